"""Per-block time of `streamq run` at full DeepSeek-V3 width, on synthetic weights, on 1 or more GPUs.

Writes a DeepSeek-V3-width checkpoint (by default 1 dense + 2 MoE layers, 256 experts, FP8 blocks), quantizes it
(4-bit, group 128, GPTQ with act-order, routed calibration) with `streamq run` for each GPU count asked for, and
prints the per-block seconds split into load / calibrate / solve / write / propagate, then extrapolates to the
full model: 3 dense + 58 MoE layers and 512 × 4096 calibration tokens. Calibration and propagation scale with the
token count; load, solve and write do not (the solver's cost depends on the Hessians' size, not on how many tokens
built them).

    PYTHONPATH=$PWD python3 bench/pipeline.py --work /tmp/bench --samples 64 --seq-len 2048 --gpus 1,2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from streamq.report import REPORT_NAME
from streamq.synth import SynthOptions, write_synthetic_checkpoint

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
    parser.add_argument("--gpus", default="1", help="comma-separated process counts to measure, e.g. 1,2")
    parser.add_argument("--json", type=Path, default=None, help="write the measurements here")
    args = parser.parse_args()

    model = args.work / "model"
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
    results = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "synth_seconds": time.perf_counter() - start,
        "tokens": args.samples * args.seq_len,
        "runs": {},
    }
    for gpus in (int(g) for g in args.gpus.split(",")):
        results["runs"][gpus] = measure(args, model, gpus)
        print_table(results["runs"][gpus], gpus, results["tokens"], results["device"])
    if len(results["runs"]) > 1:
        print_speedup(results["runs"])
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def measure(args: argparse.Namespace, model: Path, gpus: int) -> dict:
    out = args.work / f"out-{gpus}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [
        sys.executable,
        "-m",
        "streamq",
        "run",
        str(model),
        str(out),
        "--dataset",
        args.dataset,
        "--num-samples",
        str(args.samples),
        "--seq-len",
        str(args.seq_len),
        "--calibration",
        args.calibration,
        "--display",
        "plain",
        "--gpus",
        str(gpus),
    ]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    blocks = json.loads((out / REPORT_NAME).read_text())["blocks"]
    return {
        "run_seconds": time.perf_counter() - start,
        "blocks": blocks,
        "extrapolation": extrapolate(blocks, args.samples * args.seq_len),
    }


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


def print_table(run: dict, gpus: int, tokens: int, device: str) -> None:
    print(f"\n{gpus} x {device}: {tokens} calibration tokens; run {run['run_seconds']:.1f} s")
    print("| block | kind | " + " | ".join(STAGES) + " | total | rel. error |")
    print("|---" * (len(STAGES) + 4) + "|")
    for b in run["blocks"]:
        secs = [b["seconds"].get(s, 0.0) for s in STAGES]
        err = "-" if b["rel_error"] is None else f"{b['rel_error']:.4f}"
        print(
            f"| {b['layer']} | {b['kind']} | " + " | ".join(f"{s:.1f}" for s in secs) + f" | {sum(secs):.1f} | {err} |"
        )
    x = run["extrapolation"]
    print(
        f"Extrapolated to 3 dense + 58 MoE layers and 512x4096 tokens: dense block {x['dense_block_s']:.1f} s, "
        f"MoE block {x['moe_block_s']:.1f} s, total {x['total_h']:.2f} h"
    )


def print_speedup(runs: dict[int, dict]) -> None:
    def moe_seconds(run: dict) -> float:
        return statistics.fmean(sum(b["seconds"].values()) for b in run["blocks"] if b["kind"] == "moe")

    base = moe_seconds(runs[min(runs)])
    for gpus, run in sorted(runs.items()):
        print(f"{gpus} GPU(s): MoE block {moe_seconds(run):.1f} s, speed-up {base / moe_seconds(run):.2f}x")


if __name__ == "__main__":
    main()
