"""Calibrate and solve one block: run the planned passes over its input, hand complete statistics to the method.

A pass collects the Hessians of a chunk of routed experts (and, the first, of the non-expert groups); the method
solves what a pass completed before the next one starts, so only one chunk's Hessians exist at a time. In
``hybrid`` mode a first pass counts the routed tokens, since which experts are starved is known only then.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from streamq.calibrate import Accumulators, BlockStats, HessianCheck, Hessians, calibration_pass, routed_pass
from streamq.distributed import Dist
from streamq.forward import BlockInputs
from streamq.groups import LinearGroup
from streamq.methods import Method
from streamq.model.deepseek import Block, MoE
from streamq.passes import PassPlan, numbered, plan_passes, same_count, with_first
from streamq.report import StageClock

OnExperts = Callable[[], None]  # called on every rank after every pass (progress)


@dataclass(frozen=True)
class Calibration:
    """How a block's statistics are collected."""

    mode: str  # routed / all / hybrid
    min_tokens: int  # hybrid: experts routed fewer tokens get all of them
    tie_gate_up: bool
    hessian_bytes: int  # expert Hessians per pass
    dist: Dist
    check: HessianCheck | None = None  # sees each Hessian before a method uses it (the run's finiteness guard)
    cache_bytes: int = 0  # the MoE input kept on the device across a block's passes (see MoEInputCache)
    router_weighted: bool = False  # a routed expert's tokens weigh their router weight squared (calibrate.py)


def calibrate_and_solve(
    block: Block,
    groups: Sequence[LinearGroup],
    inputs: BlockInputs,
    calibration: Calibration,
    method: Method,
    clock: StageClock,
    on_experts: OnExperts,
    on_calibrated: OnExperts = lambda: None,
    targets: BlockInputs | None = None,
) -> BlockStats | None:
    """Feed ``method`` the statistics of ``groups`` (the block's non-expert groups and this rank's experts);
    returns the statistics (None for a method without calibration). ``on_calibrated`` runs on every rank after
    each calibration pass, before its solve. ``targets``: the float model's input to this block (a float target:
    the routed experts' cross products are collected too)."""
    dist = calibration.dist
    mine = [g for g in groups if g.expert is not None or dist.main]
    if not method.calibrates:
        with clock("solve"):
            method.block_complete(mine, None)
        return None
    stats = _block_stats(block, groups, calibration, inputs.device, float_target=targets is not None)

    def floats() -> Iterator[torch.Tensor] | None:
        return None if targets is None else targets.read()

    experts = sorted({g.expert for g in groups if g.expert is not None})
    hybrid = isinstance(block.mlp, MoE) and calibration.mode == "hybrid"
    streams = 2 if targets is not None else 1
    passes = _plan(block, experts, stats.all_tokens, calibration, streams)
    # Cached MoE inputs carry no float stream: a float target's passes all start from the block's inputs.
    cache = MoEInputCache(calibration.cache_bytes if len(passes) + hybrid > 1 and targets is None else 0)
    if hybrid:
        counting = PassPlan((), (), dense_hooks=True, count_routes=True, moe_input=True)
        with clock("calibrate"):
            _pass(block, inputs, counting, stats.into, cache, dist, floats())
        on_calibrated()
        stats.all_tokens = {e for e in experts if stats.into.counts[e].item() < calibration.min_tokens}
        with clock("solve"):
            _complete(method, [g for g in mine if g.expert is None], stats)
        passes = _plan(block, experts, stats.all_tokens, calibration, streams)  # with the starved experts known
    passes = with_first(
        passes,
        dense_hooks=bool(stats.into.dense_groups) and not hybrid,
        count_routes=not hybrid,
        moe_input=not hybrid and (calibration.mode == "all" or method.wants_moe_input),
    )
    for step, plan in enumerate(passes, 1):
        with clock("calibrate", step=step, steps=len(passes)):
            _pass(block, inputs, plan, stats.into, cache, dist, floats())
        on_calibrated()
        chosen = [g for g in mine if g.expert in plan.experts or (g.expert is None and plan.dense_hooks)]
        with clock("solve", step=step, steps=len(passes)):
            _complete(method, chosen, stats)
        on_experts()
    if method.solves_at_end:
        with clock("solve"):
            method.block_complete(mine, stats)
    else:
        method.block_complete(mine, stats)
    return stats


class MoEInputCache:
    """The first pass's MoE input and routing per micro-batch, kept on the device so that the block's later passes
    skip reading its input and recomputing the attention, within ``limit`` bytes (the memory plan's share; past
    it nothing is kept and every pass starts from the block's input, as it must when they do not fit)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.used = limit, 0
        self.batches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.within_limit = limit > 0
        self.started = False  # a pass over the block's input has offered it its MoE inputs
        self.complete = False  # ... and it kept them all

    def keep(self, m: torch.Tensor, indices: torch.Tensor) -> None:
        if not self.within_limit:
            return
        self.used += m.nbytes + indices.nbytes
        if self.used > self.limit:
            self.within_limit, self.batches = False, []
        else:
            self.batches.append((m, indices))


def _pass(
    block: Block,
    inputs: BlockInputs,
    plan: PassPlan,
    into: Accumulators,
    cache: MoEInputCache,
    dist: Dist,
    targets: Iterator[torch.Tensor] | None,
) -> None:
    """One calibration pass: from the cached MoE inputs when the first pass kept them all and this pass needs
    nothing before the MoE, else over the block's input (the first such pass filling the cache)."""
    if cache.complete and isinstance(block.mlp, MoE) and not plan.dense_hooks:
        routed_pass(block.mlp, cache.batches, plan, into)
        return
    keep = None if cache.started else cache.keep
    calibration_pass(block, inputs.read("calibrate"), inputs.cos, inputs.sin, plan, into, keep, targets)
    cache.started = True
    # Every rank takes part in the gathers of a pass over the input, so they must all skip them or none: each
    # rank's limit comes from its own device's free memory.
    cache.complete = all(dist.gather_objects(keep is not None and cache.within_limit))
    if not cache.complete:
        cache.batches = []


def _block_stats(
    block: Block, groups: Sequence[LinearGroup], calibration: Calibration, device: torch.device, float_target: bool
) -> BlockStats:
    modules = dict(block.named_modules())
    moe = block.mlp if isinstance(block.mlp, MoE) else None
    into = Accumulators(
        counts=torch.zeros(len(moe.experts) if moe else 0, dtype=torch.int64, device=device),
        dense_groups=[g for g in groups if g.expert is None],
        tie=calibration.tie_gate_up,
        gather=calibration.dist.gather_rows,
        keep_dense=calibration.dist.main,
        cross=Hessians() if float_target else None,
        router_weighted=calibration.router_weighted,
    )
    all_tokens = {g.expert for g in groups if g.expert is not None} if calibration.mode == "all" else set()
    dims = {g.key: modules[g.members[0]].weight.shape[1] for g in groups}
    return BlockStats(into, all_tokens, dims, device, calibration.check)


def _complete(method: Method, groups: Sequence[LinearGroup], stats: BlockStats) -> None:
    method.statistics_complete(groups, stats)
    for group in groups:
        if not method.keeps(group):
            stats.into.hessians.pop(group.key)
            if stats.into.cross is not None:
                stats.into.cross.pop(group.key)


def _plan(
    block: Block, experts: list[int], all_tokens: set[int], calibration: Calibration, copies: int
) -> list[PassPlan]:
    """Passes over this rank's ``experts`` within the Hessian budget, as many on every rank; ``copies``: n × n
    matrices per Hessian (2 with a float target's cross products)."""
    sizes = (0, 0)
    if experts:
        assert isinstance(block.mlp, MoE)
        expert = block.mlp.experts[experts[0]]
        hidden, inter = expert.gate_proj.in_features, expert.down_proj.in_features
        # Gate/up + down from routed tokens; down only in all-token mode (gate/up share the MoE input's).
        sizes = (4 * copies * (hidden * hidden + inter * inter), 4 * copies * inter * inter)
    indices = {experts.index(e) for e in all_tokens}
    passes = numbered(plan_passes(len(experts), indices, *sizes, calibration.hessian_bytes), experts)
    return same_count(passes, calibration.dist)
