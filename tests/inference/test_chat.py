"""lorakit.inference.chat: the conversation grows turn by turn, each answer streamed and equal to a fresh decode of
the same history; an empty line or the end of input ends it; no chat template is refused before reading."""

import pytest

from lorakit.errors import LorakitError
from lorakit.inference.chat import chat, chat_turn
from lorakit.inference.generate import Row, encode_chat, generate_rows
from lorakit.inference.sampling import Sampling

from conftest import tiny_llama
from tiny_text import make_adapter, tiny_tokenizer

SAMPLING = Sampling(max_new_tokens=4)


@pytest.fixture(scope="module")
def model():
    return make_adapter(tiny_llama(), "style", seed=3)


def test_chat_streams_each_answer_and_keeps_the_history(model):
    tok = tiny_tokenizer()
    lines, written = iter(["hello cat", "where is the dog", ""]), []
    messages = chat(model, tok, lambda: next(lines), written.append, adapter="style", sampling=SAMPLING)
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    first = generate_rows(model, tok, [Row(encode_chat(tok, messages[:1]), "style", SAMPLING)])[0]
    second = generate_rows(model, tok, [Row(encode_chat(tok, messages[:3]), "style", SAMPLING)])[0]
    assert (messages[1]["content"], messages[3]["content"]) == (first.text, second.text)
    assert "".join(written) == f"model: {first.text}\nmodel: {second.text}\n"


def test_chat_turn_uses_the_adapter_and_eof_ends_the_chat(model):
    tok = tiny_tokenizer()
    history = [{"role": "system", "content": "be brief"}]
    base = chat_turn(model, tok, list(history), "hello cat", sampling=SAMPLING)  # adapter None: the base
    streamed = []
    adapted = chat_turn(model, tok, history, "hello cat", adapter="style", sampling=SAMPLING,
                        on_text=streamed.append)
    assert "".join(streamed) == adapted.text and history[-1] == {"role": "assistant", "content": adapted.text}
    assert adapted.token_ids != base.token_ids

    def eof():
        raise EOFError

    assert chat(model, tok, eof, print, messages=history[:1]) == history[:1]


def test_a_tokenizer_without_chat_template_is_refused_before_reading(model):
    tok = tiny_tokenizer()
    tok.chat_template = None

    def never():
        raise AssertionError("read a line although the chat cannot run")

    with pytest.raises(LorakitError, match="no chat template"):
        chat(model, tok, never, print)
