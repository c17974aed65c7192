"""Typed configuration for LoRA adapters.

`LoraConfig` is lorakit's own view; `to_peft_dict` / `from_peft_dict` translate to and from PEFT's
`adapter_config.json` so that adapter files are interchangeable with PEFT.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

from lorakit.errors import LorakitError
from lorakit.validation import build, check, is_int, is_number

INITS = ("kaiming", "gaussian", "loftq", "pissa", "olora")  # plus "pissa_niter_K" (randomized SVD, K iterations)
BASE_CHANGING_INITS = ("pissa", "olora")
BIASES = ("none",)


@dataclass
class LoraConfig:
    """How to adapt a model with LoRA: ΔW = scale · B A, scale = alpha / r (or alpha / √r with `use_rslora`)."""

    r: int = 8
    """Rank of the update; A is (r × in), B is (out × r)."""
    alpha: float = 16.0
    """Scale numerator (PEFT's `lora_alpha`)."""
    dropout: float = 0.0
    """Dropout on the LoRA path's input; 0 means no dropout module at all."""
    target_modules: list[str] | str | None = None
    """Module names (exact or dotted suffix), one regex string (full match), or "all-linear".
    None picks the usual attention projections for known architectures (W_q and W_v, as in the paper)."""
    layers: list[int] | None = None
    """Only adapt these transformer blocks (by index); None means all."""
    rank_pattern: dict[str, int] = field(default_factory=dict)
    """Per-module rank overrides: {regex matching the end of the module name: r}."""
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    """Per-module alpha overrides, matched like `rank_pattern`."""
    init: str = "kaiming"
    """Initialisation of A: "kaiming" (uniform, PEFT's default) or "gaussian" (std 1/r), with B at zero; or
    "pissa" / "pissa_niter_K" (top-r SVD of W) / "olora" (QR of W) in B and A, the frozen base keeping W − s·BA; or
    "loftq" (quantized bases): A and B from the SVD of the quantization residual, see `lorakit.models.quantization.loftq_init`."""
    loftq_config: dict[str, int] = field(default_factory=dict)
    """With init="loftq": PEFT's {"loftq_bits": 4 or 8, "loftq_iter": N}."""
    use_dora: bool = False
    """DoRA: also train a magnitude per output feature; W' = m · (W + s·BA) / ‖W + s·BA‖ row-wise (linear layers)."""
    use_rslora: bool = False
    """Scale by alpha/√r instead of alpha/r (rank-stabilised LoRA)."""
    modules_to_save: list[str] | None = None
    """Extra modules (e.g. a classification head) trained fully and saved with the adapter."""
    bias: str = "none"
    """Which biases train; only "none" is supported (biases stay frozen)."""

    def __post_init__(self) -> None:
        # normalise first (lists from tuples or one int), so problems() sees the final values
        if isinstance(self.target_modules, (tuple, set)):
            self.target_modules = list(self.target_modules)
        if isinstance(self.layers, (int, tuple)) and not isinstance(self.layers, bool):
            self.layers = [self.layers] if isinstance(self.layers, int) else list(self.layers)
        if isinstance(self.modules_to_save, tuple):
            self.modules_to_save = list(self.modules_to_save)
        check(self, "Invalid LoraConfig")

    def problems(self, prefix: str = "") -> list[str]:
        """Every invalid value, each naming its key (`prefix` + field: "lora.r" inside a TrainConfig)."""
        out = []
        if not is_int(self.r) or self.r <= 0:
            out.append(f"{prefix}r must be a positive integer, got {self.r!r}")
        if not is_number(self.alpha) or self.alpha <= 0:
            out.append(f"{prefix}alpha must be a positive number, got {self.alpha!r}")
        if not is_number(self.dropout) or not 0.0 <= self.dropout < 1.0:
            out.append(f"{prefix}dropout must be in [0, 1), got {self.dropout!r}")
        if self.init not in INITS and not _is_pissa_niter(self.init):
            out.append(f"{prefix}init must be one of {INITS} or 'pissa_niter_K' (K a positive integer), "
                       f"got {self.init!r}")
        if not isinstance(self.loftq_config, dict):
            out.append(f"{prefix}loftq_config must be a mapping like {{'loftq_bits': 4, 'loftq_iter': 1}}, "
                       f"got {self.loftq_config!r}")
        for key, value in (self.loftq_config if isinstance(self.loftq_config, dict) else {}).items():
            allowed = {"loftq_bits": (4, 8), "loftq_iter": range(1, 101)}
            if key not in allowed or isinstance(value, bool) or value not in allowed[key]:
                out.append(f"{prefix}loftq_config[{key!r}]={value!r}: allowed keys are loftq_bits (4 or 8) and "
                           "loftq_iter (1-100)")
        for name in ("use_dora", "use_rslora"):
            if not isinstance(getattr(self, name), bool):
                out.append(f"{prefix}{name} must be true or false, got {getattr(self, name)!r:.100}")
        if self.bias not in BIASES:
            out.append(f"{prefix}bias must be one of {BIASES}, got {self.bias!r} (lorakit keeps biases frozen)")
        out += self._target_problems(prefix)
        if self.layers is not None and not (isinstance(self.layers, list)
                                            and all(is_int(i) and i >= 0 for i in self.layers)):
            out.append(f"{prefix}layers must be non-negative integers, got {self.layers!r}")
        for name, kind in (("rank_pattern", int), ("alpha_pattern", (int, float))):
            pattern = getattr(self, name)
            if not isinstance(pattern, dict):
                out.append(f"{prefix}{name} must be a mapping {{module regex: value}}, got {pattern!r}")
                continue
            for key, value in pattern.items():
                if isinstance(value, bool) or not isinstance(value, kind) or not 0 < value < math.inf:
                    out.append(f"{prefix}{name}[{key!r}] must be a positive number, got {value!r}")
                try:
                    re.compile(key)
                except (re.error, TypeError) as e:
                    out.append(f"{prefix}{name} key {key!r} is not a valid regex: {e}")
        if self.modules_to_save is not None and not (isinstance(self.modules_to_save, list)
                                                     and all(isinstance(m, str) for m in self.modules_to_save)):
            out.append(f"{prefix}modules_to_save must be a list of module names, got {self.modules_to_save!r:.100}")
        return out

    def _target_problems(self, prefix: str) -> list[str]:
        targets = self.target_modules
        if isinstance(targets, list):
            if not targets or not all(isinstance(t, str) and t for t in targets):
                return [f"{prefix}target_modules must be non-empty strings, got {targets!r}"]
        elif isinstance(targets, str):
            if targets != "all-linear":
                try:
                    re.compile(targets)
                except re.error as e:
                    return [f"{prefix}target_modules {targets!r} is not a valid regex: {e}"]
        elif targets is not None:
            return [f"{prefix}target_modules must be a list of names, a regex string or 'all-linear', "
                    f"got {type(targets).__name__}"]
        return []

    # -- per-module values ------------------------------------------------------------------------
    @property
    def changes_base(self) -> bool:
        """True for PiSSA/OLoRA: the adapter only makes sense on the residual base its init leaves behind."""
        return self.init.startswith(BASE_CHANGING_INITS)

    def rank_for(self, module_name: str) -> int:
        return _pattern_value(self.rank_pattern, module_name, self.r)

    def alpha_for(self, module_name: str) -> float:
        return _pattern_value(self.alpha_pattern, module_name, self.alpha)

    # -- (de)serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LoraConfig":
        """Build from a dict (a saved config); unknown keys and bad values are reported together in one error."""
        return build(cls, data, "Invalid LoraConfig")

    def to_peft_dict(self, base_model_name_or_path: str | None = None, task_type: str | None = None,
                     fan_in_fan_out: bool = False) -> dict[str, Any]:
        """The PEFT `adapter_config.json` content for this config (PEFT's field names and conventions)."""
        return {
            "peft_type": "LORA",
            "task_type": task_type,
            "base_model_name_or_path": base_model_name_or_path,
            "inference_mode": True,
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": self.target_modules,
            "layers_to_transform": self.layers,
            "layers_pattern": None,
            "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": dict(self.alpha_pattern),
            "init_lora_weights": True if self.init == "kaiming" else self.init,
            "use_rslora": self.use_rslora,
            "use_dora": self.use_dora,
            "loftq_config": dict(self.loftq_config),
            "modules_to_save": self.modules_to_save,
            "bias": self.bias,
            "fan_in_fan_out": fan_in_fan_out,  # True for GPT-2's Conv1D (PEFT's flag for transposed weights)
        }

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any], source: str = "adapter_config.json") -> "LoraConfig":
        """Read a PEFT `adapter_config.json`. Fields that change the math and that lorakit does not support are errors."""
        if data.get("peft_type", "LORA") != "LORA":
            raise LorakitError(f"{source}: peft_type is {data.get('peft_type')!r}; lorakit loads only LORA adapters.")
        unsupported = []
        for key, neutral in (("bias", "none"), ("layer_replication", None),
                             ("lora_bias", False), ("trainable_token_indices", None), ("use_qalora", False),
                             ("alora_invocation_tokens", None), ("megatron_config", None)):
            if data.get(key) not in (neutral, None):
                unsupported.append(f"{key}={data[key]!r}")
        # A saved adapter carries its trained values, so the init only matters for the record.
        # PiSSA/OLoRA/LoftQ do matter: the adapter was trained on the base their init leaves behind.
        init = data.get("init_lora_weights")
        if isinstance(init, str) and init.lower() in ("corda", "mica", "lora_ga"):
            unsupported.append(f"init_lora_weights={init!r}")
        init = init if init in INITS or _is_pissa_niter(init) else "kaiming"
        if unsupported:
            raise LorakitError(f"{source} uses PEFT features lorakit does not support: {', '.join(unsupported)}. "
                               "Load it with PEFT, or save it again without them.")
        layers = data.get("layers_to_transform")
        if isinstance(layers, int):
            layers = [layers]
        targets = data.get("target_modules")
        if isinstance(targets, (set, tuple)):
            targets = sorted(targets)
        try:
            return cls(
                r=data.get("r", 8),
                alpha=data.get("lora_alpha", 8),
                dropout=data.get("lora_dropout", 0.0) or 0.0,
                target_modules=targets,
                layers=layers,
                rank_pattern=data.get("rank_pattern") or {},
                alpha_pattern=data.get("alpha_pattern") or {},
                init=init,
                use_rslora=data.get("use_rslora", False) or False,
                loftq_config=data.get("loftq_config") or {},
                use_dora=data.get("use_dora") or False,
                modules_to_save=data.get("modules_to_save"),
            )
        except LorakitError as e:
            raise LorakitError(f"{source}: {e}") from None


def _is_pissa_niter(init) -> bool:
    return isinstance(init, str) and re.fullmatch(r"pissa_niter_[1-9]\d*", init) is not None


def _pattern_value(pattern: dict, module_name: str, default):
    """PEFT's rule: the first key whose regex matches the end of the dotted module name wins."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default
