"""What `lorakit eval` runs: `EvalConfig` (the file or preset, split, field names, metrics) with its `GenerationConfig`
section, and the presets it can name (each a staged file, its format, field names and default metrics).

No torch here: the CLI builds its options from these classes (the readers and the scoring are in `examples` and
`evaluate`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorakit.data.benchmarks import DEFAULT_DATA_DIR, GLUE_TASKS
from lorakit.errors import LorakitError

GENERATION_METRICS = ("exact_match", "bleu", "chrf", "nist", "meteor", "rouge_l", "cider")
LABEL_METRICS = ("accuracy", "f1", "matthews", "pearson", "spearman")
DECODINGS = ("greedy", "beam")
CLASSIFY = ("head", "choice")
EVAL_FORMATS = ("auto", "instruction", "chat", "classification")
E2E_PROMPT = ("Write one sentence describing the restaurant with these attributes.\n"
              "Attributes: {mr}\nSentence:")


@dataclass(frozen=True)
class Preset:
    """A named evaluation: where its file is, how to read it, and what to report by default."""

    path: str
    """The file under the data folder; {split} is replaced by the split."""
    splits: tuple[str, ...]
    """Allowed splits; the first is the default."""
    format: str
    fields: dict[str, Any]
    """DataConfig field names for this file (prompt_field, label_field, ...)."""
    metrics: tuple[str, ...]
    classify: str = "head"
    """GLUE: the sequence-classification head (as the GLUE runs train)."""
    prompt_template: str | None = None
    """E2E: the prompt is this template filled with the prompt field, outside any chat template."""
    first_line: bool = False
    """Keep only the first line of each output (E2E answers are one sentence)."""
    regression: bool = False
    """The label is a number predicted by a one-output head (stsb)."""
    split_fields: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Field names that differ in one split (E2E train rows have one "target", dev rows a list of "references")."""

    def fields_for(self, split: str) -> dict[str, Any]:
        return {**self.fields, **self.split_fields.get(split, {})}


PRESETS: dict[str, Preset] = {
    "e2e": Preset("e2e/{split}.jsonl", ("dev", "train"), "instruction",
                  {"prompt_field": "meaning_representation", "completion_field": "references"},
                  ("bleu", "nist", "meteor", "rouge_l", "cider"), prompt_template=E2E_PROMPT, first_line=True,
                  split_fields={"train": {"completion_field": "target"}}),
    **{name: Preset(f"glue/{name}/{{split}}.jsonl", ("validation", "train"), "classification",
                    {"text_field": task.text_fields[0],
                     "text_pair_field": task.text_fields[1] if len(task.text_fields) > 1 else None,
                     "label_field": "label"}, task.metrics, regression=task.num_labels == 1)
       for name, task in GLUE_TASKS.items()},
}


def preset_path(name: str, split: str | None, data_dir: str | Path) -> tuple[Path, str]:
    preset = PRESETS[name]
    split = split or preset.splits[0]
    if split not in preset.splits:
        raise LorakitError(f"Preset {name!r} has splits {list(preset.splits)}; got split={split!r}.")
    return Path(data_dir) / preset.path.format(split=split), split


@dataclass
class GenerationConfig:
    """How to decode."""

    decoding: str = "greedy"
    """"greedy" or "beam" (with --temperature above 0, greedy becomes sampling)."""
    num_beams: int = 4
    """Beams for beam search (ignored for greedy)."""
    max_new_tokens: int = 64
    """New tokens per prompt at most; generation also stops at the end token (and, for e2e, at a newline)."""
    batch_size: int = 16
    """Prompts per generate() call (left-padded)."""
    bf16: bool = False
    """Run under bfloat16 autocast (about 1.8× faster on a modern CPU; scores move slightly)."""
    temperature: float = 0.0
    """0: greedy (or beam) decoding; above 0: sample from softmax(logits / temperature)."""
    top_p: float = 1.0
    """Sampling: keep the smallest set of tokens whose probability reaches top_p."""
    seed: int = 0
    """Sampling: the random seed, set again before each model so every model draws from the same stream."""

    def problems(self) -> list[str]:
        out = []
        if self.decoding not in DECODINGS:
            out.append(f"decoding must be one of {DECODINGS}, got {self.decoding!r}")
        for name in ("num_beams", "max_new_tokens", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                out.append(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or not 0 <= self.temperature <= 100:
            out.append(f"temperature must be a number in [0, 100] (0 = greedy), got {self.temperature!r}")
        elif self.temperature > 0 and self.decoding == "beam":
            out.append("temperature > 0 samples, which beam search does not; use decoding greedy to sample, or "
                       "temperature 0 for beam search")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            out.append(f"top_p must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            out.append(f"seed must be an integer, got {self.seed!r}")
        return out


@dataclass
class EvalConfig:
    """What to evaluate on: your own file (--data) or a preset (--task), a split, optionally the first `limit`
    examples; and which metrics to report."""

    task: str | None = None
    """A preset: e2e, sst2, mrpc, rte, cola or stsb (a staged file with its format and metrics). Default without
    --data: e2e."""
    data: str | None = None
    """Your evaluation file (.jsonl/.json/.csv/.parquet or a saved datasets folder), read as training reads it."""
    format: str = "auto"
    """instruction, chat, classification, or auto (from the first record's fields, as in training)."""
    prompt_field: str = "prompt"
    """Instruction files: the prompt's field (training's data.prompt_field)."""
    completion_field: str = "completion"
    """Instruction files: the reference's field, a string or a list of references (data.completion_field)."""
    messages_field: str = "messages"
    """Chat files: the messages' field; the last assistant turn is the reference (data.messages_field)."""
    text_field: str = "text"
    """Classification files: the text's field (data.text_field)."""
    text_pair_field: str | None = None
    """Classification files: a second text's field, for sentence pairs (data.text_pair_field)."""
    label_field: str = "label"
    """Classification files: the label's field (data.label_field)."""
    chat_template: bool = True
    """Wrap instruction prompts in the tokenizer's chat template, as training does (data.chat_template)."""
    classify: str | None = None
    """Classification: "head" (a sequence-classification model's head) or "choice" (a causal LM picks the label
    string it finds likeliest after the prompt). Default: head for GLUE presets and when the model folder or an
    adapter was trained for sequence classification; otherwise choice."""
    split: str | None = None
    """Presets: dev (e2e) / validation (GLUE) by default. --data folders saved with datasets: default validation."""
    limit: int | None = None
    """Use only the first N examples (MRs for E2E)."""
    data_dir: str = str(DEFAULT_DATA_DIR)
    """The shared data folder of the presets (contains e2e/ and glue/)."""
    generation: GenerationConfig = dataclasses.field(default_factory=GenerationConfig)
    """Decoding settings (instruction and chat files, e2e)."""
    max_length: int = 128
    """Truncate classification inputs to this many tokens."""
    metrics: list[str] | None = None
    """Metrics to report. Instruction/chat: exact_match, bleu, chrf, nist, meteor, rouge_l, cider (default
    exact_match,bleu,chrf,rouge_l; e2e: bleu,nist,meteor,rouge_l,cider). Classification: accuracy, f1, matthews
    (default accuracy,f1; presets: their paper's)."""

    def __post_init__(self) -> None:
        if isinstance(self.generation, dict):
            self.generation = _from_dict(GenerationConfig, self.generation, "generation")
        problems = self.problems()
        if problems:
            raise LorakitError("Invalid evaluation settings:\n  - " + "\n  - ".join(problems))

    def problems(self) -> list[str]:
        problems = []
        if self.task is not None and self.task not in PRESETS:
            problems.append(f"task must be one of {list(PRESETS)} (or give --data), got {self.task!r}")
        if self.task is not None and self.data is not None:
            problems.append(f"give --data or a preset --task, not both (got data={self.data!r}, task={self.task!r})")
        if self.data is not None and (not isinstance(self.data, str) or not self.data):
            problems.append(f"data must be a file path, got {self.data!r}")
        if self.format not in EVAL_FORMATS:
            problems.append(f"format must be one of {EVAL_FORMATS}, got {self.format!r}")
        for name in ("prompt_field", "completion_field", "messages_field", "text_field", "label_field"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                problems.append(f"{name} must be a non-empty string, got {getattr(self, name)!r}")
        if self.classify is not None and self.classify not in CLASSIFY:
            problems.append(f"classify must be one of {CLASSIFY} or unset, got {self.classify!r}")
        if self.limit is not None and (isinstance(self.limit, bool) or not isinstance(self.limit, int) or self.limit <= 0):
            problems.append(f"limit must be a positive integer or None, got {self.limit!r}")
        if not isinstance(self.max_length, int) or self.max_length <= 0:
            problems.append(f"max_length must be a positive integer, got {self.max_length!r}")
        if self.metrics is not None:
            bad = sorted(set(self.metrics) - set(GENERATION_METRICS) - set(LABEL_METRICS))
            if bad or not self.metrics:
                problems.append(f"metrics {bad or '[]'} unknown; allowed {list(GENERATION_METRICS)} for instruction "
                                f"and chat files, {list(LABEL_METRICS)} for classification")
        return problems + self.generation.problems()

    @property
    def preset(self) -> Preset | None:
        """The preset evaluated: --task, or e2e when neither --task nor --data is given."""
        return PRESETS[self.task or "e2e"] if self.data is None else None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EvalConfig":
        return _from_dict(cls, data, "EvalConfig")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _from_dict(cls, data: dict[str, Any], what: str):
    allowed = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise LorakitError(f"Unknown {what} key(s) {unknown}; allowed keys are {sorted(allowed)}.")
    return cls(**data)
