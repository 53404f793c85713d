"""Solve batching: the sampled Hessian-weighted errors the report averages."""

from __future__ import annotations

import math

import torch
from torch import nn

from streamq.groups import LinearGroup, Role
from streamq.solve import ERROR_EVERY, Solved, Solver
from streamq.solvers.gptq import SolveOptions
from streamq.solvers.scheme import SolverConfig


def test_an_expert_no_token_reached_is_left_out_of_the_sampled_errors() -> None:
    gen = torch.Generator().manual_seed(7)
    experts = (0, ERROR_EVERY)  # both sampled for the report
    modules: dict[str, nn.Module] = {}
    groups = []
    for e in experts:
        name = f"mlp.experts.{e}.down_proj"
        modules[name] = nn.Linear(128, 16, bias=False)
        modules[name].weight.data = torch.randn(16, 128, generator=gen)
        groups.append(LinearGroup(name, (name,), Role.DOWN, expert=e))
    x = torch.randn(512, 128, generator=gen)
    hessians = {groups[0].key: torch.zeros(128, 128), groups[1].key: x.t() @ x / 512}
    solved = Solved()
    fallbacks: list[tuple[str, str]] = []
    solver = Solver(modules, SolverConfig(), SolveOptions(), 2, lambda name, why: fallbacks.append((name, why)))
    solver.solve(groups, lambda g: hessians[g.key], solved)
    assert set(solved.errors) == {groups[1].key}  # the zero Hessian's 0 / 0 is not an error of 'nan'
    assert math.isfinite(solved.errors[groups[1].key]) and 0 < solved.errors[groups[1].key] < 1
    assert fallbacks  # the empty expert is still reported, as a fallback
