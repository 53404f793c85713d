"""Solve batching: a block's Linear groups → quantized weights and packed tensors, experts stacked per call.

Groups of the same shape (the routed experts) are stacked into batched solver calls; each solved group's rows are
packed for the shard and its quantized weight goes into the block (an expert's at once, a non-expert group's
only after every expert Hessian is collected: it changes every expert's input).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from streamq.distributed import Dist
from streamq.export.compressed_tensors import pack_linear
from streamq.groups import Family, LinearGroup, Role
from streamq.recipe import Refine
from streamq.resume import crash_point
from streamq.solvers.gptaq import asymmetric_target
from streamq.solvers.gptq import SolveOptions, gptq_quantize
from streamq.solvers.hessian import hessian_weighted_error
from streamq.solvers.row_chunks import RowGains, solve_in_row_chunks
from streamq.solvers.rtn import rtn_quantize
from streamq.solvers.scheme import QuantResult, QuantScheme, SolverConfig

# The Hessian-weighted error costs as much as the solve (out · in² flops in float64): the report samples every
# ERROR_EVERY-th expert (and every non-expert group), a choice that does not depend on how solves are batched.
ERROR_EVERY = 8

HessianOf = Callable[[LinearGroup], torch.Tensor]
CrossOf = Callable[[LinearGroup], torch.Tensor | None]  # mean(x x̃ᵀ) of a group's float and quantized inputs
OnFallback = Callable[[str, str], None]  # (group or "N experts", reason)


@dataclass
class Solved:
    """A block's solver output: packed tensors per module, and weights to put in before propagating."""

    packed: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    errors: dict[str, float] = field(default_factory=dict)  # sampled Hessian-weighted errors by group key
    changed: list[str] = field(default_factory=list)  # unquantized parameters changed by folding AWQ scales
    fallbacks: dict[str, int] = field(default_factory=dict)

    def experts_done(self) -> int:
        return len({m.split(".")[2] for m in self.packed if m.startswith("mlp.experts.")})

    def add_fallbacks(self, counts: dict[str, int]) -> None:
        for reason, n in counts.items():
            if n:
                self.fallbacks[reason] = self.fallbacks.get(reason, 0) + n


@dataclass(frozen=True)
class Solver:
    """What solving needs of the run: the block's modules, the solver's config and options, and where to say so
    when a matrix needed a fallback. ``schemes``: each family's grid (a mixed recipe's plan), where it is not
    ``config``'s. ``refine``: "down" keeps ``config``'s refinements after the sweep (scale candidates, code
    descent) for the down projections and solves every other group without them (recipe.Recipe.refine). The
    descent's ``outside_weight`` applies to down projections only."""

    modules: dict[str, nn.Module]
    config: SolverConfig
    options: SolveOptions
    batch: int  # experts per solver call
    on_fallback: OnFallback
    schemes: Mapping[Family, QuantScheme] = field(default_factory=dict)
    refine: Refine = "all"
    metric: RowGains | None = None

    def config_for(self, group: LinearGroup) -> SolverConfig:
        config = self.config
        scheme = self.schemes.get(group.family, config.scheme)
        if scheme != config.scheme:
            config = replace(config, scheme=scheme)
        if self.refine == "down" and group.role is not Role.DOWN:
            config = replace(config, scale_candidates=(), code_rounds=0)
        if group.role is not Role.DOWN and config.outside_weight != 1:
            # The weight is for what a down projection writes into the residual stream; stacked gate/up rows, or
            # an attention projection, have no such measured case.
            config = replace(config, outside_weight=1.0)
        return config

    def solve(
        self, groups: Sequence[LinearGroup], hessian: HessianOf | None, solved: Solved, cross: CrossOf | None = None
    ) -> None:
        """Solve ``groups`` (GPTQ with ``hessian``, round to nearest without), same shapes stacked; a group with a
        ``cross`` product is solved towards the float model's output (solvers/gptaq.py)."""
        by_shape: dict[tuple[object, ...], list[LinearGroup]] = {}
        for group in groups:
            rows = tuple(self.modules[m].weight.shape[0] for m in group.members)
            shape = (*rows, self.modules[group.members[0]].weight.shape[1])
            # The role too: untied gate and up of an expert as wide as the model have down's shape, not its config.
            key = (*shape, group.expert is None, group.family, group.role)
            by_shape.setdefault(key, []).append(group)
        for same in by_shape.values():
            step = self.batch if same[0].expert is not None else 1
            for start in range(0, len(same), step):
                self._solve_stack(same[start : start + step], hessian, solved, cross)

    def _solve_stack(
        self, groups: Sequence[LinearGroup], hessian: HessianOf | None, solved: Solved, cross: CrossOf | None
    ) -> None:
        weights = torch.stack([torch.cat([self.modules[m].weight for m in g.members]) for g in groups]).float()
        config = self.config_for(groups[0])  # stacked groups are of one family and role
        if hessian is None:
            result = rtn_quantize(weights, config)
        else:
            hs = torch.stack([hessian(g) for g in groups])
            weights = _target(weights, hs, groups, cross, config.damp)
            if self._weighed(groups[0], weights.shape[1], config):
                assert self.metric is not None
                result = solve_in_row_chunks(
                    weights, self.metric, lambda target: gptq_quantize(target, hs, config, self.options)
                )
            else:
                result = gptq_quantize(weights, hs, config, self.options)
            # A group no calibration token reached has a zero Hessian and no defined error (0 / 0): left out of
            # the sample, so that the block's mean is over groups with data (its fallback is counted apart).
            seen = (hs.diagonal(dim1=-2, dim2=-1).sum(-1) > 0).tolist()
            sample = [i for i, g in enumerate(groups) if (g.expert is None or g.expert % ERROR_EVERY == 0) and seen[i]]
            if sample:
                errors = hessian_weighted_error(weights[sample], result.weight[sample], hs[sample]).tolist()
                solved.errors.update({groups[i].key: err for i, err in zip(sample, errors, strict=True)})
        crash_point("solve")
        solved.add_fallbacks(result.fallbacks)
        for reason, n in result.fallbacks.items():
            if n:
                self.on_fallback(groups[0].key if len(groups) == 1 else f"{len(groups)} experts", reason)
        for i, group in enumerate(groups):
            self.record(group, result.entry(i), solved)

    def _weighed(self, group: LinearGroup, rows: int, config: SolverConfig) -> bool:
        """Whether a stack is solved under the output metric: down projections (they write the block's output),
        of the metric's size, on a grid without a per-matrix global scale (NVFP4's would differ between chunks)."""
        return (
            self.metric is not None
            and group.role is Role.DOWN
            and rows == self.metric.rows
            and config.scheme.scale_code != "fp8_global"
        )

    def record(self, group: LinearGroup, result: QuantResult, solved: Solved) -> None:
        """Pack each member's rows of ``result`` (one group's matrix), and put the quantized weights in."""
        scheme = self.config_for(group).scheme
        row = 0
        for member in group.members:
            rows = self.modules[member].weight.shape[0]
            part = result.rows(row, row + rows)
            tensors = pack_linear(part, scheme, scheme.scale_torch_dtype)
            # Left where they were computed: the shard writer copies them out one tensor at a time, so host
            # memory never holds a block's packed experts (~5.6 GB at DeepSeek-V3 width).
            solved.packed[member] = tensors
            if group.expert is None:
                # Attention and shared/dense MLP weights change every expert's input: they go in only after
                # all expert Hessians are collected. An expert's own weights affect nothing else.
                solved.weights[member] = part.weight
            else:
                self.modules[member].weight.data = part.weight.to(self.modules[member].weight.dtype)
            row += rows


def _target(
    weights: torch.Tensor, hs: torch.Tensor, groups: Sequence[LinearGroup], cross: CrossOf | None, damp: float
) -> torch.Tensor:
    """The weights GPTQ solves for: the float-target W* when every group of the stack has a cross product (routed
    experts, which are stacked only with each other), else the weights themselves."""
    crosses = [] if cross is None else [cross(g) for g in groups]
    if not crosses or any(c is None for c in crosses):
        return weights
    return asymmetric_target(weights, hs, torch.stack(crosses), damp)  # type: ignore[arg-type]


def share_dense_weights(
    modules: dict[str, nn.Module], groups: Sequence[LinearGroup], solved: Solved, dist: Dist
) -> None:
    """Rank 0 solved the non-expert groups; every rank needs their quantized weights for the forward."""
    for member in sorted(m for g in groups if g.expert is None for m in g.members):
        weight = solved.weights.get(member)
        if weight is None:
            weight = torch.empty_like(modules[member].weight, dtype=torch.float32)
        modules[member].weight.data = dist.broadcast(weight.float().contiguous()).to(modules[member].weight.dtype)
