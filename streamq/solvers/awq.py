"""AWQ (Lin et al., activation-aware weight quantization) from running statistics.

For Linears that read one input x, AWQ scales each input channel: W' = W · diag(s), x' = x / s, and rounds W'
to nearest (RTN). Channels that carry large activations get finer steps. The scale follows a power law in the
activations' and the weights' per-channel magnitudes ("duo" scaling):

    s = a^α / w^(1-α),   normalised so that sqrt(max(s) · min(s)) = 1,

with α picked on a grid by the output error; s = 1 (plain RTN) is a candidate too, so the search never does worse
than RTN on its own objective (with duo scaling no α gives s = 1). That error is computed from the input's second
moment H = E[x xᵀ] (the GPTQ Hessian, which calibration accumulates anyway) instead of stored activations:
E‖(W − Ŵ) x‖² = tr(D H Dᵀ) with D = RTN(W · diag(s)) · diag(1/s) − W. The activation magnitude a is the RMS of each
channel, sqrt(diag(H)), a running statistic too.

The division by s is folded into whatever produces x (an RMSNorm's weight, or the rows of the Linear before), which
is what lets the written checkpoint load as is. Several Linears (every routed expert's gate/up, say) can share an
input and so one s: their errors are summed, possibly a chunk of them at a time (``search_losses``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from streamq.solvers.rtn import rtn_quantize
from streamq.solvers.scheme import QuantResult, SolverConfig

GRID = 20  # alphas 0, 1/20, ..., 19/20, as in the AWQ paper's search


def alphas(grid: int = GRID) -> list[float | None]:
    """The candidates: None is s = 1 (no scaling), then the grid of α."""
    return [None, *(i / grid for i in range(grid))]


def activation_rms(h: torch.Tensor) -> torch.Tensor:
    """Per-channel RMS of the inputs, from their second moment H = E[x xᵀ]."""
    return torch.diagonal(h, dim1=-2, dim2=-1).clamp(min=0).sqrt()


def weight_magnitude(weights: Sequence[torch.Tensor], group_size: int) -> torch.Tensor:
    """Per-input-channel mean of |w| relative to its quantization group's largest magnitude, over all rows of all
    the Linears that read the input (AWQ's weight statistic: how much of its group's range a channel uses)."""
    total, rows = None, 0
    for w in weights:
        w = w.float().reshape(-1, w.shape[-1])
        grouped = w.abs().unflatten(-1, (-1, group_size)) if group_size else w.abs().unsqueeze(-2)
        relative = (grouped / grouped.amax(dim=-1, keepdim=True).clamp(min=1e-12)).flatten(-2)
        total = relative.sum(0) if total is None else total + relative.sum(0)
        rows += w.shape[0]
    assert total is not None
    return total / rows


def scales(act: torch.Tensor, weight: torch.Tensor, alpha: float | None) -> torch.Tensor:
    if alpha is None:
        return torch.ones_like(act)
    s = act.clamp(min=1e-4).pow(alpha) / weight.clamp(min=1e-4).pow(1 - alpha)
    return s / (s.max() * s.min()).sqrt()


def scaled_error(w: torch.Tensor, h: torch.Tensor, s: torch.Tensor, cfg: SolverConfig) -> torch.Tensor:
    """tr(D H Dᵀ) per matrix of ``w`` [..., out, in] with Hessians ``h`` [..., in, in], for scales ``s`` [in]."""
    d = rtn_quantize(w.float() * s, cfg).weight / s - w.float()
    return ((d @ h.float()) * d).sum((-2, -1))


def search_losses(
    weights: torch.Tensor, hessians: torch.Tensor, act: torch.Tensor, weight_mag: torch.Tensor, cfg: SolverConfig
) -> torch.Tensor:
    """Summed error of ``weights`` [E, out, in] (Hessians [E, in, in]) for every candidate of ``alphas()``. Sums
    over chunks of the Linears sharing the input (and over ranks) give the whole input's losses."""
    return torch.stack(
        [scaled_error(weights, hessians, scales(act, weight_mag, a), cfg).sum().double() for a in alphas()]
    )


def quantize_scaled(w: torch.Tensor, s: torch.Tensor, cfg: SolverConfig) -> QuantResult:
    """RTN of W · diag(s): the codes to export; ``weight`` is the dequantized *scaled* weight, which reads the
    scaled input x / s once the division is folded upstream."""
    return rtn_quantize(w.float() * s, cfg)
