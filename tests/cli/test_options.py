"""The command options generated from the config dataclasses: every training key is reachable, help is the field's
docstring, values reach the config, and bad values get the config's own error message."""

import json

import pytest
import typer

import lorakit.eval.evaluate as evaluate_module
import lorakit.serve.server as server_module
import lorakit.train
from lorakit.cli import main as cli
from lorakit.cli.main import TRAIN_FLAGS, app, main, set_overrides
from lorakit.cli.options import Flag, config_fields, config_options, field_docs
from lorakit.errors import LorakitError
from lorakit.eval.evaluate import EvalConfig
from lorakit.serve.config import ServeConfig
from lorakit.train import OptimConfig, TrainConfig, TrainResult


def run(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def click_options(command: str) -> dict[str, object]:
    return {p.name: p for p in typer.main.get_command(app).commands[command].params}


def test_field_docs_are_the_string_after_each_field():
    class Example:
        plain: int = 1
        documented: str = "x"
        """First line,
        second   line."""
        after: float = 0.5
        """Only its own."""

    assert field_docs(Example) == {"documented": "First line, second line.", "after": "Only its own."}
    assert field_docs(OptimConfig)["max_grad_norm"] == "Clip the gradient norm to this (None: no clipping)."


def test_every_train_key_has_a_flag_with_its_docstring_or_is_reachable_by_set():
    flags = {f.key: f for f in TRAIN_FLAGS}
    options = click_options("train")
    with_flag, by_set = [], []
    for field in config_fields(TrainConfig):
        if field.key in flags:
            option = options[flags[field.key].param]
            assert option.help == field.doc and option.help, field.key
            with_flag.append(field.key)
            continue
        value = list(field.default) if isinstance(field.default, tuple) else field.default
        overrides = set_overrides([f"{field.key}={json.dumps(value)}"])
        config = TrainConfig.from_yaml(None, overrides)
        section, _, name = field.key.rpartition(".")
        got = config.to_dict()[section][name] if section else config.to_dict()[name]
        assert got == value, field.key
        by_set.append(field.key)
    assert len(with_flag) == len(TRAIN_FLAGS) and len(by_set) > 20  # e.g. optim.betas, lora.rank_pattern


def test_train_help_shows_the_generated_options_with_their_docs(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")
    code, out, _ = run(["train", "--help"], capsys)
    assert code == 0
    for flag in ("--lr", "--max-steps", "--train-file", "--target-modules", "--no-gradient-checkpointing", "--set",
                 "--config", "--resume", "--use-dora"):
        assert flag in out
    assert "Micro-batches per optimizer step; the loss is averaged over all their target tokens." in out
    assert "optim.grad_accum=1" in out  # the config key and its default
    assert "lora.* settings" in out


@pytest.fixture
def captured_train(monkeypatch, tmp_path):
    seen = {}

    def fake_train(config, resume=None, show_example_first=False):
        seen["config"] = config
        return TrainResult(run_dir=tmp_path, adapter_dir=tmp_path / "adapter", best_dir=None, steps=0, metrics={},
                           history=[], summary={})

    monkeypatch.setattr(lorakit.train, "train", fake_train)
    return seen


def test_train_flags_and_set_reach_the_config(captured_train, capsys, tmp_path):
    code, out, err = run(["train", "--lr", "1e-3", "--target-modules", "q_proj,v_proj", "--gradient-checkpointing",
                          "--max-steps", "3", "--use-dora", "--set", "optim.betas=[0.8, 0.9]",
                          "--set", "lora.rank_pattern={q_proj: 2}", "--output-dir", str(tmp_path / "run")], capsys)
    assert code == 0, err
    config = captured_train["config"]
    assert (config.optim.lr, config.optim.max_steps, config.lora.use_dora, config.gradient_checkpointing) == \
        (1e-3, 3, True, True)
    assert config.lora.target_modules == ["q_proj", "v_proj"] and config.optim.betas == (0.8, 0.9)
    assert config.lora.rank_pattern == {"q_proj": 2} and config.output_dir == str(tmp_path / "run")
    assert config.seed == 0 and config.data.max_length == 512  # flags not given leave the config's defaults


def test_yaml_values_stay_unless_a_flag_overrides_them(captured_train, capsys, tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("seed: 7\noptim: {lr: 0.5, batch_size: 2}\nlora: {r: 2}\n")
    code, _, err = run(["train", "-c", str(cfg), "--lr", "0.01", "--no-gradient-checkpointing"], capsys)
    assert code == 0, err
    config = captured_train["config"]
    assert (config.seed, config.optim.lr, config.optim.batch_size, config.lora.r) == (7, 0.01, 2, 2)


@pytest.mark.parametrize("argv, key, value", [
    (["--precision", "fp8"], "precision", "fp8"),
    (["--lr", "-1"], "optim.lr", -1.0),
    (["--r", "0"], "lora.r", 0),
    (["--format", "tsv"], "data.format", "tsv"),
    (["--target-modules", "(q_proj"], "lora.target_modules", "(q_proj"),  # not a valid regex
    (["--set", "optim.lerning_rate=1"], "optim.lerning_rate", 1),
])
def test_bad_values_get_the_configs_own_message(captured_train, capsys, argv, key, value):
    with pytest.raises(LorakitError) as expected:
        TrainConfig.from_yaml(None, {key: value})
    code, _, err = run(["train", *argv], capsys)
    assert code == 2 and err == f"error: {expected.value}\n"
    assert "config" not in captured_train


def test_set_needs_key_and_value(captured_train, capsys):
    code, _, err = run(["train", "--set", "=1"], capsys)
    assert code == 2 and "--set expects KEY=VALUE (e.g. optim.lr=1e-4), got '=1'" in err


def test_serve_options_come_from_serve_config(monkeypatch, capsys):
    seen = []
    monkeypatch.setattr(server_module, "serve", seen.append)
    monkeypatch.delenv("LORAKIT_ADMIN_TOKEN", raising=False)
    assert run(["serve", "--adapter", "a", "--adapter", "b", "--port", "9000", "--max-adapter-mb", "5"], capsys)[0] == 0
    assert run(["serve"], capsys)[0] == 0
    assert seen[0] == ServeConfig(adapters=["a", "b"], port=9000, max_adapter_mb=5.0)
    assert seen[1] == ServeConfig()  # no --adapter: every adapter folder
    monkeypatch.setenv("LORAKIT_ADMIN_TOKEN", "secret-token")
    assert run(["serve"], capsys)[0] == 0 and seen[2].admin_token == "secret-token"
    code, _, err = run(["serve", "--port", "70000"], capsys)
    assert code == 2 and "port must be in 0..65535, got 70000" in err
    options = click_options("serve")
    for field in config_fields(ServeConfig):
        name = "adapter" if field.key == "adapters" else field.key
        assert options[name].help == field.doc, field.key


def test_eval_options_come_from_eval_config(monkeypatch, capsys):
    seen = []
    monkeypatch.setattr(evaluate_module, "evaluate_many", lambda config, **kw: seen.append((config, kw)) or
                        {"results": []})
    monkeypatch.setattr(evaluate_module, "results_table", lambda results: "table")
    code, out, err = run(["eval", "runs/a", "--task", "sst2", "--num-beams", "2", "--limit", "3", "--bf16",
                          "--no-base"], capsys)
    assert code == 0 and out.strip() == "table", err
    config, kw = seen[0]
    assert (config.task, config.limit, config.generation.num_beams, config.generation.bf16) == ("sst2", 3, 2, True)
    assert config.generation.max_new_tokens == 64 and kw["include_base"] is False and kw["adapters"] == ["runs/a"]
    code, _, err = run(["eval", "--decoding", "sample"], capsys)
    assert code == 2 and "decoding must be one of" in err
    assert click_options("eval")["num_beams"].help == field_docs(type(EvalConfig().generation))["num_beams"]


def test_every_generated_option_has_its_fields_docstring_as_help():
    """A flag on an undocumented field would have no help: document the field in its dataclass."""
    command = typer.main.get_command(app)
    for name in ("train", "eval", "serve", "generate", "inspect"):
        for param in command.commands[name].params:
            assert param.help, f"lorakit {name} {param.opts}: no help (a config field without a docstring?)"


def test_generator_refuses_unknown_keys_and_types_without_an_option():
    def command(*, values):
        return values

    with pytest.raises(TypeError, match="optim.betas"):
        config_options(TrainConfig, [Flag("optim.betas")])(command)
    with pytest.raises(KeyError, match="optim.nope"):
        config_options(TrainConfig, [Flag("optim.nope")])(command)
    wrapped = config_options(TrainConfig, [Flag("seed"), Flag("lora.r")], defaults=False)(command)
    assert wrapped(seed=None, r=4) == {"lora.r": 4}
    assert cli.set_overrides(["a.b=c=d"]) == {"a.b": "c=d"}
