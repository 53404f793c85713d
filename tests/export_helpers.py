"""Test-only helpers for building compressed-tensors checkpoints by hand."""

from __future__ import annotations

import torch

from streamq.errors import StreamqError


def with_prefix(module: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Checkpoint names for the module-relative tensors of one module."""
    return {f"{module}.{name}": tensor for name, tensor in tensors.items()}


def fp8_block_linear(
    weight_fp8: torch.Tensor, weight_scale_inv: torch.Tensor, block: tuple[int, int] = (128, 128)
) -> dict[str, torch.Tensor]:
    """An FP8 Linear kept as shipped, in compressed-tensors' float-quantized block naming."""
    if weight_fp8.dtype != torch.float8_e4m3fn or weight_fp8.dim() != 2:
        raise StreamqError(
            f"FP8 weight is {weight_fp8.dtype} {tuple(weight_fp8.shape)}, expected a 2-D float8_e4m3fn matrix; "
            "pass DeepSeek's FP8 weight as stored in the checkpoint"
        )
    expected = tuple(-(-dim // size) for dim, size in zip(weight_fp8.shape, block, strict=True))
    if tuple(weight_scale_inv.shape) != expected:
        raise StreamqError(
            f"weight_scale_inv has shape {tuple(weight_scale_inv.shape)}, expected {expected} for a "
            f"{tuple(weight_fp8.shape)} weight in {block[0]}x{block[1]} blocks; check the checkpoint's block size"
        )
    return {"weight": weight_fp8, "weight_scale": weight_scale_inv.to(torch.float32)}
