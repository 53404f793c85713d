"""Hessians of a block's Linears from calibration activations.

A Linear's GPTQ Hessian is the mean of x xᵀ over the inputs x it sees; Linears that read the same input share
one (see groups.py).

Routed experts get their Hessians by calibration mode:
  * routed: the tokens the router sends the expert (what the expert sees in inference);
  * all: every token (the gate/up Hessian is then the MoE input's, the same for every expert, and down's comes
    from running the expert on every token), so rarely chosen experts are fitted on as much data as the rest;
  * hybrid: all tokens only for experts routed fewer than ``min_tokens`` tokens.
In every mode the block's output, and so the activations handed to the next block, follow the real top-k routing:
the extra tokens only reach the Hessians.

Routed experts' Hessians are accumulated a chunk of experts at a time (see passes.py). Everything is computed from
the unquantized block, so the result does not depend on the chunking.

With a float target (GPTAQ's asymmetric calibration, see solvers/gptaq.py) a pass also reads the unquantized
model's activations for the same tokens and accumulates, next to each routed expert's Hessian mean(x̃ x̃ᵀ), the
cross product mean(x x̃ᵀ) of its float input x with its quantized input x̃ (the tokens are those the quantized
stream routes to it, as for the Hessian).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import chain, repeat

import torch
import torch.nn.functional as F
from torch import nn

from streamq.groups import MOE_INPUT, LinearGroup, Role
from streamq.model.deepseek import MLP, Block, MoE, route_order
from streamq.passes import PassPlan
from streamq.solvers.hessian import accumulate_gram_, accumulate_product_


class Hessians:
    """Running sums of x xᵀ (float32) and token counts, by key."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, key: str, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        accumulate_gram_(self._sum(key, x), x)
        self.counts[key] += x.shape[0]

    def add_product(self, key: str, a: torch.Tensor, b: torch.Tensor) -> None:
        """Running sum of a bᵀ over tokens (rows of ``a`` and ``b`` are the same tokens)."""
        a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
        accumulate_product_(self._sum(key, a), a, b)
        self.counts[key] += a.shape[0]

    def _sum(self, key: str, x: torch.Tensor) -> torch.Tensor:
        if key not in self.sums:
            self.sums[key] = torch.zeros(x.shape[-1], x.shape[-1], device=x.device)
            self.counts[key] = 0
        return self.sums[key]

    def mean(self, key: str, dim: int, device: torch.device) -> torch.Tensor:
        """The Hessian (mean of x xᵀ); all zeros for an input that saw no token, which the solver reports."""
        if key not in self.sums:
            return torch.zeros(dim, dim, device=device)
        return self.sums[key] / max(self.counts[key], 1)

    def count(self, key: str) -> int:
        return self.counts.get(key, 0)

    def pop(self, key: str) -> None:
        self.sums.pop(key, None)


Gather = Callable[[torch.Tensor], torch.Tensor]
KeepMoEInput = Callable[[torch.Tensor, torch.Tensor], None]  # (MoE input, routing) of one micro-batch


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


@contextmanager
def input_hooks(
    block: Block, groups: Sequence[LinearGroup], hessians: Hessians, gather: Gather = _identity, keep: bool = True
) -> Iterator[None]:
    """Accumulate the input Hessian of each non-expert group on the fly (one hook on its first member). With
    several processes each sees a slice of the micro-batch: ``gather`` reassembles it (every rank must call it);
    only the ranks with ``keep`` accumulate."""
    modules = dict(block.named_modules())
    handles = []
    for group in groups:
        if group.expert is None:
            hook = _accumulate_into(hessians, group.key, gather, keep)
            handles.append(modules[group.members[0]].register_forward_pre_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _accumulate_into(
    hessians: Hessians, key: str, gather: Gather, keep: bool
) -> Callable[[nn.Module, tuple[torch.Tensor, ...]], None]:
    def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        x = gather(args[0].reshape(-1, args[0].shape[-1]))
        if keep:
            hessians.add(key, x)

    return hook


def mlp_input(block: Block, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The normalized hidden state the block's MLP / MoE reads, flattened to [tokens, hidden]."""
    h = x + block.self_attn(block.input_layernorm(x), cos, sin)
    return block.post_attention_layernorm(h).reshape(-1, x.shape[-1])


def expert_down_input(expert: MLP, x: torch.Tensor) -> torch.Tensor:
    return F.silu(expert.gate_proj(x)) * expert.up_proj(x)


def accumulate_experts(
    moe: MoE,
    x: torch.Tensor,
    indices: torch.Tensor,
    spec: PassPlan,
    into: Accumulators,
    target: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> None:
    """Add one micro-batch ``x`` [tokens, hidden] with routing ``indices`` to the pass's expert Hessians, and, with
    the float stream's ``target`` (the same tokens' unquantized MoE input), to their cross products. With the
    router's ``weights`` [tokens, top_k] a routed expert's token counts as its weight squared (see
    ``Accumulators.router_weighted``)."""
    order, offsets = route_order(indices, len(moe.experts)) if spec.routed else (indices, [])
    for e in spec.routed:
        slots = order[offsets[e] : offsets[e + 1]]
        if slots.numel() == 0:
            continue
        tokens = slots // indices.shape[1]
        gate = None if weights is None else weights.flatten()[slots].unsqueeze(-1)
        inputs = _ExpertInputs(moe.experts[e], x[tokens], None if target is None else target[tokens], gate)
        inputs.add(into, f"mlp.experts.{e}", gate_up=True)
    for e in spec.all_tokens:
        _ExpertInputs(moe.experts[e], x, target).add(into, f"mlp.experts.{e}", gate_up=False)


@dataclass(frozen=True)
class _ExpertInputs:
    """One expert's tokens: quantized-stream input ``x``, with a float target the float stream's ``target``, and
    with router weighting each token's ``gate`` weight [tokens, 1] (its inputs enter the sums scaled by it)."""

    expert: MLP
    x: torch.Tensor
    target: torch.Tensor | None
    gate: torch.Tensor | None = None

    def add(self, into: Accumulators, prefix: str, gate_up: bool) -> None:
        keys = ([f"{prefix}.gate_up"] if into.tie else [f"{prefix}.gate_proj", f"{prefix}.up_proj"]) if gate_up else []
        down = self._weighted(expert_down_input(self.expert, self.x))
        x = self._weighted(self.x)
        for key in keys:
            into.hessians.add(key, x)
        into.hessians.add(f"{prefix}.down_proj", down)
        if self.target is None or into.cross is None:
            return
        target = self._weighted(self.target)
        for key in keys:
            into.cross.add_product(key, target, x)
        target_down = self._weighted(expert_down_input(self.expert, self.target))
        into.cross.add_product(f"{prefix}.down_proj", target_down, down)

    def _weighted(self, values: torch.Tensor) -> torch.Tensor:
        return values if self.gate is None else values * self.gate.to(values.dtype)


@dataclass
class Accumulators:
    """Where a calibration pass adds what it sees. With several processes each rank sees a slice of every
    micro-batch: ``gather`` reassembles it in rank order (every rank calls it), so every rank accumulates exactly
    what one process would; ``keep_dense`` says whether this rank keeps the non-expert Hessians (their solve
    happens on one rank)."""

    hessians: Hessians = field(default_factory=Hessians)
    counts: torch.Tensor | None = None  # routed tokens per expert, int64 [E]
    dense_groups: Sequence[LinearGroup] = ()
    tie: bool = True  # gate and up share one Hessian
    gather: Gather = _identity
    keep_dense: bool = True
    cross: Hessians | None = None  # float target: sums of x x̃ᵀ (float-stream input times quantized-stream input)
    # A routed expert's output reaches the block's output multiplied by its router weight g, so its error there is
    # g times the expert's own: weighting each token's x xᵀ by g² makes GPTQ minimise the block-output error.
    router_weighted: bool = False


def calibration_pass(
    block: Block,
    batches: Iterable[torch.Tensor],
    cos: torch.Tensor,
    sin: torch.Tensor,
    plan: PassPlan,
    into: Accumulators,
    keep: KeepMoEInput | None = None,
    targets: Iterable[torch.Tensor] | None = None,
) -> None:
    """One pass over the micro-batches ``batches`` ([n, seq, hidden] on the block's device): the expert Hessians
    of ``plan``, and the non-expert Hessians, routed-token counts and MoE input Hessian when it says so; with
    ``targets`` (the float stream's micro-batches, the same sequences) also the experts' cross products. The
    block's weights and outputs are not touched. ``keep`` is handed each micro-batch's MoE input and routing
    (what a later pass can start from instead of the block's input: see ``routed_pass``)."""
    moe = block.mlp if isinstance(block.mlp, MoE) else None
    hooked = into.dense_groups if plan.dense_hooks else []
    for x, xf in zip(batches, repeat(None) if targets is None else targets, strict=False):
        with input_hooks(block, hooked, into.hessians, into.gather, into.keep_dense):
            local = mlp_input(block, x, cos, sin)
            if moe is None:
                if hooked:
                    block.mlp(local)
                continue
            if hooked and moe.shared_experts is not None:
                moe.shared_experts(local)
        m = into.gather(local)
        target = None if xf is None else into.gather(mlp_input(block, xf, cos, sin))
        indices = moe.gate(m)[1]
        if keep is not None:
            keep(m, indices)
        routed_pass(moe, [(m, indices)], plan, into, [target])


def routed_pass(
    moe: MoE,
    inputs: Iterable[tuple[torch.Tensor, torch.Tensor]],
    plan: PassPlan,
    into: Accumulators,
    targets: Iterable[torch.Tensor | None] = (),
) -> None:
    """The MoE's part of a pass, from each micro-batch's MoE input [tokens, hidden] and routing [tokens, k], with
    the float stream's MoE input of the same tokens where ``targets`` has one."""
    for (m, indices), target in zip(inputs, chain(targets, repeat(None)), strict=False):
        if plan.count_routes and into.counts is not None:
            into.counts += torch.bincount(indices.flatten(), minlength=len(moe.experts))
        if plan.moe_input:
            into.hessians.add(MOE_INPUT, m)
            if target is not None and into.cross is not None:
                into.cross.add_product(MOE_INPUT, target, m)
        # The router's weights again (cheap) rather than carried: only router weighting needs them.
        weights = moe.gate(m)[0] if into.router_weighted else None
        accumulate_experts(moe, m, indices, plan, into, target, weights)


def expert_hessian(
    hessians: Hessians, group: LinearGroup, all_tokens: bool, dim: int, device: torch.device
) -> torch.Tensor:
    """The Hessian a routed expert's group is solved with: in all-token mode gate/up read the MoE input."""
    key = MOE_INPUT if all_tokens and group.role is Role.MLP_INPUT else group.key
    return hessians.mean(key, dim, device)


HessianCheck = Callable[[torch.Tensor, Sequence[str]], None]  # a stack of Hessians [E, n, n] and their keys


@dataclass
class BlockStats:
    """A block's statistics collected so far, and the Hessian each of its groups is solved with."""

    into: Accumulators
    all_tokens: set[int]  # routed experts whose Hessians see every token
    dims: dict[str, int]  # input features by group key
    device: torch.device
    check: HessianCheck | None = None

    def hessian(self, group: LinearGroup) -> torch.Tensor:
        all_tokens = group.expert in self.all_tokens
        h = expert_hessian(self.into.hessians, group, all_tokens, self.dims[group.key], self.device)
        if self.check is not None:
            self.check(h[None], [group.key])
        return h

    def cross(self, group: LinearGroup) -> torch.Tensor | None:
        """mean(x x̃ᵀ) of ``group``'s float and quantized inputs; None when no float target was collected for it
        (non-expert groups, or a run without a float target)."""
        if self.into.cross is None or group.expert is None:
            return None
        all_tokens = group.expert in self.all_tokens
        c = expert_hessian(self.into.cross, group, all_tokens, self.dims[group.key], self.device)
        if self.check is not None:
            self.check(c[None], [group.key])
        return c
