"""The run report: per block, stage seconds, output error, sampled Hessian-weighted error, tokens, fallbacks."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from streamq.distributed import Dist
from streamq.memory import MemoryPlan
from streamq.resume import OutputDir
from streamq.tui import Reporter

REPORT_NAME = "streamq_report.json"


@dataclass
class BlockReport:
    layer: int
    kind: str
    seconds: dict[str, float] = field(default_factory=dict)
    rel_error: float | None = None
    hessian_error: float | None = None
    tokens_routed: dict[str, float] | None = None
    tokens_hessian: dict[str, float] | None = None
    fallbacks: dict[str, int] = field(default_factory=dict)
    quantized_linears: int = 0
    # From the block's start to its shard written and its output saved, before the manifest update: the stages
    # plus what no stage covers.
    wall_seconds: float | None = None


@dataclass(frozen=True)
class StageClock:
    """Announces a block's stages to the reporter and adds up their seconds in the block's report."""

    report: BlockReport
    reporter: Reporter

    @contextmanager
    def __call__(
        self, name: str, *, step: int | None = None, steps: int | None = None, announce: bool = True
    ) -> Iterator[None]:
        """``announce=False``: more time for a stage already shown (the end of a background stage's work)."""
        if announce:
            self.reporter.stage(self.report.layer, name, step=step, steps=steps)
        start = time.perf_counter()
        yield
        self.report.seconds[name] = self.report.seconds.get(name, 0.0) + time.perf_counter() - start


def rel_error(y: torch.Tensor, ref: torch.Tensor, dist: Dist) -> float:
    """‖y − ref‖ / ‖ref‖ over every rank's slice."""
    sums = dist.sum(torch.stack([(y - ref).pow(2).sum(), ref.pow(2).sum()]).double())
    return (sums[0].sqrt() / sums[1].sqrt().clamp(min=1e-30)).item()


def merge_rank_stats(
    report: BlockReport, errors: dict[str, float], fallbacks: dict[str, int], linears: int, dist: Dist
) -> None:
    """The report covers every rank's experts, in an order that does not depend on the number of ranks."""
    all_errors: dict[str, float] = {}
    all_fallbacks: dict[str, int] = {}
    total = 0
    for rank_errors, rank_fallbacks, rank_linears in dist.gather_objects((errors, fallbacks, linears)):
        all_errors.update(rank_errors)
        for reason, n in rank_fallbacks.items():
            all_fallbacks[reason] = all_fallbacks.get(reason, 0) + n
        total += rank_linears
    report.hessian_error = statistics.fmean(all_errors[k] for k in sorted(all_errors)) if all_errors else None
    report.fallbacks = dict(sorted(all_fallbacks.items()))
    report.quantized_linears = total


def report_tokens(report: BlockReport, routed: list[int], top_k: int, fed_all: list[bool]) -> None:
    """Routed tokens per expert, and the tokens each expert's Hessian saw (``fed_all``: every token)."""
    report.tokens_routed = summary(routed)
    total = sum(routed) // max(top_k, 1)
    report.tokens_hessian = summary([total if everything else n for n, everything in zip(routed, fed_all, strict=True)])


def summary(values: list[int]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def save_block_report(output: OutputDir, report: BlockReport) -> None:
    output.timings_path(f"layer.{report.layer}").write_text(json.dumps(report.__dict__, sort_keys=True))


def write_report(output: OutputDir, layers: int, memory: MemoryPlan) -> None:
    """streamq_report.json from the blocks' saved reports (a resumed run has some from before the restart)."""
    blocks = []
    for layer in range(layers):
        path = output.timings_path(f"layer.{layer}")
        if path.is_file():
            blocks.append(json.loads(path.read_text()))
    report = {"memory_plan": memory.to_dict(), "blocks": blocks}
    (output.path / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
