"""An interactive chat: the conversation so far, rendered with the tokenizer's chat template, answered turn by turn.

    messages = chat(model, tokenizer, read_line=input, write=print_no_newline, adapter="default")

`chat_turn` is one exchange (for a UI of your own); `chat` loops until an empty line or the end of input.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from lorakit.inference.generate import Completion, Row, encode_chat, generate_rows
from lorakit.inference.sampling import Sampling

Message = dict[str, str]


def chat_turn(model: nn.Module, tokenizer, messages: list[Message], text: str, adapter: str | None = None,
              sampling: Sampling | None = None, on_text: Callable[[str], None] | None = None) -> Completion:
    """Append the user's `text` and the model's answer (streamed to `on_text` as it grows) to `messages`."""
    messages.append({"role": "user", "content": text})
    row = Row(encode_chat(tokenizer, messages), adapter, sampling or Sampling())
    stream = None if on_text is None else (lambda _row, delta: on_text(delta))
    answer = generate_rows(model, tokenizer, [row], stream)[0]
    messages.append({"role": "assistant", "content": answer.text})
    return answer


def chat(model: nn.Module, tokenizer, read_line: Callable[[], str], write: Callable[[str], None],
         adapter: str | None = None, sampling: Sampling | None = None,
         messages: list[Message] | None = None) -> list[Message]:
    """Read a user line, stream the answer to `write` after "model: ", repeat; an empty line or EOFError ends it.

    Returns the whole conversation (starting with `messages`, e.g. a system message, when given).
    """
    messages = list(messages or [])
    encode_chat(tokenizer, messages or [{"role": "user", "content": ""}])  # no chat template: say so before reading
    while True:
        try:
            line = read_line()
        except EOFError:
            break
        if not line.strip():
            break
        write("model: ")
        chat_turn(model, tokenizer, messages, line, adapter, sampling, write)
        write("\n")
    return messages
