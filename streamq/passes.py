"""Pass planning: which routed experts' Hessians each pass over a block's activations collects.

Routed experts' Hessians are large (256 × 7168² floats per DeepSeek-V3 layer = 52 GB), so they are accumulated a
chunk of experts at a time, one pass over the activations each, within a memory budget. A pass is data: the
experts it collects and what else it counts along the way.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from streamq.distributed import Dist


@dataclass(frozen=True)
class PassPlan:
    """One pass over the activations: Hessians for these routed experts, from their routed tokens or from all."""

    routed: tuple[int, ...]
    all_tokens: tuple[int, ...]
    dense_hooks: bool = False  # also the attention / shared-expert / dense-MLP groups
    count_routes: bool = False  # count the tokens routed to each expert
    moe_input: bool = False  # accumulate the MoE input's Hessian

    @property
    def experts(self) -> set[int]:
        return set(self.routed) | set(self.all_tokens)


def plan_passes(
    num_experts: int, all_token_experts: set[int], bytes_routed: int, bytes_all: int, budget: int
) -> list[PassPlan]:
    """Chunks of experts ``0..num_experts-1`` whose Hessians fit ``budget`` bytes together (at least one pass)."""
    passes: list[PassPlan] = []
    routed: list[int] = []
    everyone: list[int] = []
    used = 0
    for e in range(num_experts):
        cost = bytes_all if e in all_token_experts else bytes_routed
        if (routed or everyone) and used + cost > budget:
            passes.append(PassPlan(tuple(routed), tuple(everyone)))
            routed, everyone, used = [], [], 0
        (everyone if e in all_token_experts else routed).append(e)
        used += cost
    if routed or everyone or not passes:
        passes.append(PassPlan(tuple(routed), tuple(everyone)))
    return passes


def numbered(passes: list[PassPlan], experts: list[int]) -> list[PassPlan]:
    """``plan_passes`` numbers this rank's experts 0..n-1; map them back to the layer's expert indices."""
    return [
        replace(p, routed=tuple(experts[i] for i in p.routed), all_tokens=tuple(experts[i] for i in p.all_tokens))
        for p in passes
    ]


def same_count(passes: list[PassPlan], dist: Dist) -> list[PassPlan]:
    """Every rank must take part in every pass (the MoE input is gathered): pad with empty passes."""
    most = max(dist.gather_objects(len(passes)))
    return passes + [PassPlan((), ())] * (most - len(passes))


def with_first(passes: list[PassPlan], *, dense_hooks: bool, count_routes: bool, moe_input: bool) -> list[PassPlan]:
    """The first pass also takes the non-expert Hessians, the routing counts and the MoE input when asked."""
    first = replace(passes[0], dense_hooks=dense_hooks, count_routes=count_routes, moe_input=moe_input)
    return [first, *passes[1:]]
