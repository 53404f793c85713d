"""The Linears of a block that the recipe quantizes, grouped by shared input, each with its role.

Linears that read the same input share one Hessian and are solved together, rows stacked: gate and up of an MLP,
q_a and kv_a of the attention. A group's role (what it reads and where that input comes from) is decided here,
once, from the module names; the calibration, the solver loop and AWQ's fold sites read the role.

A Linear's family (routed experts, shared experts, dense MLPs, attention) is what a recipe gives a scheme to: the
unit every loader treats alike (vLLM fuses q_a/kv_a and gate/up, and probes one expert for the whole fused MoE).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

from streamq.config import ModelConfig

if TYPE_CHECKING:
    from streamq.recipe import Recipe

MOE_INPUT = "mlp.input"  # the Hessian of the MoE input: every routed expert's gate/up in "all" mode


class Role(Enum):
    """What a Linear group reads."""

    ATTENTION_INPUT = "attention_input"  # q_a (or q) and kv_a: the input norm's output
    Q_B = "q_b"
    KV_B = "kv_b"
    O_PROJ = "o"
    MLP_INPUT = "mlp_input"  # gate/up (or gate, or up) of an MLP or expert: the post-attention norm's output
    DOWN = "down"  # an MLP's down projection: silu(gate) * up


class Family(Enum):
    """The families of decoder Linears a recipe gives one scheme each (``--scheme FAMILY=SPEC``)."""

    EXPERTS = "experts"  # routed experts
    SHARED = "shared"  # shared experts of a MoE block
    DENSE = "dense"  # the MLP of a dense block
    ATTENTION = "attention"  # every MLA projection


FAMILIES: tuple[Family, ...] = tuple(Family)
_FAMILY_OF = (
    (re.compile(r"(^|\.)mlp\.experts\.\d+\.(gate|up|down)_proj$"), Family.EXPERTS),
    (re.compile(r"(^|\.)mlp\.shared_experts\.(gate|up|down)_proj$"), Family.SHARED),
    (re.compile(r"(^|\.)mlp\.(gate|up|down)_proj$"), Family.DENSE),
    (re.compile(r"(^|\.)self_attn\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)$"), Family.ATTENTION),
)


def module_family(module: str) -> Family | None:
    """The family of a decoder Linear, by its module name (with or without the layer prefix); None otherwise."""
    return next((family for pattern, family in _FAMILY_OF if pattern.search(module)), None)


@dataclass(frozen=True)
class LinearGroup:
    """Linears of one block that share an input, hence a Hessian; ``expert`` is set for routed experts."""

    key: str
    members: tuple[str, ...]
    role: Role
    expert: int | None = None

    @property
    def mlp(self) -> str | None:
        """The MLP (``mlp``, ``mlp.shared_experts``, ``mlp.experts.N``) this group belongs to, if any."""
        if self.role not in (Role.MLP_INPUT, Role.DOWN):
            return None
        return self.members[0].rsplit(".", 1)[0]

    @property
    def family(self) -> Family:
        family = module_family(self.members[0])
        assert family is not None, self.members
        return family


def linear_groups(cfg: ModelConfig, layer: int, recipe: Recipe) -> list[LinearGroup]:
    """The block's Linears that the recipe quantizes (the families its plan gives a quantized scheme), grouped by
    shared input."""
    quantized = set(recipe.plan(cfg.fp8_block is not None).quantized())
    groups: list[LinearGroup] = []
    tie = recipe.tie_gate_up
    if Family.ATTENTION in quantized:
        first = ("self_attn.q_a_proj" if cfg.q_lora_rank else "self_attn.q_proj", "self_attn.kv_a_proj_with_mqa")
        groups += _shared_input(first[0], first, tie, Role.ATTENTION_INPUT)
        if cfg.q_lora_rank:
            groups.append(LinearGroup("self_attn.q_b_proj", ("self_attn.q_b_proj",), Role.Q_B))
        groups += [
            LinearGroup("self_attn.kv_b_proj", ("self_attn.kv_b_proj",), Role.KV_B),
            LinearGroup("self_attn.o_proj", ("self_attn.o_proj",), Role.O_PROJ),
        ]
    moe = cfg.is_moe_layer(layer)
    if moe and cfg.n_shared_experts and Family.SHARED in quantized:
        groups += _mlp_groups("mlp.shared_experts", tie)
    if not moe and Family.DENSE in quantized:
        groups += _mlp_groups("mlp", tie)
    if moe and Family.EXPERTS in quantized:
        for e in range(cfg.n_routed_experts):
            groups += _mlp_groups(f"mlp.experts.{e}", tie, expert=e)
    return groups


def _shared_input(
    key: str, members: tuple[str, ...], tie: bool, role: Role, expert: int | None = None
) -> list[LinearGroup]:
    if tie:
        return [LinearGroup(key, members, role, expert)]
    return [LinearGroup(m, (m,), role, expert) for m in members]


def _mlp_groups(prefix: str, tie: bool, expert: int | None = None) -> list[LinearGroup]:
    gate_up = (f"{prefix}.gate_proj", f"{prefix}.up_proj")
    return [
        *_shared_input(f"{prefix}.gate_up", gate_up, tie, Role.MLP_INPUT, expert),
        LinearGroup(f"{prefix}.down_proj", (f"{prefix}.down_proj",), Role.DOWN, expert),
    ]
