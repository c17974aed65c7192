"""`lorakit eval`: score the base model and any number of adapters (or merged models) on the user's own file or on a
preset, side by side, writing results.json, a markdown table, a bar chart and every example's output.

One path for every source: `examples.read_eval_set` reads the file with training's reader and field options; then
instruction and chat files are decoded (greedy, beam or sampled) and scored with generation metrics, classification
files are predicted and scored with label metrics. A preset (e2e, sst2, mrpc, rte, cola, stsb) only names a staged
file, its format and its default metrics. The settings (`EvalConfig`, `GenerationConfig`, importable from here too) and
the presets are in `eval.config`, which loads no torch.

Metrics use the established implementations, with these conventions (generation metrics on lowercased text, as the E2E
scripts do; all ×100 except NIST and CIDEr):

- exact_match: the share of outputs equal to one of their references after lowercasing and collapsing whitespace.
- BLEU: sacrebleu corpus BLEU, 13a tokenisation, every reference of an input used (variable counts allowed).
- chrF: sacrebleu corpus chrF (character 6-grams, β=2), every reference used.
- NIST: nltk `corpus_nist`, n=5, on the same 13a tokens.
- METEOR: METEOR 1.5 (pycocoevalcap's jar, `-l en -norm`; needs Java).
- ROUGE-L: rouge-score's `rougeL` F-measure, the maximum over an input's references, averaged over inputs.
  (The E2E script uses pycocoevalcap's ROUGE-L with β=1.2 over pooled references; numbers differ slightly.)
- CIDEr: pycocoevalcap CIDEr (n=4, σ=6) on 13a-tokenised text.
- Labels: accuracy and F1 (scikit-learn; binary F1 of class 1 with two classes, macro F1 with more), Matthews
  correlation (scikit-learn), Pearson/Spearman (scipy, regression presets such as stsb).
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

from lorakit.data.benchmarks import DEFAULT_DATA_DIR, GLUE_TASKS
from lorakit.data.config import DataConfig
from lorakit.data.records import detect_format, read_records
from lorakit.errors import LorakitError
from lorakit.eval.config import (E2E_PROMPT, EVAL_FORMATS, GENERATION_METRICS, LABEL_METRICS, EvalConfig,
                                 GenerationConfig, Preset, preset_path)
from lorakit.eval.examples import EvalSet, read_eval_set
from lorakit.fsutil import atomic_write_text

E2E_METRICS = ("bleu", "nist", "meteor", "rouge_l", "cider")
DEFAULT_METRICS = {"instruction": ("exact_match", "bleu", "chrf", "rouge_l"), "chat": ("exact_match", "bleu", "chrf",
                   "rouge_l"), "classification": ("accuracy", "f1")}


def e2e_prompt(mr: str) -> str:
    """The prompt used for E2E everywhere in lorakit (prompted base model and fine-tuning alike)."""
    return E2E_PROMPT.format(mr=mr)


# ---------------------------------------------------------------------------------------------------- metrics
def _tokens(text: str) -> list[str]:
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    return Tokenizer13a()(text.lower().strip()).split()


def generation_metrics(hypotheses: Sequence[str], references: Sequence[Sequence[str]],
                       metrics: Sequence[str] = E2E_METRICS) -> dict[str, float]:
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
    most = max(len(rs) for rs in refs)
    streams = [[rs[k] if k < len(rs) else None for rs in refs] for k in range(most)]  # sacrebleu's reference layout
    scores: dict[str, float] = {}
    if "exact_match" in metrics:
        scores["exact_match"] = 100 * sum(h.lower() in {r.lower() for r in rs} for h, rs in zip(hyps, refs)) / len(hyps)
    if "bleu" in metrics:
        import sacrebleu

        scores["bleu"] = sacrebleu.corpus_bleu(hyps, streams, lowercase=True, tokenize="13a").score
    if "chrf" in metrics:
        from sacrebleu.metrics import CHRF

        scores["chrf"] = CHRF(lowercase=True).corpus_score(hyps, streams).score
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
            for pipe in (scorer.meteor_p.stdout, scorer.meteor_p.stderr):  # unclosed, they warn when collected
                if pipe is not None:
                    pipe.close()
    return float(score)


def label_metrics(predictions: Sequence[float], labels: Sequence[float],
                  metrics: Sequence[str] = ("accuracy", "f1")) -> dict[str, float]:
    """Label metrics of class ids (or regression values); accuracy/F1/Matthews in %, correlations ×100."""
    unknown = sorted(set(metrics) - set(LABEL_METRICS))
    if unknown:
        raise LorakitError(f"Unknown label metric(s) {unknown}; allowed: {list(LABEL_METRICS)}.")
    if len(predictions) != len(labels) or not labels:
        raise LorakitError(f"Need equally many predictions and labels (got {len(predictions)} and {len(labels)}).")
    out = {}
    for name in metrics:
        if name == "accuracy":
            from sklearn.metrics import accuracy_score
            out[name] = 100 * accuracy_score(labels, predictions)
        elif name == "f1":
            from sklearn.metrics import f1_score
            binary = set(labels) | set(predictions) <= {0, 1}
            out[name] = 100 * f1_score(labels, predictions, average="binary" if binary else "macro")
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


def classification_metrics(task: str, predictions: Sequence[float], labels: Sequence[float]) -> dict[str, float]:
    """The GLUE metrics for `task` (its preset's default metrics)."""
    if task not in GLUE_TASKS:
        raise LorakitError(f"task must be one of {sorted(GLUE_TASKS)}, got {task!r}.")
    return label_metrics(predictions, labels, GLUE_TASKS[task].metrics)


# ---------------------------------------------------------------------------------------------------- plan
@dataclass
class Plan:
    """What one evaluation run reads and reports, resolved from an EvalConfig before any model is loaded."""

    path: Path
    data: DataConfig
    """How the file is read (training's reader options; format resolved)."""
    preset: Preset | None
    format: str
    classify: str | None
    metrics: tuple[str, ...]


def plan(config: EvalConfig, trained_head: bool = False) -> tuple[Plan, list]:
    """The file, the reading options (a training DataConfig), format, classifier and metrics; and the records.
    `trained_head`: the model or an adapter was trained for sequence classification (see `has_head`)."""
    preset = config.preset
    fields = {name: getattr(config, name) for name in ("prompt_field", "completion_field", "messages_field",
                                                       "text_field", "text_pair_field", "label_field", "chat_template")}
    if preset is not None:
        path, split = preset_path(config.task or "e2e", config.split, config.data_dir)
        if not path.is_file():
            raise LorakitError(f"Benchmark file {path} not found. Point --data-dir at the shared data folder "
                               f"(default {DEFAULT_DATA_DIR}, which must contain e2e/ and glue/).")
        fields.update(preset.fields_for(split))
        fields["chat_template"] = False if preset.prompt_template else fields["chat_template"]
        data = DataConfig(format=preset.format, split=split, **fields)
    else:
        path = Path(config.data)
        data = DataConfig(format=config.format, split=config.split or "validation", **fields)
    records = read_records(path, data.split)[:config.limit]
    fmt = data.format if data.format != "auto" else detect_format(records[0], data)
    data = dataclasses.replace(data, format=fmt)
    if fmt not in EVAL_FORMATS:
        raise LorakitError(f"{records[0].source}: the records look like the {fmt!r} format (fields "
                           f"{sorted(records[0].fields)}), which has no reference answer to score; allowed formats: "
                           f"{list(EVAL_FORMATS[1:])}. Set --format and the --*-field options (training's data.* keys).")
    default = preset.classify if preset else "head" if trained_head else "choice"
    classify = (config.classify or default) if fmt == "classification" else None
    allowed = LABEL_METRICS if fmt == "classification" else GENERATION_METRICS
    metrics = tuple(config.metrics or (preset.metrics if preset else DEFAULT_METRICS[fmt]))
    wrong = [m for m in metrics if m not in allowed]
    if wrong:
        raise LorakitError(f"metrics {wrong} do not apply to {fmt} data ({path}); allowed: {list(allowed)}.")
    return Plan(path, data, preset, fmt, classify, metrics), records


def has_head(model: str, adapters: Sequence[str]) -> bool:
    """Whether the model folder is a sequence-classification model or an adapter was saved from one (PEFT's
    task_type SEQ_CLS in adapter_config.json): such adapters carry the trained head, so classify with it."""
    from lorakit.lora.adapter_io import CONFIG_FILE

    def read(path: Path) -> dict:
        try:
            return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        except (OSError, ValueError):
            return {}  # unreadable here; loading the model or adapter reports it properly

    architectures = read(Path(model) / "config.json").get("architectures") or []
    return any(str(a).endswith("ForSequenceClassification") for a in architectures) or \
        any(read(Path(a) / CONFIG_FILE).get("task_type") == "SEQ_CLS" for a in adapters)


# ---------------------------------------------------------------------------------------------------- prediction
@contextlib.contextmanager
def _inference(model):
    """Dropout off while scoring (the caller's train/inference mode restored after); yields the model's device."""
    was_training = model.training
    model.train(False)
    try:
        yield next(model.parameters()).device
    finally:
        model.train(was_training)


def _autocast(enabled: bool, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


class _NewlineStop:
    """Stop a row once its new text contains a newline (outputs are one line; works with any tokenizer)."""

    def __init__(self, tokenizer, prompt_length: int):
        self.tokenizer, self.prompt_length = tokenizer, prompt_length

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_length:], skip_special_tokens=True)
        return torch.tensor(["\n" in t for t in texts], device=input_ids.device)


def _left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str | list[int]], config: GenerationConfig | None = None,
             first_line: bool = True) -> list[str]:
    """Continue each prompt (text, or token ids such as a chat-templated prompt) with greedy decoding, beam search
    or sampling, batched and left-padded; return the new text (its first line with `first_line`)."""
    config = config or GenerationConfig()
    problems = config.problems()
    if problems:
        raise LorakitError("Invalid generation settings: " + "; ".join(problems))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sampling = {"do_sample": True, "temperature": float(config.temperature), "top_p": float(config.top_p)} \
        if config.temperature > 0 else {"do_sample": False}
    if config.temperature > 0:
        torch.manual_seed(config.seed)
    outputs: list[str] = []
    with _inference(model) as device:
        for start in range(0, len(prompts), config.batch_size):
            batch = [list(tokenizer(p).input_ids) if isinstance(p, str) else list(p)
                     for p in prompts[start:start + config.batch_size]]
            ids, mask = _left_pad(batch, pad_id, device)  # decoder-only models continue from the last position
            stop = [_NewlineStop(tokenizer, ids.shape[1])] if first_line else []
            with _autocast(config.bf16, device):
                out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=config.max_new_tokens,
                                     num_beams=config.num_beams if config.decoding == "beam" else 1,
                                     pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id,
                                     stopping_criteria=stop, **sampling)
            texts = tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
            outputs += [t.strip().split("\n")[0].strip() if first_line else t.strip() for t in texts]
    return outputs


@torch.no_grad()
def predict_classes(model, tokenizer, texts: Sequence[tuple[str, ...]], batch_size: int = 64,
                    max_length: int = 128) -> list[float]:
    """Class indices (or the regression value when the model has one output) for single texts or text pairs, from a
    sequence-classification model's head."""
    preds: list[float] = []
    with _inference(model) as device:
        for start in range(0, len(texts), batch_size):
            batch = texts[start:start + batch_size]
            columns = list(zip(*batch))
            enc = tokenizer(*columns, return_tensors="pt", padding=True, truncation=True,
                            max_length=max_length).to(device)
            logits = model(**enc).logits.float()  # (B, num_labels)
            preds += logits[:, 0].tolist() if logits.shape[-1] == 1 else logits.argmax(-1).tolist()
    return preds


@torch.no_grad()
def predict_choices(model, tokenizer, prompts: Sequence[list[int]], choices: Sequence[str],
                    batch_size: int = 16) -> list[int]:
    """For a causal LM: the index of the choice whose tokens (then the end token) are likeliest after each prompt.

    A choice is tokenized as an instruction completion is in training (no special tokens, EOS appended), so an
    adapter trained on {"prompt": text, "completion": label} scores exactly what it learned; the end token makes
    "positive" and "positive but..." different answers."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise LorakitError("Choosing among labels needs a tokenizer with an end token; this one has none.")
    answers = [list(tokenizer(c, add_special_tokens=False).input_ids) + [eos] for c in choices]
    pairs = [(p, a) for p in prompts for a in answers]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    totals: list[float] = []
    with _inference(model) as device:
        for start in range(0, len(pairs), batch_size):
            batch = pairs[start:start + batch_size]
            width = max(len(p) + len(a) for p, a in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)  # (B, T), right padded
            mask = torch.zeros_like(ids)
            for i, (p, a) in enumerate(batch):
                ids[i, :len(p) + len(a)] = torch.tensor(p + a)
                mask[i, :len(p) + len(a)] = 1
            logp = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float().log_softmax(-1)
            for i, (p, a) in enumerate(batch):
                steps = torch.arange(len(p) - 1, len(p) + len(a) - 1)  # the positions that predict the answer
                totals.append(float(logp[i, steps, torch.tensor(a)].sum()))  # (V,) picked per answer token
    k = len(answers)
    return [max(range(k), key=lambda j: totals[n * k + j]) for n in range(len(prompts))]


def score(model, tokenizer, run: Plan, examples: EvalSet, config: EvalConfig) -> tuple[dict[str, float], list[dict]]:
    """Score the model as it stands (active adapter, merged or not) on `examples`; returns (scores, outputs)."""
    t0 = time.time()
    rows = examples.examples
    if examples.format == "classification":
        labels = [e.label for e in rows]
        if run.classify == "head":
            preds = predict_classes(model, tokenizer, [e.texts for e in rows], config.generation.batch_size,
                                    config.max_length)
        else:
            from lorakit.data.records import prompt_ids

            prompts = [prompt_ids(tokenizer, e.prompt, run.data.chat_template) for e in rows]
            preds = predict_choices(model, tokenizer, prompts, examples.label_names, config.generation.batch_size)
        scores = label_metrics(preds, labels, run.metrics)
        names = examples.label_names
        outputs = [{"source": e.source, "text": e.prompt, "prediction": names[int(p)] if names else p,
                    "label": names[e.label] if names else e.label} for e, p in zip(rows, preds)]
    else:
        first_line = bool(run.preset and run.preset.first_line)
        hyps = generate(model, tokenizer, [e.prompt_ids for e in rows], config.generation, first_line=first_line)
        scores = generation_metrics(hyps, [e.references for e in rows], run.metrics)
        outputs = [{"source": e.source, "prompt": e.prompt, "output": h, "references": e.references}
                   for e, h in zip(rows, hyps)]
    scores = {k: round(scores[k], 4) for k in run.metrics}  # in the order asked for
    scores["examples"] = len(rows)
    scores["seconds"] = round(time.time() - t0, 1)
    return scores, outputs


def evaluate_model(model, tokenizer, config: EvalConfig) -> tuple[dict[str, float], list[dict]]:
    """Score the model as it stands on `config`'s data; returns (scores, outputs)."""
    run, records = plan(config)
    return score(model, tokenizer, run, read_eval_set(records, tokenizer, run.data, run.preset), config)


# ---------------------------------------------------------------------------------------------------- many models
def evaluate_many(config: EvalConfig, model: str = "smollm2-135m", adapters: Sequence[str] = (),
                  include_base: bool = True, merge: bool = False, out_dir: str | Path | None = None) -> dict[str, Any]:
    """Evaluate the base `model` (a name or a folder, e.g. a merged model) and each adapter folder on it.

    The model is loaded once; each adapter is loaded, optionally merged into the weights (the "merged model"
    setting: same scores, base-model speed), scored, then removed. With `out_dir`, writes `results.json`,
    `results.md`, `results.png` and `outputs/<name>.jsonl`. Returns {"config", "model", "data", "format",
    "metrics", "results": {name: scores}}.
    """
    from lorakit import delete_adapter, load_adapter, load_model, merge as merge_adapter, set_adapter, unmerge

    if not include_base and not adapters:
        raise LorakitError("Nothing to evaluate: pass one or more adapters, or include the base model.")
    for path in adapters:
        if not Path(path).is_dir():
            raise LorakitError(f"Adapter folder {path} does not exist (expected a lorakit or PEFT adapter folder).")
    run, records = plan(config, has_head(model, adapters))
    examples = None
    if run.format == "classification":  # labels first: a classification head needs their count
        examples = read_eval_set(records, None, run.data, run.preset)
    head = run.classify == "head"
    num_labels = (1 if examples.regression else len(examples.label_names)) if head else None
    base, tokenizer = load_model(model, task="seq-cls" if head else "causal-lm", num_labels=num_labels)
    examples = examples or read_eval_set(records, tokenizer, run.data, run.preset)
    results: dict[str, Any] = {}
    outputs: dict[str, list[dict]] = {}
    names = _unique_names(adapters)
    if include_base:
        results["base"], outputs["base"] = score(base, tokenizer, run, examples, config)
    for name, path in zip(names, adapters):
        load_adapter(base, path, adapter=name)
        set_adapter(base, name)
        if merge:
            merge_adapter(base, name)
        try:
            results[name], outputs[name] = score(base, tokenizer, run, examples, config)
        finally:
            unmerge(base)
            delete_adapter(base, name)
        results[name]["adapter"] = str(path)
    report = {"config": config.to_dict(), "model": model, "merged": merge, "data": str(run.path),
              "format": run.format, "classify": run.classify, "metrics": list(run.metrics), "results": results}
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
    """results.json (what the UI reads), results.md, results.png and outputs/<name>.jsonl (one line per example)."""
    out_dir = Path(out_dir)
    atomic_write_text(out_dir / "results.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(out_dir / "results.md", results_table(report["results"]))
    for name, rows in outputs.items():
        atomic_write_text(out_dir / "outputs" / f"{name}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    plot_results(report["results"], report.get("metrics") or [], out_dir / "results.png")


def plot_results(results: dict[str, dict[str, Any]], metrics: Sequence[str], path: str | Path) -> Path:
    """A bar chart: one panel per metric (their scales differ: NIST and CIDEr are not percentages), one bar per model."""
    import os
    import tempfile

    import matplotlib

    matplotlib.use("Agg")  # files only; never a window
    import matplotlib.pyplot as plt

    metrics = [m for m in metrics if any(isinstance(s.get(m), (int, float)) for s in results.values())]
    names = list(results)
    fig, axes = plt.subplots(1, max(1, len(metrics)), figsize=(1.2 + 0.5 * len(names) * max(1, len(metrics)) + 1.5
                                                                 * len(metrics), 3.2), squeeze=False)
    colors = [f"C{i % 10}" for i in range(len(names))]
    for ax, metric in zip(axes[0], metrics):
        values = [results[n].get(metric) or 0.0 for n in names]
        bars = ax.bar(range(len(names)), values, color=colors)
        ax.bar_label(bars, labels=[_fmt(float(v)) for v in values], fontsize=7)
        ax.set_title(metric, fontsize=9)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
        ax.margins(y=0.15)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)  # written whole, then renamed (as atomic_write_text)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120, format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
