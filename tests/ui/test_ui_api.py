"""The UI's JSON API without a browser or a base model: run status from the files, metrics, adapters and their ΔW
analysis, the launch form's errors, and folders it must never leave."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch
from fastapi.testclient import TestClient

from lorakit.errors import LorakitError
from lorakit.ui import UiConfig
from lorakit.ui.adapters import effective_rank
from lorakit.ui.runs import run_status
from lorakit.ui.server import create_ui_app
from ui_workspace import make_workspace


def fake_run(folder, steps: int, summary: bool = False, adapter: bool = False, checkpoint: bool = False, age: float = 0):
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text("model: tiny\noptim:\n  max_steps: 10\n")
    (folder / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 5.0 - s / 10, "lr": 1e-3,
                                                              "tokens_per_s": 100.0}) + "\n"
                                                  for s in range(1, steps + 1)) + '{"step": 99, "lo')  # torn line
    if checkpoint:
        (folder / "checkpoints" / "step-000002").mkdir(parents=True)
    if adapter:
        (folder / "adapter").mkdir()
    if summary:
        (folder / "summary.json").write_text(json.dumps({"steps": steps, "trainable params": 896,
                                                         "peak memory (MB)": 400.0}))
    if age:
        then = time.time() - age
        for path in folder.rglob("*"):
            os.utime(path, (then, then))
    return folder


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    ws = make_workspace(tmp_path_factory.mktemp("ui"))
    runs = ws["runs"]
    fake_run(runs / "done", 10, summary=True, adapter=True, checkpoint=True, age=600)
    fake_run(runs / "ctrl-c", 4, summary=True, checkpoint=True, age=600)
    fake_run(runs / "killed", 3, checkpoint=True, age=600)
    fake_run(runs / "live", 2)
    (runs / "not-a-run").mkdir()
    return ws


@pytest.fixture(scope="module")
def client(workspace):
    config = UiConfig(runs_dir=str(workspace["runs"]), adapters_dir=str(workspace["adapters"]))
    return TestClient(create_ui_app(config), base_url="http://127.0.0.1:7860")


def test_runs_status_from_the_files(client, workspace):
    runs = {r["name"]: r for r in client.get("/api/runs").json()}
    assert sorted(runs) == ["ctrl-c", "done", "killed", "live"]  # a folder without config.yaml is no run
    assert runs["done"]["status"] == "finished" and runs["done"]["resume"] is None
    assert runs["done"]["trainable_params"] == 896 and runs["done"]["peak_memory_mb"] == 400.0
    assert runs["live"]["status"] == "running"
    for name in ("ctrl-c", "killed"):
        assert runs[name]["status"] == "stopped"
        assert runs[name]["resume"] == f"lorakit train --resume {workspace['runs'].resolve() / name}"
    assert runs["killed"]["why"].endswith("(killed or crashed)")
    fresh = workspace["runs"] / "done"
    assert run_status(fresh, now=time.time() + 10)["status"] == "finished"
    assert run_status(fresh, process_alive=True)["status"] == "running"


def test_metrics_series_and_detail(client):
    m = client.get("/api/runs/done/metrics").json()
    assert m["step"] == list(range(1, 11)) and len(m["loss"]) == 10 and m["wall_estimated"]
    assert "grad_norm" not in m  # only series the run logged
    detail = client.get("/api/runs/done").json()
    assert detail["config_yaml"].startswith("model: tiny") and detail["summary"]["steps"] == 10


@pytest.mark.parametrize("name", ["nope", "..", "not-a-run", "%2e%2e"])
def test_unknown_or_escaping_runs_are_404(client, name):
    r = client.get(f"/api/runs/{name}/metrics")  # ".." is resolved by the client: a path with no route
    assert r.status_code == 404 and ("known:" in r.json()["error"] if name != ".." else True)


def test_adapters_and_their_analysis(client, workspace):
    ids = [a["id"] for a in client.get("/api/adapters").json()]
    assert ids == ["alpha", "beta"]
    alpha = client.get("/api/adapters/alpha").json()
    assert alpha["r"] == 4 and alpha["base_sha256"] and alpha["weights_bytes"] > 0
    layers = client.get("/api/adapters/alpha/analysis").json()
    assert len(layers) == 4 and all(row["delta_norm"] > 0 and 1 <= row["effective_rank"] <= 4 for row in layers)
    assert client.get("/api/adapters/alpha/base").json()["match"] is None  # no base loaded
    assert client.get("/api/adapters/../runs/done/adapter").status_code == 404


def test_effective_rank():
    assert effective_rank(torch.diag(torch.tensor([1.0, 1.0, 1.0, 0.0]))) == pytest.approx(3.0)
    assert effective_rank(torch.outer(torch.ones(5), torch.arange(4.0))) == pytest.approx(1.0)
    assert effective_rank(torch.zeros(3, 3)) == 0.0


@pytest.mark.parametrize("body, message", [
    ({"name": "../evil", "settings": {}}, "Invalid run name '../evil'"),
    ({"name": "x", "settings": {"output_dir": "/tmp/elsewhere"}}, "output_dir is set by the run name"),
    ({"name": "done", "settings": {}}, "A run named 'done' already exists"),
    ({"name": "x", "settings": {"optim.lr": "-1", "lora.r": "0"}}, "optim.lr must be a positive number, got -1"),
    ({"name": "x", "settings": {"optimm.lr": "1"}}, "Invalid training config"),
    ({"name": "x", "more": "no equals sign"}, "one KEY=VALUE a line"),
])
def test_launch_errors_are_the_clis_and_write_nothing(client, workspace, body, message):
    before = sorted(p.name for p in workspace["runs"].iterdir())
    r = client.post("/api/launch", json=body)
    assert r.status_code == 400 and message in r.json()["error"], r.json()
    assert sorted(p.name for p in workspace["runs"].iterdir()) == before


def test_stop_refuses_runs_not_started_here(client):
    r = client.post("/api/runs/live/stop", json={})
    assert r.status_code == 400 and "not running from this page" in r.json()["error"]


def test_page_and_vendored_plotting_are_served(client):
    assert "uPlot.iife.min.js" in client.get("/").text
    assert client.get("/static/vendor/uPlot.iife.min.js").status_code == 200
    assert client.get("/api/info").json()["base"] is None


def test_settings_are_checked():
    with pytest.raises(LorakitError, match="port must be in 0..65535, got 70000"):
        UiConfig(port=70000)


def test_the_ui_command_is_registered():
    from typer.testing import CliRunner

    from lorakit.cli.main import app

    result = CliRunner().invoke(app, ["ui", "--help"])
    assert result.exit_code == 0 and "--runs-dir" in result.stdout and "--adapters-dir" in result.stdout
    result = CliRunner().invoke(app, ["ui", "--port", "70000"])
    assert result.exit_code != 0 and "port must be in 0..65535" in str(result.exception)


def test_other_sites_cannot_drive_the_page(client, workspace):
    body = json.dumps({"name": "x", "settings": {}})
    r = client.post("/api/launch", content=body, headers={"Content-Type": "text/plain"})  # a cross-site form
    assert r.status_code == 415 and "application/json" in r.json()["error"]
    r = client.post("/api/launch", content=body, headers={"Content-Type": "application/json",
                                                          "Origin": "http://evil.example"})
    assert r.status_code == 403 and "Cross-origin" in r.json()["error"]
    r = client.get("/api/runs", headers={"Host": "evil.example:7860"})  # DNS rebinding
    assert r.status_code == 403
    assert not (workspace["runs"] / "x").exists()
