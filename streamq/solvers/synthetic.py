"""Random GPTQ problems that look like a MoE layer's: for tests and benchmarks.

Real activations have a few channels orders of magnitude louder than the rest and a strong low-rank
common component; a Hessian built from i.i.d. Gaussian inputs is nearly a multiple of the identity, on
which GPTQ and RTN are almost the same and every solver looks good.
"""

from __future__ import annotations

import torch


def heavy_tailed_inputs(
    tokens: int, n: int, generator: torch.Generator, device: torch.device | str = "cpu", rank: int = 16
) -> torch.Tensor:
    """Inputs [tokens, n]: log-normal channel scales (sigma 1) with 1% outlier channels x20, plus a
    rank-``rank`` component shared by all channels."""
    scales = torch.exp(torch.randn(n, generator=generator, device=device))
    outliers = torch.rand(n, generator=generator, device=device) < 0.01
    scales = torch.where(outliers, 20 * scales, scales)
    common = torch.randn(tokens, rank, generator=generator, device=device)
    mixing = torch.randn(rank, n, generator=generator, device=device) / rank**0.5
    noise = torch.randn(tokens, n, generator=generator, device=device)
    return (noise + common @ mixing) * scales


def heavy_tailed_hessians(
    experts: int, n: int, tokens: int, generator: torch.Generator, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Hessians H = X^T X / tokens [experts, n, n] of independent heavy-tailed inputs (symmetric exactly)."""
    out = torch.empty(experts, n, n, device=device)
    for e in range(experts):
        x = heavy_tailed_inputs(tokens, n, generator, device)
        h = x.T @ x / tokens
        out[e] = (h + h.T) / 2
    return out


def random_weights(
    experts: int, out: int, n: int, generator: torch.Generator, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Weights [experts, out, n] ~ N(0, 0.02^2) with row scales varying x4, like trained projections."""
    rows = torch.exp(0.7 * torch.randn(experts, out, 1, generator=generator, device=device))
    return 0.02 * rows * torch.randn(experts, out, n, generator=generator, device=device)


def random_problem(
    experts: int, out: int, n: int, seed: int, tokens: int | None = None, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(W [experts, out, n], H [experts, n, n]) from one seed; ``tokens`` defaults to 4n."""
    generator = torch.Generator(device=device).manual_seed(seed)
    h = heavy_tailed_hessians(experts, n, tokens or 4 * n, generator, device)
    return random_weights(experts, out, n, generator, device), h
