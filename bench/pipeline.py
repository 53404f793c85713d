"""Per-block time of `streamq run` at full DeepSeek-V3 width, on synthetic weights.

Writes a DeepSeek-V3-width checkpoint (by default 1 dense + 2 MoE layers, 256 experts, FP8 blocks), quantizes it
(4-bit, group 128, GPTQ with act-order, routed calibration), and prints the per-block seconds split into
load / calibrate / solve / write / propagate, then extrapolates to the full model: 3 dense + 58 MoE layers and
512 × 4096 calibration tokens. Calibration and propagation scale with the token count; load, solve and write do
not (the solver's cost depends on the Hessians' size, not on how many tokens built them).

    PYTHONPATH=$PWD python3 bench/pipeline.py --work /tmp/bench --samples 64 --seq-len 2048
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import torch

from streamq.data import DataConfig
from streamq.pipeline import REPORT_NAME, RunOptions, run
from streamq.recipe import Recipe
from streamq.synth import SynthOptions, write_synthetic_checkpoint
from streamq.tui import Reporter

STAGES = ("load", "calibrate", "solve", "write", "propagate")
PER_TOKEN = ("calibrate", "propagate")
FULL_DENSE, FULL_MOE, FULL_TOKENS = 3, 58, 512 * 4096


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="scratch directory (tens of GB)")
    parser.add_argument("--preset", default="v3", help="v3 (DeepSeek-V3 width) or tiny (a CPU smoke test)")
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--dense", type=int, default=1)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--dataset", default="builtin")
    parser.add_argument("--tokenizer", type=Path, default=None, help="tokenizer directory to put in the model")
    parser.add_argument("--calibration", default="routed")
    parser.add_argument("--hessian-budget-gb", type=float, default=None)
    parser.add_argument("--json", type=Path, default=None, help="write the measurements here")
    args = parser.parse_args()

    model, out = args.work / "model", args.work / "out"
    shutil.rmtree(out, ignore_errors=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    start = time.perf_counter()
    if not (model / "model.safetensors.index.json").exists():
        opts = SynthOptions(
            preset=args.preset,
            num_layers=args.layers,
            dense_layers=args.dense,
            mtp=False,
            shards=8,
            tokenizer_dir=args.tokenizer,
            device=device,
        )
        write_synthetic_checkpoint(model, opts, progress=print)
    synth_s = time.perf_counter() - start

    recipe = Recipe(
        calibration=args.calibration,
        data=DataConfig(source=args.dataset, num_samples=args.samples, seq_len=args.seq_len),
    )
    budget = None if args.hessian_budget_gb is None else int(args.hessian_budget_gb * 2**30)
    warm_up_solver(recipe, device)
    options = RunOptions(device=device, hessian_budget=budget)
    start = time.perf_counter()
    with Reporter(out / "streamq_events.jsonl", display="plain") as reporter:
        run(model, out, recipe, options, reporter)
    run_s = time.perf_counter() - start

    blocks = json.loads((out / REPORT_NAME).read_text())["blocks"]
    tokens = args.samples * args.seq_len
    result = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "tokens": tokens,
        "synth_seconds": synth_s,
        "run_seconds": run_s,
        "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
        "blocks": blocks,
        "extrapolation": extrapolate(blocks, tokens),
    }
    print_table(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


def warm_up_solver(recipe: Recipe, device: str) -> None:
    """Compile the Triton kernels before timing, so that the first MoE block's solve is not charged for it."""
    from streamq.solvers.gptq import gptq_quantize

    x = torch.randn(512, 256, device=device)
    gptq_quantize(torch.randn(2, 256, 256, device=device), (x.t() @ x).expand(2, 256, 256).contiguous(), recipe.solver)


def extrapolate(blocks: list[dict], tokens: int) -> dict[str, float]:
    """Seconds for the full model: per kind of block, fixed stages as measured, per-token stages scaled."""
    scale = FULL_TOKENS / tokens
    per_kind: dict[str, float] = {}
    for kind in ("dense", "moe"):
        measured = [b["seconds"] for b in blocks if b["kind"] == kind]
        if measured:
            per_kind[kind] = sum(
                statistics.fmean(s.get(stage, 0.0) for s in measured) * (scale if stage in PER_TOKEN else 1.0)
                for stage in STAGES
            )
    total = FULL_DENSE * per_kind.get("dense", 0.0) + FULL_MOE * per_kind.get("moe", 0.0)
    return {
        "dense_block_s": per_kind.get("dense", 0.0),
        "moe_block_s": per_kind.get("moe", 0.0),
        "total_h": total / 3600,
    }


def print_table(result: dict) -> None:
    print(f"\n{result['device']}: {result['tokens']} calibration tokens; run {result['run_seconds']:.1f} s")
    print("| block | kind | " + " | ".join(STAGES) + " | total | rel. error |")
    print("|---" * (len(STAGES) + 4) + "|")
    for b in result["blocks"]:
        secs = [b["seconds"].get(s, 0.0) for s in STAGES]
        err = "-" if b["rel_error"] is None else f"{b['rel_error']:.4f}"
        print(
            f"| {b['layer']} | {b['kind']} | " + " | ".join(f"{s:.1f}" for s in secs) + f" | {sum(secs):.1f} | {err} |"
        )
    x = result["extrapolation"]
    print(
        f"\nExtrapolated to 3 dense + 58 MoE layers and 512x4096 tokens: dense block {x['dense_block_s']:.1f} s, "
        f"MoE block {x['moe_block_s']:.1f} s, total {x['total_h']:.2f} h"
    )
    if result["peak_gpu_gib"] is not None:
        print(f"peak GPU memory {result['peak_gpu_gib']:.1f} GiB")


if __name__ == "__main__":
    main()
