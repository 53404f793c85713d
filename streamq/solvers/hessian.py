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
from dataclasses import dataclass
from typing import Literal

import torch

from streamq.solvers import fallbacks as fb
from streamq.solvers.scheme import SolverConfig

FactorForm = Literal["cholesky", "inverse"]


@dataclass(frozen=True)
class DampingPolicy:
    """How hard to try before giving a matrix up to RTN: damping grows by ``growth`` up to ``retries`` times."""

    retries: int = 3
    growth: float = 10.0


@dataclass
class PreparedHessians:
    """Everything the column sweep needs from a batch of E Hessians of size n."""

    feedback: torch.Tensor  # [E, n, n] strictly upper M, in solving order
    perm: torch.Tensor | None  # [E, n] int64, solving position -> input column; None when actorder is "none"
    dead: torch.Tensor  # [E, n] bool, input columns no token activated (natural order)
    use_rtn: torch.Tensor  # [E] bool, matrices solved as RTN (M = 0, perm = identity, nothing dead)
    form: FactorForm
    fallbacks: Counter[str]


def solving_order(diag: torch.Tensor, cfg: SolverConfig) -> torch.Tensor | None:
    """Columns by decreasing Hessian diagonal (stable, so equal entries keep their order), or None."""
    if cfg.actorder == "none":
        return None
    return torch.argsort(diag, dim=-1, descending=True, stable=True)


def feedback_from_cholesky(lower: torch.Tensor, form: FactorForm, out: torch.Tensor | None = None) -> torch.Tensor:
    """M (strictly upper, solving order) from the lower Cholesky factor of the *reversed* damped Hessian.

    ``out`` receives M when given (saves a copy of an n x n matrix per expert)."""
    if form == "cholesky":
        r = lower.flip((-2, -1))
        m = torch.div(r, r.diagonal(dim1=-2, dim2=-1).unsqueeze(-2), out=out)
    elif form == "inverse":
        eye = torch.eye(lower.shape[-1], dtype=lower.dtype, device=lower.device)
        u = torch.linalg.solve_triangular(lower, eye, upper=False).flip((-2, -1))
        m = torch.div(u, u.diagonal(dim1=-2, dim2=-1).unsqueeze(-1), out=out)
    else:
        raise ValueError(f"unknown factor form {form!r}")
    m.diagonal(dim1=-2, dim2=-1).zero_()
    return m


def _reversed_damped(h: torch.Tensor, order: torch.Tensor, diag: torch.Tensor, damp: torch.Tensor) -> torch.Tensor:
    """J P^T H P J with the diagonal replaced by ``diag + damp`` (``diag`` already has dead columns at 1)."""
    rev = order.flip(0)
    out = h[rev.unsqueeze(1), rev.unsqueeze(0)].to(diag.dtype)
    out.diagonal().copy_(diag[rev] + damp)
    return out


def prepare_hessians(
    h: torch.Tensor,
    cfg: SolverConfig,
    form: FactorForm = "cholesky",
    policy: DampingPolicy | None = None,
    dtype: torch.dtype = torch.float32,
) -> PreparedHessians:
    """Validate, damp, order and factor a batch of Hessians ``[E, n, n]`` (the input is not modified).

    Matrices that cannot be solved (NaN/Inf, all zero, not positive definite at the damping limit) get
    ``use_rtn``; dead columns (H_ii == 0) get H_ii = 1 and are reported in ``dead`` for the caller to zero
    in W, as the reference GPTQ does.
    """
    policy = policy or DampingPolicy()
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

    feedback = torch.empty(experts, n, n, dtype=dtype, device=h.device)
    skip = use_rtn.tolist()
    infos = []
    for k in range(experts):
        if skip[k]:
            feedback[k] = 0
            infos.append(torch.zeros((), dtype=torch.int32, device=h.device))
            continue
        order = identity if perm is None else perm[k]
        lower, info = torch.linalg.cholesky_ex(_reversed_damped(h[k], order, diag[k], damp[k]))
        feedback_from_cholesky(lower, form, out=feedback[k])
        infos.append(info)
    failed = [k for k, info in enumerate(torch.stack(infos).tolist()) if info != 0]

    for k in failed:
        order = identity if perm is None else perm[k]
        for attempt in range(1, policy.retries + 1):
            more = damp[k] * policy.growth**attempt
            lower, info = torch.linalg.cholesky_ex(_reversed_damped(h[k], order, diag[k], more))
            if int(info) == 0:
                feedback_from_cholesky(lower, form, out=feedback[k])
                counter[fb.EXTRA_DAMPING] += 1
                break
        else:
            counter[fb.NOT_POSITIVE_DEFINITE] += 1
            use_rtn[k] = True
            dead[k] = False
            feedback[k] = 0

    if perm is not None:
        perm = torch.where(use_rtn.unsqueeze(1), identity, perm)
    return PreparedHessians(feedback=feedback, perm=perm, dead=dead, use_rtn=use_rtn, form=form, fallbacks=counter)


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
