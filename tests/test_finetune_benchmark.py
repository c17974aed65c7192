"""benchmarks/finetune.py's own logic (no model runs): the FLOPs and LoRA counts it reports, the evaluator's one
tokenisation, the TRL/lorakit token accounting, and that the file stays importable in TRL's environment."""

import ast
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import finetune as F  # noqa: E402

# SmolLM2-135M's config.json fields that the benchmark reads
SMOLLM2 = {"hidden_size": 576, "num_hidden_layers": 30, "intermediate_size": 1536, "num_attention_heads": 9,
           "num_key_value_heads": 3, "vocab_size": 49152}


@pytest.fixture
def shape(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(SMOLLM2))
    return F.model_shape(str(tmp_path))


def test_lora_parameter_counts_match_lorakit_and_peft(shape):
    assert F.lora_params(shape, "qv", 8) == 460_800  # lorakit's and PEFT's trainable count for r=8 on q,v
    assert F.lora_params(shape, "all", 8) == 30 * 8 * (2 * 1152 + 2 * 768 + 3 * 2112)
    assert shape["n_blocks"] == 30 * (2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536)
    assert shape["n_head"] == 576 * 49152


def test_flops_formula(shape):
    lengths, targets = [10, 20], [4, 5]
    expected = (4 * shape["n_blocks"] * 30 + 6 * 100 * 30 + 4 * shape["n_head"] * 9
                + 6 * 30 * 576 * (100 + 400))
    assert F.epoch_flops(shape, 100, lengths, targets) == expected


class _Tok:
    """A character tokenizer with an EOS (id 0) and a two-turn chat template shaped like SmolLM2's."""

    eos_token_id = 0

    def __call__(self, text, add_special_tokens=True):
        return type("Enc", (), {"input_ids": [ord(c) for c in text.replace("<E>", "\0")]})()

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        text = "".join(f"[{m['role']}]{m['content']}<E>\n" for m in messages)
        return text + ("[assistant]" if add_generation_prompt else "")


def test_eval_tokens_mark_the_completion_and_its_end_tokens():
    tok = _Tok()
    ids, prompt_len, end = F.eval_tokens(tok, "e2e", {"prompt": "ab\n", "completion": "xyz"})
    assert ids == [97, 98, 10, 120, 121, 122, 0] and prompt_len == 3 and end == 1
    chat = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "ok"}]}
    ids, prompt_len, end = F.eval_tokens(tok, "chat", chat)
    assert "".join(map(chr, ids[prompt_len:])) == "ok\0\n" and end == 2  # the answer, <|im_end|>, newline


def test_accounting_counts_identical_examples():
    trl = {"input_ids": [[1, 2, 0], [3, 4, 0]], "labels": [[-100, 2, 0], [-100, 4, 0]]}
    lk = {"input_ids": [[1, 2, 0], [3, 5, 0]], "labels": [[-100, 2, 0], [-100, -100, 0]]}
    acc = F.accounting(trl, lk)
    assert acc["identical_input_ids"] == 1 and acc["identical_target_masks"] == 1
    assert acc["tokens"] == [6, 6] and acc["targets"] == [4, 3]
    assert acc["first_difference"] == {"example": 1, "trl": [3, 4, 0], "lorakit": [3, 5, 0]}


def test_module_level_imports_are_standard_library_only():
    """The TRL child runs this file in TRL's own environment, where neither lorakit nor this repo's extras exist."""
    tree = ast.parse(Path(F.__file__).read_text())
    names = {a.name.split(".")[0] for node in tree.body if isinstance(node, ast.Import) for a in node.names}
    names |= {node.module.split(".")[0] for node in tree.body if isinstance(node, ast.ImportFrom) and node.module}
    assert names <= set(sys.stdlib_module_names) | {"__future__"}, names


def test_run_kinds_and_table():
    assert set(F.DEFAULT_RUNS.split(",")) <= set(F.KINDS)
    assert {k["framework"] for k in F.KINDS.values()} == {"trl", "lorakit"}
    rows = {"e2e/qv/trl-fp32": {"workload": "e2e", "targets": "qv", "label": "TRL", "train_seconds": 10.0,
                                "process_seconds": 20.0, "tokens_per_s": 100.0, "eval_loss": 1.5,
                                "peak_rss_gib": 2.0, "mfu_pct": 10.0, "bf16_peak_pct": 5.0, "padding_share": 0.25,
                                "vs_trl_fp32": 1.0, "vs_trl_fastest": 0.5, "rss_vs_trl_fp32": 1.0},
            "e2e/qv/lk-bf16": {"workload": "e2e", "targets": "qv", "label": "lk", "error": "boom\nmore"},
            "chat/qv/lk-bf16": {"workload": "chat", "targets": "qv", "label": "other"}}
    lines = F.table(rows, "e2e", "qv").splitlines()
    assert len(lines) == 4 and all(line.count("|") == lines[0].count("|") for line in lines)
    assert "| TRL | 10.0 | 20.0 | 100 | 1.5000 | 2.00 | 10.0% | 5.0% | 25% | 1.00× | 0.50× | 1.00× |" in lines
    assert "failed: boom" in lines[3]


def test_every_lorakit_run_but_the_default_names_its_batching():
    for name, kind in F.KINDS.items():
        if kind["framework"] == "lorakit" and name != "lk-default":
            assert {a.split("=")[0] for a in kind["argv"] if a.startswith("data.")} == {"data.packing",
                                                                                   "data.group_by_length"}, name
    assert all(a in F.KINDS and b in F.KINDS for a, b in F.PACKING_PAIRS)


def test_packing_lines_compare_packed_with_padded_at_the_same_precision_and_order():
    row = lambda kind, tps, pad, loss: {"workload": "chat", "targets": "qv", "kind": kind, "tokens_per_s": tps,  # noqa: E731
                                        "padding_share": pad, "eval_loss": loss}
    rows = {"chat/qv/lk-fp32-packed": row("lk-fp32-packed", 260.0, 0.19, 1.2345),
            "chat/qv/lk-fp32-random": row("lk-fp32-random", 200.0, 0.37, 1.2346),
            "chat/qv/lk-packed": row("lk-packed", 400.0, 0.19, None)}  # its padded partner is missing: no line
    assert F.packing_lines(rows) == ["- packing, chat/qv: lk-fp32-packed 260 vs lk-fp32-random 200 real tokens/s = "
                                     "1.30×; padding 19% vs 37%; eval loss 1.2345 vs 1.2346."]
