"""Atomic writes: the new directory appears whole or not at all; a failure keeps the previous one."""

from __future__ import annotations

import pytest

from lorakit.fsutil import atomic_directory, atomic_write_text


def test_atomic_directory_with_subdirectories(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_directory(target) as d:
        (d / "a.txt").write_text("1")
        (d / "sub" / "deeper").mkdir(parents=True)
        (d / "sub" / "deeper" / "b.txt").write_text("2")
    assert (target / "a.txt").read_text() == "1"
    assert (target / "sub" / "deeper" / "b.txt").read_text() == "2"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary or .old folder left behind


def test_failure_mid_write_keeps_previous_directory(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_directory(target) as d:
        (d / "weights").write_text("old")
    with pytest.raises(OSError, match="disk full"):
        with atomic_directory(target) as d:
            (d / "weights").write_text("new, half written")
            raise OSError(28, "disk full")
    assert (target / "weights").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_atomic_write_text_replaces_whole_file(tmp_path):
    f = tmp_path / "x.json"
    atomic_write_text(f, "first")
    atomic_write_text(f, "second")
    assert f.read_text() == "second"
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]
