"""The batched blocked Cholesky behind GPTQ's Hessian stage, against cuSOLVER/LAPACK."""

from __future__ import annotations

import pytest
import torch

from streamq.solvers import FactorOptions, SolveOptions, SolverConfig, gptq_quantize
from streamq.solvers.cholesky import split_tf32, upper_cholesky_blocked_
from streamq.solvers.hessian import library_upper_cholesky
from streamq.solvers.synthetic import heavy_tailed_hessians, random_problem

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # on a GPU, "3xtf32" runs on real TF32 tensor cores


def _damped_hessians(seed: int, experts: int, n: int) -> torch.Tensor:
    h = heavy_tailed_hessians(experts, n, 4 * n, torch.Generator(device=DEVICE).manual_seed(seed), DEVICE)
    return h + 0.01 * h.diagonal(dim1=-2, dim2=-1).mean(-1)[:, None, None] * torch.eye(n, device=DEVICE)


def test_split_tf32_is_exact_and_hi_fits_tf32() -> None:
    x = torch.randn(4096, device=DEVICE) * torch.exp(4 * torch.randn(4096, device=DEVICE))
    hi, lo = split_tf32(x)
    assert torch.equal(hi + lo, x)
    assert torch.all(hi.view(torch.int32) & 0x1FFF == 0), "hi has more than TF32's 10 fraction bits"
    assert torch.all(lo.abs() < x.abs() * 2.0**-10)
    strided_hi, strided_lo = split_tf32(x.view(64, 64).mT)
    assert torch.equal(strided_hi + strided_lo, x.view(64, 64).mT)


@pytest.mark.parametrize("precision", ["fp32", "3xtf32"])
@pytest.mark.parametrize(("n", "block"), [(96, 32), (100, 48)], ids=["even", "ragged"])
def test_blocked_upper_factor_matches_the_library(precision: str, n: int, block: int) -> None:
    seed = 1012
    h = _damped_hessians(seed, 3, n)
    a = h.clone()
    ok = upper_cholesky_blocked_(a, block, precision)
    assert ok.all()
    r = a.triu()
    assert torch.equal(r, r.triu()) and torch.all(r.diagonal(dim1=-2, dim2=-1) > 0)
    expected = torch.stack([library_upper_cholesky(m.double())[0] for m in h])
    torch.testing.assert_close(r.double(), expected, rtol=0, atol=2e-5 * expected.abs().max().item())
    residual = (r.double() @ r.double().mT - h.double()).norm() / h.double().norm()
    assert residual < 1e-6, f"seed {seed}"


def test_blocked_failure_is_per_matrix() -> None:
    h = _damped_hessians(1013, 3, 64)
    h[1] -= 2 * h[1].diagonal().max() * torch.eye(64, device=DEVICE)  # negative definite
    assert upper_cholesky_blocked_(h, 16, "fp32").tolist() == [True, False, True]


def test_solver_gives_the_same_codes_with_either_factorisation() -> None:
    w, h = random_problem(2, 16, 128, seed=1014)
    cfg = SolverConfig()
    exact = {"dtype": torch.float64}
    library = gptq_quantize(w, h, cfg, SolveOptions(factor=FactorOptions(method="library"), **exact))
    blocked = gptq_quantize(w, h, cfg, SolveOptions(factor=FactorOptions(method="blocked", block=32), **exact))
    assert torch.equal(library.q, blocked.q)
