"""How far an E2E sweep LoRA adapter's A matrices moved from their initialisation (for the ΔW analysis, issue 21).

The sweep seeds torch before loading the model and adding LoRA (benchmarks/sweep.py, execute), so the same seed
re-creates A's random init exactly. Printed per kind (W_q, W_v), averaged over layers: ‖A − A₀‖ / ‖A₀‖, and the share of
the trained A's energy that still lies in A₀'s row space (a random r-dimensional subspace would hold r / in_features).

    .venv/bin/python benchmarks/lora_a_drift.py "benchmarks/runs/sweep_e2e/e2e__lora__lr=0.002__seed=0/adapter" --seed 0
"""

import argparse
import random
import statistics

import _common as C
import torch
from lorakit import LoraConfig, load_model
from lorakit.lora.analysis import adapter_factors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapter")
    parser.add_argument("--seed", type=int, required=True, help="the seed the adapter was trained with")
    parser.add_argument("--model", default="smollm2-135m")
    args = parser.parse_args()
    torch.set_num_threads(1)
    factors = adapter_factors(args.adapter)
    first = next(iter(factors.values()))
    targets = sorted({name.split(".")[-1] for name in factors})
    random.seed(args.seed)
    torch.manual_seed(args.seed)  # as the sweep: seed, load, add LoRA
    model, _ = load_model(args.model)
    C.prepare(model, "lora", LoraConfig(r=first["A"].shape[0], target_modules=targets))
    moved: dict[str, list[float]] = {t: [] for t in targets}
    kept: dict[str, list[float]] = {t: [] for t in targets}
    for name, f in factors.items():
        A0 = next(p for n, p in model.get_submodule(name).named_parameters() if "lora_A" in n).detach()  # (r, in)
        A = f["A"].to(A0.dtype)
        Q = torch.linalg.qr(A0.T)[0]  # (in, r): an orthonormal basis of A0's row space
        moved[name.split(".")[-1]].append(float((A - A0).norm() / A0.norm()))
        kept[name.split(".")[-1]].append(float((A @ Q).norm() ** 2 / A.norm() ** 2))
    for t in targets:
        print(f"{t}: ‖A − A0‖/‖A0‖ mean {statistics.fmean(moved[t]):.3f} (max {max(moved[t]):.3f}); share of A's "
              f"energy in A0's row space mean {statistics.fmean(kept[t]):.3f} (min {min(kept[t]):.3f}; a random "
              f"subspace: {A0.shape[0] / A0.shape[1]:.4f})")


if __name__ == "__main__":
    main()
