"""GPTQ solver benchmark at DeepSeek-V3 expert shapes (run on the GPU machine).

    PYTHONPATH=$PWD PYTHONUNBUFFERED=1 python3 bench/gptq.py --out $OUT          # full: 256 experts per shape
    PYTHONPATH=$PWD python3 bench/gptq.py --smoke                                 # tiny shapes, any device

For each shape (gate/up 2048x7168, down 7168x2048), 4-bit symmetric, group 128, activation order with static
groups ("weight"), Hessians from 8192 tokens of heavy-tailed inputs, all experts solved in chunks that fit:

- ms per matrix with one Hessian per matrix, and for gate/up also with tied gate+up (two matrices per
  Cholesky: rows concatenated, [E, 4096, 7168]), amortised over all experts;
- the Hessian stage (reorder + Cholesky + feedback matrix) against the column stage (sweep kernel, feedback
  matmuls, the rest), from CUDA events and a profiler pass over one chunk;
- Hessian-weighted relative error next to RTN and textbook column-by-column GPTQ (timed on 2 matrices);
- variants (TF32 off, classic inverse form, sweep/panel widths, dynamic groups) on one chunk;
- the machine's ceilings (copy bandwidth, fp32 and tf32 matmul, Cholesky rates) and the floor they imply.

Every chunk is fresh random data (no input is timed twice except in the variant table, where a chunk of
16-64 Hessians of 16-205 MB each is far larger than L2). Timings are CUDA events after a warm-up chunk.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from streamq.solvers import (
    SolveOptions,
    SolverConfig,
    gptq_quantize,
    gptq_reference,
    gptq_solve_prepared,
    hessian_weighted_error,
    prepare_hessians,
    rtn_quantize,
)
from streamq.solvers.cholesky import upper_cholesky_blocked_
from streamq.solvers.hessian import FactorOptions, library_upper_cholesky
from streamq.solvers.scheme import QuantScheme
from streamq.solvers.synthetic import heavy_tailed_hessians, random_weights

CFG = SolverConfig(scheme=QuantScheme(bits=4, group_size=128, symmetric=True), actorder="weight")
MOE_QUANT_MS = {"gate_up": 87.5, "down": 19.2}  # IST-DASLab MoE-Quant on an H100, same shapes (from the issue)


@dataclass(frozen=True)
class Shape:
    name: str
    out: int
    n: int
    chunk: int  # experts per solver call
    tied: bool  # gate/up: also measure two matrices per Hessian


@dataclass(frozen=True)
class Plan:
    shapes: tuple[Shape, ...]
    experts: int
    tokens: int
    reference_matrices: int
    variant_repeats: int


FULL = Plan(
    shapes=(Shape("gate_up", 2048, 7168, 32, True), Shape("down", 7168, 2048, 64, False)),
    experts=256,
    tokens=8192,
    reference_matrices=2,
    variant_repeats=3,
)
SMOKE = Plan(
    shapes=(Shape("gate_up", 64, 256, 4, True), Shape("down", 256, 128, 4, False)),
    experts=8,
    tokens=512,
    reference_matrices=1,
    variant_repeats=1,
)


# ---------------------------------------------------------------------------------------------- timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def elapsed_ms(device: torch.device, sink: list[float]) -> Iterator[None]:
    """Append the wall time of the block in ms: CUDA events on a GPU (device work included), else a clock."""
    sync(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        yield
        end.record()
        end.synchronize()
        sink.append(start.elapsed_time(end))
    else:
        t0 = time.perf_counter()
        yield
        sink.append((time.perf_counter() - t0) * 1e3)


def time_ms(fn: Callable[[], object], device: torch.device, repeats: int = 1) -> float:
    """Median over ``repeats`` calls."""
    times: list[float] = []
    for _ in range(repeats):
        with elapsed_ms(device, times):
            fn()
    return statistics.median(times)


def bench_ms(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=50, rep=200, return_mode="median"))
    return time_ms(fn, device, repeats=3)


# ------------------------------------------------------------------------------------------- ceilings


@contextmanager
def matmul_precision(level: str) -> Iterator[None]:
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(level)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def measure_ceilings(device: torch.device, size: int) -> dict[str, float]:
    """Copy bandwidth (bytes read + written), fp32 and tf32 matmul rates, on random data."""
    a = torch.randn(size * size * 4, device=device)
    b = torch.empty_like(a)
    copy_ms = bench_ms(lambda: b.copy_(a), device)
    x, y = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    flops = 2 * size**3
    with matmul_precision("highest"):
        fp32_ms = bench_ms(lambda: x @ y, device)
    with matmul_precision("high"):
        tf32_ms = bench_ms(lambda: x @ y, device)
    return {
        "copy_GBps": 2 * a.numel() * 4 / copy_ms / 1e6,
        "fp32_matmul_TFLOPs": flops / fp32_ms / 1e9,
        "tf32_matmul_TFLOPs": flops / tf32_ms / 1e9,
    }


def measure_cholesky(device: torch.device, n: int, batch: int, tokens: int) -> dict[str, float]:
    """ms per matrix and backward error ||R R^T - A|| / ||A|| of the upper factor: cuSOLVER one matrix per
    call (fp32, fp64), torch's batched call (potrfBatched), and the blocked batched factorisation at each
    Schur precision; plus the triangular inverse the classic form adds."""
    g = torch.Generator(device=device).manual_seed(1)
    with matmul_precision("high"):
        h = heavy_tailed_hessians(batch, n, tokens, g, device)
    h += 0.01 * h.diagonal(dim1=-2, dim2=-1).mean(-1)[:, None, None] * torch.eye(n, device=device)
    h64 = h.double()

    def residual(r: torch.Tensor) -> float:
        r64 = r.double().triu()
        return float(((r64 @ r64.mT - h64).norm() / h64.norm()).item())

    row: dict[str, float] = {"n": n}
    row["library_fp32_ms"] = time_ms(lambda: [library_upper_cholesky(m) for m in h], device, 3) / batch
    row["library_fp32_residual"] = residual(torch.stack([library_upper_cholesky(m)[0] for m in h]))
    row["library_fp64_ms"] = time_ms(lambda: [torch.linalg.cholesky_ex(m) for m in h64], device, 3) / batch
    # potrfBatched is meant for small matrices: at n = 7168 it risks minutes of device time for nothing.
    batched = time_ms(lambda: torch.linalg.cholesky_ex(h), device, 3) / batch if n <= 2048 else float("nan")
    row["potrf_batched_fp32_ms"] = batched
    for precision in ("fp32", "tf32", "3xtf32"):
        work = h.clone()
        row[f"blocked_{precision}_ms"] = (
            time_ms(lambda p=precision, a=work: upper_cholesky_blocked_(a.copy_(h), 512, p), device, 3) / batch
        )
        row[f"blocked_{precision}_residual"] = residual(work)
    lower = torch.linalg.cholesky(h)
    eye = torch.eye(n, device=device)
    row["triangular_inverse_fp32_ms"] = (
        time_ms(lambda: [torch.linalg.solve_triangular(m, eye, upper=False) for m in lower], device, 3) / batch
    )
    return row


# ------------------------------------------------------------------------------------------- problems


def make_chunk(shape: Shape, first: int, count: int, tokens: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Hessians and weights of experts [first, first + count): seeded by index, so reruns see the same data."""
    g = torch.Generator(device=device).manual_seed(1000 + first)
    with matmul_precision("high"):  # TF32 makes H = X^T X cheap; H is symmetrised exactly either way
        h = heavy_tailed_hessians(count, shape.n, tokens, g, device)
    w = random_weights(count, shape.out, shape.n, g, device)
    chunk = {"h": h, "w": w}
    if shape.tied:
        chunk["w_tied"] = torch.cat([w, random_weights(count, shape.out, shape.n, g, device)], dim=1)
    return chunk


def mean_error(w: torch.Tensor, wq: torch.Tensor, h: torch.Tensor) -> float:
    """Mean Hessian-weighted relative error, one matrix at a time (float64 of a whole chunk is too big)."""
    return statistics.fmean(float(hessian_weighted_error(w[e], wq[e], h[e])) for e in range(w.shape[0]))


# ------------------------------------------------------------------------------------------- the runs


def solve_all(
    shape: Shape, plan: Plan, options: SolveOptions, device: torch.device, log: Callable[[str], None]
) -> dict[str, float]:
    """Every expert, chunk by chunk: total solver time with one Hessian per matrix and (gate/up) tied."""
    single: list[float] = []
    tied: list[float] = []
    for first in range(0, plan.experts, shape.chunk):
        count = min(shape.chunk, plan.experts - first)
        data = make_chunk(shape, first, count, plan.tokens, device)
        with elapsed_ms(device, single):
            gptq_quantize(data["w"], data["h"], CFG, options)
        if shape.tied:
            with elapsed_ms(device, tied):
                gptq_quantize(data["w_tied"], data["h"], CFG, options)
        log(
            f"  {shape.name} experts {first}-{first + count - 1}: {single[-1]:.1f} ms"
            + (f", tied {tied[-1]:.1f} ms" if tied else "")
        )
        del data
    row = {"ms_per_matrix": sum(single) / plan.experts}
    if shape.tied:
        row["tied_ms_per_matrix"] = sum(tied) / (2 * plan.experts)
    return row


def profile_kernels(fn: Callable[[], object], device: torch.device) -> dict[str, float]:
    """Device time (ms) of the kernels ``fn`` launches, by category."""
    if device.type != "cuda":
        return {}
    from torch.profiler import ProfilerActivity, profile

    sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        sync(device)
    totals: dict[str, float] = {}
    for event in prof.key_averages():
        name = event.key.lower()
        us = getattr(event, "self_device_time_total", 0.0) or getattr(event, "self_cuda_time_total", 0.0)
        if "gptq_block" in name:
            kind = "sweep_kernel"
        elif "potrf" in name or "cusolver" in name or "syrk" in name or "trsm" in name or "chol" in name:
            kind = "cusolver"
        elif "gemm" in name or "xmma" in name or "cutlass" in name:
            kind = "gemm"
        elif "index" in name or "gather" in name:
            kind = "gather"
        else:
            kind = "other"
        totals[kind] = totals.get(kind, 0.0) + us / 1e3
    return totals


def breakdown(shape: Shape, data: dict[str, torch.Tensor], options: SolveOptions, device: torch.device) -> dict:
    """Hessian stage vs column stage on one chunk (events), and the kernels inside each (profiler)."""
    count = data["w"].shape[0]
    prep_ms: list[float] = []
    solve_ms: list[float] = []
    with elapsed_ms(device, prep_ms):
        prep = prepare_hessians(data["h"], CFG, options.factor)
    with elapsed_ms(device, solve_ms):
        gptq_solve_prepared(data["w"], prep, CFG, options)
    row = {"hessian_ms_per_matrix": prep_ms[0] / count, "columns_ms_per_matrix": solve_ms[0] / count}
    hessian_kernels = profile_kernels(lambda: prepare_hessians(data["h"], CFG, options.factor), device)
    column_kernels = profile_kernels(lambda: gptq_solve_prepared(data["w"], prep, CFG, options), device)
    row["hessian_kernels_ms_per_matrix"] = {k: v / count for k, v in hessian_kernels.items()}
    row["column_kernels_ms_per_matrix"] = {k: v / count for k, v in column_kernels.items()}
    return row


def quality(
    shape: Shape, data: dict[str, torch.Tensor], plan: Plan, options: SolveOptions, device: torch.device
) -> dict:
    """Errors of ours, RTN and the textbook reference (on the first matrices), and their times."""
    w, h = data["w"], data["h"]
    ours = gptq_quantize(w, h, CFG, options)
    rtn_ms: list[float] = []
    with elapsed_ms(device, rtn_ms):
        rtn = rtn_quantize(w, CFG)
    k = plan.reference_matrices
    ref_ms: list[float] = []
    ref_err = []
    for e in range(k):
        with elapsed_ms(device, ref_ms):
            ref = gptq_reference(w[e], h[e], CFG)
        ref_err.append(float(hessian_weighted_error(w[e], ref.weight, h[e])))
    return {
        "error": mean_error(w, ours.weight, h),
        "error_first_matrices": mean_error(w[:k], ours.weight[:k], h[:k]),
        "rtn_error": mean_error(w, rtn.weight, h),
        "rtn_ms_per_matrix": rtn_ms[0] / w.shape[0],
        "reference_error_first_matrices": statistics.fmean(ref_err),
        "reference_ms_per_matrix": statistics.fmean(ref_ms),
        "fallbacks": ours.fallbacks,
    }


VARIANTS: dict[str, tuple[SolveOptions, SolverConfig]] = {
    "default (TF32 blocked Cholesky, TF32 feedback, sweep 32 x 64 rows, panels 1024/128/32)": (SolveOptions(), CFG),
    "Cholesky: blocked, 3xTF32 Schur (float32-accurate)": (SolveOptions(factor=FactorOptions(precision="3xtf32")), CFG),
    "Cholesky: blocked, fp32 Schur (CUDA cores)": (SolveOptions(factor=FactorOptions(precision="fp32")), CFG),
    "Cholesky: cuSOLVER potrf per matrix": (SolveOptions(factor=FactorOptions(method="library")), CFG),
    "classic inverse form (+ triangular inverse)": (SolveOptions(factor=FactorOptions(form="inverse")), CFG),
    "fp32 feedback matmuls (no TF32)": (SolveOptions(tf32=False), CFG),
    "no outer panel (128/32)": (SolveOptions(outer_panel=0), CFG),
    "sweep 128 rows per program": (SolveOptions(sweep_rows=128), CFG),
    "actorder=group (dynamic groups, g_idx)": (SolveOptions(), replace(CFG, actorder="group")),
}


def variants(
    shape: Shape, data: dict[str, torch.Tensor], plan: Plan, device: torch.device, log: Callable[[str], None]
) -> dict:
    w, h = data["w"], data["h"]
    rows = {}
    for name, (options, cfg) in VARIANTS.items():
        ms = time_ms(lambda o=options, c=cfg: gptq_quantize(w, h, c, o), device, plan.variant_repeats)
        result = gptq_quantize(w, h, cfg, options)
        err = mean_error(w, result.weight, h)
        rows[name] = {"ms_per_matrix": ms / w.shape[0], "error": err, "fallbacks": result.fallbacks}
        log(f"  variant {name}: {ms / w.shape[0]:.3f} ms/matrix, error {err:.5f}, fallbacks {result.fallbacks}")
    return rows


# ------------------------------------------------------------------------------------------- floors


def floors(shape: Shape, ceilings: dict[str, float], chol: dict[str, float] | None) -> dict[str, float]:
    """Lower bounds per matrix: Cholesky n^3/3 flops at the fp32 matmul rate, feedback 2*out*n^2 flops at
    tf32 rate, and the bytes that must move (H and W read, codes + bf16 weight written)."""
    n, out = shape.n, shape.out
    fp32 = ceilings["fp32_matmul_TFLOPs"] * 1e12
    tf32 = ceilings["tf32_matmul_TFLOPs"] * 1e12
    bw = ceilings["copy_GBps"] * 1e9
    chol_flops = n**3 / 3
    update_flops = 2 * out * n**2
    bytes_moved = 4 * n * n + 4 * out * n + out * n + 2 * out * n
    row = {
        "cholesky_GFLOP": chol_flops / 1e9,
        "feedback_GFLOP": update_flops / 1e9,
        "bytes_MB": bytes_moved / 1e6,
        "cholesky_floor_ms": chol_flops / fp32 * 1e3,
        "feedback_floor_ms_tf32": update_flops / tf32 * 1e3,
        "feedback_floor_ms_fp32": update_flops / fp32 * 1e3,
        "memory_floor_ms": bytes_moved / bw * 1e3,
    }
    row["cholesky_floor_ms_tf32"] = chol_flops / tf32 * 1e3
    # fp32 Cholesky (what cuSOLVER or a float32-accurate factorisation needs) and all-TF32 (the default).
    row["floor_ms"] = max(row["cholesky_floor_ms"] + row["feedback_floor_ms_tf32"], row["memory_floor_ms"])
    row["tied_floor_ms"] = max(row["cholesky_floor_ms"] / 2 + row["feedback_floor_ms_tf32"], row["memory_floor_ms"])
    tf32_total = row["cholesky_floor_ms_tf32"] + row["feedback_floor_ms_tf32"]
    row["tf32_floor_ms"] = max(tf32_total, row["memory_floor_ms"])
    row["tf32_tied_floor_ms"] = max(tf32_total - row["cholesky_floor_ms_tf32"] / 2, row["memory_floor_ms"])
    if chol:
        row["cusolver_cholesky_ms"] = chol["library_fp32_ms"]
    return row


# ------------------------------------------------------------------------------------------- main


def table(results: dict) -> str:
    lines = []
    dev = results["device"]
    lines.append(f"device: {dev}; experts per shape: {results['experts']}; tokens per Hessian: {results['tokens']}")
    c = results["ceilings"]
    lines.append(
        f"ceilings: copy {c['copy_GBps']:.0f} GB/s, fp32 matmul {c['fp32_matmul_TFLOPs']:.1f} TFLOP/s, "
        f"tf32 matmul {c['tf32_matmul_TFLOPs']:.1f} TFLOP/s"
    )
    lines.append("")
    lines.append("| Cholesky, n | ms/matrix | backward error |")
    lines.append("|---|---|---|")
    for chol in results["cholesky"]:
        for key in chol:
            if key.endswith("_ms"):
                name = key.removesuffix("_ms")
                res = chol.get(name + "_residual")
                lines.append(f"| {name}, {chol['n']} | {chol[key]:.3f} | {'' if res is None else f'{res:.1e}'} |")
    lines.append("")
    lines.append(
        "| shape | ms/matrix (1 H per matrix) | ms/matrix tied gate+up | MoE-Quant ms | speed-up (tied) | "
        "floor ms, fp32 Cholesky (tied) | floor ms, all TF32 (tied) "
        "| error | RTN error | reference error (first) / ours (first) | reference ms |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in results["shapes"].items():
        f = r["floor"]
        q = r["quality"]
        tied = f"{r['tied_ms_per_matrix']:.2f}" if "tied_ms_per_matrix" in r else "n/a"
        has_tied = "tied_ms_per_matrix" in r
        floor = f"{f['floor_ms']:.2f}" + (f" ({f['tied_floor_ms']:.2f})" if has_tied else "")
        floor_tf32 = f"{f['tf32_floor_ms']:.2f}" + (f" ({f['tf32_tied_floor_ms']:.2f})" if has_tied else "")
        speedup = f"{MOE_QUANT_MS[name] / r['ms_per_matrix']:.1f}x"
        if has_tied:
            speedup += f" ({MOE_QUANT_MS[name] / r['tied_ms_per_matrix']:.1f}x)"
        lines.append(
            f"| {name} {r['out']}x{r['n']} | {r['ms_per_matrix']:.2f} | {tied} | {MOE_QUANT_MS[name]} | "
            f"{speedup} | {floor} | {floor_tf32} | {q['error']:.5f} | {q['rtn_error']:.5f} | "
            f"{q['reference_error_first_matrices']:.5f} / {q['error_first_matrices']:.5f} | "
            f"{q['reference_ms_per_matrix']:.0f} |"
        )
    lines.append("")
    lines.append("| shape | Hessian stage ms/matrix | column stage ms/matrix | Hessian kernels | column kernels |")
    lines.append("|---|---|---|---|---|")
    for name, r in results["shapes"].items():
        b = r["breakdown"]
        hk = ", ".join(f"{k} {v:.3f}" for k, v in sorted(b["hessian_kernels_ms_per_matrix"].items()))
        ck = ", ".join(f"{k} {v:.3f}" for k, v in sorted(b["column_kernels_ms_per_matrix"].items()))
        lines.append(f"| {name} | {b['hessian_ms_per_matrix']:.3f} | {b['columns_ms_per_matrix']:.3f} | {hk} | {ck} |")
    lines.append("")
    lines.append("| shape | variant | ms/matrix | error |")
    lines.append("|---|---|---|---|")
    for name, r in results["shapes"].items():
        for vname, v in r["variants"].items():
            fallbacks = v["fallbacks"] or ""
            lines.append(f"| {name} | {vname} | {v['ms_per_matrix']:.3f} | {v['error']:.5f} {fallbacks} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes: check that the script runs")
    parser.add_argument("--experts", type=int, help="experts per shape (default 256; smoke 8)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench_out")))
    parser.add_argument("--skip-variants", action="store_true")
    args = parser.parse_args()
    plan = SMOKE if args.smoke else FULL
    if args.experts:
        plan = replace(plan, experts=args.experts)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.out.mkdir(parents=True, exist_ok=True)
    log_file = (args.out / "gptq_bench.log").open("w")

    def log(msg: str) -> None:
        print(msg, flush=True)
        log_file.write(msg + "\n")
        log_file.flush()

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    results: dict = {"device": name, "torch": torch.__version__, "experts": plan.experts, "tokens": plan.tokens}
    results["ceilings"] = measure_ceilings(device, 8192 if device.type == "cuda" else 512)
    log(f"ceilings {results['ceilings']}")
    results["cholesky"] = [measure_cholesky(device, s.n, min(4, s.chunk), plan.tokens) for s in plan.shapes]
    log(f"cholesky {results['cholesky']}")
    options = SolveOptions(memory_budget=1 << 40)  # the benchmark sizes chunks itself

    results["shapes"] = {}
    for shape, chol in zip(plan.shapes, results["cholesky"], strict=True):
        log(f"{shape.name}: {shape.out}x{shape.n}, {plan.experts} experts in chunks of {shape.chunk}")
        first = make_chunk(shape, 0, shape.chunk, plan.tokens, device)
        gptq_quantize(first["w"], first["h"], CFG, options)  # warm-up: Triton compile, cuBLAS/cuSOLVER handles
        row: dict = {"out": shape.out, "n": shape.n}
        row["breakdown"] = breakdown(shape, first, options, device)
        log(f"  breakdown {row['breakdown']}")
        row["quality"] = quality(shape, first, plan, options, device)
        log(f"  quality {row['quality']}")
        if not args.skip_variants:
            row["variants"] = variants(shape, first, plan, device, log)
        del first
        row.update(solve_all(shape, plan, options, device, log))
        row["floor"] = floors(shape, results["ceilings"], chol)
        results["shapes"][shape.name] = row
        (args.out / "gptq_bench.json").write_text(json.dumps(results, indent=2))
    if args.skip_variants:
        for row in results["shapes"].values():
            row["variants"] = {}
    report = table(results)
    (args.out / "gptq_bench.md").write_text(report + "\n")
    log(report)


if __name__ == "__main__":
    sys.exit(main())
