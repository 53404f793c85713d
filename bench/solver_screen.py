"""Screen solver variants on the trained fixture's real expert problems, without held-out text (issue 13).

    PYTHONPATH=$PWD python3 bench/solver_screen.py capture --work /tmp/screen --seeds 0 1
    PYTHONPATH=$PWD python3 bench/solver_screen.py screen --work /tmp/screen --bits 4 \\
        --variants sweep "scale_candidates=0.94/0.97/1.03,code_rounds=2" --kinds all down

``capture`` runs streamq's W4 recipe with MSE scales and no refinement after the sweep (issue 13's first default,
whose runs made the tables of bench/RESULTS.md) on ``tests/fixtures/tiny-moe-shakespeare`` (CPU, bf16, 128 × 256
calibration tokens of Tiny Shakespeare's first 90%, one run per calibration seed) and records every routed-expert
solve's weights W and Hessian H as the pipeline hands them to ``gptq_quantize``. The weights are the fixture's own
in every run (routed experts see the quantized stream, but their weights do not change); the Hessians differ by
seed and by the earlier layers' quantization.

``screen`` solves every captured W with each variant on the first seed's H ("in": the tokens it is fitted on) and
scores the relative output error tr(D H Dᵀ) / tr(W H Wᵀ), D = W - Ŵ, on that H and on the second seed's ("out":
other calibration tokens, the same experts), mean over solves, per matrix kind (the tied gate/up, and down). A
variant is ``name`` (``sweep``: MSE scales and nothing after the sweep; ``default``: the default solver) or
comma-separated ``SolverConfig`` fields over ``sweep`` (``scale_candidates`` as M1/M2/...). ``--kinds down`` solves
gate/up with ``sweep`` and only the down projections with the variant, as ``--refine down`` does. W3 screens reuse
the W4 run's Hessians (the inputs differ only through the quantized stream). bench/RESULTS.md, "Refinements where
the error is", has a table made with it.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import fields, replace
from pathlib import Path

import torch

import streamq.solve as solve
from streamq.config import ModelConfig
from streamq.data import DataConfig
from streamq.pipeline import RunOptions, run
from streamq.recipe import Recipe, default_solver
from streamq.solvers.gptq import SolveOptions, gptq_quantize
from streamq.solvers.scheme import QuantResult, QuantScheme, SolverConfig
from streamq.tui import Reporter

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "tiny-moe-shakespeare"
TEXT = next(
    (p for p in (d / "shared" / "fixtures" / "text" / "tinyshakespeare.txt" for d in REPO.parents) if p.is_file()),
    Path("tinyshakespeare.txt"),
)


def capture(work: Path, seed: int) -> Path:
    """One run on the fixture; every routed-expert solve's (W, H) saved to WORK/captured-seedS.pt."""
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []
    solver = gptq_quantize

    def recording(
        w: torch.Tensor, h: torch.Tensor, cfg: SolverConfig | None = None, options: SolveOptions | None = None
    ) -> QuantResult:
        if w.dim() == 3:  # stacked routed experts
            calls.append((w.detach().float().cpu().clone(), h.detach().float().cpu().clone()))
        return solver(w, h, cfg, options)

    solve.gptq_quantize = recording
    try:
        data = DataConfig(source=str(TEXT), num_samples=128, seq_len=256, seed=seed)
        recipe = Recipe(solver=variant_config("sweep", 4), data=data)
        with Reporter(None, display="none") as reporter:
            run(FIXTURE, work / f"out-seed{seed}", recipe, RunOptions(device="cpu", dtype="bfloat16"), reporter)
    finally:
        solve.gptq_quantize = solver
    path = work / f"captured-seed{seed}.pt"
    torch.save(calls, path)
    return path


def variant_config(spec: str, bits: int) -> SolverConfig:
    scheme = QuantScheme(bits=bits, group_size=128)
    if spec == "default":
        return replace(default_solver(), scheme=scheme)
    sweep = replace(default_solver(), scheme=scheme, scale_candidates=(), code_rounds=0)
    if spec == "sweep":
        return sweep
    types = {f.name: f.type for f in fields(sweep)}
    given = {}
    for part in spec.split(","):
        key, _, value = part.partition("=")
        if key not in types:
            raise SystemExit(f"{spec}: {key!r} is not a SolverConfig field")
        if key == "scale_candidates":
            given[key] = tuple(float(m) for m in value.split("/"))
        else:
            current = getattr(sweep, key)
            given[key] = value if isinstance(current, str) else type(current)(float(value))
    return replace(sweep, **given)


def relative_errors(w: torch.Tensor, wq: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    d, w, h = (w - wq).double(), w.double(), h.double()
    return ((d @ h) * d).sum((-2, -1)) / ((w @ h) * w).sum((-2, -1))


def screen(work: Path, seeds: list[int], bits: int, variants: list[str], kinds: list[str]) -> None:
    fitted, other = (torch.load(work / f"captured-seed{s}.pt") for s in seeds[:2])
    down_in = ModelConfig.load(FIXTURE).moe_intermediate_size
    sweep = variant_config("sweep", bits)
    print(f"W{bits}: relative output error, mean over routed-expert solves; in/out: seed {seeds[0]}'s/{seeds[1]}'s H")
    print("| variant | refines | gate/up in | gate/up out | down in | down out | all in | all out | seconds |")
    print("|---|---|---|---|---|---|---|---|---|")
    for spec in variants:
        for kind in kinds:
            cfg, start = variant_config(spec, bits), time.perf_counter()
            errors: dict[str, list[float]] = {"gate/up in": [], "gate/up out": [], "down in": [], "down out": []}
            for (w, h_in), (w_other, h_out) in zip(fitted, other, strict=True):
                if not torch.equal(w, w_other):
                    raise SystemExit("the captures hold different weights: capture both seeds with the same code")
                name = "down" if w.shape[-1] == down_in else "gate/up"
                result = gptq_quantize(w, h_in, cfg if kind == "all" or name == "down" else sweep)
                seen = (h_in.diagonal(dim1=-2, dim2=-1).sum(-1) > 0) & (h_out.diagonal(dim1=-2, dim2=-1).sum(-1) > 0)
                for split, h in (("in", h_in), ("out", h_out)):
                    errors[f"{name} {split}"] += relative_errors(w, result.weight.float(), h)[seen].tolist()
            mean = {k: statistics.fmean(v) for k, v in errors.items()}
            both = [(mean[f"gate/up {s}"] + mean[f"down {s}"]) / 2 for s in ("in", "out")]
            cells = " | ".join(f"{mean[k]:.6f}" for k in errors)
            print(f"| {spec} | {kind} | {cells} | {both[0]:.6f} | {both[1]:.6f} | {time.perf_counter() - start:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("capture", "screen"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/screen"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--variants", nargs="+", default=["sweep", "default"])
    parser.add_argument("--kinds", nargs="+", choices=("all", "down"), default=["all"])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.command == "capture":
        for seed in args.seeds:
            print(f"seed {seed}: {capture(args.work, seed)}", flush=True)
    else:
        screen(args.work, args.seeds, args.bits, args.variants, args.kinds)


if __name__ == "__main__":
    main()
