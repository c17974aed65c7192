"""The sweep runner (benchmarks/sweep.py) with a fake run in place of training: a killed sweep resumes without
redoing or losing runs, the lr is chosen on the select split only, and the report's mean ± std are right; and the
WebNLG/DART train/test cut (benchmarks/data2text.py)."""

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import data2text  # noqa: E402
import sweep  # noqa: E402

# select accuracy by lr (lr 0.01 best on select) and test accuracy (lr 0.1 would be best on test: must not be chosen)
SELECT = {0.001: 70.0, 0.01: 80.0, 0.1: 60.0}
TEST = {0.001: 71.0, 0.01: 75.0, 0.1: 90.0}


def _cfg(**over):
    cfg = {"name": "t", "model": "m", "kind": "glue", "tasks": ["sst2"],
           "methods": {"lora": {"lr": [0.001, 0.01, 0.1], "lora": {"r": 2}}, "full": {"lr": [0.001]}},
           "budget": {"steps": 3, "batch_size": 2}, "split": {"select": 4}, "eval": {}, "seeds": [0, 1, 2],
           "select_seeds": [0]}
    return {**cfg, **over}


class Killed(Exception):
    pass


def _fake(calls, kill_after=None):
    def execute(cfg, spec):
        if kill_after is not None and len(calls) == kill_after:
            raise Killed
        calls.append(spec.run_id)
        return {"trainable_params": 10 if spec.method == "lora" else 100, "trainable_pct": 1.0,
                "train_seconds": 2.0 + spec.seed, "select": {"accuracy": SELECT[spec.lr] + spec.seed},
                "test": {"accuracy": TEST[spec.lr] + spec.seed}}
    return execute


def _expected_ids(cfg):
    grid = [f"sst2/{m}/lr={lr:g}/seed=0" for m, spec in cfg["methods"].items() for lr in spec["lr"]]
    seeds = [f"sst2/lora/lr=0.01/seed={s}" for s in (1, 2)] + [f"sst2/full/lr=0.001/seed={s}" for s in (1, 2)]
    return set(grid + seeds)


def test_a_killed_sweep_continues_where_it_stopped_and_runs_everything_once(tmp_path):
    cfg, rows_file, claims = _cfg(), tmp_path / "t.runs.jsonl", tmp_path / "claims"
    calls = []
    with pytest.raises(Killed):
        sweep.sweep(cfg, rows_file, claims, _fake(calls, kill_after=2), say=lambda m: None)
    assert len(sweep.read_rows(rows_file)) == 2 and not list(claims.iterdir())  # the claim of the killed run is freed
    # a SIGKILL leaves the claim behind, with a pid that no longer runs; and a row cut short mid-write
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (claims / "sst2__lora__lr=0.1__seed=0").write_text(str(dead.pid))
    with rows_file.open("a") as fh:
        fh.write('{"run_id": "sst2/lora/lr=0.1/seed=0", "task": "ss')
    assert sweep.sweep(cfg, rows_file, claims, _fake(calls), say=lambda m: None) == 6
    rows = sweep.current_rows(cfg, sweep.read_rows(rows_file))
    assert len(calls) == len(set(calls)) == 8 and set(calls) == {r["run_id"] for r in rows} == _expected_ids(cfg)
    assert sweep.sweep(cfg, rows_file, claims, _fake(calls), say=lambda m: None) == 0  # nothing left
    # method by method: lora's grid, lora's seeds at its chosen lr, then full
    assert calls == ["sst2/lora/lr=0.001/seed=0", "sst2/lora/lr=0.01/seed=0", "sst2/lora/lr=0.1/seed=0",
                     "sst2/lora/lr=0.01/seed=1", "sst2/lora/lr=0.01/seed=2", "sst2/full/lr=0.001/seed=0",
                     "sst2/full/lr=0.001/seed=1", "sst2/full/lr=0.001/seed=2"]


def test_a_run_claimed_by_a_live_worker_is_left_to_it(tmp_path):
    spec = sweep.RunSpec("sst2", "full", 0.001, 0, "grid")
    claims = tmp_path / "claims"
    claims.mkdir()
    (claims / spec.run_id.replace("/", "__")).write_text(str(os.getppid()))  # a live process that is not us
    assert sweep.claim(claims, spec) is None
    assert sweep.claim(claims, sweep.RunSpec("sst2", "full", 0.001, 1, "grid")) is not None


def test_rows_of_other_settings_do_not_count(tmp_path):
    cfg, rows_file = _cfg(), tmp_path / "t.runs.jsonl"
    calls = []
    sweep.sweep(cfg, rows_file, tmp_path / "c", _fake(calls), say=lambda m: None)
    longer = _cfg(budget={"steps": 30, "batch_size": 2})
    assert sweep.current_rows(longer, sweep.read_rows(rows_file)) == []
    assert sweep.current_rows(cfg, sweep.read_rows(rows_file)) != []
    assert sweep.settings_hash(cfg, "sst2", "lora") == sweep.settings_hash(
        {**cfg, "methods": {**cfg["methods"], "lora": {**cfg["methods"]["lora"], "lr": [5.0]}}}, "sst2", "lora")


def test_the_lr_is_chosen_on_the_select_split_and_seeds_are_aggregated(tmp_path):
    cfg, rows_file = _cfg(), tmp_path / "t.runs.jsonl"
    sweep.sweep(cfg, rows_file, tmp_path / "c", _fake([]), say=lambda m: None)
    agg = sweep.aggregate(cfg, sweep.read_rows(rows_file))
    lora = agg["results"]["sst2 lora"]
    assert lora["chosen_lr"] == 0.01 and lora["seeds"] == [0, 1, 2]  # not 0.1, the best on test
    mean, std, n = lora["test"]["accuracy"]
    assert (mean, n) == (76.0, 3) and std == pytest.approx(statistics.stdev([75.0, 76.0, 77.0]))
    assert lora["grid"] == {"0.001": 70.0, "0.01": 80.0, "0.1": 60.0} and lora["trainable_params"] == 10
    assert agg["missing_runs"] == [] and agg["not_yet_planned"] == []
    report = sweep.write_report(cfg, rows_file, tmp_path, "t.yaml")
    md = (tmp_path / "t.md").read_text()
    assert "| sst2 | lora | 10 (1.00%) | 0.01 (accuracy 80.00) | 0,1,2 | 76.00 ± 1.00 |" in md
    assert report["results"]["sst2 full"]["test"]["accuracy"] == {"mean": 72.0, "std": 1.0, "n": 3}
    assert json.loads((tmp_path / "t.json").read_text())["runs"] == 8


def test_every_method_is_tested_against_the_reference_with_welchs_t_test(tmp_path):
    from scipy import stats

    cfg, rows_file = _cfg(), tmp_path / "t.runs.jsonl"
    sweep.sweep(cfg, rows_file, tmp_path / "c", _fake([]), say=lambda m: None)
    (full,) = sweep.aggregate(cfg, sweep.read_rows(rows_file))["comparisons"]  # lora is the first method
    assert (full["method"], full["reference"]) == ("full", "lora")
    # by hand: full 71, 72, 73 against lora 75, 76, 77 -> t = -4 / sqrt(1/3 + 1/3), Welch-Satterthwaite df = 4
    t = -4.0 / ((1 / 3 + 1 / 3) ** 0.5)
    assert full["metrics"]["accuracy"]["delta"] == pytest.approx(-4.0)
    assert full["metrics"]["accuracy"]["p"] == pytest.approx(2 * stats.t.sf(abs(t), 4))
    md = sweep.report_markdown(cfg, sweep.aggregate(cfg, sweep.read_rows(rows_file)), "t.yaml")
    assert "| sst2 | lora | 75.00 / 76.00 / 77.00 | — |" in md
    assert f"| sst2 | full | 71.00 / 72.00 / 73.00 | -4.00 ({2 * stats.t.sf(abs(t), 4):.3f}) |" in md
    assert sweep.welch_p([1.0], [2.0, 3.0]) != sweep.welch_p([1.0], [2.0, 3.0])  # NaN with one seed
    with pytest.raises(SystemExit, match="compare_to: 'dora' is not a method"):
        sweep.aggregate({**cfg, "compare_to": "dora"}, sweep.read_rows(rows_file))


def test_a_bf16_budget_is_refused_where_bf16_is_slow_and_fp32_always_runs():
    cfg = _cfg(budget={"steps": 3, "batch_size": 2, "precision": "bf16"})
    with pytest.raises(SystemExit, match=r"bf16 matmul runs at 0.01x .* set `precision: fp32`"):
        sweep.check_precision(cfg, "t.yaml", speedup=lambda: 0.014)
    sweep.check_precision(cfg, "t.yaml", speedup=lambda: 2.3)  # AVX512-BF16: runs
    sweep.check_precision(_cfg(), "t.yaml", speedup=lambda: 0.014)  # fp32 never asks


def test_a_partial_grid_chooses_nothing_and_the_report_says_what_is_missing(tmp_path):
    cfg, rows_file = _cfg(), tmp_path / "t.runs.jsonl"
    sweep.sweep(cfg, rows_file, tmp_path / "c", _fake([]), max_runs=2, say=lambda m: None)
    agg = sweep.aggregate(cfg, sweep.read_rows(rows_file))
    assert agg["results"]["sst2 lora"]["chosen_lr"] is None and "test" not in agg["results"]["sst2 lora"]
    assert agg["missing_runs"] == ["sst2/lora/lr=0.1/seed=0", "sst2/full/lr=0.001/seed=0"]  # seeds wait
    assert "grid not complete" in sweep.report_markdown(cfg, agg, "t.yaml")


def test_a_setting_run_by_another_sweep_is_reused_only_when_every_setting_is_the_same(tmp_path):
    import yaml

    first = _cfg(name="first")
    sweep.sweep(first, tmp_path / "first.runs.jsonl", tmp_path / "c1", _fake([]), say=lambda m: None)
    (tmp_path / "first.yaml").write_text(yaml.safe_dump(first))
    # an ablation whose "qv" setting is the first sweep's lora (other name, explicit type) plus a new setting
    second = _cfg(name="second", methods={"qv": {"type": "lora", "lr": [0.001, 0.01, 0.1], "lora": {"r": 2}},
                                          "q": {"type": "lora", "lr": [0.001], "lora": {"r": 4}}},
                  reuse={"qv": "first.yaml:lora"})
    reused = sweep.reused_rows(second, tmp_path, tmp_path)
    assert {r["run_id"] for r in reused} == {"sst2/qv/lr=0.001/seed=0", "sst2/qv/lr=0.01/seed=0",
                                             "sst2/qv/lr=0.1/seed=0", "sst2/qv/lr=0.01/seed=1", "sst2/qv/lr=0.01/seed=2"}
    assert all(r["reused_from"].startswith("first/sst2/lora/") for r in reused)
    calls = []
    sweep.sweep(second, tmp_path / "second.runs.jsonl", tmp_path / "c2", _fake(calls), say=lambda m: None,
                reused=reused)
    assert sorted(calls) == ["sst2/q/lr=0.001/seed=0", "sst2/q/lr=0.001/seed=1", "sst2/q/lr=0.001/seed=2"]
    agg = sweep.aggregate(second, sweep.read_rows(tmp_path / "second.runs.jsonl") + reused)
    assert agg["results"]["sst2 qv"]["chosen_lr"] == 0.01 and agg["results"]["sst2 qv"]["test"]["accuracy"][2] == 3
    # another rank is another run: refused, not silently mixed in
    other = _cfg(name="third", methods={"qv": {"type": "lora", "lr": [0.01], "lora": {"r": 8}}},
                 reuse={"qv": "first.yaml:lora"})
    with pytest.raises(SystemExit, match="differ in a setting"):
        sweep.reused_rows(other, tmp_path, tmp_path)
    with pytest.raises(SystemExit, match="has no method 'lorax'"):
        sweep.reused_rows({**second, "reuse": {"qv": "first.yaml:lorax"}}, tmp_path, tmp_path)


def test_ter_is_chosen_lowest_and_a_nan_select_score_is_never_chosen():
    cfg = _cfg(kind="nlg", tasks=["e2e"], select_metric="ter", methods={"lora": {"lr": [1.0, 2.0, 3.0]}})
    rows = [{"task": "e2e", "method": "lora", "lr": lr, "seed": 0, "select": {"ter": ter}}
            for lr, ter in ((1.0, 50.0), (2.0, 40.0), (3.0, float("nan")))]
    assert sweep.choose_lr(cfg, rows, "e2e", "lora")[0] == 2.0


def test_unknown_config_keys_and_missing_grids_are_errors(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("name: x\nmodel: m\nkind: glue\ntasks: [sst2]\nmethods: {lora: {}}\nbudget: {steps: 1}\n"
                    "split: {}\nseeds: [0]\nsteps: 3\n")
    with pytest.raises(SystemExit, match=r"unknown keys \['steps'\].*lora.*lr grid"):
        sweep.load_config(path)
    path.write_text(path.read_text().replace("steps: 3\n", "").replace("lora: {}", "lora_r1: {lr: [1], type: lorax}"))
    with pytest.raises(SystemExit, match="'lora_r1': type 'lorax' unknown"):
        sweep.load_config(path)
    path.write_text(path.read_text().replace("lorax", "lora"))
    assert sweep.method_type("lora_r1", sweep.load_config(path)["methods"]["lora_r1"]) == "lora"
    path.write_text(path.read_text().replace("{steps: 1}", "{steps: 1, precision: fp16, lr: 1}"))
    with pytest.raises(SystemExit, match=r"unknown budget keys \['lr'\].*precision must be one of \['fp32', 'bf16'\]"):
        sweep.load_config(path)
    path.write_text(path.read_text().replace("precision: fp16, lr: 1", "precision: bf16"))
    assert sweep.load_config(path)["budget"]["precision"] == "bf16"


def test_entries_are_cut_into_disjoint_parts_with_unseen_categories_all_in_test():
    entries = [{"id": str(i), "category": "ABC"[i % 3], "triples": [("s", "p", str(i))], "references": [str(i)]}
               for i in range(30)]
    cut = data2text.split_entries(entries, data_seed=0, select=3, unseen=["C"])
    ids = [e["id"] for part in cut.values() for e in part]
    assert sorted(ids) == sorted(e["id"] for e in entries)  # each entry exactly once
    assert {e["id"] for e in entries if e["category"] == "C"} <= {e["id"] for e in cut["test"]}
    assert {e["category"] for e in cut["train"] + cut["select"]} == {"A", "B"}
    assert len(cut["test"]) == 10 + 10 and len(cut["select"]) == 3 and len(cut["train"]) == 7
    assert cut == data2text.split_entries(entries, data_seed=0, select=3, unseen=["C"])  # fixed by the seed
    assert cut != data2text.split_entries(entries, data_seed=1, select=3, unseen=["C"])
    rows = data2text._eval_rows(cut["test"], ["C"])
    assert {r["group"] for r in rows} == {"seen", "unseen"}
    assert rows[0]["prompt"].startswith("Write one sentence stating these facts.\nFacts: s : p : ")


def test_ter_counts_edits_against_the_closest_reference():
    assert data2text.ter(["a b c d"], [["a b c d", "x y"]]) == 0.0
    assert data2text.ter(["a b c"], [["a b c d"]]) == pytest.approx(25.0)
    assert data2text.ter(["a b", "x y"], [["a b"], ["x y z", "x y q r"]]) > 0
