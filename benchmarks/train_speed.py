"""Training-step speed and memory: full fine-tuning vs PEFT LoRA vs lorakit LoRA vs the floor, on SmolLM2-135M.

Budget (defaults): batch 8 × 128 tokens of E2E text (every token supervised, and once with the prompts masked as in
instruction tuning), plus a 2 × 512 long-sequence case; LoRA r=8 alpha=16 dropout 0, targets W_q,W_v and all-linear;
each variant runs in its own process (so peak RSS is its own) for 2 warm-up + 6 measured steps, twice, in alternating
order; ~40-60 minutes on 2 CPU cores. Reported: median step time, peak RSS, ratios.

Variants (same batch, same LoRA math):
  full       full fine-tuning, AdamW, fp32, the model's own loss
  peft       PEFT LoRA, fp32, the model's own loss (PEFT's default setup)
  peft-thp   `peft` with PyTorch's transparent huge pages on, as `import lorakit` sets them (equal allocator)
  lorakit    lorakit LoRA, fp32 (equal math to `peft`) as `lorakit.train` runs it by default: fused linear+cross-entropy
             loss on labelled positions only, gated MLP keeping one activation fewer (`lorakit.models.fused`), transparent
             huge pages for large tensors (`lorakit.memory`)
  lk-plain   `lorakit` with huge pages off (equal allocator to `peft`)
  lk-lean    `lorakit` plus the opt-in glibc mmap threshold of 128 KiB (`malloc_mmap_threshold_kb: 128`)
  lk-bf16    frozen base cast to bf16 once, LoRA fp32, eager attention, fused loss; run only where this CPU's bf16
             matmul is faster than fp32 (AMX / AVX512-BF16), which the benchmark measures first (--bf16 on forces it)
  floor      forward + backward through the frozen fp32 model, no weight gradients at all (fused loss, fused MLP),
             no optimizer, allocator as `lorakit`

Also checked: with identical A/B values PEFT and lorakit give the same loss and LoRA gradients; the loss trajectory
over --traj-steps steps (lorakit fp32, and lorakit bf16 where it runs, vs PEFT fp32) from identical initial A/B;
inference overhead of an unmerged adapter at batch 1 × 128 tokens and the cost of switching adapters.

    python benchmarks/train_speed.py                 # everything, writes benchmarks/results/train_speed.json + .md
    python benchmarks/train_speed.py --quick         # 1 round, 3 measured steps, fewer cases
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "src"))
from lorakit.hardware import cpu_info, cpu_line  # noqa: E402  (children set their own THP_MEM_ALLOC_ENABLE)
TARGETS = {"qv": ["q_proj", "v_proj"], "all": "all-linear"}


# ---------------------------------------------------------------------------------------------------- data
def make_batch(tokenizer, data_dir: Path, batch: int, seq: int, offset: int = 0,
               mask_prompt: bool = False) -> dict[str, torch.Tensor]:
    """Pack E2E training pairs into `batch` rows of exactly `seq` tokens. Every token is supervised, or with
    `mask_prompt` only the target sentences (the meaning representations get label -100, as in instruction tuning)."""
    ids, labels = [], []
    with open(data_dir / "e2e" / "train.jsonl", encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            if i < offset:
                continue
            row = json.loads(line)
            prompt = tokenizer(row["meaning_representation"] + " ->")["input_ids"]
            target = tokenizer(" " + row["target"] + tokenizer.eos_token)["input_ids"]
            ids += prompt + target
            labels += ([-100] * len(prompt) if mask_prompt else prompt) + target
            if len(ids) >= batch * seq:
                break
    input_ids = torch.tensor(ids[: batch * seq]).view(batch, seq)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
            "labels": torch.tensor(labels[: batch * seq]).view(batch, seq)}


# ---------------------------------------------------------------------------------------------------- variants
def build(variant: str, targets: str, r: int = 8):
    import lorakit as lk
    from lorakit.models.fused import fuse_gated_mlp

    attn = "eager" if variant == "lk-bf16" else "sdpa"
    model, tok = lk.load_model(attn_implementation=attn)
    model.train()
    if variant == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    elif variant in ("peft", "peft-thp"):
        import peft

        cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=TARGETS[targets])
        model = peft.get_peft_model(model, cfg)
    elif variant in ("lorakit", "lk-plain", "lk-lean", "lk-bf16"):
        lk.add_lora(model, lk.LoraConfig(r=r, alpha=2 * r, target_modules=TARGETS[targets]))
        fuse_gated_mlp(model)  # what lorakit.train does: exact, one MLP activation fewer kept for backward
        if variant == "lk-bf16":
            lk.cast_base(model, torch.bfloat16)
    elif variant == "floor":
        for p in model.parameters():
            p.requires_grad_(False)
        fuse_gated_mlp(model)
    else:
        raise SystemExit(f"unknown variant {variant}")
    return model, tok


def loss_fn(variant: str, model, batch):
    from lorakit.train.losses import causal_lm_loss

    if variant in ("full", "peft", "peft-thp"):
        return model(**batch).loss
    if variant == "floor":
        embeds = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_(True)
        out = model.base_model(inputs_embeds=embeds, attention_mask=batch["attention_mask"])
        from lorakit.train.losses import fused_linear_cross_entropy

        hidden, labels = out.last_hidden_state[:, :-1], batch["labels"][:, 1:]
        keep = labels != -100
        return fused_linear_cross_entropy(hidden[keep], model.lm_head.weight, labels[keep])
    return causal_lm_loss(model, batch["input_ids"], batch["labels"], attention_mask=batch["attention_mask"])


HUGE_PAGES = ("peft-thp", "lorakit", "lk-lean", "lk-bf16", "floor")  # THP_MEM_ALLOC_ENABLE=1 (what `import lorakit` sets)
MMAP_128K = ("lk-lean",)


def worker(args) -> None:
    from lorakit.memory import set_mmap_threshold

    if args.variant in MMAP_128K:
        set_mmap_threshold(128 * 1024)  # lorakit.train with malloc_mmap_threshold_kb: 128
    torch.manual_seed(0)
    model, tok = build(args.variant, args.targets)
    batch = make_batch(tok, Path(args.data_dir), args.batch, args.seq, mask_prompt=args.mask_prompt)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None
    times, losses = [], []
    for step in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        loss = loss_fn(args.variant, model, batch)
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        losses.append(loss.item())
        if step >= args.warmup:
            times.append(dt)
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2
    print(json.dumps({"times": times, "peak_rss_gb": peak_gb, "losses": losses}))


def run_variant(variant, targets, batch, seq, args, mask_prompt: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--variant", variant, "--targets", targets, "--batch", str(batch),
           "--seq", str(seq), "--steps", str(args.steps), "--warmup", str(args.warmup), "--data-dir", args.data_dir]
    cmd += ["--mask-prompt"] if mask_prompt else []
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "THP_MEM_ALLOC_ENABLE": "1" if variant in HUGE_PAGES else "0"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"worker {variant}/{targets} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------- checks
def equivalence_check(data_dir: Path, traj_steps: int, bf16_trajectory: bool) -> dict:
    """Same A/B in PEFT and lorakit: same loss and LoRA gradients; then loss trajectories from the same start."""
    import peft

    import lorakit as lk
    from lorakit.models.fused import fuse_gated_mlp
    from lorakit.train.losses import causal_lm_loss

    def pair(bf16: bool = False):
        torch.manual_seed(0)
        pm, tok = lk.load_model()
        pm = peft.get_peft_model(pm, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
        km, _ = lk.load_model(attn_implementation="eager" if bf16 else None)
        lk.add_lora(km, lk.LoraConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"]))
        fuse_gated_mlp(km)
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
            ours = dict(km.named_parameters())
            for name, p in pm.named_parameters():
                if "lora_" in name:
                    ours[name.removeprefix("base_model.model.")].copy_(p)
        if bf16:
            lk.cast_base(km, torch.bfloat16)
        return pm, km, tok

    pm, km, tok = pair()
    batch = make_batch(tok, data_dir, 8, 128)
    lp = pm(**batch).loss
    lp.backward()
    lo = causal_lm_loss(km, batch["input_ids"], batch["labels"], attention_mask=batch["attention_mask"])
    lo.backward()
    theirs = {n.removeprefix("base_model.model."): p.grad for n, p in pm.named_parameters() if p.requires_grad}
    grad_diff = max((p.grad - theirs[n]).abs().max().item() for n, p in km.named_parameters() if p.requires_grad)
    grad_scale = max(g.abs().max().item() for g in theirs.values())
    result = {"loss_peft": lp.item(), "loss_lorakit": lo.item(), "loss_abs_diff": abs(lp.item() - lo.item()),
              "max_grad_abs_diff": grad_diff, "max_grad_abs": grad_scale}

    def trajectory(model, use_fused):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
        losses = []
        for step in range(traj_steps):
            b = make_batch(tok, data_dir, 8, 128, offset=40 * step)
            loss = (causal_lm_loss(model, b["input_ids"], b["labels"], attention_mask=b["attention_mask"])
                    if use_fused else model(**b).loss)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        held = make_batch(tok, data_dir, 8, 128, offset=20000)
        with torch.no_grad():
            held_loss = causal_lm_loss(model, held["input_ids"], held["labels"], attention_mask=held["attention_mask"])
        return losses, held_loss.item()

    if traj_steps:
        pm, km, tok = pair()
        result["traj_peft_fp32"], result["heldout_peft_fp32"] = trajectory(pm, False)
        result["traj_lorakit_fp32"], result["heldout_lorakit_fp32"] = trajectory(km, True)
        del pm, km
        if bf16_trajectory:
            _, kb, _ = pair(bf16=True)
            result["traj_lorakit_bf16"], result["heldout_lorakit_bf16"] = trajectory(kb, True)
    return result


def inference_check(repeats: int = 15) -> dict:
    import lorakit as lk

    model, tok = lk.load_model()
    model.eval()
    ids = torch.randint(100, 40000, (1, 128), generator=torch.Generator().manual_seed(0))
    lk.add_lora(model, lk.LoraConfig(r=8, alpha=16), adapter="a")
    lk.add_lora(model, lk.LoraConfig(r=8, alpha=16), adapter="b")
    timings = {"base": [], "unmerged": [], "merged": []}
    with torch.no_grad():
        for _ in range(3):
            model(input_ids=ids)
        for _ in range(repeats):
            for mode in timings:
                if mode == "merged":
                    lk.merge(model, "a")
                t0 = time.perf_counter()
                if mode == "base":
                    with lk.disable_adapters(model):
                        model(input_ids=ids)
                else:
                    model(input_ids=ids)
                timings[mode].append(time.perf_counter() - t0)
                if mode == "merged":
                    lk.unmerge(model)
    switch = []
    for i in range(200):
        t0 = time.perf_counter()
        lk.set_adapter(model, "b" if i % 2 else "a")
        switch.append(time.perf_counter() - t0)
    merge_cycle = []
    for _ in range(10):
        t0 = time.perf_counter()
        lk.merge(model, "a")
        lk.unmerge(model)
        merge_cycle.append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in timings.items()}
    return {"forward_ms": {k: 1e3 * v for k, v in med.items()},
            "unmerged_overhead": med["unmerged"] / med["base"] - 1, "merged_overhead": med["merged"] / med["base"] - 1,
            "set_adapter_us": 1e6 * statistics.median(switch), "merge_unmerge_ms": 1e3 * statistics.median(merge_cycle)}


def gemm_rates() -> dict:
    """GFLOP/s of a (1024 × 576) @ (576 × 1536) matmul (an MLP projection at batch 8 × 128) per dtype on this CPU."""
    rates = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(1024, 576, dtype=dtype), torch.randn(576, 1536, dtype=dtype)
        a @ b
        n, t0 = 0, time.perf_counter()
        while n < 3 or time.perf_counter() - t0 < 1.0:
            a @ b
            n += 1
        rates[name] = 2 * 1024 * 576 * 1536 * n / (time.perf_counter() - t0) / 1e9
    return rates


# ---------------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--variant", default="lorakit")
    ap.add_argument("--targets", default="qv", choices=sorted(TARGETS))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--traj-steps", type=int, default=30)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--mask-prompt", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--bf16", choices=["auto", "on", "off"], default="auto",
                    help="run the bf16-base variant: auto = only where this CPU's bf16 matmul beats fp32 (AMX/AVX512-BF16)")
    ap.add_argument("--data-dir", default=str(ROOT / ".." / "shared" / "data"))
    ap.add_argument("--out", default=str(RESULTS / "train_speed"))
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    if args.quick:
        args.steps, args.rounds, args.traj_steps = 3, 1, min(args.traj_steps, 5)
    rates = gemm_rates()
    use_bf16 = args.bf16 == "on" or (args.bf16 == "auto" and rates["bf16"] > rates["fp32"])
    print(f"GEMM on this CPU: fp32 {rates['fp32']:.1f} GFLOP/s, bf16 {rates['bf16']:.1f} GFLOP/s -> bf16 variant "
          f"{'on' if use_bf16 else 'off'}", flush=True)
    bf16 = ["lk-bf16"] if use_bf16 else []
    lora = ["peft", "peft-thp", "lorakit", "lk-plain", "lk-lean", *bf16, "floor"]
    short = [v for v in lora if v not in ("lk-plain", "lk-lean")]
    cases = [("qv", 8, 128, False, ["full", *lora]),
             ("all", 8, 128, False, lora),
             ("qv", 2, 512, False, short),
             ("qv", 8, 128, True, short)]
    if args.quick:
        cases = cases[:1]
    results = {"setup": {"torch": torch.__version__, "threads": torch.get_num_threads(), "steps": args.steps,
                         "warmup": args.warmup, "rounds": args.rounds, "r": 8, "alpha": 16, "dropout": 0.0,
                         "gemm_gflops": rates, "bf16_variant": use_bf16, "load_avg_start": os.getloadavg()},
               "cases": []}
    t_start = time.time()
    for targets, batch, seq, masked, variants in cases:
        runs = {v: {"times": [], "peak_rss_gb": 0.0} for v in variants}
        for rnd in range(args.rounds):
            order = variants if rnd % 2 == 0 else variants[::-1]  # alternate to spread machine noise
            for v in order:
                out = run_variant(v, targets, batch, seq, args, mask_prompt=masked)
                runs[v]["times"] += out["times"]
                runs[v]["peak_rss_gb"] = max(runs[v]["peak_rss_gb"], out["peak_rss_gb"])
                runs[v]["first_loss"] = out["losses"][0]
                print(f"  {targets} {batch}x{seq} {v:8s} round {rnd}: median {statistics.median(out['times']):.2f} s, "
                      f"peak {out['peak_rss_gb']:.2f} GB", flush=True)
        case = {"targets": targets, "batch": batch, "seq": seq, "prompt_masked": masked, "variants": {}}
        for v, d in runs.items():
            case["variants"][v] = {"median_s": statistics.median(d["times"]), "peak_rss_gb": d["peak_rss_gb"],
                                   "n": len(d["times"]), "first_loss": d["first_loss"]}
        results["cases"].append(case)
    results["equivalence"] = equivalence_check(Path(args.data_dir), args.traj_steps, use_bf16)
    results["inference"] = inference_check()
    results["wall_s"] = time.time() - t_start
    results["setup"]["load_avg_end"] = os.getloadavg()
    write(results, Path(args.out))


def write(results: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = ["| targets | batch | variant | step (median s) | peak RSS (GB) | time / PEFT | RSS / PEFT | "
             "RSS / PEFT-THP | time / floor |", "|---|---|---|---|---|---|---|---|---|"]
    for case in results["cases"]:
        v = case["variants"]
        for name, d in v.items():
            ratio = lambda key, ref: f"{d[key] / v[ref][key]:.2f}" if ref in v else "-"  # noqa: E731
            shape = f"{case['batch']}×{case['seq']}" + (" prompt masked" if case.get("prompt_masked") else "")
            lines.append(f"| {case['targets']} | {shape} | {name} | {d['median_s']:.2f} | "
                         f"{d['peak_rss_gb']:.2f} | {ratio('median_s', 'peft')} | {ratio('peak_rss_gb', 'peft')} | "
                         f"{ratio('peak_rss_gb', 'peft-thp')} | "
                         f"{ratio('median_s', 'floor')} |")
    eq = results["equivalence"]
    lines += ["", f"Equal math (identical A/B, q,v r=8): loss PEFT {eq['loss_peft']:.6f} vs lorakit {eq['loss_lorakit']:.6f} "
              f"(|diff| {eq['loss_abs_diff']:.2e}); max |grad diff| {eq['max_grad_abs_diff']:.2e} "
              f"(max |grad| {eq['max_grad_abs']:.2e})."]
    if "traj_peft_fp32" in eq:
        n = len(eq["traj_peft_fp32"])
        fp32_gap = max(abs(a - b) for a, b in zip(eq["traj_peft_fp32"], eq["traj_lorakit_fp32"]))
        line = (f"Loss after {n} steps from identical A/B (last step / held-out batch): PEFT fp32 "
                f"{eq['traj_peft_fp32'][-1]:.4f} / {eq['heldout_peft_fp32']:.4f}; lorakit fp32 "
                f"{eq['traj_lorakit_fp32'][-1]:.4f} / {eq['heldout_lorakit_fp32']:.4f}; max |Δloss| over the "
                f"trajectory {fp32_gap:.2e}.")
        if "traj_lorakit_bf16" in eq:
            bf16_gap = max(abs(a - b) for a, b in zip(eq["traj_peft_fp32"], eq["traj_lorakit_bf16"]))
            line += (f" lorakit bf16 base {eq['traj_lorakit_bf16'][-1]:.4f} / {eq['heldout_lorakit_bf16']:.4f}, "
                     f"max |Δloss| vs PEFT fp32 {bf16_gap:.2e}.")
        lines += [line]
    rates = results["setup"]["gemm_gflops"]
    lines += [f"GEMM here: fp32 {rates['fp32']:.1f} GFLOP/s, bf16 {rates['bf16']:.1f} GFLOP/s; the bf16-base variant "
              f"{'ran' if results['setup']['bf16_variant'] else 'was skipped (bf16 slower than fp32 on this CPU)'}. "
              f"Load average at start/end: {results['setup']['load_avg_start'][0]:.2f} / "
              f"{results['setup'].get('load_avg_end', [float('nan')])[0]:.2f}."]
    inf = results["inference"]
    lines += [f"Inference batch 1 × 128: base {inf['forward_ms']['base']:.1f} ms, unmerged "
              f"{inf['forward_ms']['unmerged']:.1f} ms ({100 * inf['unmerged_overhead']:+.1f}%), merged "
              f"{inf['forward_ms']['merged']:.1f} ms ({100 * inf['merged_overhead']:+.1f}%); set_adapter "
              f"{inf['set_adapter_us']:.0f} µs; merge+unmerge {inf['merge_unmerge_ms']:.1f} ms."]
    text = "\n".join(lines)
    print(text)
    results["cpu"] = cpu_info()
    print(cpu_line())
    out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    out.with_suffix(".md").write_text("# Training speed (benchmarks/train_speed.py)\n\n" + cpu_line() + "\n\n" + text + "\n")


if __name__ == "__main__":
    main()
