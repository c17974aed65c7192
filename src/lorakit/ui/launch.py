"""The Launch page: a form becomes the YAML `lorakit train` reads, validated by TrainConfig, run as
`python -m lorakit train --config FILE` in a subprocess and stopped with SIGINT (Ctrl-C: checkpoint, then exit).

Everything is written inside the run's folder in the runs directory: launch.yaml (the config) and train.log."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from lorakit.errors import LorakitError
from lorakit.train.config import TrainConfig
from lorakit.train.layout import CONFIG_FILE, checkpoints
from lorakit.validation import ADAPTER_NAME

LAUNCH_FILE = "launch.yaml"
LOG_FILE = "train.log"


class Launcher:
    """Training processes started from the page, by run name."""

    def __init__(self, runs_dir: Path):
        self.runs_dir = runs_dir.resolve()
        self.procs: dict[str, subprocess.Popen] = {}
        self.lock = threading.Lock()

    def alive(self, name: str) -> bool:
        proc = self.procs.get(name)
        return proc is not None and proc.poll() is None

    def build_config(self, name: str, settings: dict[str, Any]) -> TrainConfig:
        """The config the form asks for: dotted keys (as `--set`) with output_dir set to runs_dir/name."""
        if not isinstance(name, str) or not ADAPTER_NAME.fullmatch(name):
            raise LorakitError(f"Invalid run name {name!r}: use letters, digits, '_' and '-' (it becomes the folder "
                               f"{self.runs_dir}/NAME).")
        if not isinstance(settings, dict):
            raise LorakitError(f"settings must map dotted keys to values, got {type(settings).__name__}.")
        if "output_dir" in settings:
            raise LorakitError(f"output_dir is set by the run name: this page writes only inside {self.runs_dir}; "
                               "remove output_dir and choose a name.")
        folder = self.runs_dir / name
        if (folder / CONFIG_FILE).exists() or checkpoints(folder) or self.alive(name):
            raise LorakitError(f"A run named {name!r} already exists in {self.runs_dir}; choose another name (resume "
                               f"a stopped run with `lorakit train --resume {folder}`).")
        overrides = {k: v for k, v in settings.items() if v not in (None, "")}
        overrides["output_dir"] = str(folder)
        return TrainConfig.from_yaml(None, overrides)

    def start(self, name: str, settings: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            config = self.build_config(name, settings)
            folder = Path(config.output_dir)
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / LAUNCH_FILE
            path.write_text(config.to_yaml(), encoding="utf-8")
            command = [sys.executable, "-m", "lorakit", "train", "--config", str(path)]
            log = open(folder / LOG_FILE, "ab")
            try:
                # its own session: a Ctrl-C in the UI's terminal reaches only the UI, which then sends each run one
                # SIGINT (a second one would abort the run without its checkpoint)
                self.procs[name] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                                    stdin=subprocess.DEVNULL, start_new_session=True)
            finally:
                log.close()
        return {"name": name, "config_file": str(path), "command": " ".join(command[1:]).replace("-m lorakit",
                                                                                              "lorakit", 1)}

    def stop(self, name: str) -> dict[str, Any]:
        """SIGINT, as Ctrl-C in a terminal: the trainer finishes its step, saves a checkpoint and exits."""
        proc = self.procs.get(name)
        if proc is None or proc.poll() is not None:
            raise LorakitError(f"Run {name!r} is not running from this page; a run started elsewhere stops with "
                               "Ctrl-C in its own terminal.")
        proc.send_signal(signal.SIGINT)
        return {"name": name, "signal": "SIGINT"}

    def close(self, timeout: float = 60.0) -> None:
        """Stop (checkpointing) every run still going when the UI exits."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
