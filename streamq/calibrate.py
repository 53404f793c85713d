"""Hessians of a block's Linears from calibration activations.

A Linear's GPTQ Hessian is the mean of x xᵀ over the inputs x it sees. Linears that read the same input share
one Hessian and are solved together, rows stacked: gate and up of an MLP, q_a and kv_a of the attention.

Routed experts get their Hessians by calibration mode:
  * routed: the tokens the router sends the expert (what the expert sees in inference);
  * all: every token (the gate/up Hessian is then the MoE input's, the same for every expert, and down's comes
    from running the expert on every token), so rarely chosen experts are fitted on as much data as the rest;
  * hybrid: all tokens only for experts routed fewer than ``min_tokens`` tokens.
In every mode the block's output, and so the activations handed to the next block, follow the real top-k routing:
the extra tokens only reach the Hessians.

Routed experts' Hessians are large (256 × 7168² floats per DeepSeek-V3 layer = 52 GB), so they are accumulated a
chunk of experts at a time, one pass over the activations each, within a memory budget. Everything is computed from
the unquantized block, so the result does not depend on the chunking.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from streamq.config import ModelConfig
from streamq.model.deepseek import MLP, Block, MoE, route_order
from streamq.recipe import Recipe
from streamq.solvers.hessian import accumulate_gram_

MOE_INPUT = "mlp.input"  # the Hessian of the MoE input: every routed expert's gate/up in "all" mode


@dataclass(frozen=True)
class LinearGroup:
    """Linears of one block that share an input, hence a Hessian; ``expert`` is set for routed experts."""

    key: str
    members: tuple[str, ...]
    expert: int | None = None


def linear_groups(cfg: ModelConfig, layer: int, recipe: Recipe) -> list[LinearGroup]:
    """The block's Linears that the recipe quantizes, grouped by shared input."""
    groups: list[LinearGroup] = []
    tie = recipe.tie_gate_up
    if recipe.scope == "all":
        first = ("self_attn.q_a_proj" if cfg.q_lora_rank else "self_attn.q_proj", "self_attn.kv_a_proj_with_mqa")
        groups += _shared_input(first[0], first, tie)
        if cfg.q_lora_rank:
            groups.append(LinearGroup("self_attn.q_b_proj", ("self_attn.q_b_proj",)))
        groups += [
            LinearGroup("self_attn.kv_b_proj", ("self_attn.kv_b_proj",)),
            LinearGroup("self_attn.o_proj", ("self_attn.o_proj",)),
        ]
        mlp = "mlp.shared_experts" if cfg.is_moe_layer(layer) else "mlp"
        if not cfg.is_moe_layer(layer) or cfg.n_shared_experts:
            groups += _mlp_groups(mlp, tie)
    if cfg.is_moe_layer(layer):
        for e in range(cfg.n_routed_experts):
            groups += _mlp_groups(f"mlp.experts.{e}", tie, expert=e)
    return groups


def _shared_input(key: str, members: tuple[str, ...], tie: bool, expert: int | None = None) -> list[LinearGroup]:
    if tie:
        return [LinearGroup(key, members, expert)]
    return [LinearGroup(m, (m,), expert) for m in members]


def _mlp_groups(prefix: str, tie: bool, expert: int | None = None) -> list[LinearGroup]:
    gate_up = (f"{prefix}.gate_proj", f"{prefix}.up_proj")
    return [
        *_shared_input(f"{prefix}.gate_up", gate_up, tie, expert),
        LinearGroup(f"{prefix}.down_proj", (f"{prefix}.down_proj",), expert),
    ]


class Hessians:
    """Running sums of x xᵀ (float32) and token counts, by key."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, key: str, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        if key not in self.sums:
            self.sums[key] = torch.zeros(x.shape[-1], x.shape[-1], device=x.device)
            self.counts[key] = 0
        accumulate_gram_(self.sums[key], x)
        self.counts[key] += x.shape[0]

    def mean(self, key: str, dim: int, device: torch.device) -> torch.Tensor:
        """The Hessian (mean of x xᵀ); all zeros for an input that saw no token, which the solver reports."""
        if key not in self.sums:
            return torch.zeros(dim, dim, device=device)
        return self.sums[key] / max(self.counts[key], 1)

    def count(self, key: str) -> int:
        return self.counts.get(key, 0)

    def pop(self, key: str) -> None:
        self.sums.pop(key, None)


@dataclass(frozen=True)
class ExpertPass:
    """One pass over the activations: Hessians for these routed experts, from their routed tokens or from all."""

    routed: tuple[int, ...]
    all_tokens: tuple[int, ...]
    dense_hooks: bool = False  # also the attention / shared-expert / dense-MLP groups (first pass only)


@dataclass
class RoutingStats:
    tokens_per_expert: torch.Tensor  # routed tokens, int64 [E]
    total_tokens: int = 0


@dataclass
class BlockCalibration:
    hessians: Hessians = field(default_factory=Hessians)
    routing: RoutingStats | None = None


def plan_passes(
    num_experts: int,
    all_token_experts: set[int],
    bytes_routed: int,
    bytes_all: int,
    budget: int,
    dense_groups: bool,
) -> list[ExpertPass]:
    """Chunks of experts whose Hessians fit ``budget`` bytes together; the first pass also takes the
    non-expert groups."""
    passes: list[ExpertPass] = []
    routed: list[int] = []
    everyone: list[int] = []
    used = 0
    for e in range(num_experts):
        cost = bytes_all if e in all_token_experts else bytes_routed
        if (routed or everyone) and used + cost > budget:
            passes.append(ExpertPass(tuple(routed), tuple(everyone), dense_groups and not passes))
            routed, everyone, used = [], [], 0
        (everyone if e in all_token_experts else routed).append(e)
        used += cost
    if routed or everyone or not passes:
        passes.append(ExpertPass(tuple(routed), tuple(everyone), dense_groups and not passes))
    return passes


Gather = Callable[[torch.Tensor], torch.Tensor]


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
    moe: MoE, x: torch.Tensor, indices: torch.Tensor, spec: ExpertPass, hessians: Hessians, tie: bool
) -> None:
    """Add one micro-batch ``x`` [tokens, hidden] with routing ``indices`` to the pass's expert Hessians."""
    order, offsets = route_order(indices, len(moe.experts)) if spec.routed else (indices, [])
    for e in spec.routed:
        tokens = order[offsets[e] : offsets[e + 1]] // indices.shape[1]
        if tokens.numel() == 0:
            continue
        xe = x[tokens]
        _add_gate_up(hessians, f"mlp.experts.{e}", xe, tie)
        hessians.add(f"mlp.experts.{e}.down_proj", expert_down_input(moe.experts[e], xe))
    for e in spec.all_tokens:
        hessians.add(f"mlp.experts.{e}.down_proj", expert_down_input(moe.experts[e], x))


def _add_gate_up(hessians: Hessians, prefix: str, x: torch.Tensor, tie: bool) -> None:
    if tie:
        hessians.add(f"{prefix}.gate_up", x)
    else:
        hessians.add(f"{prefix}.gate_proj", x)
        hessians.add(f"{prefix}.up_proj", x)


def count_routes(moe: MoE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The router's expert indices for ``x`` and the per-expert token counts."""
    _, indices = moe.gate(x)
    return indices, torch.bincount(indices.flatten(), minlength=len(moe.experts))


def calibration_pass(
    block: Block,
    batches: Iterable[torch.Tensor],
    cos: torch.Tensor,
    sin: torch.Tensor,
    expert_pass: ExpertPass,
    dense_groups: Sequence[LinearGroup],
    hessians: Hessians,
    counts: torch.Tensor | None,
    tie: bool,
    moe_input: bool,
    gather: Gather = _identity,
    keep_dense: bool = True,
) -> None:
    """One pass over the micro-batches ``batches`` ([n, seq, hidden] on the block's device): the expert Hessians
    of ``expert_pass``, the non-expert ones when it says so, routed-token ``counts`` and the MoE input Hessian
    (``moe_input``) when asked. The block's weights and outputs are not touched.

    With several processes, ``batches`` are this rank's slices and ``gather`` reassembles micro-batches in rank
    order, so every rank accumulates exactly what one process would; ``keep_dense`` says whether this rank keeps
    the non-expert Hessians (their solve happens on one rank)."""
    moe = block.mlp if isinstance(block.mlp, MoE) else None
    hooked = dense_groups if expert_pass.dense_hooks else []
    for x in batches:
        with input_hooks(block, hooked, hessians, gather, keep_dense):
            local = mlp_input(block, x, cos, sin)
            if moe is None:
                if hooked:
                    block.mlp(local)
                continue
            if hooked and moe.shared_experts is not None:
                moe.shared_experts(local)
        m = gather(local)
        indices, batch_counts = count_routes(moe, m)
        if counts is not None:
            counts += batch_counts
        if moe_input:
            hessians.add(MOE_INPUT, m)
        accumulate_experts(moe, m, indices, expert_pass, hessians, tie)


def expert_hessian(
    hessians: Hessians, group: LinearGroup, all_tokens: bool, dim: int, device: torch.device
) -> torch.Tensor:
    """The Hessian a routed expert's group is solved with: in all-token mode gate/up read the MoE input."""
    key = MOE_INPUT if all_tokens and not group.key.endswith("down_proj") else group.key
    return hessians.mean(key, dim, device)
