"""Reading compressed-tensors checkpoints (streamq's own output) back as dense weights.

A pack-quantized Linear is stored as ``weight_packed`` + ``weight_scale`` (+ ``weight_zero_point``) +
``weight_shape``; the reader exposes it under its plain ``weight`` name and dequantizes on read, so the same
block-by-block model runs on the original and on the quantized checkpoint (evaluation, tests).
"""

from __future__ import annotations

from typing import Any

import torch


def int_bits(config: dict[str, Any]) -> int | None:
    """Bits of the integer weight group of a compressed-tensors quantization_config, if any."""
    qcfg = config.get("quantization_config") or {}
    if qcfg.get("quant_method") != "compressed-tensors":
        return None
    for group in (qcfg.get("config_groups") or {}).values():
        weights = group.get("weights") or {}
        if weights.get("type") == "int":
            return int(weights["num_bits"])
    return None


def packed_bits(words: int, in_features: int, first: int) -> int | None:
    """The bit width (``first`` tried first: the config's) whose rows of ``in_features`` codes take ``words`` int32
    words: a module's own, so that a mixed recipe's integer groups (W4 experts beside W8 shared experts) each read
    back with theirs."""
    return next((b for b in (first, 2, 3, 4, 8) if -(-in_features * b // 32) == words), None)


def dequantize_packed(
    packed: torch.Tensor,
    scale: torch.Tensor,
    shape: torch.Tensor,
    zero_point: torch.Tensor | None,
    bits: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """w = (q - zero_point) · scale, with one scale column per input group, computed in the scale's dtype as
    compressed-tensors and vLLM do."""
    # Imported here: reading an original checkpoint must not need compressed-tensors (nor its pydantic import).
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    out_features, in_features = (int(d) for d in shape.tolist())
    q = unpack_from_int32(packed, bits, torch.Size((out_features, in_features)))
    group = in_features // scale.shape[1]
    scale_full = scale.repeat_interleave(group, dim=1)
    values = q.to(scale.dtype)
    if zero_point is not None:
        zp = unpack_from_int32(zero_point, bits, torch.Size((out_features, scale.shape[1])), packed_dim=0)
        values = values - zp.to(scale.dtype).repeat_interleave(group, dim=1)
    return (values * scale_full).to(dtype)
