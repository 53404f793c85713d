"""Test-only helpers for building checkpoints (safetensors files, compressed-tensors layouts) by hand."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from streamq.errors import StreamqError
from streamq.io.safetensors_write import TensorSpec, write_safetensors


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


def save_tensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> int:
    """Write in-memory tensors (in the mapping's order) atomically (test-only)."""
    specs = [TensorSpec(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]
    return write_safetensors(path, specs, lambda spec: [tensors[spec.name]], metadata)
