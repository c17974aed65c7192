"""The training config and the one validation pattern of every config: problems() per dataclass, one error listing
every problem (nested sections and unknown keys included), YAML round trip and dotted overrides."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from lorakit.data.records import DataConfig
from lorakit.errors import LorakitError
from lorakit.lora.config import LoraConfig
from lorakit.train import OptimConfig, TrainConfig, apply_override


def test_yaml_with_overrides_and_saved_resolved_config(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"seed": 3, "optim": {"lr": "2e-4", "epochs": 2}, "lora": {"r": 4},
                                    "data": {"train_file": "x.jsonl"}}))
    cfg = TrainConfig.from_yaml(path, {"optim.lr": "1e-3", "lora.target_modules": ["q_proj"], "eval_every": "5"})
    assert cfg.seed == 3 and cfg.optim.lr == 1e-3 and cfg.optim.epochs == 2 and cfg.eval_every == 5
    assert cfg.lora.r == 4 and cfg.lora.target_modules == ["q_proj"]
    assert TrainConfig.from_yaml(path).optim.lr == 2e-4  # "2e-4" is a string in YAML 1.1; floats are coerced
    again = tmp_path / "again.yaml"
    again.write_text(cfg.to_yaml())
    assert TrainConfig.from_yaml(again) == cfg


def test_unknown_keys_and_bad_values_are_reported_together(tmp_path):
    with pytest.raises(LorakitError) as err:
        TrainConfig.from_dict({"lerning_rate": 1, "optim": {"lr": -1, "batch_size": 0, "bogus": 1},
                               "data": {"format": "tsv"}, "lora": {"r": 0}, "precision": "fp8"})
    msg = str(err.value)
    for part in ("['lerning_rate']", "['optim.bogus']", "optim.lr", "optim.batch_size", "data.format",
                 "lora.r must be a positive integer", "precision", "allowed in optim"):
        assert part in msg, part


def test_nonfinite_settings_are_validated():
    with pytest.raises(LorakitError, match=r"(?s)on_nonfinite must be one of \('stop', 'skip'\).*max_skipped_steps must be"):
        TrainConfig.from_dict({"on_nonfinite": "ignore", "max_skipped_steps": 0})


def test_every_problem_in_every_section_is_one_error_naming_dotted_keys():
    with pytest.raises(LorakitError) as err:
        TrainConfig.from_dict({"seed": -1, "tensorboard": "yes",
                               "data": {"max_length": 1, "chat_template": 3, "colour": "red"},
                               "lora": {"alpha": 0, "dropout": 2.0, "rank": 8},
                               "optim": {"eps": 0, "warmup_ratio": 2}})
    lines = str(err.value).splitlines()
    assert lines[0] == "Invalid training config:" and lines[-1].startswith("Fix these keys")
    problems = [line[4:] for line in lines[1:-1]]
    assert len(problems) == 10, problems
    starts = ["Unknown DataConfig key(s) ['data.colour']", "Unknown LoraConfig key(s) ['lora.rank']", "seed must",
              "tensorboard must", "data.max_length must", "data.chat_template must", "lora.alpha must",
              "lora.dropout must", "optim.eps must", "optim.warmup_ratio must"]
    assert sorted(p[:len(s)] for p, s in zip(sorted(problems), sorted(starts))) == sorted(starts)


def test_each_config_validates_on_construction_with_the_same_pattern():
    for make, title, key in ((lambda: LoraConfig(r=0), "Invalid LoraConfig", "r must"),
                             (lambda: DataConfig(max_length=0), "Invalid data config", "data.max_length must"),
                             (lambda: OptimConfig(lr=0), "Invalid training config", "optim.lr must"),
                             (lambda: TrainConfig(keep_last=0), "Invalid training config", "keep_last must")):
        with pytest.raises(LorakitError) as err:
            make()
        assert str(err.value).startswith(title + ":\n  - " + key)
    for config in (LoraConfig(), DataConfig(), OptimConfig(), TrainConfig()):
        assert config.problems() == []


def test_problems_name_keys_with_the_given_prefix():
    lora = LoraConfig()
    lora.r = 0  # problems() reads the current values; it never raises
    assert lora.problems() == ["r must be a positive integer, got 0"]
    assert lora.problems("lora.") == ["lora.r must be a positive integer, got 0"]
    optim = OptimConfig()
    optim.batch_size = 0
    assert optim.problems() == ["optim.batch_size must be a positive integer, got 0"]
    config = TrainConfig()
    config.optim = optim
    assert config.problems() == ["optim.batch_size must be a positive integer, got 0"]


def test_sections_must_be_mappings_and_sections_of_the_right_type():
    with pytest.raises(LorakitError, match=r"optim must be a mapping of keys to values, got int"):
        TrainConfig.from_dict({"optim": 5})
    with pytest.raises(LorakitError, match=r"lora must be a LoraConfig, got dict"):
        TrainConfig(lora={"r": 4})
    with pytest.raises(LorakitError, match=r"Invalid LoraConfig:\n  - LoraConfig must be a mapping"):
        LoraConfig.from_dict(["r", 4])
    assert TrainConfig.from_dict({"optim": None}).optim == OptimConfig()  # an empty YAML section keeps the defaults


def test_lora_from_dict_reports_unknown_keys_and_bad_values_together():
    with pytest.raises(LorakitError) as err:
        LoraConfig.from_dict({"rank": 8, "r": 0, "init": "xavier"})
    msg = str(err.value)
    assert msg.count("\n  - ") == 3 and "Unknown LoraConfig key(s) ['rank']" in msg and "init must be one of" in msg
    assert LoraConfig.from_dict({"r": 4, "target_modules": ("q_proj", "v_proj"), "layers": 1}) == \
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], layers=[1])


def test_building_does_not_leak_deferred_checks():
    with pytest.raises(LorakitError):
        TrainConfig.from_dict({"lora": {"r": 0}})
    with pytest.raises(LorakitError, match="r must be a positive integer"):
        LoraConfig(r=0)  # after a failed build, construction checks again


def test_overrides_parse_yaml_scalars_and_refuse_setting_inside_a_value():
    data = {"optim": {"lr": 1.0}}
    apply_override(data, "optim.lr", "3e-4")
    apply_override(data, "lora.target_modules", "[q_proj, v_proj]")
    apply_override(data, "optim.max_grad_norm", "null")
    assert data == {"optim": {"lr": 3e-4, "max_grad_norm": None}, "lora": {"target_modules": ["q_proj", "v_proj"]}}
    with pytest.raises(LorakitError, match=r"Cannot set 'optim.lr.x': 'lr' is not a section"):
        apply_override(data, "optim.lr.x", "1")


def test_every_training_field_has_a_docstring():
    """The CLI generates its options and their help from these docstrings."""
    import ast
    import inspect
    import textwrap

    undocumented = {}
    for cls in (TrainConfig, OptimConfig):
        body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
        documented = {a.target.id for a, doc in zip(body, body[1:]) if isinstance(a, ast.AnnAssign)
                      and isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant)}
        undocumented[cls.__name__] = sorted({f.name for f in dataclasses.fields(cls)} - documented)
    assert undocumented == {"TrainConfig": [], "OptimConfig": []}
