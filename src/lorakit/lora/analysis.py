"""Understanding ΔW (the paper's Section 7): how much two adapters' subspaces overlap, and how strongly ΔW amplifies
directions of W.

- Normalised subspace similarity (Grassmann-type), per adapted module:
  φ(A1, A2, i, j) = ‖U_i^T U_j‖_F² / min(i, j) ∈ [0, 1], where U_i are the top-i right-singular vectors of the first
  adapter's A (or of its ΔW = scale·B·A) and U_j the top-j of the second's. φ = 1: one subspace contains the other.
- Amplification factor: with U, V the top-r left/right singular vectors of ΔW, ‖ΔW‖_F / ‖Uᵀ W V‖_F, and the same
  projection of W onto W's own top-r directions and onto random orthonormal directions for comparison.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.lora.adapter_io import PREFIX, WEIGHTS_FILE, peek_adapter_config, read_adapter_weights
from lorakit.errors import LorakitError
from lorakit.fsutil import atomic_write_text

MATRICES = ("A", "delta")
_LAYER = re.compile(r"\.(?:layers|layer|h|blocks)\.(\d+)\.")


# ---------------------------------------------------------------------------------------------------- reading
def adapter_factors(path: str | Path) -> dict[str, dict[str, Any]]:
    """{module name: {"A": (r, in), "B": (out, r), "scale": float}} for every LoRA linear layer in an adapter folder."""
    path = Path(path)
    config = peek_adapter_config(path)
    weights = read_adapter_weights(path / WEIGHTS_FILE)
    out: dict[str, dict[str, Any]] = {}
    for key, tensor in weights.items():
        if not key.endswith(".lora_A.weight"):
            continue
        name = key[len(PREFIX):-len(".lora_A.weight")] if key.startswith(PREFIX) else key[:-len(".lora_A.weight")]
        B = weights[key.replace(".lora_A.weight", ".lora_B.weight")]
        r, alpha = config.rank_for(name), config.alpha_for(name)
        scale = alpha / r ** 0.5 if config.use_rslora else alpha / r
        out[name] = {"A": tensor.float(), "B": B.float(), "scale": scale}
    if not out:
        raise LorakitError(f"{path} holds no LoRA linear layers (no '*.lora_A.weight' tensors) to analyse.")
    return out


def delta_weight(factors: dict[str, Any]) -> torch.Tensor:
    """ΔW = scale · B A, shape (out, in)."""
    return factors["scale"] * factors["B"] @ factors["A"]


def layer_index(name: str) -> int | None:
    match = _LAYER.search("." + name + ".")
    return int(match.group(1)) if match else None


# ---------------------------------------------------------------------------------------------------- similarity
def _right_singular(M: torch.Tensor, k: int) -> torch.Tensor:
    """The top-k right-singular vectors of M as rows, (k, in)."""
    _, _, Vh = torch.linalg.svd(M.double(), full_matrices=False)
    return Vh[:k]


def subspace_similarity(M1: torch.Tensor, M2: torch.Tensor, r1: int | None = None,
                        r2: int | None = None) -> torch.Tensor:
    """φ[i-1, j-1] = ‖U_i^T U_j‖_F² / min(i, j) for i ≤ r1, j ≤ r2, between the right-singular subspaces of M1, M2.

    M1 and M2 are (r, in) A matrices or (out, in) ΔW matrices with the same input dimension.
    """
    if M1.shape[-1] != M2.shape[-1]:
        raise LorakitError(f"Matrices must share the input dimension to compare subspaces; got {tuple(M1.shape)} and "
                           f"{tuple(M2.shape)}.")
    r1 = r1 or min(M1.shape)
    r2 = r2 or min(M2.shape)
    V1, V2 = _right_singular(M1, r1), _right_singular(M2, r2)  # (r1, in), (r2, in)
    overlap = (V1 @ V2.T) ** 2  # (r1, r2): squared cosines between singular directions
    cumulative = overlap.cumsum(0).cumsum(1)  # ‖U_i^T U_j‖_F² for every (i, j)
    i = torch.arange(1, r1 + 1, dtype=torch.float64)[:, None]
    j = torch.arange(1, r2 + 1, dtype=torch.float64)[None, :]
    return (cumulative / torch.minimum(i, j)).float()


def compare_adapters(path1: str | Path, path2: str | Path, matrix: str = "A") -> dict[str, torch.Tensor]:
    """Per module present in both adapters: the φ grid (r1 × r2) using their A matrices or their ΔW."""
    if matrix not in MATRICES:
        raise LorakitError(f"matrix must be one of {MATRICES}, got {matrix!r}.")
    f1, f2 = adapter_factors(path1), adapter_factors(path2)
    common = [n for n in f1 if n in f2]
    if not common:
        raise LorakitError(f"The adapters share no adapted module: {sorted(f1)[:4]}... vs {sorted(f2)[:4]}...")
    grids = {}
    for name in common:
        a, b = f1[name], f2[name]
        M1, M2 = (a["A"], b["A"]) if matrix == "A" else (delta_weight(a), delta_weight(b))
        grids[name] = subspace_similarity(M1, M2, a["A"].shape[0], b["A"].shape[0])
    return grids


# ---------------------------------------------------------------------------------------------------- amplification
def amplification(W: torch.Tensor, delta: torch.Tensor, r: int, random_draws: int = 10,
                  seed: int = 0) -> dict[str, float]:
    """How W looks in ΔW's top-r directions vs its own top-r directions vs random ones (the paper's Table 7)."""
    W, delta = W.double(), delta.double()
    if W.shape != delta.shape:
        raise LorakitError(f"W {tuple(W.shape)} and ΔW {tuple(delta.shape)} must have the same shape.")
    U, _, Vh = torch.linalg.svd(delta, full_matrices=False)
    Uw, Sw, Vhw = torch.linalg.svd(W, full_matrices=False)
    projected = torch.linalg.matrix_norm(U[:, :r].T @ W @ Vh[:r].T)
    gen = torch.Generator().manual_seed(seed)
    random = []
    for _ in range(random_draws):
        Ur = torch.linalg.qr(torch.randn(W.shape[0], r, generator=gen, dtype=torch.float64))[0]
        Vr = torch.linalg.qr(torch.randn(W.shape[1], r, generator=gen, dtype=torch.float64))[0]
        random.append(torch.linalg.matrix_norm(Ur.T @ W @ Vr).item())
    delta_norm = torch.linalg.matrix_norm(delta).item()
    return {
        "r": r,
        "delta_norm": delta_norm,
        "W_norm": torch.linalg.matrix_norm(W).item(),
        "W_in_delta_dirs": projected.item(),
        "W_in_W_dirs": Sw[:r].pow(2).sum().sqrt().item(),  # ‖Uᵀ W V‖ with W's own top-r singular vectors
        "W_in_random_dirs": sum(random) / len(random),
        "amplification": delta_norm / projected.item(),
        "amplification_random": delta_norm / (sum(random) / len(random)),
    }


def amplification_report(model, path: str | Path, random_draws: int = 10) -> dict[str, dict[str, float]]:
    """`amplification` for every LoRA linear layer of the adapter at `path`, on the matching weights of `model`."""
    out = {}
    for name, factors in adapter_factors(path).items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise LorakitError(f"The model has no module {name!r} from adapter {path}; analyse it with the base model "
                               "it was trained on.") from None
        module = getattr(module, "base_layer", module)
        if not isinstance(module, nn.Linear):
            continue
        out[name] = amplification(module.weight.detach(), delta_weight(factors), factors["A"].shape[0], random_draws)
    return out


# ---------------------------------------------------------------------------------------------------- plots, files
def _kind(name: str) -> str:
    return name.split(".")[-1]


def plot_similarity(grids: dict[str, torch.Tensor], path: str | Path, title: str = "", zoom: int | None = 8) -> None:
    """One figure: a row per module kind (e.g. q_proj, v_proj); the middle layer's φ over all (i, j) and zoomed to
    j ≤ `zoom`, like the paper's Figure 3, plus φ's mean over i, j ≤ zoom for every layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    kinds = sorted({_kind(n) for n in grids})
    fig, axes = plt.subplots(len(kinds), 3, figsize=(14, 2.6 * len(kinds) + 0.6), squeeze=False,
                             gridspec_kw={"width_ratios": [3, 1.2, 2]})
    for row, kind in enumerate(kinds):
        names = sorted((n for n in grids if _kind(n) == kind), key=lambda n: layer_index(n) or 0)
        middle = names[len(names) // 2]
        grid = grids[middle].numpy()
        for ax, data, label in ((axes[row][0], grid, "all j"), (axes[row][1], grid[:, :zoom or grid.shape[1]], f"j ≤ {zoom}")):
            im = ax.imshow(data, vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="upper",
                           extent=(0.5, data.shape[1] + 0.5, data.shape[0] + 0.5, 0.5))
            ax.set_title(f"{middle.split('.', 1)[-1]} ({label})", fontsize=8)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("j (second adapter)")
            ax.set_ylabel("i (first adapter)")
        fig.colorbar(im, ax=axes[row][1])
        k = min(zoom or grid.shape[1], grid.shape[1])
        layers = [layer_index(n) for n in names]
        means = [grids[n][:, :k].mean().item() for n in names]
        first = [grids[n][0, 0].item() for n in names]
        axes[row][2].plot(layers, means, marker="o", label=f"mean φ, j ≤ {k}")
        axes[row][2].plot(layers, first, marker="x", label="φ(1, 1)")
        axes[row][2].set_ylim(0, 1)
        axes[row][2].set_xlabel("layer")
        axes[row][2].set_title(kind, fontsize=9)
        axes[row][2].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def analyze(path1: str | Path, path2: str | Path | None = None, base: nn.Module | None = None, matrix: str = "A",
            out_dir: str | Path | None = None, random_draws: int = 10, base_name: str | None = None) -> dict[str, Any]:
    """The `lorakit analyze` workflow. With two adapters: φ per module (+ heatmaps). With a loaded base model `base`:
    the amplification factor of the first adapter's ΔW on its weights, labelled `base_name` (default: the model's
    `config._name_or_path`). Writes analysis.json/.md (+ PNG) to `out_dir`. The caller loads the base (the CLI with
    `load_model`)."""
    if base is not None and not isinstance(base, nn.Module):
        raise LorakitError(f"analyze: base must be a loaded model (nn.Module), got {type(base).__name__}; load it "
                           "first, e.g. with lorakit.load_model.")
    report: dict[str, Any] = {"adapter1": str(path1), "adapter2": str(path2) if path2 else None, "matrix": matrix}
    md = []
    if path2 is not None:
        grids = compare_adapters(path1, path2, matrix)
        report["similarity"] = {n: g.tolist() for n, g in grids.items()}
        report["similarity_summary"] = {n: {"phi_1_1": g[0, 0].item(), "mean_phi": g.mean().item()}
                                        for n, g in grids.items()}
        md += ["| module | r1 × r2 | φ(1,1) | mean φ |", "|---|---|---:|---:|"]
        md += [f"| {n} | {g.shape[0]} × {g.shape[1]} | {g[0, 0]:.3f} | {g.mean():.3f} |" for n, g in grids.items()]
        if out_dir is not None:
            plot_similarity(grids, Path(out_dir) / "subspace_similarity.png",
                            f"φ between {Path(path1).name} and {Path(path2).name} ({matrix})")
    if base is not None:
        if base_name is None:
            base_name = getattr(getattr(base, "config", None), "_name_or_path", None) or type(base).__name__
        amp = amplification_report(base, path1, random_draws)
        report["amplification"] = amp
        md += ["", f"Amplification ({Path(path1).name} on {base_name}):", "",
               "| module | r | ‖ΔW‖ | ‖W‖ | ‖UᵀWV‖ ΔW dirs | W dirs | random | factor |", "|---|---:|" + "---:|" * 6]
        md += [f"| {n} | {a['r']} | {a['delta_norm']:.3f} | {a['W_norm']:.2f} | {a['W_in_delta_dirs']:.3f} | "
               f"{a['W_in_W_dirs']:.2f} | {a['W_in_random_dirs']:.3f} | {a['amplification']:.2f} |" for n, a in amp.items()]
    if path2 is None and base is None:
        raise LorakitError("Nothing to analyse: give a second adapter (subspace similarity) and/or --model "
                           "(amplification factor).")
    report["markdown"] = "\n".join(md) + "\n"
    if out_dir is not None:
        atomic_write_text(Path(out_dir) / "analysis.json", json.dumps(report, indent=1) + "\n")
        atomic_write_text(Path(out_dir) / "analysis.md", report["markdown"])
    return report
