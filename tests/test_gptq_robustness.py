"""Hessians and weights a real calibration run produces: every bad case is handled and counted, never silent."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from streamq.solvers import (
    FactorOptions,
    SolveOptions,
    SolverConfig,
    gptq_quantize,
    gptq_reference,
    hessian_weighted_error,
    rtn_quantize,
)
from streamq.solvers import fallbacks as fb
from streamq.solvers.scheme import QuantResult, QuantScheme
from streamq.solvers.synthetic import heavy_tailed_inputs, random_problem

CFG = SolverConfig(scheme=QuantScheme(bits=4, group_size=32, symmetric=False), actorder="group")


def _assert_is_rtn(r: QuantResult, e: int, w: torch.Tensor) -> None:
    rtn = rtn_quantize(w, CFG)
    assert torch.equal(r.q[e], rtn.q) and torch.equal(r.scale[e], rtn.scale) and torch.equal(r.weight[e], rtn.weight)
    assert torch.equal(r.g_idx[e].long(), torch.arange(w.shape[-1]) // 32), "RTN keeps natural groups"


def _assert_finite(r: QuantResult) -> None:
    assert torch.isfinite(r.weight).all() and torch.isfinite(r.scale).all()


def test_dead_columns_are_zeroed_like_the_reference_and_not_fallbacks() -> None:
    seed = 1020
    g = torch.Generator().manual_seed(seed)
    n = 96
    x = heavy_tailed_inputs(4 * n, n, g)
    dead = torch.randperm(n, generator=g)[:7]
    x[:, dead] = 0  # channels no calibration token activated
    h = x.T @ x / x.shape[0]
    w, _ = random_problem(1, 16, n, seed=seed)
    cfg = SolverConfig(scheme=QuantScheme(bits=4, group_size=32), actorder="weight")
    r = gptq_quantize(w[0], h, cfg)
    assert r.fallbacks == {}
    assert torch.all(r.weight[:, dead] == 0)
    assert hessian_weighted_error(w[0], r.weight, h) < hessian_weighted_error(w[0], rtn_quantize(w[0], cfg).weight, h)
    exact = gptq_quantize(w[0], h, cfg, SolveOptions(dtype=torch.float64))
    assert torch.equal(exact.q, gptq_reference(w[0], h, cfg, dtype=torch.float64).q), f"seed {seed}"


@pytest.mark.parametrize("method", ["library", "blocked"])
def test_unusable_hessians_fall_back_to_rtn_per_matrix_and_are_counted(method: str) -> None:
    seed = 1021
    w, h = random_problem(5, 16, 64, seed=seed)
    h[0, 3, 5] = float("nan")
    h[1] = 0  # an expert no token was routed to
    h[2, 7, 7] = float("inf")
    h[3] = torch.eye(64) + 50 * (lambda s: s + s.T)(torch.randn(64, 64).triu(1))  # indefinite at any damping
    options = SolveOptions(factor=FactorOptions(method=method, block=16))
    r = gptq_quantize(w, h, CFG, options)
    assert r.fallbacks == {fb.NONFINITE_HESSIAN: 2, fb.ZERO_HESSIAN: 1, fb.NOT_POSITIVE_DEFINITE: 1}, f"seed {seed}"
    _assert_finite(r)
    for e in range(4):
        _assert_is_rtn(r, e, w[e])
    alone = gptq_quantize(w[4], h[4], CFG, options)  # the healthy expert is untouched by its neighbours
    for name in ("q", "scale", "zero_point", "g_idx", "weight"):
        assert torch.equal(getattr(r, name)[4], getattr(alone, name)), name


@pytest.mark.parametrize("method", ["library", "blocked"])
def test_slightly_indefinite_hessian_is_rescued_by_more_damping(method: str) -> None:
    """A Hessian accumulated in low precision can lose definiteness by a little: 10x damping fixes it."""
    seed = 1022
    w, h = random_problem(1, 16, 64, seed=seed, tokens=32)  # rank 32 < 64: singular
    mean_diag = h[0].diagonal().mean()
    h[0] -= 0.05 * mean_diag * torch.eye(64)  # smallest eigenvalue -0.05 mean(diag), beyond 0.01 damping
    r = gptq_quantize(w[0], h[0], CFG, SolveOptions(factor=FactorOptions(method=method, block=16)))
    assert r.fallbacks == {fb.EXTRA_DAMPING: 1}, f"seed {seed}"
    _assert_finite(r)
    assert not torch.equal(r.q, rtn_quantize(w[0], CFG).q)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_weights_are_solved_as_zero_and_counted(bad: float) -> None:
    w, h = random_problem(3, 16, 64, seed=1023)
    zeroed = w.clone()
    zeroed[1, 2, 5] = zeroed[1, 9, 60] = 0
    w[1, 2, 5] = w[1, 9, 60] = bad
    r = gptq_quantize(w, h, CFG)
    assert r.fallbacks == {fb.NONFINITE_WEIGHT: 1}
    _assert_finite(r)
    assert torch.equal(r.q, gptq_quantize(zeroed, h, CFG).q)
    rtn = rtn_quantize(w, CFG)
    assert rtn.fallbacks == {fb.NONFINITE_WEIGHT: 1}
    assert rtn.weight[1, 2, 5] == 0 and rtn.weight[1, 9, 60] == 0
