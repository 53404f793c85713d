"""Hessian collection for one block: routed, all-token and chunked passes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from streamq.calibrate import Accumulators, Hessians, calibration_pass, expert_down_input, mlp_input
from streamq.groups import MOE_INPUT, linear_groups
from streamq.io.safetensors_stream import CheckpointReader
from streamq.passes import PassPlan, plan_passes, with_first
from streamq.recipe import Recipe


def test_routed_pass_sees_exactly_the_routed_tokens(moe_block) -> None:
    cfg, _, block, cos, sin = moe_block
    torch.manual_seed(0)
    xs = [torch.randn(2, 16, cfg.hidden_size, dtype=torch.float64) for _ in range(3)]
    hessians, counts = Hessians(), torch.zeros(cfg.n_routed_experts, dtype=torch.int64)
    experts = tuple(range(cfg.n_routed_experts))
    calibration_pass(block, xs, cos, sin, PassPlan(experts, (), count_routes=True), Accumulators(hessians, counts))

    m = torch.cat([mlp_input(block, x, cos, sin) for x in xs])
    _, indices = block.mlp.gate(m)
    for e in experts:
        mine = (indices == e).any(-1)
        assert counts[e] == mine.sum() == hessians.count(f"mlp.experts.{e}.gate_up")
        if mine.any():
            xe = m[mine].float()
            torch.testing.assert_close(hessians.sums[f"mlp.experts.{e}.gate_up"], xe.t() @ xe, rtol=1e-4, atol=1e-4)
            down = expert_down_input(block.mlp.experts[e], m[mine]).float()
            torch.testing.assert_close(
                hessians.sums[f"mlp.experts.{e}.down_proj"], down.t() @ down, rtol=1e-4, atol=1e-4
            )


def test_all_token_pass_feeds_every_expert_and_leaves_the_block_output_alone(moe_block) -> None:
    cfg, _, block, cos, sin = moe_block
    torch.manual_seed(1)
    xs = [torch.randn(2, 16, cfg.hidden_size, dtype=torch.float64) for _ in range(2)]
    before = [block(x, cos, sin) for x in xs]
    hessians = Hessians()
    experts = tuple(range(cfg.n_routed_experts))
    calibration_pass(block, xs, cos, sin, PassPlan((), experts, moe_input=True), Accumulators(hessians))
    tokens = sum(x.shape[0] * x.shape[1] for x in xs)
    assert hessians.count(MOE_INPUT) == tokens
    assert all(hessians.count(f"mlp.experts.{e}.down_proj") == tokens for e in experts)
    assert not any(k.endswith("gate_up") for k in hessians.sums)  # they share the MoE input's Hessian
    for x, y in zip(xs, before, strict=True):
        assert torch.equal(block(x, cos, sin), y)  # routing and outputs are the real top-k ones


def test_non_expert_groups_are_hooked_only_in_the_pass_that_says_so(moe_block) -> None:
    cfg, layer, block, cos, sin = moe_block
    groups = [g for g in linear_groups(cfg, layer, Recipe(scope="all")) if g.expert is None]
    assert {g.key for g in groups} >= {"self_attn.q_a_proj", "self_attn.o_proj", "mlp.shared_experts.gate_up"}
    x = [torch.randn(1, 16, cfg.hidden_size, dtype=torch.float64)]
    off, on = Hessians(), Hessians()
    calibration_pass(block, x, cos, sin, PassPlan((), ()), Accumulators(off, dense_groups=groups))
    calibration_pass(block, x, cos, sin, PassPlan((), (), dense_hooks=True), Accumulators(on, dense_groups=groups))
    assert not off.sums and {g.key for g in groups} == set(on.sums)
    assert all(on.count(g.key) == 16 for g in groups)


@pytest.mark.parametrize("budget", [0, 3, 10**12])
def test_passes_cover_every_expert_once_within_the_budget(budget: int) -> None:
    all_tokens = {1, 4, 5}
    passes = plan_passes(8, all_tokens, bytes_routed=2, bytes_all=1, budget=budget)
    passes = with_first(passes, dense_hooks=True, count_routes=True, moe_input=False)
    seen = [e for p in passes for e in (*p.routed, *p.all_tokens)]
    assert sorted(seen) == list(range(8))
    assert all(set(p.all_tokens) <= all_tokens and not set(p.routed) & all_tokens for p in passes)
    assert [p.dense_hooks for p in passes] == [True] + [False] * (len(passes) - 1)
    for p in passes:
        assert len(p.routed) * 2 + len(p.all_tokens) <= max(budget, 2)
    if budget >= 10**12:
        assert len(passes) == 1


def test_untied_gate_up_groups_name_both_projections(tiny_checkpoint: Path) -> None:
    cfg = CheckpointReader(tiny_checkpoint).config
    layer = cfg.first_k_dense_replace
    tied = linear_groups(cfg, layer, Recipe(tie_gate_up=True))
    untied = linear_groups(cfg, layer, Recipe(tie_gate_up=False))
    assert len(untied) == len(tied) + cfg.n_routed_experts
    assert sorted(m for g in tied for m in g.members) == sorted(m for g in untied for m in g.members)
