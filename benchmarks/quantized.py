"""Quantized frozen bases (QLoRA) on SmolLM2-135M: weight memory, training step time and logit drift, fp32 vs NF4 vs
int8 (bitsandbytes) vs int8-wo (torchao int8 weight-only).

Budget (defaults): LoRA r=8 alpha=16 dropout 0 on W_q,W_v (fp32 A/B); one fixed batch of 8 × 128 E2E tokens (every
token supervised); AdamW; 1 warm-up step then 5 measured steps per base, median reported; 1 torch thread; ~10 minutes.
The four models are held at once and step in turn (fp32, nf4, int8, int8-wo, fp32, ...) so that load from other
processes on a shared machine hits them alike.
Weight memory is the bytes of the base model's parameters and buffers plus bitsandbytes' quantization statistics
(absmax, codebooks), or torchao's int8 data, scales and zero points, before LoRA is added. The output head / tied
embeddings stay fp32 in every variant. Drift: the quantized base's logits vs the fp32 base's on 2 × 64 tokens in
eval mode (max and mean |Δ|, and how often the top-1 token agrees); bitsandbytes' int8 layer also rounds the
activations to int8 there (in training mode it does not); torchao's int8-wo keeps float activations in both.
After the steps, `merge_quantized` merges each quantized model's trained adapter into its dequantized base (fp32)
and reports the drift against the quantized base + adapter on the same tokens. held_for_backward_MiB: what autograd
keeps for backward in one training forward beyond the model's parameters (activations, and for torchao's own linear
a float copy of each weight; the extra row "int8-wo torchao-linear" runs the same int8 weights through it).

    python benchmarks/quantized.py        # writes benchmarks/results/quantized.json + .md
"""

from __future__ import annotations

import statistics
import time

import torch
from _common import base_parser, budget_line, set_threads, write

import lorakit as lk
from lorakit.data.benchmarks import load_e2e
from lorakit.models.quantization import merge_quantized, weight_bytes

# row name -> quantize argument; "int8-wo torchao-linear" is torchao's own nn.Linear forward on the same int8 weights,
# to show what lorakit's Int8WeightOnlyLinear backward saves.
VARIANTS = {"fp32": None, "nf4": "nf4", "int8": "int8", "int8-wo": "int8-wo", "int8-wo torchao-linear": "torchao"}


def load(quantize: str | None):
    if quantize != "torchao":
        return lk.load_model("smollm2-135m", quantize=quantize)
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    model, tokenizer = lk.load_model("smollm2-135m")
    quantize_(model, Int8WeightOnlyConfig(set_inductor_config=False),
              filter_fn=lambda module, name: isinstance(module, torch.nn.Linear) and name != "lm_head")
    return model, tokenizer


def held_for_backward_mib(model, batch: dict[str, torch.Tensor]) -> float:
    """MiB of the tensors autograd keeps for backward in one forward, beyond the model's own parameters."""
    own = set()
    for p in model.parameters():
        try:
            own.add(p.untyped_storage().data_ptr())
        except (RuntimeError, NotImplementedError):  # a torchao wrapper tensor has no storage of its own
            pass
    held: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return t  # a wrapper tensor (a quantized weight the model already holds)
        if storage.data_ptr() not in own:
            held[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**batch).loss  # noqa: B018  (the graph is dropped at once)
    return round(sum(held.values()) / 2**20, 1)


def fixed_batch(tokenizer, data_dir: str, batch: int, seq: int) -> dict[str, torch.Tensor]:
    """E2E pairs packed into `batch` rows of exactly `seq` tokens, every token supervised."""
    ids: list[int] = []
    for row in load_e2e("train", data_dir):
        ids += tokenizer(row["mr"] + " -> " + row["references"][0] + tokenizer.eos_token)["input_ids"]
        if len(ids) >= batch * seq:
            break
    input_ids = torch.tensor(ids[: batch * seq]).view(batch, seq)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}


class Stepper:
    """One model with LoRA and its optimizer; `step()` times one training step."""

    def __init__(self, model, batch: dict[str, torch.Tensor]):
        self.model, self.batch = model.train(), batch
        self.opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
        self.times: list[float] = []
        self.losses: list[float] = []

    def step(self, measured: bool) -> None:
        t0 = time.perf_counter()
        loss = self.model(**self.batch).loss
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if measured:
            self.times.append(time.perf_counter() - t0)
            self.losses.append(round(loss.item(), 4))


def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--steps", type=int, default=5, help="measured steps per base (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.set_defaults(threads=1)
    args = parser.parse_args()
    set_threads(args.threads)

    rows, steppers, reference = {}, {}, None
    for name, quantize in VARIANTS.items():
        t0 = time.perf_counter()
        model, tokenizer = load(quantize)
        load_s = time.perf_counter() - t0
        batch = fixed_batch(tokenizer, args.data_dir, args.batch_size, args.seq)
        probe = batch["input_ids"][:2, :64]
        with torch.no_grad():
            logits = model(input_ids=probe).logits
        row = {"weight_MiB": round(weight_bytes(model) / 2**20, 1), "load_s": round(load_s, 1)}
        if reference is None:
            reference = logits
        else:
            diff = (logits - reference).abs()
            row.update(max_logit_drift=round(float(diff.max()), 4), mean_logit_drift=round(float(diff.mean()), 4),
                       top1_agree_pct=round(100 * float((logits.argmax(-1) == reference.argmax(-1)).float().mean()), 1))
        lk.add_lora(model, lk.LoraConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"]))
        rows[name], steppers[name] = row, Stepper(model, batch)
    for i in range(args.warmup + args.steps):
        for name, stepper in steppers.items():
            stepper.step(measured=i >= args.warmup)
            print(f"  round {i + 1}: {name} {stepper.times[-1] if stepper.times else 0:.1f} s", flush=True)
    for name, stepper in steppers.items():
        rows[name].update(step_s_median=round(statistics.median(stepper.times), 3),
                          step_s_all=[round(t, 3) for t in stepper.times], losses=stepper.losses,
                          held_for_backward_MiB=held_for_backward_mib(stepper.model, stepper.batch))
        if name != "fp32":  # the trained adapter into the dequantized base (fp32), vs quantized base + adapter
            _, report = merge_quantized(stepper.model.eval(), probe)
            rows[name].update(merge_drift=float(f"{report.max_logit_diff:.3g}"),
                              adapter_effect=round(report.adapter_effect, 4))
        print(f"  [{name}] {rows[name]}", flush=True)
    for name, row in rows.items():
        row["weight_vs_fp32"] = round(row["weight_MiB"] / rows["fp32"]["weight_MiB"], 3)
        row["step_vs_fp32"] = round(row["step_s_median"] / rows["fp32"]["step_s_median"], 2)

    budget = budget_line(model="SmolLM2-135M", lora="r=8 alpha=16 q_proj,v_proj fp32",
                         batch=f"{args.batch_size}×{args.seq}",
                         warmup_steps=args.warmup, measured_steps=args.steps, threads=args.threads)
    header = ("# Quantized frozen base (QLoRA): weight memory, training step time, logit drift vs fp32\n\n"
              f"Budget: {budget}. bitsandbytes NF4 (double-quantized statistics, blocks of 64, fp32 compute) and "
              "int8 (per-row absmax); torchao int8-wo (Int8WeightOnlyConfig: int8 per-row weights, fp32 "
              "activations); the tied embeddings / output head stay fp32. Drift on 2×64 tokens, eval mode "
              "(int8 activations for the bitsandbytes int8 base). merge_drift: max |logits| difference of "
              "merge_quantized (the trained adapter merged into the dequantized base, fp32) vs quantized base + "
              "adapter on the same tokens; adapter_effect: max |base + adapter − base| there. held_for_backward_MiB: "
              "tensors autograd keeps for backward in one training forward, beyond the model's parameters "
              "(bitsandbytes' autograd functions keep their quantized weights outside this count). int8-wo "
              "torchao-linear: the same int8 weights with torchao's own linear instead of lorakit's "
              "Int8WeightOnlyLinear.")
    table = {n: {**r, "merge_drift": f"{r['merge_drift']:.2g}"} if "merge_drift" in r else r for n, r in rows.items()}
    write("quantized", args.out, {"benchmark": "quantized", "budget": budget, "args": vars(args), "results": rows},
          table, ["weight_MiB", "weight_vs_fp32", "held_for_backward_MiB", "step_s_median", "step_vs_fp32",
                  "max_logit_drift", "mean_logit_drift", "top1_agree_pct", "merge_drift", "adapter_effect"], header)


if __name__ == "__main__":
    main()
