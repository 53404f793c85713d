"""GPTAQ's asymmetric calibration (Li et al., 2025) as a change of target: GPTQ on the corrected weight W*.

GPTQ fits Ŵ to a Linear's own output on its quantized input X̃: min ||W X̃ - Ŵ X̃||. The quantized model's
inputs already carry the error of every earlier block, so GPTAQ fits the *unquantized* model's output instead,
min ||W X - Ŵ X̃|| with X the float model's input for the same tokens (columns are tokens). With ΔX = X - X̃,

    ||W X - Ŵ X̃||² = ||(W - Ŵ) X̃ + W ΔX||²,

which is GPTQ's objective plus the cross term W ΔX that GPTAQ carries through its column updates. Its
unconstrained minimiser is W* = W + W ΔX X̃ᵀ H̃⁻¹ (H̃ = X̃ X̃ᵀ, the usual Hessian), and the residual W X - W* X̃
is orthogonal to the rows of X̃, so for every Ŵ

    ||W X - Ŵ X̃||² = ||W X - W* X̃||² + tr((W* - Ŵ) H̃ (W* - Ŵ)ᵀ):

the asymmetric problem is GPTQ's problem with W* in place of W, exactly, for every column order and every step
of the sweep (each step's compensation then aims at the float output, not at the compensated weights). So the
solver computes W* once per matrix and runs the unchanged GPTQ sweep on it.

The statistics are means over tokens: H̃ = mean(x̃ x̃ᵀ) and P = mean(x x̃ᵀ), so ΔX X̃ᵀ = P - H̃. H̃ is damped as GPTQ
damps it (``damp`` times its mean diagonal); without a float target (P = H̃) W* = W exactly.
No Triton kernel: W* is two matrix products and a Cholesky solve per matrix, all library calls.
"""

from __future__ import annotations

import torch


def asymmetric_target(w: torch.Tensor, h: torch.Tensor, cross: torch.Tensor, damp: float) -> torch.Tensor:
    """W* = W + W (P - H̃)(H̃ + λI)⁻¹ for ``w`` [E, out, in], Hessians ``h`` = H̃ and cross products ``cross`` = P,
    both [E, in, in] means over the same tokens; λ = ``damp`` × mean diag H̃. A matrix whose H̃ or P is not
    finite, or H̃ zero or not positive definite after damping, keeps W: the solver's own fallbacks then apply to
    it as without a target. One matrix at a time, so the extra memory is a few n × n float32 buffers."""
    out = w.float().clone()
    for k in range(w.shape[0]):
        correction = _correction(out[k], h[k].float(), cross[k].float(), damp)
        if correction is not None:
            out[k] += correction
    return out.to(w.dtype)


def _correction(w: torch.Tensor, h: torch.Tensor, cross: torch.Tensor, damp: float) -> torch.Tensor | None:
    diag = h.diagonal()
    if not (torch.isfinite(h).all() and torch.isfinite(cross).all() and diag.sum() > 0):
        return None
    damped = h + damp * diag.mean() * torch.eye(h.shape[-1], dtype=h.dtype, device=h.device)
    lower, info = torch.linalg.cholesky_ex(damped)
    if int(info) != 0:
        return None
    shift = w @ (cross - h)  # W ΔX X̃ᵀ
    # (H̃ + λI) is symmetric: W ΔX X̃ᵀ (H̃ + λI)⁻¹ = ((H̃ + λI)⁻¹ (W ΔX X̃ᵀ)ᵀ)ᵀ.
    return torch.cholesky_solve(shift.t(), lower).t()
