"""Per-block time of `streamq run` at full DeepSeek-V3 width, on synthetic weights, on 1 or more GPUs.

Writes a DeepSeek-V3-width checkpoint (by default 1 dense + 2 MoE layers, 256 experts, FP8 blocks), quantizes it
(4-bit, group 128, GPTQ with act-order, routed calibration) with `streamq run` for each GPU count asked for, and
prints the per-block seconds split into load / calibrate / solve / write / propagate, each with its floor beside
it (see ``floors``), and the peak resident memory of the whole process tree (all ranks summed, sampled every
0.2 s). Then the full model: 3 dense + 58 MoE layers at 512 × 4096 calibration tokens. At that token count
(``--samples 512 --seq-len 4096``) the figure is the measured per-block times; at fewer tokens calibration and
propagation are scaled by the token ratio (load, solve and write do not depend on it), which is only an estimate.

At 512 × 4096 tokens one activation file is 30 GB and two exist at once: give ``--out`` a file system with room for
60 GB plus the output (about 17 GB for 1 dense + 2 MoE blocks) apart from the 27 GB checkpoint in ``--work``.

    PYTHONPATH=$PWD python3 bench/pipeline.py --work /tmp/bench --samples 64 --seq-len 2048 --gpus 1,2
    PYTHONPATH=$PWD python3 bench/pipeline.py --work /tmp/bench --out /mnt/ram --samples 512 --seq-len 4096
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from streamq.config import ModelConfig
from streamq.report import REPORT_NAME
from streamq.synth import SynthOptions, write_synthetic_checkpoint
from streamq.tui import EVENTS_FILENAME

STAGES = ("load", "calibrate", "solve", "write", "propagate")
PER_TOKEN = ("calibrate", "propagate")
FULL_DENSE, FULL_MOE, FULL_TOKENS = 3, 58, 512 * 4096
# Rates the floors are computed with, measured on an H200 by bench/profile_forward.py (2026-11-30): an 8192³ bf16
# matrix product, and the disk write rate seen by fsync-ed activation files; the solver's own time per expert
# (gate/up tied + down) from bench/gptq.py (bench/RESULTS.md, issue 3).
# `streamq run` in a process that may allocate at most argv[1] GiB on its GPU (a smaller card's memory; the plan's
# budget still comes from --memory-budget-gb, since the driver reports the real card's free memory).
# A smaller GPU, as streamq sees one: the allocator capped at GIB, and the driver's free memory reported as what is
# left of GIB (so that the automatic memory plan is the one that GPU would get).
_CAPPED = (
    "import sys, torch; gib = float(sys.argv.pop(1)); cap = int(gib * 2**30); "
    "torch.cuda.set_per_process_memory_fraction(cap / torch.cuda.get_device_properties(0).total_memory); "
    "torch.cuda.mem_get_info = lambda device=None: (cap - torch.cuda.memory_reserved(device), cap); "
    "from streamq.cli import main; sys.argv[0] = 'streamq'; main()"
)
BF16_FLOPS = 780e12
DISK_WRITE_BPS = 2.4e9
SOLVER_S_PER_EXPERT = (3.52 + 1.55) * 1e-3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="scratch directory (tens of GB)")
    parser.add_argument("--preset", default="v3", help="synth preset: v3, v32-full, kimi-k2-full or tiny (CPU)")
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--dense", type=int, default=1)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--dataset", default="builtin")
    parser.add_argument("--tokenizer", type=Path, default=None, help="tokenizer directory to put in the model")
    parser.add_argument("--calibration", default="routed")
    parser.add_argument("--gpus", default="1", help="comma-separated process counts to measure, e.g. 1,2")
    parser.add_argument("--json", type=Path, default=None, help="write the measurements here")
    parser.add_argument("--out", type=Path, default=None, help="where OUT goes (default: WORK/out-N)")
    parser.add_argument("--memory-budget-gb", type=float, default=None, help="streamq run's memory budget")
    parser.add_argument(
        "--device-memory-gib",
        type=float,
        default=None,
        help="cap what the run may allocate on the GPU (one process), e.g. 79.6 for an 80 GB card",
    )
    parser.add_argument("--smaps", action="store_true", help="record each process's largest mappings at the peak")
    parser.add_argument("--extra", default="", help="more `streamq run` options, e.g. '--target layer'")
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
    cfg = ModelConfig.load(model)
    results["floors"] = {kind: floors(cfg, args.samples, args.seq_len, kind) for kind in ("dense", "moe")}
    for gpus in (int(g) for g in args.gpus.split(",")):
        results["runs"][gpus] = measure(args, model, gpus)
        print_table(results["runs"][gpus], gpus, results["tokens"], results["device"], results["floors"])
        if args.json:  # after each GPU count: a run cut short keeps what it measured
            args.json.write_text(json.dumps(results, indent=2))
    if len(results["runs"]) > 1:
        print_speedup(results["runs"])


def measure(args: argparse.Namespace, model: Path, gpus: int) -> dict:
    out = (args.out or args.work) / f"out-{gpus}"
    shutil.rmtree(out, ignore_errors=True)
    launcher = ["-m", "streamq"]
    if args.device_memory_gib is not None:
        if gpus != 1:
            raise SystemExit("--device-memory-gib caps one process: use it with --gpus 1")
        launcher = ["-c", _CAPPED, str(args.device_memory_gib)]
    budget = [] if args.memory_budget_gb is None else ["--memory-budget-gb", str(args.memory_budget_gb)]
    cmd = [
        sys.executable,
        *launcher,
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
        *budget,
        *shlex.split(args.extra),
    ]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    peak = PeakRss(proc.pid, mappings=args.smaps)
    if proc.wait():
        raise SystemExit(f"streamq run failed with exit status {proc.returncode}")
    seconds = time.perf_counter() - start
    report = json.loads((out / REPORT_NAME).read_text())
    blocks = report["blocks"]
    done = _block_done_seconds(out / EVENTS_FILENAME)
    fisher = _fisher_seconds(out / EVENTS_FILENAME)
    for b in blocks:
        b["done_seconds"] = done.get(b["layer"])
    shutil.rmtree(out, ignore_errors=True)  # the next GPU count needs the room
    return {
        "run_seconds": seconds,
        "peak_rss_gib": peak.stop() / 2**30,
        "peak_pss_gib": peak.peak_pss / 2**30,
        "rss_at_peak": peak.at_peak,
        "largest_mappings_at_peak": {str(k): v for k, v in peak.top_mappings.items()},
        "memory_plan": report.get("memory_plan"),
        "blocks": blocks,
        "fisher_seconds": fisher,
        "extrapolation": extrapolate(blocks, args.samples * args.seq_len),
    }


def _block_done_seconds(events: Path) -> dict[int, float]:
    """Each block's time as the live display measures it: from its first event to ``block done`` (the report's
    ``wall_seconds`` stops before the manifest update and the removal of the block's input activations)."""
    done: dict[int, float] = {}
    for line in events.read_text().splitlines() if events.is_file() else []:
        event = json.loads(line)
        if event.get("event") == "block_done":
            done[event["block"]] = event["seconds"]
    return done


def _fisher_seconds(events: Path) -> dict[str, float]:
    """The output Fisher pre-pass (pipeline._output_fisher) from the events: its forward and backward passes, from
    their first stage event to the next pass's (or the first block's "load")."""
    marks: list[tuple[str, float]] = []
    for line in events.read_text().splitlines() if events.is_file() else []:
        event = json.loads(line)
        if event.get("event") == "stage":
            stage = str(event["stage"])
            kind = stage.rsplit(" ", 1)[-1] if stage.startswith("output Fisher") else "blocks"
            if not marks or marks[-1][0] != kind:
                marks.append((kind, event["time"]))
    seconds: dict[str, float] = {}
    for (kind, start), (_, stop) in itertools.pairwise(marks):
        if kind != "blocks":
            seconds[kind] = seconds.get(kind, 0.0) + stop - start
    return seconds


class PeakRss:
    """The largest sum of resident memory over a process and all its descendants, sampled from /proc; with each
    process's share at that moment (anonymous, file-backed, shared memory) and the peak of the summed PSS, which
    counts a page shared by several processes (the CUDA libraries' code, say) once instead of once per process."""

    def __init__(self, root: int, every: float = 0.2, mappings: bool = False) -> None:
        self.root, self.every, self.peak, self.peak_pss = root, every, 0, 0
        self.at_peak: list[dict[str, int]] = []
        self.mappings = mappings  # also the largest mappings of each large process at the peak (/proc/PID/smaps)
        self.top_mappings: dict[int, list[tuple[int, str]]] = {}
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def stop(self) -> int:
        self._done.set()
        self._thread.join()
        return self.peak

    def _poll(self) -> None:
        while not self._done.wait(self.every):
            parts = [_memory(pid) for pid in _tree(self.root)]
            total = sum(p["rss"] for p in parts)
            if total > self.peak:
                self.peak, self.at_peak = total, parts
                if self.mappings:
                    self.top_mappings = {p["pid"]: _largest_mappings(p["pid"]) for p in parts if p["rss"] > 2**30}
            self.peak_pss = max(self.peak_pss, sum(p["pss"] for p in parts))


def _tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def _largest_mappings(pid: int, count: int = 12) -> list[tuple[int, str]]:
    """The ``count`` mappings of ``pid`` with the most resident bytes, as (bytes, what is mapped)."""
    sizes: dict[str, int] = {}
    name = "?"
    try:
        for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
            fields = line.split()
            if fields and "-" in fields[0] and len(fields) >= 5:
                name = fields[5] if len(fields) > 5 else "[anon]"
            elif line.startswith("Rss:"):
                sizes[name] = sizes.get(name, 0) + int(fields[1]) * 1024
    except OSError:
        return []
    return sorted(((v, k) for k, v in sizes.items()), reverse=True)[:count]


_STATUS = {"VmRSS:": "rss", "RssAnon:": "anon", "RssFile:": "file", "RssShmem:": "shmem"}


def _memory(pid: int) -> dict[str, int]:
    """Bytes of resident memory of ``pid``: total, anonymous, file-backed, shared, and its PSS."""
    out = {"pid": pid, "rss": 0, "anon": 0, "file": 0, "shmem": 0, "pss": 0}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key = line.split(maxsplit=1)[0] if line else ""
            if key in _STATUS:
                out[_STATUS[key]] = int(line.split()[1]) * 1024
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                out["pss"] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


def floors(cfg: ModelConfig, samples: int, seq: int, kind: str) -> dict[str, float]:
    """Seconds no implementation beats by much, per stage of one block on one GPU (rates above).

    load: 0 (reading the next block's weights overlaps this one's work; FP8 bytes / disk otherwise); calibrate: one
    pass of attention, router, routed gate/up products and the expert Hessians (XᵀX per routed token, gate/up and
    down) on the tensor cores; solve: the solver's own time per expert; write: the packed experts' bytes at the
    disk's rate (overlappable); propagate: the block's forward."""
    h, heads, tokens = cfg.hidden_size, cfg.num_attention_heads, samples * seq
    proj = (
        h * (cfg.q_lora_rank or 0)
        + (cfg.q_lora_rank or h) * heads * cfg.qk_head_dim
        + h * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
        + cfg.kv_lora_rank * heads * (cfg.qk_nope_head_dim + cfg.v_head_dim)
        + heads * cfg.v_head_dim * h
    )
    attention = 2 * tokens * proj + 2 * tokens * heads * (seq / 2) * (cfg.qk_head_dim + cfg.v_head_dim)
    if kind == "dense":
        forward = attention + 2 * tokens * 3 * h * cfg.intermediate_size
        return {"load": 0.0, "calibrate": 0.0, "solve": 0.0, "write": 0.0, "propagate": forward / BF16_FLOPS}
    k, inter, experts = cfg.num_experts_per_tok, cfg.moe_intermediate_size, cfg.n_routed_experts
    routed = 2 * tokens * k * 3 * h * inter
    shared = 2 * tokens * 3 * h * inter * cfg.n_shared_experts
    hessians = 2 * tokens * k * (h * h + inter * inter)
    calibrate = attention + routed * 2 / 3 + hessians
    packed = experts * 3 * h * inter * (0.5 + 2 / 128)  # 4-bit values and a bf16 scale per group of 128
    return {
        "load": 0.0,
        "calibrate": calibrate / BF16_FLOPS,
        "solve": experts * SOLVER_S_PER_EXPERT,
        "write": packed / DISK_WRITE_BPS,
        "propagate": (attention + routed + shared) / BF16_FLOPS,
    }


def extrapolate(blocks: list[dict], tokens: int) -> dict[str, float]:
    """Seconds for the full model. At the full token count: the blocks' measured times (stages and what lies
    between them, start to ``block done``), per kind. At fewer tokens an estimate: fixed stages as measured,
    per-token stages scaled."""
    scale = FULL_TOKENS / tokens
    per_kind: dict[str, float] = {}
    for kind in ("dense", "moe"):
        measured = [b for b in blocks if b["kind"] == kind]
        if measured and tokens == FULL_TOKENS and all(b.get("done_seconds") for b in measured):
            per_kind[kind] = statistics.fmean(b["done_seconds"] for b in measured)
        elif measured:
            per_kind[kind] = sum(
                statistics.fmean(b["seconds"].get(stage, 0.0) for b in measured)
                * (scale if stage in PER_TOKEN else 1.0)
                for stage in STAGES
            )
    total = FULL_DENSE * per_kind.get("dense", 0.0) + FULL_MOE * per_kind.get("moe", 0.0)
    return {
        "dense_block_s": per_kind.get("dense", 0.0),
        "moe_block_s": per_kind.get("moe", 0.0),
        "total_h": total / 3600,
    }


def print_table(run: dict, gpus: int, tokens: int, device: str, floor: dict[str, dict[str, float]]) -> None:
    print(f"\n{gpus} x {device}: {tokens} calibration tokens; run {run['run_seconds']:.1f} s")
    print(f"peak resident memory of the process tree: {run['peak_rss_gib']:.1f} GiB (PSS {run['peak_pss_gib']:.1f})")
    for part in run["rss_at_peak"]:
        gib = {k: f"{v / 2**30:.2f}" for k, v in part.items() if k != "pid"}
        print(f"  pid {part['pid']} at the peak, GiB: {gib}")
    for pid, top in run.get("largest_mappings_at_peak", {}).items():
        print(f"  pid {pid}'s largest mappings: " + ", ".join(f"{n} {b / 2**20:.0f} MiB" for b, n in top))
    print("seconds per stage, the floor for one GPU in brackets")
    if run.get("memory_plan"):
        plan = run["memory_plan"]
        print("memory plan: " + ", ".join(f"{k} {v / 2**30:.1f} GiB" for k, v in plan.items() if k != "solve_batch"))
    print("| block | kind | " + " | ".join(STAGES) + " | stages | wall | done | rel. error | H-weighted error |")
    print("|---" * (len(STAGES) + 7) + "|")
    for b in run["blocks"]:
        secs = [b["seconds"].get(s, 0.0) for s in STAGES]
        floors_ = floor[b["kind"]]
        cells = " | ".join(f"{sec:.1f} ({floors_[s]:.1f})" for sec, s in zip(secs, STAGES, strict=True))
        err = "-" if b["rel_error"] is None else f"{b['rel_error']:.4f}"
        herr = "-" if b.get("hessian_error") is None else f"{b['hessian_error']:.5f}"
        wall, done = (f"{b[k]:.1f}" if b.get(k) is not None else "-" for k in ("wall_seconds", "done_seconds"))
        total = f"{sum(secs):.1f} ({sum(floors_.values()):.1f})"
        print(f"| {b['layer']} | {b['kind']} | {cells} | {total} | {wall} | {done} | {err} | {herr} |")
    if run.get("fisher_seconds"):
        parts = ", ".join(f"{k} {v:.1f} s" for k, v in run["fisher_seconds"].items())
        print(f"output Fisher pre-pass ({len(run['blocks'])} blocks): {parts}")
    x = run["extrapolation"]
    how = (
        "measured per-block times, start to done"
        if tokens == FULL_TOKENS
        else f"calibrate/propagate scaled x{FULL_TOKENS / tokens:g}"
    )
    print(
        f"3 dense + 58 MoE layers at 512x4096 tokens ({how}): dense block {x['dense_block_s']:.1f} s, "
        f"MoE block {x['moe_block_s']:.1f} s, total {x['total_h'] * 60:.1f} min"
    )


def print_speedup(runs: dict[int, dict]) -> None:
    def moe_seconds(run: dict, key: str) -> float:
        moe = [b for b in run["blocks"] if b["kind"] == "moe"]
        if key != "stages":
            return statistics.fmean(b.get(f"{key}_seconds") or 0.0 for b in moe)
        return statistics.fmean(sum(b["seconds"].get(s, 0.0) for s in STAGES) for b in moe)

    for key in ("done", "wall", "stages"):
        base = moe_seconds(runs[min(runs)], key)
        for gpus, run in sorted(runs.items()):
            secs = moe_seconds(run, key)
            print(f"{gpus} GPU(s): MoE block {secs:.1f} s ({key}), speed-up {base / max(secs, 1e-9):.2f}x")


if __name__ == "__main__":
    main()
