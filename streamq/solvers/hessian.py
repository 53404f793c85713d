"""From a batch of Hessians to GPTQ's feedback matrices, with every unusable Hessian caught and counted.

GPTQ needs, in the solving (activation) order, the upper Cholesky factor U of H^-1 (H^-1 = U^T U). With J
the order-reversal permutation and L the lower Cholesky factor of J H J, R = J L J is upper triangular with
H = R R^T, and U = R^-1 (Cholesky factors are unique). So one Cholesky of the reversed matrix gives R, and
one triangular inverse gives U: half the work of cholesky -> cholesky_inverse -> cholesky.

Written as v_j = w_j + sum_{i<j} d_i M[i, j] (see ``streamq.kernels.gptq_block``), GPTQ's recurrence works
with either factor:

- ``"inverse"``: the classic form, d_i = deq_i - v_i and M = U with row i divided by U_ii;
- ``"cholesky"``: d_i = w_i - deq_i (against the *original* weight) and M = R with column j divided by
  R_jj. From e = (w - deq) U^-1 (which is what the classic recurrence computes) and U^-1 = R this is the
  same algorithm (Babai's nearest plane on the lattice of R): no triangular inverse at all.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from typing import Literal

import torch

from streamq.solvers import fallbacks as fb
from streamq.solvers.cholesky import SchurPrecision, upper_cholesky_blocked_
from streamq.solvers.scheme import SolverConfig

FactorForm = Literal["cholesky", "inverse"]
CholeskyMethod = Literal["auto", "library", "blocked"]


@dataclass(frozen=True)
class DampingPolicy:
    """How hard to try before giving a matrix up to RTN: damping grows by ``growth`` up to ``retries`` times."""

    retries: int = 3
    growth: float = 10.0


@dataclass(frozen=True)
class FactorOptions:
    """How the Hessians are factored. ``method``: "library" is cuSOLVER/LAPACK one matrix at a time;
    "blocked" is ``cholesky.upper_cholesky_blocked_`` batched over experts on tensor cores; "auto" picks
    blocked on CUDA and the library on CPU. A matrix the blocked factorisation fails on is retried with the
    library at the same damping before any extra damping."""

    form: FactorForm = "cholesky"
    method: CholeskyMethod = "auto"
    precision: SchurPrecision = "tf32"
    block: int = 512
    damping: DampingPolicy = field(default_factory=DampingPolicy)


@dataclass
class PreparedHessians:
    """Everything the column sweep needs from a batch of E Hessians of size n."""

    feedback: torch.Tensor  # [E, n, n] strictly upper M, in solving order
    perm: torch.Tensor | None  # [E, n] int64, solving position -> input column; None when actorder is "none"
    dead: torch.Tensor  # [E, n] bool, input columns no token activated (natural order)
    use_rtn: torch.Tensor  # [E] bool, matrices solved as RTN (M = 0, perm = identity, nothing dead)
    form: FactorForm
    fallbacks: Counter[str]
    diag: torch.Tensor | None = None  # [E, n] H's diagonal, natural order (dead columns and RTN matrices at 1)


def solving_order(diag: torch.Tensor, cfg: SolverConfig) -> torch.Tensor | None:
    """Columns by decreasing Hessian diagonal (stable, so equal entries keep their order), or None."""
    if cfg.actorder == "none":
        return None
    return torch.argsort(diag, dim=-1, descending=True, stable=True)


def feedback_from_upper_(r: torch.Tensor, form: FactorForm) -> None:
    """Turn R ``[..., n, n]`` (upper, H = R R^T, solving order; the strict lower triangle is ignored) into the
    feedback matrix M in place."""
    if form == "cholesky":
        diag = r.diagonal(dim1=-2, dim2=-1).clone()
        r.triu_(1).div_(diag.unsqueeze(-2))
    elif form == "inverse":
        eye = torch.eye(r.shape[-1], dtype=r.dtype, device=r.device)
        u = torch.linalg.solve_triangular(r.triu(), eye, upper=True)
        diag = u.diagonal(dim1=-2, dim2=-1).clone()
        torch.div(u.triu_(1), diag.unsqueeze(-1), out=r)
    else:
        raise ValueError(f"unknown factor form {form!r}")


def library_upper_cholesky(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(R upper with A = R R^T, info) for one matrix through cuSOLVER/LAPACK: Cholesky of the reversed
    matrix, reversed back (J L J is upper when L is lower)."""
    lower, info = torch.linalg.cholesky_ex(a.flip((-2, -1)))
    return lower.flip((-2, -1)), info


def _permuted_damped(h: torch.Tensor, order: torch.Tensor, diag: torch.Tensor, damp: torch.Tensor) -> torch.Tensor:
    """P^T H P with the diagonal replaced by ``diag + damp`` (``diag`` already has dead columns at 1)."""
    out = h[order.unsqueeze(1), order.unsqueeze(0)].to(diag.dtype)
    out.diagonal().copy_(diag[order] + damp)
    return out


def _retry_with_library(
    damped: Callable[[float], torch.Tensor], first_attempt: int, policy: DampingPolicy
) -> tuple[torch.Tensor, int] | None:
    """(R, attempt) for the first damping ``growth**attempt`` times the configured one that factors."""
    for attempt in range(first_attempt, policy.retries + 1):
        r, info = library_upper_cholesky(damped(policy.growth**attempt))
        if int(info) == 0:
            return r, attempt
    return None


def prepare_hessians(
    h: torch.Tensor, cfg: SolverConfig, factor: FactorOptions | None = None, dtype: torch.dtype = torch.float32
) -> PreparedHessians:
    """Validate, damp, order and factor a batch of Hessians ``[E, n, n]`` (the input is not modified).

    Matrices that cannot be solved (NaN/Inf, all zero, not positive definite at the damping limit) get
    ``use_rtn``; dead columns (H_ii == 0) get H_ii = 1 and are reported in ``dead`` for the caller to zero
    in W, as the reference GPTQ does.
    """
    factor = factor or FactorOptions()
    experts, n, _ = h.shape
    counter: Counter[str] = Counter()
    diag = h.diagonal(dim1=-2, dim2=-1).to(dtype)
    finite = torch.isfinite(h).flatten(1).all(1)
    zero = finite & (diag == 0).all(1)
    fb.count(counter, fb.NONFINITE_HESSIAN, ~finite)
    fb.count(counter, fb.ZERO_HESSIAN, zero)
    use_rtn = ~finite | zero
    dead = (diag == 0) & ~use_rtn.unsqueeze(1)
    diag = torch.where(dead | use_rtn.unsqueeze(1), torch.ones((), dtype=dtype, device=h.device), diag)
    perm = solving_order(diag, cfg)
    identity = torch.arange(n, device=h.device)
    damp = cfg.damp * diag.mean(1)

    def damped(k: int, scale: float = 1.0) -> torch.Tensor:
        return _permuted_damped(h[k], identity if perm is None else perm[k], diag[k], damp[k] * scale)

    # One buffer: the damped Hessians, then their factors R, then the feedback matrices.
    work = torch.empty(experts, n, n, dtype=dtype, device=h.device)
    rtn_list = use_rtn.tolist()
    for k in range(experts):
        work[k] = torch.eye(n, dtype=dtype, device=h.device) if rtn_list[k] else damped(k)
    method = factor.method if factor.method != "auto" else ("blocked" if h.is_cuda else "library")
    ok = _factor_in_place(work, method, factor)

    # A blocked failure may be the TF32 rounding: the library gets the same damping first.
    first_attempt = 0 if method == "blocked" else 1
    for k in torch.nonzero(~ok).flatten().tolist():
        retried = _retry_with_library(lambda scale, k=k: damped(k, scale), first_attempt, factor.damping)
        if retried is None:
            counter[fb.NOT_POSITIVE_DEFINITE] += 1
            use_rtn[k] = True
            dead[k] = False
            work[k] = torch.eye(n, dtype=dtype, device=h.device)
            continue
        work[k], attempt = retried
        if attempt > 0:
            counter[fb.EXTRA_DAMPING] += 1

    feedback_from_upper_(work, factor.form)
    if perm is not None:
        perm = torch.where(use_rtn.unsqueeze(1), identity, perm)
    return PreparedHessians(work, perm, dead, use_rtn, factor.form, counter, diag)


def _factor_in_place(work: torch.Tensor, method: str, factor: FactorOptions) -> torch.Tensor:
    """Replace each damped Hessian in ``work`` by its upper Cholesky factor; which ones succeeded."""
    if method == "blocked":
        return upper_cholesky_blocked_(work, factor.block, factor.precision)
    if method != "library":
        raise ValueError(f"unknown Cholesky method {factor.method!r}")
    ok = torch.ones(work.shape[0], dtype=torch.bool, device=work.device)
    for k in range(work.shape[0]):
        r, info = library_upper_cholesky(work[k])
        work[k] = r
        ok[k] = info == 0
    return ok


GRAM_CHUNK = 4096  # tokens per tensor-core product in ``accumulate_gram_``


def accumulate_gram_(total: torch.Tensor, x: torch.Tensor) -> None:
    """``total += xᵀx`` for ``x [tokens, n]`` into a float32 ``total [n, n]``.

    On CUDA, bf16/fp16 inputs are multiplied on the tensor cores with float32 accumulation (12-14x faster than
    float32 products, which run on the CUDA cores): the products of bf16 numbers are exact, only the summation
    differs. Other inputs, and every CPU input, are upcast to float32 first, so CPU Hessians are bit for bit what
    they were."""
    accumulate_product_(total, x, x)


def accumulate_product_(total: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``total += aᵀb`` for ``a, b [tokens, n]`` of one dtype, as ``accumulate_gram_`` (which is a = b)."""
    if a.is_cuda and a.dtype in (torch.bfloat16, torch.float16) and _half_gram_supported(a.device, a.dtype):
        # cuBLAS's sum over a long token dimension loses precision: against float64, on an H200 at 32768 tokens
        # of width 7168, 1.2e-4 in one product, 2.5e-5 in chunks of 8192, 9.5e-6 in chunks of 4096 (15% slower
        # than one product), 6.2e-6 for float32 on the CUDA cores (14x slower). Chunks summed in float32 bound it.
        for ca, cb in zip(a.split(GRAM_CHUNK), b.split(GRAM_CHUNK), strict=True):
            torch.addmm(total, ca.t(), cb, out_dtype=torch.float32, out=total)
        return
    af = a.float()
    total.addmm_(af.t(), af if b is a else b.float())


@cache
def _half_gram_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this torch has the float32-output matrix product for ``dtype`` inputs on ``device`` (torch ≥ 2.8)."""
    probe = torch.ones(2, 2, dtype=dtype, device=device)
    total = torch.zeros(2, 2, dtype=torch.float32, device=device)
    try:
        torch.addmm(total, probe.t(), probe, out_dtype=torch.float32, out=total)
    except (RuntimeError, TypeError):
        return False
    return bool((total == 2).all())


def hessian_weighted_error(w: torch.Tensor, wq: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """tr(D H D^T) / tr(W H W^T) with D = W - Wq, per matrix (``[out, in]`` -> 0-d, ``[E, out, in]`` -> [E]).

    The output error of the layer on the calibration inputs, relative to its output energy; computed in
    float64 so that it can compare solvers whose errors differ in the third digit.
    """
    w64, h64 = w.double(), h.double()
    d = w64 - wq.double()
    num = ((d @ h64) * d).sum((-2, -1))
    den = ((w64 @ h64) * w64).sum((-2, -1))
    return num / den
