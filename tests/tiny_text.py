"""A tiny word-level tokenizer with a chat template, built in-process (no downloads), for conftest's tiny_llama."""

from __future__ import annotations

from pathlib import Path

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>"]  # ids 0..6 (bos 1, eos 2)
WORDS = ("the a an is was to of and in on at for with cat dog bird fish tree house car road city river sky sun moon "
         "star red blue green big small old new fast slow good bad hot cold one two three four five six seven eight "
         "nine ten hello world yes no please thanks what where when who why how name food drink eat run walk sing "
         "read write play sleep day night happy sad up down left right open close pub cafe price high low near far "
         ).split()
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} </s> {% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(SPECIALS + WORDS))}
    assert len(vocab) <= 97, "tiny_llama has 97 token ids"
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", chat_template=CHAT_TEMPLATE,
                                   additional_special_tokens=SPECIALS[4:])


def save_tiny_lm(path: Path, seed: int = 0, **sizes) -> Path:
    """A tiny Llama plus tokenizer saved as a Hugging Face model folder (`sizes`: hidden_size, intermediate_size)."""
    from conftest import tiny_llama

    model = tiny_llama(seed, **sizes)
    model.generation_config.eos_token_id = 2
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def make_adapter(model, name: str, seed: int, std: float = 0.5):
    """Add a LoRA adapter on q,v with random non-zero B so it changes the outputs."""
    import lorakit as lk
    from conftest import randomize_lora_B

    lk.add_lora(model, lk.LoraConfig(r=4, alpha=8), adapter=name)
    randomize_lora_B(model, name, std=std, seed=seed)
    return model
