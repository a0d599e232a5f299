"""The mechanisms of issue #13, item 4, measured on fixed batches of the eight tasks' training examples.

(a) Cosine between the ZO gradient estimate averaged over n directions and the backprop gradient g of the
    equal-weighted multi-task loss, for a MaZO-LoRA adapter with a mask (`compute_importance`, scorer "mazo") and
    without one (scorer "none"): ĝ_n = (1/n) Σ_i (L(θ+εz_i) − L(θ−εz_i)) / (2ε) · z_i, with z_i the directions that
    `ZOSGD` draws (`ZOSGD.perturbation_direction(step)`, seed = repetition, step = i), cos(ĝ_n, g) for
    n = 1, 2, 4, …, n_max, mean ± std over repetitions. In LoRA mode A and B are perturbed in both cases (the mask is
    applied to their product), so both have the same dimension d; the mask changes the function, not d. With
    `--r 0` (the dense mode) the masked delta holds only its kept values, so its d is (1 − ρ) times the unmasked
    one; both deltas start at zero (the pretrained weights), and (b) is skipped.
(b) Top-k eigenvalues (Lanczos with full reorthogonalisation on Hessian-vector products by double backward) of the
    Hessian of the multi-task loss and of each single-task loss w.r.t. the LoRA tensors of the masked adapter,
    normalised by the largest.

    python benchmarks/mechanisms.py --model smollm2-135m --data-dir ../shared/data
    python benchmarks/mechanisms.py --model smollm2-135m --data-dir ../shared/data --r 0 --sparsity 0.9  # dense
    python benchmarks/mechanisms.py --tiny --device cpu --data-dir ../shared/data --out /tmp/m.json  # smoke run
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import torch


ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from common import results_header  # noqa: E402  (benchmarks/common.py)
from peft import get_peft_model  # noqa: E402

from peft_mazo import ZOSGD, MaZOConfig  # noqa: E402
from peft_mazo.tasks import TASK_NAMES, MultiTaskSampler, calibration_loaders, multitask_losses, sample_tasks  # noqa: E402


LossFn = Callable[[], torch.Tensor]


# ------------------------------------------------------------------------------------------------------------------
# (a) ZO estimates
# ------------------------------------------------------------------------------------------------------------------
def flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def backprop_gradient(loss_fn: LossFn, params: Sequence[torch.Tensor]) -> torch.Tensor:
    """The gradient of `loss_fn()` w.r.t. `params`, flattened (float64)."""
    with torch.enable_grad():
        grads = torch.autograd.grad(loss_fn(), list(params))
    return flat(grads).double()


@torch.no_grad()
def projected_gradient(
    loss_fn: LossFn, params: Sequence[torch.Tensor], z: Sequence[torch.Tensor], eps: float
) -> float:
    """(L(θ+εz) − L(θ−εz)) / (2ε); θ is restored exactly (from a copy) afterwards."""
    saved = [p.detach().clone() for p in params]
    try:
        for p, zi in zip(params, z, strict=True):
            p.add_(zi, alpha=eps)
        plus = float(loss_fn())
        for p, s, zi in zip(params, saved, z, strict=True):
            p.copy_(s).sub_(zi, alpha=eps)
        minus = float(loss_fn())
    finally:
        for p, s in zip(params, saved, strict=True):
            p.copy_(s)
    return (plus - minus) / (2 * eps)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.dot(a, b) / (a.norm() * b.norm()).clamp_min(1e-300))


def zo_cosines(
    loss_fn: LossFn,
    params: Sequence[torch.Tensor],
    g: torch.Tensor,
    directions: Callable[[int], Sequence[torch.Tensor]],
    ns: Sequence[int],
    eps: float,
) -> dict[int, float]:
    """cos(ĝ_n, g) for every n of `ns`, the estimates nested (ĝ_n uses the first n directions `directions(i)`)."""
    total = torch.zeros_like(g)
    out: dict[int, float] = {}
    for i in range(max(ns)):
        z = directions(i)
        total += projected_gradient(loss_fn, params, z, eps) * flat(z).double()
        if i + 1 in ns:
            out[i + 1] = cosine(total / (i + 1), g)
            print(f"  n = {i + 1}: cos {out[i + 1]:.4f}", flush=True)
    return out


def zosgd_directions(model: torch.nn.Module, seed: int) -> Callable[[int], list[torch.Tensor]]:
    """z of step i of a `ZOSGD(model, seed=seed)`: exactly the directions its steps would draw."""
    opt = ZOSGD(model, lr=0.0, eps=1e-3, seed=seed)
    return lambda step: opt.perturbation_direction(step)


# ------------------------------------------------------------------------------------------------------------------
# (b) Lanczos on Hessian-vector products
# ------------------------------------------------------------------------------------------------------------------
def hvp_fn(loss_fn: LossFn, params: Sequence[torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """v (flat, float64) ↦ H v of `loss_fn` w.r.t. `params` by double backward (flat, float64)."""
    params = list(params)

    def hvp(v: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            grads = torch.autograd.grad(loss_fn(), params, create_graph=True)
            chunks, offset = [], 0
            for p in params:
                chunks.append(v[offset : offset + p.numel()].view_as(p).to(p.dtype))
                offset += p.numel()
            hv = torch.autograd.grad(grads, params, grad_outputs=chunks)
        return flat(hv).double()

    return hvp


def lanczos(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    dim: int,
    k: int,
    iters: int,
    seed: int = 0,
    device: Union[str, torch.device] = "cpu",
) -> list[float]:
    """The k largest Ritz values (descending) of a symmetric operator after `iters` Lanczos steps with full
    reorthogonalisation (float64, the basis on `device`, the operator's); with iters = dim they are the exact top-k
    eigenvalues. The start vector is drawn on the CPU (seed `seed`), so it is the same on every device."""
    iters = min(iters, dim)
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(dim, generator=gen, dtype=torch.float64).to(device)
    q /= q.norm()
    basis, alphas, betas = [q], [], []
    for j in range(iters):
        w = matvec(basis[j])
        alpha = float(torch.dot(w, basis[j]))
        alphas.append(alpha)
        Q = torch.stack(basis)
        w = w - Q.T @ (Q @ w)
        w = w - Q.T @ (Q @ w)  # twice is enough
        beta = float(w.norm())
        if j == iters - 1 or beta < 1e-10:
            break
        betas.append(beta)
        basis.append(w / beta)
    T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if betas:
        off = torch.tensor(betas[: len(alphas) - 1], dtype=torch.float64)
        T += torch.diag(off, 1) + torch.diag(off, -1)
    values = torch.linalg.eigvalsh(T).flip(0)
    return [float(v) for v in values[:k]]


# ------------------------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------------------------
def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="smollm2-135m (SmolLM2-135M-Instruct)")
    parser.add_argument("--tiny", action="store_true", help="tiny Llama and tokenizer built in code (CPU smoke run)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--tasks", default=",".join(TASK_NAMES))
    parser.add_argument("--batch-size", type=int, default=2, help="training examples per task in the fixed batch")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--r", type=int, default=8, help="LoRA rank; 0: the dense masked delta (no Hessian)")
    parser.add_argument("--sparsity", type=float, default=0.8, help="ρ of the masked adapter (the paper: 0.9 dense)")
    parser.add_argument("--scorer", default="mazo", help="mask scorer of the masked adapter")
    parser.add_argument("--calib-batches", type=int, default=2)
    parser.add_argument("--n-max", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--eps", type=float, default=1e-3)
    parser.add_argument("--hessian-k", type=int, default=10)
    parser.add_argument("--lanczos-iters", type=int, default=20)
    parser.add_argument("--no-hessian", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--out", default=None, help="JSON path (default benchmarks/results/mechanisms[_dense]_<device>.json)"
    )
    parser.add_argument(
        "--fig-dir", default=None, help="write mechanisms_cosine[_dense].png / mechanisms_hessian.png here"
    )
    args = parser.parse_args(argv)
    args.tasks = [t for t in args.tasks.split(",") if t]
    if args.r == 0:
        args.no_hessian = True  # the Hessian of the protocol is the LoRA tensors'
    if args.tiny:
        args.batch_size, args.max_length, args.n_max, args.repeats = 1, 64, 4, 2
        args.r = min(args.r, 2)
        args.hessian_k, args.lanczos_iters, args.calib_batches = 3, 4, 1
        args.tasks = args.tasks[:3]
    return args


def build(args: argparse.Namespace) -> tuple[torch.nn.Module, Any, str]:
    """(model, tokenizer, name) in float32 with eager attention (SDPA on CPU has no double backward)."""
    if args.tiny:
        from tests.helpers import make_tiny_llama, make_tiny_tokenizer

        model = make_tiny_llama(max_position_embeddings=2048, attn_implementation="eager")
        return model, make_tiny_tokenizer(pad=True), "tiny-llama"
    import transformers

    from peft_mazo.models import smollm2_dir

    path = smollm2_dir()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    return model, tokenizer, "SmolLM2-135M-Instruct"


def adapter(
    base: torch.nn.Module, args, masked: bool, tokenizer, train, init: Optional[dict] = None
) -> torch.nn.Module:
    """A MaZO adapter on a copy of `base`. LoRA (r > 0): the non-zero random A, B of `init_weights=False` (seed 0);
    the masked one computes its mask (which zeroes the delta: `reset=True`), then takes the trainable values `init`.
    Dense (r = 0): both deltas start at zero, at the pretrained weights where training starts (the masked delta has
    only the kept (out, k) values, so there are no common values to copy)."""
    config = MaZOConfig(
        r=args.r,
        sparsity=args.sparsity if masked else 0.0,
        scorer=args.scorer if masked else "none",
        init_weights=args.r == 0,
    )
    torch.manual_seed(0)  # the same A, B in both adapters
    model = get_peft_model(copy.deepcopy(base), config).eval()
    if masked:
        loaders = calibration_loaders(
            args.tasks, tokenizer, batch_size=args.batch_size, num_batches=args.calib_batches,
            examples_by_task=train, seed=1, max_length=args.max_length,
        )  # fmt: skip
        model.compute_importance(loaders, progress=False, reset=True)
    if masked and args.r > 0:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.requires_grad:
                    p.copy_(init[name])
    return model.to(args.device)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    device = torch.device(args.device)
    base, tokenizer, model_name = build(args)
    splits = sample_tasks(args.tasks, data_dir=args.data_dir, seed=0, n_train=64, n_val=0, n_test=0)
    train = {t: s.train for t, s in splits.items()}
    sampler = MultiTaskSampler(train, batch_size=args.batch_size, seed=0)
    batches = {t: b.to(device) for t, b in next(sampler.encoded(tokenizer, max_length=args.max_length)).items()}
    ns = [2**i for i in range(int(math.log2(args.n_max)) + 1)]

    result: dict[str, Any] = {
        **results_header("mechanisms", device, argv),
        "shapes": {
            "model": model_name,
            "dtype": "float32",
            "attention": "eager",
            "tasks": args.tasks,
            "batch_size_per_task": args.batch_size,
            "max_length": args.max_length,
            "tokens_per_task": {t: int(b.attention_mask.sum()) for t, b in batches.items()},
        },
        "settings": {
            "lora_r": args.r,
            "masked": {
                "scorer": args.scorer,
                "sparsity": args.sparsity,
                "calibration_batches_per_task": args.calib_batches,
            },
            "unmasked": {"scorer": "none", "sparsity": 0.0},
            "init_weights": args.r == 0,
            "eps": args.eps,
            "ns": ns,
            "repeats": args.repeats,
            "data": "train.jsonl only (sample_tasks seed 0; calibration seed 1)",
            "loss": "equal-weighted mean of the per-task losses (multitask_losses)",
            "directions": "ZOSGD(model, seed=repetition).perturbation_direction(i), i = 0..n_max-1 (nested estimates)",
        },  # fmt: skip
        "cosine": {},
    }
    masked_model, init = None, None
    for name, masked in (("unmasked", False), ("masked", True)):
        model = adapter(base, args, masked, tokenizer, train, init)
        if not masked:
            init = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        params = [p for p in model.parameters() if p.requires_grad]
        loss_fn = lambda m=model: multitask_losses(m, batches, with_grad=True).mean()  # noqa: E731
        g = backprop_gradient(loss_fn, params)
        runs = []
        for rep in range(args.repeats):
            t0 = time.perf_counter()
            runs.append(zo_cosines(loss_fn, params, g, zosgd_directions(model, seed=rep), ns, args.eps))
            print(f"{name} rep {rep}: {runs[-1]} ({time.perf_counter() - t0:.0f} s)", flush=True)
        table = {}
        for n in ns:
            values = torch.tensor([r[n] for r in runs], dtype=torch.float64)
            std = float(values.std()) if len(runs) > 1 else 0.0
            table[str(n)] = {"mean": float(values.mean()), "std": std, "values": values.tolist()}
        result["cosine"][name] = {
            "d": sum(p.numel() for p in params),
            "loss": float(loss_fn().detach()),
            "grad_norm": float(g.norm()),
            "by_n": table,
            "expected_if_isotropic_n1": math.sqrt(2 / (math.pi * sum(p.numel() for p in params))),
        }
        if masked:
            masked_model = model

    if not args.no_hessian:
        model = masked_model
        params = [p for p in model.parameters() if p.requires_grad]
        dim = sum(p.numel() for p in params)
        losses = {"multi-task": lambda: multitask_losses(model, batches, with_grad=True).mean()}
        for task in args.tasks:
            losses[task] = lambda t=task: multitask_losses(model, {t: batches[t]}, with_grad=True).mean()
        spectra = {}
        for name, fn in losses.items():
            t0 = time.perf_counter()
            top = lanczos(hvp_fn(fn, params), dim, args.hessian_k, args.lanczos_iters, seed=0, device=device)
            spectra[name] = {"eigenvalues": top, "normalised": [v / top[0] for v in top]}
            print(f"hessian {name}: {[round(v, 4) for v in top]} ({time.perf_counter() - t0:.0f} s)", flush=True)
        result["hessian"] = {
            "adapter": "masked", "d": dim, "k": args.hessian_k, "lanczos_iters": args.lanczos_iters,
            "method": "Lanczos, full reorthogonalisation, float64 basis, start vector seed 0; HVP by double backward",
            "spectra": spectra,
        }  # fmt: skip
    result["wall_s"] = time.perf_counter() - started

    default_name = f"mechanisms{'' if args.r else '_dense'}_{device.type}.json"
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / default_name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    if args.fig_dir:
        figures(result, Path(args.fig_dir))
    return result


def figures(result: dict[str, Any], fig_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig_dir.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for name, row in result["cosine"].items():
        ns = [int(n) for n in row["by_n"]]
        mean = [row["by_n"][str(n)]["mean"] for n in ns]
        std = [row["by_n"][str(n)]["std"] for n in ns]
        ax.errorbar(ns, mean, yerr=std, marker="o", capsize=3, label=f"{name} (d = {row['d']:,})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("directions n")
    ax.set_ylabel("cos(ZO estimate, backprop gradient)")
    s = result["shapes"]
    r = result["settings"]["lora_r"]
    mode = f"LoRA r={r}" if r else f"dense, ρ={result['settings']['masked']['sparsity']}"
    ax.set_title(f"{s['model']}, {mode}, {len(s['tasks'])} tasks", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(fig_dir / f"mechanisms_cosine{'' if r else '_dense'}.png", dpi=120)
    plt.close(fig)
    if "hessian" in result:
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        for name, row in result["hessian"]["spectra"].items():
            multi = name == "multi-task"
            ax.plot(
                range(1, len(row["normalised"]) + 1), row["normalised"], marker="o" if multi else ".",
                lw=2.5 if multi else 1, color="black" if multi else None, label=name,
            )  # fmt: skip
        ax.set_xlabel("eigenvalue index i")
        ax.set_ylabel("λ_i / λ_1")
        ax.set_title(f"Hessian w.r.t. the LoRA tensors (masked adapter, d = {result['hessian']['d']:,})", fontsize=9)
        ax.legend(fontsize=7, ncol=2)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(fig_dir / "mechanisms_hessian.png", dpi=120)
        plt.close(fig)


if __name__ == "__main__":
    main()
