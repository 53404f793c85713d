"""Quantization methods, each told when a block's statistics are complete.

The block loop (block_solve.py) runs the planned calibration passes and hands each method the groups whose
Hessians a pass completed, then the whole block at the end. A method says whether it needs calibration at all,
whether it wants the MoE input's Hessian, and which Hessians it still needs after a pass; a new method implements
``Method`` and is added to ``make_method``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from streamq.calibrate import BlockStats
from streamq.distributed import Dist
from streamq.groups import MOE_INPUT, LinearGroup, Role
from streamq.model.deepseek import Block, MoE
from streamq.smooth import BlockAWQ, FoldSite
from streamq.solve import Solved, Solver
from streamq.solvers.awq import activation_rms
from streamq.solvers.scheme import QuantResult


class Method(Protocol):
    calibrates: bool  # False: no calibration pass at all
    wants_moe_input: bool  # the first pass also accumulates the MoE input's Hessian
    solves_at_end: bool  # block_complete solves something (else the progress shows no extra solve stage)

    def statistics_complete(self, groups: Sequence[LinearGroup], stats: BlockStats) -> None:
        """The Hessians of ``groups`` (this rank's) are complete."""

    def keeps(self, group: LinearGroup) -> bool:
        """Whether ``group``'s Hessian is still needed after ``statistics_complete``."""

    def block_complete(self, groups: Sequence[LinearGroup], stats: BlockStats | None) -> None:
        """Every statistic of the block is collected (None without calibration); ``groups``: this rank's."""


class GPTQ:
    """Solve each group as soon as its Hessian is complete."""

    calibrates = True
    wants_moe_input = False
    solves_at_end = False

    def __init__(self, solver: Solver, solved: Solved) -> None:
        self.solver, self.solved = solver, solved

    def statistics_complete(self, groups: Sequence[LinearGroup], stats: BlockStats) -> None:
        self.solver.solve(groups, stats.hessian, self.solved, stats.cross)

    def keeps(self, group: LinearGroup) -> bool:
        return False

    def block_complete(self, groups: Sequence[LinearGroup], stats: BlockStats | None) -> None:
        return None


class RTN(GPTQ):
    """Round to nearest: no statistics, every group solved at the end."""

    calibrates = False
    solves_at_end = True

    def statistics_complete(self, groups: Sequence[LinearGroup], stats: BlockStats) -> None:
        raise AssertionError("RTN collects no statistics")

    def block_complete(self, groups: Sequence[LinearGroup], stats: BlockStats | None) -> None:
        self.solver.solve(groups, None, self.solved)


class AWQ:
    """Experts' down projections with their chunk; the shared MoE input scale and the non-expert sites at the end
    (see smooth.BlockAWQ)."""

    calibrates = True
    wants_moe_input = True
    solves_at_end = True

    def __init__(self, awq: BlockAWQ, solver: Solver, solved: Solved, block: Block, dist: Dist) -> None:
        self.awq, self.solver, self.solved, self.block, self.dist = awq, solver, solved, block, dist

    def statistics_complete(self, groups: Sequence[LinearGroup], stats: BlockStats) -> None:
        if self.awq.mlp_act is None:
            self.awq.mlp_act = mlp_input_rms(stats, self.block)
        chunk = [g for g in groups if g.expert is not None]
        self._record(self.awq.chunk(chunk, stats.hessian), chunk)

    def keeps(self, group: LinearGroup) -> bool:
        return group.expert is None  # the non-expert sites are searched at the end

    def block_complete(self, groups: Sequence[LinearGroup], stats: BlockStats | None) -> None:
        assert stats is not None
        finishing = [g for g in groups if g.expert is None]
        self._record(self.awq.finish(finishing, stats.hessian), groups)
        self.solved.changed = share_folds(self.block, self.awq.sites, self.awq.changed, self.dist)

    def _record(self, results: dict[str, QuantResult], groups: Sequence[LinearGroup]) -> None:
        by_key = {g.key: g for g in groups}
        for key, result in results.items():
            self.solver.record(by_key[key], result, self.solved)


def mlp_input_rms(stats: BlockStats, block: Block) -> torch.Tensor | None:
    """The MLP input's per-channel RMS: the MoE input's Hessian, or a dense MLP's gate/up one (rank 0)."""
    hidden = block.post_attention_layernorm.weight.shape[0]
    readers = (g.key for g in stats.into.dense_groups if g.role is Role.MLP_INPUT)
    key = MOE_INPUT if isinstance(block.mlp, MoE) else next(readers, None)
    if key is None or stats.into.hessians.count(key) == 0:
        return None
    return activation_rms(stats.into.hessians.mean(key, hidden, stats.device))


def share_folds(block: Block, sites: Sequence[FoldSite], changed: set[str], dist: Dist) -> list[str]:
    """Non-expert tensors changed by folding (norms, router, compensated shared experts): rank 0's values for
    every rank. Returns every changed parameter's name."""
    params = dict(block.named_parameters())
    shared = sorted(
        name
        for site in sites
        if site.expert is None
        for name in (f"{site.producer}.weight", *(f"{c}.weight" for c in site.compensate))
    )
    for name in shared:
        param = params[name]
        param.data = dist.broadcast(param.data.float().contiguous()).to(param.dtype)
    return sorted(changed | set(shared))


def make_method(
    name: str, solver: Solver, solved: Solved, block: Block, dist: Dist, awq: Callable[[], BlockAWQ]
) -> Method:
    """The method ``name`` for one block; ``awq`` builds AWQ's fold sites when that is the method."""
    if name == "gptq":
        return GPTQ(solver, solved)
    if name == "rtn":
        return RTN(solver, solved)
    if name == "awq":
        return AWQ(awq(), solver, solved, block, dist)
    raise ValueError(f"unknown method {name!r}")
