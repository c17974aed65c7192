"""Evaluation: the E2E challenge's metrics for data-to-text generation, GLUE metrics, batched decoding, and one call
that evaluates the base model, any number of adapters and merged models, writing JSON, a markdown table and outputs.

Metrics use the established implementations, with these conventions (all on lowercased text, as the E2E scripts do):

- BLEU: sacrebleu corpus BLEU, 13a tokenisation, every reference of an MR used (variable counts allowed); 0–100.
- NIST: nltk `corpus_nist`, n=5, on the same 13a tokens.
- METEOR: METEOR 1.5 (pycocoevalcap's jar, `-l en -norm`; needs Java); reported ×100.
- ROUGE-L: rouge-score's `rougeL` F-measure, the maximum over an MR's references, averaged over MRs; ×100.
  (The E2E script uses pycocoevalcap's ROUGE-L with β=1.2 over pooled references; numbers differ slightly.)
- CIDEr: pycocoevalcap CIDEr (n=4, σ=6) on 13a-tokenised text.
- GLUE: accuracy and F1 (scikit-learn), Matthews correlation (CoLA), Pearson/Spearman (scipy, STS-B).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from lorakit.data.benchmarks import DEFAULT_DATA_DIR, GLUE_TASKS, TASKS, load_e2e, load_glue
from lorakit.errors import LorakitError
from lorakit.fsutil import atomic_write_text

GENERATION_METRICS = ("bleu", "nist", "meteor", "rouge_l", "cider")
DECODINGS = ("greedy", "beam")
E2E_PROMPT = ("Write one sentence describing the restaurant with these attributes.\n"
              "Attributes: {mr}\nSentence:")


def e2e_prompt(mr: str) -> str:
    """The prompt used for E2E everywhere in lorakit (prompted base model and fine-tuning alike)."""
    return E2E_PROMPT.format(mr=mr)


# ---------------------------------------------------------------------------------------------------- metrics
def _tokens(text: str) -> list[str]:
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    return Tokenizer13a()(text.lower().strip()).split()


def generation_metrics(hypotheses: Sequence[str], references: Sequence[Sequence[str]],
                       metrics: Sequence[str] = GENERATION_METRICS) -> dict[str, float]:
    """Corpus scores of `hypotheses[i]` against its references `references[i]` (one or more strings each)."""
    unknown = sorted(set(metrics) - set(GENERATION_METRICS))
    if unknown:
        raise LorakitError(f"Unknown generation metric(s) {unknown}; allowed: {list(GENERATION_METRICS)}.")
    if len(hypotheses) != len(references) or not hypotheses:
        raise LorakitError(f"Need one reference list per hypothesis and at least one pair; got {len(hypotheses)} "
                           f"hypotheses and {len(references)} reference lists.")
    if any(not refs for refs in references):
        raise LorakitError("Every hypothesis needs at least one reference.")
    hyps = [" ".join(h.split()) for h in hypotheses]  # newlines would break METEOR's line protocol
    refs = [[" ".join(r.split()) for r in rs] for rs in references]
    scores: dict[str, float] = {}
    if "bleu" in metrics:
        import sacrebleu

        most = max(len(rs) for rs in refs)
        streams = [[rs[k] if k < len(rs) else None for rs in refs] for k in range(most)]
        scores["bleu"] = sacrebleu.corpus_bleu(hyps, streams, lowercase=True, tokenize="13a").score
    if "nist" in metrics:
        from nltk.translate.nist_score import corpus_nist

        hyp_tokens = [_tokens(h) for h in hyps]
        # nltk divides by the count of hypothesis n-grams per order; orders no hypothesis reaches add 0 (as in mteval).
        n = min(5, max(len(t) for t in hyp_tokens))
        scores["nist"] = float(corpus_nist([[_tokens(r) for r in rs] for rs in refs], hyp_tokens, n=n)) if n else 0.0
    if "meteor" in metrics:
        scores["meteor"] = 100 * _meteor(hyps, refs)
    if "rouge_l" in metrics:
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(["rougeL"])
        scores["rouge_l"] = 100 * sum(scorer.score_multi(rs, h)["rougeL"].fmeasure for h, rs in zip(hyps, refs)) / len(hyps)
    if "cider" in metrics:
        from pycocoevalcap.cider.cider import Cider

        gts = {i: [" ".join(_tokens(r)) for r in rs] for i, rs in enumerate(refs)}
        res = {i: [" ".join(_tokens(h))] for i, h in enumerate(hyps)}
        scores["cider"] = float(Cider().compute_score(gts, res)[0])
    return scores


def _meteor(hyps: list[str], refs: list[list[str]]) -> float:
    import shutil

    from pycocoevalcap.meteor.meteor import Meteor

    if shutil.which("java") is None:
        raise LorakitError("METEOR 1.5 runs on Java, which is not on PATH; install a JRE (17 works) or leave "
                           "'meteor' out of the metrics.")
    scorer = Meteor()
    try:
        score, _ = scorer.compute_score({i: [r.lower() for r in rs] for i, rs in enumerate(refs)},
                                        {i: [h.lower()] for i, h in enumerate(hyps)})
    finally:
        with scorer.lock:  # the wrapper's __del__ does this too, but only whenever it is collected
            scorer.meteor_p.stdin.close()
            scorer.meteor_p.kill()
            scorer.meteor_p.wait()
    return float(score)


def classification_metrics(task: str, predictions: Sequence[float], labels: Sequence[float]) -> dict[str, float]:
    """The GLUE metrics for `task`; accuracy/F1/Matthews in %, correlations ×100 as in the paper's tables."""
    if task not in GLUE_TASKS:
        raise LorakitError(f"task must be one of {sorted(GLUE_TASKS)}, got {task!r}.")
    if len(predictions) != len(labels) or not labels:
        raise LorakitError(f"Need equally many predictions and labels (got {len(predictions)} and {len(labels)}).")
    out = {}
    for name in GLUE_TASKS[task].metrics:
        if name == "accuracy":
            from sklearn.metrics import accuracy_score
            out[name] = 100 * accuracy_score(labels, predictions)
        elif name == "f1":
            from sklearn.metrics import f1_score
            out[name] = 100 * f1_score(labels, predictions)
        elif name == "matthews":
            from sklearn.metrics import matthews_corrcoef
            out[name] = 100 * matthews_corrcoef(labels, predictions)
        elif name == "pearson":
            from scipy.stats import pearsonr
            out[name] = 100 * float(pearsonr(predictions, labels)[0])
        elif name == "spearman":
            from scipy.stats import spearmanr
            out[name] = 100 * float(spearmanr(predictions, labels)[0])
    return {k: float(v) for k, v in out.items()}


# ---------------------------------------------------------------------------------------------------- configs
@dataclass
class GenerationConfig:
    """How to decode."""

    decoding: str = "greedy"
    """"greedy" or "beam"."""
    num_beams: int = 4
    """Beams for beam search (ignored for greedy)."""
    max_new_tokens: int = 64
    """New tokens per prompt at most; generation also stops at a newline or the end token."""
    batch_size: int = 16
    """Prompts per generate() call (left-padded)."""
    bf16: bool = False
    """Run under bfloat16 autocast (about 1.8× faster on a modern CPU; scores move slightly)."""

    def problems(self) -> list[str]:
        out = []
        if self.decoding not in DECODINGS:
            out.append(f"decoding must be one of {DECODINGS}, got {self.decoding!r}")
        for name in ("num_beams", "max_new_tokens", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                out.append(f"{name} must be a positive integer, got {value!r}")
        return out


@dataclass
class EvalConfig:
    """What to evaluate on: one benchmark task, a split, optionally the first `limit` examples."""

    task: str = "e2e"
    """e2e, sst2, mrpc, rte, cola or stsb."""
    split: str | None = None
    """Defaults to the dev half: "dev" for E2E, "validation" for GLUE."""
    limit: int | None = None
    """Use only the first N examples (MRs for E2E)."""
    data_dir: str = str(DEFAULT_DATA_DIR)
    """The shared data folder (contains e2e/ and glue/)."""
    generation: GenerationConfig = dataclasses.field(default_factory=GenerationConfig)
    """Decoding settings (E2E)."""
    max_length: int = 128
    """Truncate classification inputs to this many tokens."""
    metrics: list[str] | None = None
    """Generation metrics to compute (default: all five)."""

    def __post_init__(self) -> None:
        if isinstance(self.generation, dict):
            self.generation = _from_dict(GenerationConfig, self.generation, "generation")
        problems = []
        if self.task not in TASKS:
            problems.append(f"task must be one of {TASKS}, got {self.task!r}")
        if self.limit is not None and (isinstance(self.limit, bool) or not isinstance(self.limit, int) or self.limit <= 0):
            problems.append(f"limit must be a positive integer or None, got {self.limit!r}")
        if not isinstance(self.max_length, int) or self.max_length <= 0:
            problems.append(f"max_length must be a positive integer, got {self.max_length!r}")
        if self.metrics is not None:
            bad = sorted(set(self.metrics) - set(GENERATION_METRICS))
            if bad:
                problems.append(f"metrics {bad} unknown; allowed {list(GENERATION_METRICS)}")
        problems += self.generation.problems()
        if problems:
            raise LorakitError("Invalid evaluation settings:\n  - " + "\n  - ".join(problems))

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


# ---------------------------------------------------------------------------------------------------- prediction
def _autocast(enabled: bool, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


class _NewlineStop:
    """Stop a row once its new text contains a newline (outputs are one line; works with any tokenizer)."""

    def __init__(self, tokenizer, prompt_length: int):
        self.tokenizer, self.prompt_length = tokenizer, prompt_length

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_length:], skip_special_tokens=True)
        return torch.tensor(["\n" in t for t in texts], device=input_ids.device)


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], config: GenerationConfig | None = None) -> list[str]:
    """Continue each prompt (greedy or beam search, batched, left-padded) and return the first line of new text."""
    config = config or GenerationConfig()
    problems = config.problems()
    if problems:
        raise LorakitError("Invalid generation settings: " + "; ".join(problems))
    device = next(model.parameters()).device
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"  # decoder-only models continue from the last position
    outputs: list[str] = []
    try:
        for start in range(0, len(prompts), config.batch_size):
            batch = list(prompts[start:start + config.batch_size])
            enc = tokenizer(batch, return_tensors="pt", padding=True).to(device)
            with _autocast(config.bf16, device):
                out = model.generate(**enc, max_new_tokens=config.max_new_tokens, do_sample=False,
                                     num_beams=config.num_beams if config.decoding == "beam" else 1,
                                     pad_token_id=tokenizer.pad_token_id,
                                     stopping_criteria=[_NewlineStop(tokenizer, enc["input_ids"].shape[1])])
            texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            outputs += [t.strip().split("\n")[0].strip() for t in texts]
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return outputs


@torch.no_grad()
def predict_classes(model, tokenizer, texts: Sequence[tuple[str, ...]], batch_size: int = 64,
                    max_length: int = 128) -> list[float]:
    """Class indices (or the regression value when the model has one output) for single texts or text pairs."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    preds: list[float] = []
    try:
        for start in range(0, len(texts), batch_size):
            batch = texts[start:start + batch_size]
            columns = list(zip(*batch))
            enc = tokenizer(*columns, return_tensors="pt", padding=True, truncation=True,
                            max_length=max_length).to(device)
            logits = model(**enc).logits.float()  # (B, num_labels)
            preds += logits[:, 0].tolist() if logits.shape[-1] == 1 else logits.argmax(-1).tolist()
    finally:
        model.train(was_training)
    return preds


def evaluate_model(model, tokenizer, config: EvalConfig) -> tuple[dict[str, float], list[dict]]:
    """Score the model as it stands (active adapter, merged or not) on `config.task`; returns (scores, outputs)."""
    t0 = time.time()
    if config.task == "e2e":
        rows = load_e2e(config.split or "dev", config.data_dir, config.limit)
        hyps = generate(model, tokenizer, [e2e_prompt(r["mr"]) for r in rows], config.generation)
        scores = generation_metrics(hyps, [r["references"] for r in rows], config.metrics or GENERATION_METRICS)
        outputs = [{"mr": r["mr"], "output": h} for r, h in zip(rows, hyps)]
    else:
        rows = load_glue(config.task, config.split or "validation", config.data_dir, config.limit)
        preds = predict_classes(model, tokenizer, [r["texts"] for r in rows], config.generation.batch_size,
                                config.max_length)
        scores = classification_metrics(config.task, preds, [r["label"] for r in rows])
        outputs = [{"idx": r["idx"], "prediction": p, "label": r["label"]} for r, p in zip(rows, preds)]
    scores = {k: round(v, 4) for k, v in scores.items()}
    scores["examples"] = len(rows)
    scores["seconds"] = round(time.time() - t0, 1)
    return scores, outputs


# ---------------------------------------------------------------------------------------------------- many models
def evaluate_many(config: EvalConfig, model: str = "smollm2-135m", adapters: Sequence[str] = (),
                  include_base: bool = True, merge: bool = False, out_dir: str | Path | None = None) -> dict[str, Any]:
    """Evaluate the base `model` (a name or a folder, e.g. a merged model) and each adapter folder on it.

    The model is loaded once; each adapter is loaded, optionally merged into the weights (the "merged model"
    setting: same scores, base-model speed), scored, then removed. With `out_dir`, writes `results.json`,
    `results.md` and `outputs/<name>.jsonl`. Returns {"config", "model", "results": {name: scores}}.
    """
    from lorakit import delete_adapter, load_adapter, load_model, merge as merge_adapter, set_adapter, unmerge

    if not include_base and not adapters:
        raise LorakitError("Nothing to evaluate: pass one or more adapters, or include the base model.")
    for path in adapters:
        if not Path(path).is_dir():
            raise LorakitError(f"Adapter folder {path} does not exist (expected a lorakit or PEFT adapter folder).")
    task = "causal-lm" if config.task == "e2e" else "seq-cls"
    num_labels = None if config.task == "e2e" else GLUE_TASKS[config.task].num_labels
    base, tokenizer = load_model(model, task=task, num_labels=num_labels)
    results: dict[str, Any] = {}
    outputs: dict[str, list[dict]] = {}
    names = _unique_names(adapters)
    if include_base:
        results["base"], outputs["base"] = evaluate_model(base, tokenizer, config)
    for name, path in zip(names, adapters):
        load_adapter(base, path, adapter=name)
        set_adapter(base, name)
        if merge:
            merge_adapter(base, name)
        try:
            results[name], outputs[name] = evaluate_model(base, tokenizer, config)
        finally:
            unmerge(base)
            delete_adapter(base, name)
        results[name]["adapter"] = str(path)
    report = {"config": config.to_dict(), "model": model, "merged": merge, "results": results}
    if out_dir is not None:
        write_results(report, outputs, out_dir)
    return report


def _unique_names(paths: Sequence[str]) -> list[str]:
    names: list[str] = []
    for path in paths:
        stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in Path(path).name) or "adapter"
        name, k = stem, 2
        while name in names or name == "base":
            name, k = f"{stem}_{k}", k + 1
        names.append(name)
    return names


def results_table(results: dict[str, dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A markdown table: one row per evaluated model, one column per metric."""
    if not results:
        return ""
    columns = list(columns or [k for k in next(iter(results.values())) if k not in ("adapter", "seconds")])
    lines = ["| model | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for name, scores in results.items():
        cells = [_fmt(scores.get(c)) for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:,.2f}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def write_results(report: dict[str, Any], outputs: dict[str, list[dict]], out_dir: str | Path) -> None:
    out_dir = Path(out_dir)
    atomic_write_text(out_dir / "results.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(out_dir / "results.md", results_table(report["results"]))
    for name, rows in outputs.items():
        atomic_write_text(out_dir / "outputs" / f"{name}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
