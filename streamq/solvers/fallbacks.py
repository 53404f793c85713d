"""Why a matrix was not solved normally: the keys of ``QuantResult.fallbacks``, each counting matrices.

Nothing here is silent: every case below is counted in the result the solver returns.
"""

from __future__ import annotations

from collections import Counter

import torch

NONFINITE_WEIGHT = "nonfinite_weight"  # W had NaN/Inf entries: solved as if they were 0
NONFINITE_HESSIAN = "nonfinite_hessian"  # H had NaN/Inf entries; the matrix was quantized with RTN
ZERO_HESSIAN = "zero_hessian"  # H was all zero (the expert saw no token); RTN
EXTRA_DAMPING = "extra_damping"  # Cholesky failed at the configured damping and succeeded with more
NOT_POSITIVE_DEFINITE = "not_positive_definite"  # Cholesky failed up to the damping limit; RTN


def count(counter: Counter[str], reason: str, mask: torch.Tensor) -> None:
    """Add the number of matrices flagged in ``mask`` (a bool tensor, one entry per matrix) under ``reason``."""
    flagged = int(mask.sum().item())
    if flagged:
        counter[reason] += flagged


def zero_nonfinite(w: torch.Tensor, counter: Counter[str]) -> torch.Tensor:
    """Replace NaN/Inf weights by 0, counting the matrices ([..., out, in]) that had any.

    Returns ``w`` itself when it is clean: a NaN/Inf anywhere makes a matrix's sum non-finite, so one
    reduction clears the common case; the elementwise check runs only on a non-finite sum (which finite
    weights can also reach by overflow: they are then counted by the exact check, not the sum).
    """
    if torch.isfinite(w.sum(dim=(-2, -1))).all():
        return w
    finite = torch.isfinite(w)
    count(counter, NONFINITE_WEIGHT, ~finite.flatten(-2).all(-1))
    return torch.where(finite, w, torch.zeros((), dtype=w.dtype, device=w.device))
