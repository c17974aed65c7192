import json

import pytest
import torch

import lorakit as lk
from lorakit.errors import LorakitError
from lorakit.inference.generate import (Row, Sampling, encode_chat, encode_prompt, generate, generate_rows, read_prompts,
                               resolve_adapter_dir)

from conftest import tiny_llama
from tiny_text import make_adapter, tiny_tokenizer

PROMPTS = ["the cat is red", "hello world", "a big dog walks to the old house near the river", "what is the name",
           "two green birds sing at night", "the sun is hot"]


@pytest.fixture(scope="module")
def lm():
    model = tiny_llama()
    model.generation_config.eos_token_id = 2
    for name, seed in (("a", 1), ("b", 2)):
        make_adapter(model, name, seed)
    return model, tiny_tokenizer()


def test_mixed_batch_rows_decode_exactly_as_alone(lm):
    model, tok = lm
    adapters = ["a", "b", None, "a", "b", None]
    batch = generate(model, tok, PROMPTS, adapters, Sampling(max_new_tokens=10))
    for prompt, adapter, got in zip(PROMPTS, adapters, batch):
        alone = generate(model, tok, [prompt], adapter, Sampling(max_new_tokens=10))[0]
        assert got.token_ids == alone.token_ids and got.text == alone.text
        assert got.prompt_tokens == len(encode_prompt(tok, prompt))
    # the adapters really differ, so the check above can fail
    same_prompt = generate(model, tok, [PROMPTS[5]] * 3, ["a", "b", None], Sampling(max_new_tokens=10))
    assert len({tuple(c.token_ids) for c in same_prompt}) == 3


def test_greedy_matches_transformers_generate(lm):
    model, tok = lm
    lk.set_adapter(model, "b")
    enc = tok(PROMPTS[2], return_tensors="pt")
    with torch.no_grad():
        hf = model.generate(**enc, max_new_tokens=10, do_sample=False, pad_token_id=0)[0, enc.input_ids.shape[1]:]
    hf = hf.tolist()
    if 2 in hf:
        hf = hf[:hf.index(2)]
    ours = generate(model, tok, [PROMPTS[2]], "b", Sampling(max_new_tokens=10))[0]
    assert ours.token_ids == hf and len(hf) > 3


def test_generation_with_a_merged_adapter_matches_unmerged(lm):
    model, tok = lm
    unmerged = generate(model, tok, PROMPTS[:3], "a", Sampling(max_new_tokens=8))
    lk.merge(model, "a")
    try:
        merged = generate(model, tok, PROMPTS[:3], "a", Sampling(max_new_tokens=8))
        with pytest.raises(LorakitError, match="merged"):
            generate(model, tok, PROMPTS[:2], ["a", "b"], Sampling(max_new_tokens=2))
    finally:
        lk.unmerge(model)
    assert [c.token_ids for c in merged] == [c.token_ids for c in unmerged]


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(lm):
    model, tok = lm
    hot = Sampling(max_new_tokens=10, temperature=1.5, seed=11)
    alone = generate(model, tok, [PROMPTS[0]], "a", hot)[0]
    rows = [Row(encode_prompt(tok, PROMPTS[0]), "a", hot), Row(encode_prompt(tok, PROMPTS[3]), "b", Sampling(seed=3)),
            Row(encode_prompt(tok, PROMPTS[0]), "a", Sampling(max_new_tokens=10, temperature=1.5, seed=12))]
    batch = generate_rows(model, tok, rows)
    assert batch[0].token_ids == alone.token_ids
    assert batch[2].token_ids != alone.token_ids  # another seed, another sample
    greedy = generate(model, tok, [PROMPTS[4]], "b", Sampling(max_new_tokens=10))[0]
    top1 = generate(model, tok, [PROMPTS[4]], "b", Sampling(max_new_tokens=10, temperature=0.7, top_k=1, seed=0))[0]
    tiny_p = generate(model, tok, [PROMPTS[4]], "b",
                      Sampling(max_new_tokens=10, temperature=0.7, top_p=1e-6, seed=0))[0]
    assert top1.token_ids == greedy.token_ids == tiny_p.token_ids


def test_streamed_pieces_add_up_to_the_answer(lm):
    model, tok = lm
    pieces: dict[int, list[str]] = {}
    out = generate(model, tok, PROMPTS, ["a", "b", None] * 2, Sampling(max_new_tokens=10),
                   on_text=lambda i, t: pieces.setdefault(i, []).append(t))
    for i, c in enumerate(out):
        assert "".join(pieces.get(i, [])) == c.text
    assert max(len(p) for p in pieces.values()) > 3  # token by token, not at the end


def test_stop_strings_cut_the_answer(lm):
    model, tok = lm
    full = generate(model, tok, [PROMPTS[0]], None, Sampling(max_new_tokens=12))[0]
    words = full.text.split()
    assert len(words) > 4
    stop = " ".join(words[2:4])
    cut = generate(model, tok, [PROMPTS[0]], None, Sampling(max_new_tokens=12, stop=[stop]))[0]
    assert cut.finish_reason == "stop" and cut.text == full.text[:full.text.index(stop)]
    assert full.finish_reason == "length" and len(full.token_ids) == 12


def test_chat_prompts_use_the_template(lm):
    model, tok = lm
    ids = encode_chat(tok, [{"role": "user", "content": "hello world"}])
    assert tok.decode(ids) == "<|user|> hello world </s> <|assistant|>"
    via_generate = generate(model, tok, ["hello world"], "a", Sampling(max_new_tokens=6), chat=True)[0]
    assert via_generate.token_ids == generate_rows(model, tok, [Row(ids, "a", Sampling(max_new_tokens=6))])[0].token_ids


def test_bad_settings_are_reported_together():
    with pytest.raises(LorakitError) as info:
        Sampling(max_new_tokens=0, temperature=-1, top_p=0, top_k=-2)
    for field in ("max_new_tokens", "temperature", "top_p", "top_k"):
        assert field in str(info.value)


def test_unknown_adapter_and_empty_prompt_are_errors(lm):
    model, tok = lm
    with pytest.raises(LorakitError, match="nosuch"):
        generate(model, tok, ["hello"], "nosuch")
    with pytest.raises(LorakitError, match="empty prompt"):
        generate_rows(model, tok, [Row([], None)])


def test_prompt_files_and_adapter_lookup(tmp_path):
    (tmp_path / "p.txt").write_text("first prompt\n\nsecond prompt\n")
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "one"}) + "\n" + json.dumps("two") + "\n")
    assert read_prompts(tmp_path / "p.txt") == ["first prompt", "second prompt"]
    assert read_prompts(tmp_path / "p.jsonl") == ["one", "two"]
    (tmp_path / "adapters" / "mine").mkdir(parents=True)
    assert resolve_adapter_dir("mine", tmp_path / "adapters") == tmp_path / "adapters" / "mine"
    assert resolve_adapter_dir(str(tmp_path / "adapters" / "mine"), None) == tmp_path / "adapters" / "mine"
    (tmp_path / "outside").mkdir()
    with pytest.raises(LorakitError, match="not found"):
        resolve_adapter_dir("../outside", tmp_path / "adapters" / "mine")


def test_generate_command_streams_a_prompt_and_answers_a_file(tmp_path):
    from typer.testing import CliRunner

    from lorakit.cli.main import app
    from tiny_text import save_tiny_lm

    save_tiny_lm(tmp_path / "base")
    model, tok = lk.load_model(str(tmp_path / "base"))
    make_adapter(model, "default", seed=1)
    lk.save_adapter(model, tmp_path / "adapters" / "mine")
    expected = generate(model, tok, [PROMPTS[0]], "default", Sampling(max_new_tokens=8), chat=True)[0].text
    common = ["--model", str(tmp_path / "base"), "--adapter", "mine", "--adapters-dir", str(tmp_path / "adapters"),
              "--max-new-tokens", "8"]
    result = CliRunner().invoke(app, ["generate", PROMPTS[0], *common])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == expected.strip()
    (tmp_path / "prompts.txt").write_text(PROMPTS[0] + "\n" + PROMPTS[1] + "\n")
    result = CliRunner().invoke(app, ["generate", "--prompts-file", str(tmp_path / "prompts.txt"), *common])
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["prompt"] for line in lines] == PROMPTS[:2] and lines[0]["output"] == expected
    result = CliRunner().invoke(app, ["generate", "--chat", *common], input=PROMPTS[0] + "\n\n")
    assert result.exit_code == 0 and "model: " + expected in result.stdout


@pytest.fixture
def one_thread():
    """On the shared 2-core machine two intra-op threads make each SmolLM2 forward ~10x slower than one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_real_model_mixed_batch_with_chat_template_matches_alone(one_thread):
    model, tok = lk.load_model()
    gen = torch.Generator().manual_seed(0)
    for name in ("x", "y"):
        lk.add_lora(model, lk.LoraConfig(r=8, alpha=16), adapter=name)
        with torch.no_grad():
            for _, layer in lk.lora_layers(model):
                if name in layer.adapters:
                    layer.lora_B[name].weight.copy_(torch.randn(layer.lora_B[name].weight.shape, generator=gen) * 0.01)
    prompts = ["Name a fruit.", "Say hello in Spanish.", "What is the capital of France?"]
    adapters = ["x", "y", None]
    batch = generate(model, tok, prompts, adapters, Sampling(max_new_tokens=8), chat=True)
    for prompt, adapter, got in zip(prompts, adapters, batch):
        alone = generate(model, tok, [prompt], adapter, Sampling(max_new_tokens=8), chat=True)[0]
        assert got.token_ids == alone.token_ids
    assert "Paris" in batch[2].text  # the chat template is applied: the instruct model answers


def test_streamed_text_waits_for_whole_characters_and_possible_stop_strings():
    from lorakit.inference.sampling import RowText

    pieces = {1: b"Hola", 2: b" \xf0\x9f", 3: b"\x98\x8a", 4: b" EN", 5: b"D", 6: b"!"}

    class ByteLevel:  # decode() of a byte-level tokenizer: half an emoji decodes to U+FFFD
        def decode(self, ids, skip_special_tokens=True):
            return b"".join(pieces[i] for i in ids).decode("utf-8", errors="replace")

    row = RowText(ByteLevel(), stop=["END"])
    assert [row.add(t) for t in (1, 2, 3, 4, 5)] == [("Ho", False), ("", False), ("la", False), (" \U0001F60A ", False),
                                                     ("", True)]
    assert row.emitted_text == "Hola \U0001F60A "
    cut = RowText(ByteLevel(), stop=[])
    assert [cut.add(1), cut.add(2), cut.finish()] == [("Hola", False), ("", False), " "]  # half a character dropped
    whole = RowText(ByteLevel(), stop=[])
    assert "".join(whole.add(t)[0] for t in (1, 2, 3, 4, 5, 6)) + whole.finish() == "Hola \U0001F60A END!"
