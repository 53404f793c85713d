"""Which expert errors the held-out KL feels, and a down-projection objective that weighs them so (issue 13, offline).

    PYTHONPATH=$PWD python3 bench/output_space.py --work /tmp/q4 --variant down6 --seeds 0 1 2

Reads what ``bench/peers.py --work WORK --recipes gptq-w4 --streamq-variants VARIANT`` left there (the scorer's
float32 source copy, the calibration ids, and streamq's dequantized routed experts per seed) and prints, per seed:

1. **where the KL comes from**: the held-out KL with only some of the result's quantized experts in (the others
   at the source's weights): one MoE layer at a time, the gate/up projections alone, the down projections alone,
   and the down projections' error split into its part inside the column space of the source W_down (the
   directions the expert writes to the residual stream) and the part outside it, each applied alone
   (W + P·D and W + (I - P)·D, D = Ŵ - W, P the projector; not quantized weights, a diagnostic).
2. **an output-weighted objective for down**: every down projection is solved again offline with streamq's default
   solver on Hessians from the float model's inputs (the control: this reproduces the pipeline's KL), then given
   ``--rounds`` rounds of coordinate descent on tr(D H Dᵀ F), F = P + β (I - P), for each ``--betas`` value; β = 1
   is plain code descent (GPTQ's own objective), β < 1 makes errors along the expert's output directions cost more.
   The descent visits one code at a time with its exact gradient (F couples the rows), or with
   ``--parallel-rows`` every row of a column at once from the column's gradient, as the pipeline's row-parallel
   descent (code_descent.py) runs: a prototype for this fixture's 256 × 128 down projections (minutes on a CPU,
   seconds with ``--parallel-rows``); at DeepSeek-V3 width F would be applied through W_down's Gram matrix.

KL is scored like bench/peers.py (the same scorer) on the reported windows (``--eval-offset 0``) and on the
tuning split (the next 128 windows). Results: bench/RESULTS.md, "Which errors the KL feels".
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import FIXTURE, TEXT, Scorer, eval_windows, load_experts, metrics
from solver_screen import variant_config

from streamq.solvers.gptq import gptq_quantize


def moe_inputs(scorer: Scorer, ids: torch.Tensor) -> dict[int, dict[str, torch.Tensor]]:
    """Each MoE layer's input [tokens, hidden] and top-k routing (indices) on ``ids``, from the float source model."""
    store: dict[int, dict[str, list[torch.Tensor]]] = {}
    hooks = []
    for i, layer in enumerate(scorer.model.model.layers):
        if not hasattr(layer.mlp, "experts"):
            continue
        store[i] = {"x": [], "idx": []}

        def keep_x(_m: torch.nn.Module, args: tuple, i: int = i) -> None:
            store[i]["x"].append(args[0].reshape(-1, args[0].shape[-1]).clone())

        def keep_idx(_m: torch.nn.Module, _a: tuple, out: tuple, i: int = i) -> None:
            store[i]["idx"].append(out[2].clone())

        hooks += [layer.mlp.register_forward_pre_hook(keep_x), layer.mlp.gate.register_forward_hook(keep_idx)]
    with torch.no_grad():
        for chunk in ids.split(16):
            scorer.model(chunk)
    for hook in hooks:
        hook.remove()
    return {i: {k: torch.cat(v) for k, v in d.items()} for i, d in store.items()}


def source_experts(scorer: Scorer, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The source's fused gate_up_proj [E, 2I, H] and down_proj [E, H, I] of ``layer`` (float32)."""
    prefix = f"model.layers.{layer}.mlp.experts"
    return scorer.original[f"{prefix}.gate_up_proj"], scorer.original[f"{prefix}.down_proj"]


def down_hessians(x: torch.Tensor, idx: torch.Tensor, gate_up: torch.Tensor) -> torch.Tensor:
    """[E, I, I] mean h hᵀ of each expert's routed tokens, h = silu(gate x) · up x (float weights)."""
    inter = gate_up.shape[1] // 2
    out = []
    for e in range(gate_up.shape[0]):
        xe = x[(idx == e).any(1)].double()
        h = F.silu(xe @ gate_up[e, :inter].T.double()) * (xe @ gate_up[e, inter:].T.double())
        out.append(h.T @ h / max(1, xe.shape[0]))
    return torch.stack(out)


def output_projector(down: torch.Tensor) -> torch.Tensor:
    """[E, out, out] projector on the column space of each W_down [E, out, in]."""
    u = torch.linalg.svd(down.double(), full_matrices=False)[0]
    return u @ u.transpose(1, 2)


def coupled_descent(
    w: torch.Tensor,
    q: torch.Tensor,
    s: torch.Tensor,
    h: torch.Tensor,
    f: torch.Tensor,
    rounds: int,
    qmax: int,
    parallel_rows: bool,
) -> torch.Tensor:
    """Coordinate descent on tr(D H Dᵀ F), D = W - q·s, batched over experts: each code moves to the grid value
    nearest the minimum of its parabola given the current gradient. Columns in order; within a column the rows one
    at a time (exact), or with ``parallel_rows`` all at once from the column's gradient (Jacobi over rows, as the
    pipeline's descent runs, then the gradient updated with F once per column). ``s`` [E, out] (one group per
    row). Returns the new codes."""
    q, d = q.clone(), w - q * s[..., None]
    for _ in range(rounds):
        g = f @ d @ h
        for j in range(w.shape[2]):
            if parallel_rows:
                curvature = f.diagonal(dim1=1, dim2=2) * h[:, j, j, None]
                new = torch.round(q[:, :, j] + g[:, :, j] / (curvature * s)).clamp(-qmax - 1, qmax)
                delta = (new - q[:, :, j]) * s
                q[:, :, j] = new
                d[:, :, j] -= delta
                g -= (f @ delta.unsqueeze(-1)) * h[:, None, j, :]
                continue
            for i in range(w.shape[1]):
                curvature = f[:, i, i] * h[:, j, j]
                new = torch.round(q[:, i, j] + g[:, i, j] / (curvature * s[:, i])).clamp(-qmax - 1, qmax)
                delta = (new - q[:, i, j]) * s[:, i]
                if bool((delta != 0).any()):
                    q[:, i, j] = new
                    d[:, i, j] -= delta
                    g -= delta[:, None, None] * f[:, :, i, None] * h[:, None, j, :]
    return q


def kl(scorers: list[Scorer], weights: dict[str, torch.Tensor]) -> list[float]:
    return [metrics(s.score(weights))["kl"] for s in scorers]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/peers"))
    parser.add_argument("--variant", default="default", help="the streamq variant of bench/peers.py to start from")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--betas", type=float, nargs="+", default=[1.0, 0.4])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--parallel-rows", action="store_true", help="the descent's rows all at once per column")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    splits = []
    for offset in (0, 128):
        ns = argparse.Namespace(text=TEXT, eval_samples=128, seq_len=256, eval_offset=offset, model=FIXTURE)
        splits.append(Scorer(args.work / "source-hf", eval_windows(ns), batch=16))
    scorer = splits[0]
    cfg = variant_config("default", 4)
    rows: dict[str, list[list[float]]] = {}
    for seed in args.seeds:
        start = time.perf_counter()
        result = load_experts(args.work / "experts" / f"streamq-bf16-{args.variant}-gptq-w4-seed{seed}.safetensors")
        inputs = moe_inputs(scorer, torch.load(args.work / f"calib-128x256-seed{seed}.pt"))
        layers = sorted(inputs)

        def subset(keep: str, result: dict[str, torch.Tensor] = result) -> dict[str, torch.Tensor]:
            return {k: v for k, v in result.items() if keep in k or (keep == "gate/up" and "down_proj" not in k)}

        measured = {"all quantized": kl(splits, result)}
        for layer in layers:
            measured[f"layer {layer} alone"] = kl(splits, subset(f"layers.{layer}."))
        measured["gate/up alone"] = kl(splits, subset("gate/up"))
        measured["down alone"] = kl(splits, subset("down_proj"))
        inside, outside, solved = {}, {}, {beta: {} for beta in args.betas}
        for layer in layers:
            gate_up, down = source_experts(scorer, layer)
            prefix = f"model.layers.{layer}.mlp.experts"
            quantized = torch.stack([result[f"{prefix}.{e}.down_proj.weight"] for e in range(down.shape[0])]).double()
            proj = output_projector(down)
            err = quantized - down.double()
            for e in range(down.shape[0]):
                inside[f"{prefix}.{e}.down_proj.weight"] = (down[e] + (proj[e] @ err[e])).float()
                outside[f"{prefix}.{e}.down_proj.weight"] = (down[e] + err[e] - proj[e] @ err[e]).float()
            h = down_hessians(inputs[layer]["x"], inputs[layer]["idx"], gate_up)
            base = gptq_quantize(down.float(), h.float(), cfg)
            damped = h.clone()
            damped.diagonal(dim1=1, dim2=2).add_(cfg.damp * h.diagonal(dim1=1, dim2=2).mean(1, keepdim=True))
            scale = base.scale.double()[..., 0]
            eye = torch.eye(down.shape[1], dtype=torch.float64)
            for beta in args.betas:
                f = proj + beta * (eye - proj)
                codes = coupled_descent(
                    down.double(), base.q.double(), scale, damped, f, args.rounds, cfg.scheme.grid.code_max,
                    args.parallel_rows,
                )  # fmt: skip
                for e in range(down.shape[0]):
                    solved[beta][f"{prefix}.{e}.down_proj.weight"] = (codes[e] * scale[e, :, None]).float()
        measured["down error inside col(W_down) alone"] = kl(splits, inside)
        measured["down error outside col(W_down) alone"] = kl(splits, outside)
        gate_up_q = subset("gate/up")
        for beta in args.betas:
            name = "plain descent (control)" if beta == 1 else f"output-weighted descent, β={beta}"
            name += ", rows in parallel" if args.parallel_rows else ""
            name = f"down re-solved, {name}"
            measured[name] = kl(splits, {**gate_up_q, **solved[beta]})
        for name, values in measured.items():
            rows.setdefault(name, []).append(values)
        print(f"seed {seed}: {time.perf_counter() - start:.0f} s", flush=True)
    print(f"KL (nats/token), mean over seeds {args.seeds}; reported windows / tuning split")
    print("| experts quantized | reported | by seed | tuning split | by seed |")
    print("|---|---|---|---|---|")
    for name, per_seed in rows.items():
        cells = []
        for split in (0, 1):
            values = [v[split] for v in per_seed]
            cells += [f"{statistics.fmean(values):.5f}", ", ".join(f"{v:.5f}" for v in values)]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
