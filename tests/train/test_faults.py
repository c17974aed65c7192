"""Training under faults: SIGKILL mid-step and mid-checkpoint-write, a torn/incomplete newest checkpoint, a full disk.
Every resumed run must end with exactly (torch.equal) the adapter of an uninterrupted run."""

from __future__ import annotations

import errno
import os
import signal
import warnings

import pytest
import torch
from safetensors.torch import load_file

import fault_worker as fw
from lorakit.errors import LorakitError
from lorakit.train import checkpoints, latest_checkpoint

STEPS = 8


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return fw.write_data(tmp_path_factory.mktemp("faults") / "train.jsonl")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_file):
    """The uninterrupted run (in-process; the killed runs are subprocesses with the same single thread)."""
    before = torch.get_num_threads()
    result = fw.run(tmp_path_factory.mktemp("faults") / "ref", data_file, STEPS)
    torch.set_num_threads(before)
    return load_file(str(result.adapter_dir / "adapter_model.safetensors"))


def assert_same_adapter(run_dir, reference):
    got = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    assert got.keys() == reference.keys()
    assert all(torch.equal(got[k], reference[k]) for k in got), max(float((got[k] - reference[k]).abs().max())
                                                                   for k in got)


def killed(run_dir, data_file, kill_at: str) -> None:
    proc = fw.launch(run_dir, data_file, STEPS, kill_at)
    fw.wait_ready(proc)
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, f"{kill_at} did not fire (rc {proc.returncode})"


def test_sigkill_mid_step_then_mid_checkpoint_write_then_torn_newest_checkpoint(tmp_path, data_file, reference):
    run = tmp_path / "run"
    killed(run, data_file, "forward:5")  # 2 micro-batches a step: dies in step 3, after the step-2 checkpoint
    assert [p.name for p in checkpoints(run)] == ["step-000001", "step-000002"]
    killed(run, data_file, "write:7")  # resumed at 2; dies half-way through the 3rd file of the step-4 checkpoint
    assert [p.name for p in checkpoints(run)] == ["step-000002", "step-000003"]
    assert list((run / "checkpoints").glob(".step-000004.tmp-*"))  # the torn copy never became a checkpoint
    # A damaged newest checkpoint (e.g. a disk error after the fact): resume falls back to step 2 with a warning.
    newest = checkpoints(run)[-1]
    data = (newest / "trainable.safetensors").read_bytes()
    (newest / "trainable.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.warns(UserWarning, match="step-000003 is unreadable"):
        assert latest_checkpoint(run)[0].name == "step-000002"
    with pytest.warns(UserWarning, match="step-000003 is unreadable"):
        assert fw.run(run, data_file, STEPS).steps == STEPS  # the last resume in-process: one subprocess fewer
    assert_same_adapter(run, reference)
    assert not list((run / "checkpoints").glob(".*tmp-*"))  # stale partial copies were cleaned up


def test_incomplete_newest_checkpoint_falls_back(tmp_path, data_file):
    run = tmp_path / "run"
    fw.run(run, data_file, 3)
    (checkpoints(run)[-1] / "rng.json").unlink()  # e.g. copied by hand, a file missing
    with pytest.warns(UserWarning, match="step-000003 is unreadable .*rng.json"):
        path, state = latest_checkpoint(run)
    assert path.name == "step-000002" and state["position"]["step"] == 2
    for p in checkpoints(run):
        (p / "trainer_state.json").write_text("{\"step\": 2")  # torn JSON in every checkpoint
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(LorakitError, match="No readable checkpoint .*2 found, all damaged"):
            latest_checkpoint(run)


def test_full_disk_during_checkpoint_keeps_previous_and_says_so(tmp_path, data_file, monkeypatch, reference):
    import safetensors.torch as st

    run = tmp_path / "run"
    real, calls = st.save_file, [0]

    def disk_full_on_step_4(tensors, filename, metadata=None):
        calls[0] += 1
        if calls[0] == 4 * 3 + 3:  # the optimizer file of the 4th checkpoint
            with open(filename, "wb") as fh:
                fh.write(b"\0" * 100)  # some bytes made it before the disk filled up
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(st, "save_file", disk_full_on_step_4)
    with pytest.raises(LorakitError) as err:
        fw.run(run, data_file, STEPS)
    msg = str(err.value)
    assert "No space left on device" in msg and "step-000004" in msg and "Nothing was half-written" in msg
    assert "previous checkpoint" in msg and "step-000003 is intact" in msg and "--resume" in msg
    assert [p.name for p in checkpoints(run)] == ["step-000002", "step-000003"]
    assert not list((run / "checkpoints").glob(".*"))  # the partial copy was removed
    monkeypatch.setattr(st, "save_file", real)  # space freed: the resumed run ends exactly like the reference
    fw.run(run, data_file, STEPS)
    assert_same_adapter(run, reference)


@pytest.mark.stress
def test_many_random_sigkills_then_resume_equals_uninterrupted(tmp_path, data_file):
    kills = int(os.environ.get("LORAKIT_FAULT_KILLS", "25"))
    reference = load_file(str(fw.run(tmp_path / "ref", data_file, 60).adapter_dir / "adapter_model.safetensors"))
    counts = fw.kill_until_done(tmp_path / "run", data_file, 60, kills=kills, window_s=4.0, seed=1)
    print(counts)
    assert counts["kills_injected"] == kills and counts["kills_landed"] >= kills * 0.8
    assert_same_adapter(tmp_path / "run", reference)
