"""The Adapters page's data: every adapter folder (under the adapters directory and each run's adapter/ and best/),
its config, provenance, size, per-layer ‖ΔW‖ and effective rank, eval results, and whether it fits the loaded base."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch

from lorakit.errors import LorakitError
from lorakit.lora.adapter_io import CONFIG_FILE, META_FILE, WEIGHTS_FILE, peek_adapter_config
from lorakit.train.runlog import dir_size
from lorakit.ui.runs import run_folders
from lorakit.validation import ADAPTER_NAME

RESULTS_FILE = "results.json"


def adapter_folders(adapters_dir: Path, runs_dir: Path) -> dict[str, Path]:
    """{id: folder}: "name" for adapters_dir/name, "run:<run>/adapter" and "run:<run>/best" for runs' adapters."""
    found: dict[str, Path] = {}
    if adapters_dir.is_dir():
        for p in sorted(adapters_dir.iterdir()):
            if p.is_dir() and ADAPTER_NAME.fullmatch(p.name) and (p / CONFIG_FILE).is_file():
                found[p.name] = p
    for run in run_folders(runs_dir):
        for sub in ("adapter", "best"):
            if (run / sub / CONFIG_FILE).is_file():
                found[f"run:{run.name}/{sub}"] = run / sub
    return found


def _meta(folder: Path) -> dict[str, Any]:
    try:
        meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _results(folder: Path) -> Any:
    """results.json in the folder or next to it (lorakit eval --out beside the adapter), if any."""
    for path in (folder / RESULTS_FILE, folder.parent / RESULTS_FILE):
        if path.is_file():
            try:
                return json.loads(path.read_text(encoding="utf-8"))
            except ValueError:
                return {"error": f"{path} is not valid JSON"}
    return None


def adapter_overview(ident: str, folder: Path) -> dict[str, Any]:
    meta = _meta(folder)
    fingerprint = meta.get("base_fingerprint") if isinstance(meta.get("base_fingerprint"), dict) else None
    try:
        config, problem = peek_adapter_config(folder).to_dict(), None
    except LorakitError as e:
        config, problem = None, str(e)
    return {
        "id": ident, "path": str(folder), "config": config, "problem": problem,
        "r": (config or {}).get("r"), "alpha": (config or {}).get("alpha"),
        "target_modules": (config or {}).get("target_modules"),
        "base_model": meta.get("base_model"), "base_model_class": meta.get("base_model_class"),
        "lorakit_version": meta.get("lorakit_version"),
        "base_sha256": fingerprint.get("sha256") if fingerprint else None,
        "fingerprint_modules": len(fingerprint.get("modules") or {}) if fingerprint else 0,
        "size_bytes": dir_size(folder),
        "weights_bytes": (folder / WEIGHTS_FILE).stat().st_size if (folder / WEIGHTS_FILE).is_file() else None,
        "results": _results(folder),
        "servable": ":" not in ident,
    }


def effective_rank(delta: torch.Tensor) -> float:
    """Roy & Vetterli's effective rank exp(H(p)), p = σ / Σσ: 1 when one direction carries ΔW, r when r share it."""
    s = torch.linalg.svdvals(delta.double())
    s = s[s > s.max() * 1e-12] if s.numel() and s.max() > 0 else s[:0]
    if not s.numel():
        return 0.0
    p = s / s.sum()
    return float(torch.exp(-(p * p.log()).sum()))


def layer_analysis(folder: Path) -> list[dict[str, Any]]:
    """Per adapted linear layer: ‖ΔW‖_F, its rank r and ΔW's effective rank (lorakit.lora.analysis reads the factors)."""
    from lorakit.lora.analysis import adapter_factors, delta_weight, layer_index

    rows = []
    for name, factors in adapter_factors(folder).items():
        delta = delta_weight(factors)  # (out, in)
        rows.append({"module": name, "layer": layer_index(name), "r": int(factors["A"].shape[0]),
                     "shape": list(delta.shape), "delta_norm": float(torch.linalg.matrix_norm(delta)),
                     "effective_rank": round(effective_rank(delta), 3)})
    return rows


def base_match(engine, folder: Path) -> dict[str, Any]:
    """Whether the adapter fits the base the UI serves: load it on the engine's model (under the engine's lock, as a
    temporary adapter that is removed again) with the fingerprint check on, then compare exact digests."""
    from lorakit.lora.adapter_io import base_fingerprint, load_adapter
    from lorakit.lora.injection import delete_adapter

    if engine is None:
        return {"match": None, "detail": "no base loaded: start `lorakit ui --model MODEL` to check"}
    saved = (_meta(folder).get("base_fingerprint") or {}).get("sha256")
    name = "lorakit-ui-check"
    with engine.lock, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            load_adapter(engine.model, folder, adapter=name, strict=True)
        except LorakitError as e:
            return {"match": False, "detail": str(e)}
        try:
            current = base_fingerprint(engine.model, name)["sha256"]
        finally:
            delete_adapter(engine.model, name)
    notes = [str(w.message) for w in caught]
    if saved is None:
        return {"match": None, "detail": "it loads, but has no base fingerprint (a PEFT adapter): not checked",
                "notes": notes}
    if notes:
        return {"match": None, "detail": "loaded with warnings: " + " ".join(notes)}
    if saved == current:
        return {"match": True, "detail": f"identical base weights (sha256 {current[:12]}…)"}
    return {"match": True, "detail": "same base in another dtype (statistics match, digest differs)"}
