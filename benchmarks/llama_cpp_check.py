"""llama.cpp itself runs lorakit's GGUF exports: does it compute what lorakit computes?

With the default model (SmolLM2-135M-Instruct), a lorakit adapter with random non-zero B (fixed seed; r=8, alpha 16 on
W_q, W_k, W_v, W_o, W_gate, W_up, W_down, with an alpha_pattern on o_proj so one scale is folded into B) is exported
as a GGUF LoRA, the base as an f32 GGUF (lorakit's merged export with no adapter: the dequantized Q4_1 weights
lorakit also computes with) and the merged model as an f32 GGUF. llama.cpp (llama-cpp-python, in its own venv, run as
a subprocess) then decodes greedily (argmax of its own logits) on chat-formatted prompts fed as token ids, and scores
lorakit's greedy sequences (teacher forcing) so logits are compared on the same contexts:

  (a) f32 base GGUF + adapter GGUF   vs lorakit fp32 base + adapter
  (b) merged f32 GGUF                vs lorakit fp32 merged (unload)
  (c) the wheel's Q4_1 GGUF + adapter vs lorakit fp32 base + adapter (partial agreement expected; base-only rows too)

Decode speed is batch 1, tokens after the prompt, for both engines with the same thread count.

    python benchmarks/llama_cpp_check.py                 # 20 prompts x 16 tokens, 2 threads
    LORAKIT_LLAMA_PYTHON=/path/to/venv/bin/python python benchmarks/llama_cpp_check.py --prompts 24
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "src"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import lorakit as lk  # noqa: E402
from lorakit.export.gguf import embedded_gguf_file, export_adapter_gguf  # noqa: E402
from lorakit.export.gguf_model import export_merged_gguf  # noqa: E402
from lorakit.export.llamacpp import llama_cpp_python, run_llama_cpp  # noqa: E402
from lorakit.inference.generate import encode_chat  # noqa: E402
from lorakit.hardware import cpu_info, cpu_line  # noqa: E402
from lorakit.lora.injection import lora_layers  # noqa: E402

PROMPTS = [
    "What is the capital of France?", "Write a haiku about the sea.", "Explain photosynthesis in one sentence.",
    "Give me three tips for better sleep.", "What is 12 times 7?", "Translate 'good morning' into Spanish.",
    "Name a famous painting by Leonardo da Vinci.", "What does a CPU do?", "Suggest a name for a pet turtle.",
    "Why is the sky blue?", "Write the first line of a mystery novel.", "What is the boiling point of water?",
    "List two primary colors.", "How many legs does a spider have?", "Describe a pub called The Vaults.",
    "What is machine learning?", "Recommend a book for a long flight.", "What is the opposite of 'ancient'?",
    "How do I make a cup of tea?", "Who wrote Romeo and Juliet?", "What is the largest planet?",
    "Give a synonym for 'happy'.", "What is a prime number?", "Summarize the plot of Cinderella.",
]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lorakit_greedy(model, prompts, n_new):
    """Batch-1 greedy with a KV cache: tokens, the logits that chose each token, and decode seconds per prompt."""
    tokens, logits, times = [], [], []
    with torch.no_grad():
        for ids in prompts:
            out = model(input_ids=torch.tensor([ids]), use_cache=True)
            past, step_logits, seq = out.past_key_values, [out.logits[0, -1].float()], []
            t0 = time.perf_counter()
            for i in range(n_new):
                tok = int(step_logits[-1].argmax())
                seq.append(tok)
                if i == n_new - 1:
                    break
                out = model(input_ids=torch.tensor([[tok]]), past_key_values=past, use_cache=True)
                past = out.past_key_values
                step_logits.append(out.logits[0, -1].float())
            times.append(time.perf_counter() - t0)
            tokens.append(seq)
            logits.append(torch.stack(step_logits).numpy())
    return tokens, np.stack(logits), times


def agreement(a, b):
    """(prompts identical in all tokens, tokens equal before the first divergence, total tokens)."""
    same = sum(x == y for x, y in zip(a, b))
    prefix = 0
    for x, y in zip(a, b):
        for s, t in zip(x, y):
            if s != t:
                break
            prefix += 1
    return same, prefix, sum(len(x) for x in a)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2, help="torch and llama.cpp threads")
    parser.add_argument("--std", type=float, default=0.02, help="std of the random B matrices")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--python", default=None, help="python of the llama-cpp-python venv")
    parser.add_argument("--workdir", default=None, help="where the GGUF files go (default: a temporary folder)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds allowed for all llama.cpp runs")
    parser.add_argument("--out", default=str(ROOT / "results"))
    args = parser.parse_args()
    python = args.python or llama_cpp_python()
    if python is None:
        sys.exit("llama-cpp-python not found: create /work/venvs/llama or set LORAKIT_LLAMA_PYTHON")
    torch.set_num_threads(args.threads)
    prompts_text = (PROMPTS * 4)[: args.prompts]
    n = args.new_tokens
    t_start = time.time()

    with tempfile.TemporaryDirectory(prefix="lorakit-llamacpp-check-") as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        model, tok = lk.load_model()
        prompts = [encode_chat(tok, [{"role": "user", "content": p}]) for p in prompts_text]
        texts = [tok.decode(p) for p in prompts]
        config = lk.LoraConfig(r=8, alpha=16, target_modules=TARGETS, alpha_pattern={"o_proj": 32.0})
        torch.manual_seed(args.seed)  # A's Kaiming init draws from the global generator
        lk.add_lora(model, config)
        gen = torch.Generator().manual_seed(args.seed)
        with torch.no_grad():
            for _, layer in lora_layers(model):
                w = layer.lora_B["default"].weight
                w.copy_(torch.randn(w.shape, generator=gen) * args.std)
        lk.save_adapter(model, work / "adapter")
        t0 = time.time()
        ad = export_adapter_gguf(work / "adapter", work / "adapter-f32.gguf", dtype="f32",
                                 base_name_or_path="smollm2-135m")
        base_x = export_merged_gguf("smollm2-135m", work / "base-f32.gguf", quant="f32", modelfile=False)
        merged_x = export_merged_gguf(model, work / "merged-f32.gguf", quant="f32", modelfile=False)
        export_s = time.time() - t0
        print(ad, "|", base_x, "|", merged_x, f"| exports {export_s:.1f} s", flush=True)

        # lorakit references (fp32)
        with lk.disable_adapters(model):
            lk_base = lorakit_greedy(model, prompts, n)
        lk_adapter = lorakit_greedy(model, prompts, n)
        with torch.no_grad(), lk.disable_adapters(model):  # the base's logits on the adapter's own sequences
            base_on_adapter = np.stack([model(input_ids=torch.tensor([p + t])).logits[0, -n - 1:-1].numpy()
                                        for p, t in zip(prompts, lk_adapter[0])])
        merged = lk.unload(copy.deepcopy(model))
        lk_merged = lorakit_greedy(merged, prompts, n)
        del merged
        print("lorakit decoding done", flush=True)

        q41 = str(embedded_gguf_file("smollm2-135m"))
        full = lambda ref: [p + t for p, t in zip(prompts, ref[0])]  # noqa: E731
        # f32 rows check the export's math: f32 KV cache. The others run with llama.cpp's defaults (f16 KV cache).
        runs = [
            {"name": "f32 base", "model": str(work / "base-f32.gguf"), "forced": full(lk_base), "kv_f32": True},
            {"name": "f32 base + adapter", "model": str(work / "base-f32.gguf"),
             "lora": str(work / "adapter-f32.gguf"), "forced": full(lk_adapter), "kv_f32": True},
            {"name": "merged f32", "model": str(work / "merged-f32.gguf"), "forced": full(lk_merged), "kv_f32": True},
            {"name": "f32 base + adapter, f16 KV", "model": str(work / "base-f32.gguf"),
             "lora": str(work / "adapter-f32.gguf"), "forced": full(lk_adapter)},
            {"name": "Q4_1 base", "model": q41, "forced": full(lk_base)},
            {"name": "Q4_1 base + adapter", "model": q41, "lora": str(work / "adapter-f32.gguf"),
             "forced": full(lk_adapter)},
        ]
        t0 = time.time()
        res = run_llama_cpp(runs, prompts, n_new=n, n_forced=n, threads=args.threads, n_ctx=512, python=python,
                            timeout=args.timeout, texts=texts)
        llama_s = time.time() - t0

    refs = {"f32 base": ("lorakit base", lk_base), "f32 base + adapter": ("lorakit base + adapter", lk_adapter),
            "merged f32": ("lorakit merged", lk_merged),
            "f32 base + adapter, f16 KV": ("lorakit base + adapter", lk_adapter),
            "Q4_1 base": ("lorakit base", lk_base),
            "Q4_1 base + adapter": ("lorakit base + adapter", lk_adapter)}
    lk_speed = {"lorakit base": lk_base, "lorakit base + adapter": lk_adapter, "lorakit merged": lk_merged}
    rows = []
    for name, (ref_name, ref) in refs.items():
        r = res["runs"][name]
        same, prefix, total = agreement(r["tokens"], ref[0])
        diff = np.abs(r["logits"] - ref[1])
        rows.append({"llama.cpp": name, "vs": ref_name, "prompts identical": f"{same}/{len(prompts)}",
                     "tokens agreeing (to first divergence)": f"{prefix}/{total}",
                     "max |logit diff|": float(diff.max()), "median per-step max |logit diff|":
                     float(np.median(diff.max(axis=-1))),
                     "llama.cpp tok/s": (len(prompts) * (n - 1)) / sum(r["decode_s"]),
                     "lorakit tok/s": (len(prompts) * (n - 1)) / sum(ref[2])})
    # does the adapter change llama.cpp's output where it changes lorakit's?
    lk_changed = [a != b for a, b in zip(lk_base[0], lk_adapter[0])]
    effect = {}
    for base_run, ad_run in (("f32 base", "f32 base + adapter"), ("Q4_1 base", "Q4_1 base + adapter")):
        cc = [a != b for a, b in zip(res["runs"][base_run]["tokens"], res["runs"][ad_run]["tokens"])]
        effect[ad_run] = {"lorakit changed": sum(lk_changed), "llama.cpp changed": sum(cc),
                          "both changed": sum(x and y for x, y in zip(lk_changed, cc)),
                          "same verdict": sum(x == y for x, y in zip(lk_changed, cc)), "prompts": len(prompts)}
    adapter_effect = float(np.abs(lk_adapter[1] - base_on_adapter).max())
    adapter_effect_median = float(np.median(np.abs(lk_adapter[1] - base_on_adapter).max(axis=-1)))
    tokenizer_same = sum(list(a) == list(b) for a, b in zip(res.get("tokenized") or [], prompts))
    samples = [{"prompt": prompts_text[i], "lorakit base": tok.decode(lk_base[0][i]),
                "lorakit base + adapter": tok.decode(lk_adapter[0][i]),
                "llama.cpp Q4_1 base + adapter": tok.decode(res["runs"]["Q4_1 base + adapter"]["tokens"][i])}
               for i in range(min(4, len(prompts)))]
    summary = {
        "cpu": cpu_info(), "threads": args.threads,
        "torch": torch.__version__, "llama_cpp_python": "0.3.36 (" + python + ")",
        "prompts": len(prompts), "new_tokens": n, "adapter": {"r": 8, "alpha": 16, "alpha_pattern": {"o_proj": 32},
                                                              "targets": TARGETS, "B std": args.std,
                                                              "seed": args.seed},
        "adapter_export": {"alpha": ad.alpha, "folded": len(ad.folded), "notes": ad.notes},
        "lorakit adapter effect (max |logit diff| base vs base+adapter, on lorakit's adapter sequences)":
            adapter_effect,
        "lorakit adapter effect, median per-step max": adapter_effect_median,
        "tokenizer agreement (llama.cpp tokenize vs HF ids of the chat-formatted prompts)":
            f"{tokenizer_same}/{len(prompts)}",
        "rows": rows, "adapter changes output": effect, "samples": samples, "export_s": export_s,
        "llama_cpp_s": llama_s,
        "wall_s": time.time() - t_start,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "llama_cpp_check.json").write_text(json.dumps(summary, indent=2))
    md = [f"# llama.cpp vs lorakit (SmolLM2-135M-Instruct, {len(prompts)} chat prompts x {n} greedy tokens)", "",
          f"{cpu_line()}; llama.cpp: llama-cpp-python 0.3.36 built with GGML_NATIVE=ON, {args.threads} thread(s).", "",
          "| llama.cpp | vs | prompts identical | tokens agreeing (to first divergence) | max abs logit diff | "
          "median per-step max diff | llama.cpp tok/s | lorakit tok/s |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        md.append(f"| {r['llama.cpp']} | {r['vs']} | {r['prompts identical']} | "
                  f"{r['tokens agreeing (to first divergence)']} | {r['max |logit diff|']:.3g} | "
                  f"{r['median per-step max |logit diff|']:.3g} | {r['llama.cpp tok/s']:.1f} | "
                  f"{r['lorakit tok/s']:.1f} |")
    md += ["", f"Adapter effect in lorakit: |logit diff| base vs base+adapter on the adapter's sequences: max "
               f"{adapter_effect:.3g}, median per-step max {adapter_effect_median:.3g}; it changes the "
               f"greedy answer of {sum(lk_changed)}/{len(prompts)} prompts.", ""]
    for k, v in effect.items():
        md.append(f"- {k}: llama.cpp's answer changes on {v['llama.cpp changed']}/{v['prompts']} prompts (lorakit: "
                  f"{v['lorakit changed']}); both change on {v['both changed']}; same verdict on "
                  f"{v['same verdict']}/{v['prompts']}.")
    md += [f"- llama.cpp's tokenizer gives the same ids as the HF tokenizer for {tokenizer_same}/{len(prompts)} "
           "chat-formatted prompts (the comparison feeds ids, so it does not depend on this).",
           "- f32 rows run llama.cpp with an f32 KV cache (checks the export's math); the 'f16 KV' and Q4_1 rows use "
           "llama.cpp's default f16 KV cache. Q4_1 holds the same weights lorakit computes with (lorakit dequantizes "
           "that file), but llama.cpp's Q4_1 kernels quantize activations to 8 bits, so greedy paths drift apart.",
           f"- Adapter GGUF: alpha {ad.alpha:g}, scale folded into B for {len(ad.folded)} modules "
           f"(o_proj's alpha_pattern). Logit diffs are on lorakit's own greedy sequences (teacher forcing), so every "
           f"row compares the same contexts; tok/s = decode after the prompt at batch 1 ({n - 1} steps per prompt).",
           f"- Wall time {summary['wall_s']:.0f} s (exports {export_s:.0f} s, llama.cpp {llama_s:.0f} s)."]
    (out / "llama_cpp_check.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
