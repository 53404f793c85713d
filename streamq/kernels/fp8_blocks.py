"""FP8 block (de)quantization: ``w[i, j] = fp8[i, j] * scale_inv[i // bm, j // bn]``.

DeepSeek ships its linear weights as float8 e4m3 with one float32 scale per 128×128 block; edge blocks are
partial when a dimension is not a multiple of the block (kv_a_proj_with_mqa has 576 rows). The Triton kernel
reads one byte and writes one output element per weight; the torch reference materialises float32 copies.
Both multiply in float32 and round once to the output dtype, so they agree bit for bit.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is Linux-only; the torch path serves elsewhere
    triton = None


def dequant_fp8_blocks_ref(
    weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    _check(weight, scale_inv, block)
    rows, cols = weight.shape
    scale = scale_inv.float().repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return (weight.float() * scale).to(dtype)


def dequant_fp8_blocks_triton(
    weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    _check(weight, scale_inv, block)
    rows, cols = weight.shape
    weight = weight.contiguous()
    scale_inv = scale_inv.float().contiguous()
    out = torch.empty(rows, cols, dtype=dtype, device=weight.device)
    tile_m, tile_n = 32, 128
    grid = (triton.cdiv(rows, tile_m), triton.cdiv(cols, tile_n))
    bf16 = dtype == torch.bfloat16
    _dequant_kernel[grid](
        weight,
        scale_inv,
        out.view(torch.int16) if bf16 else out,
        rows,
        cols,
        scale_inv.shape[1],
        block[0],
        block[1],
        TILE_M=tile_m,
        TILE_N=tile_n,
        ROUND_BF16=bf16,
    )
    return out


def dequant_fp8_blocks(
    weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """Triton on CUDA, the torch reference elsewhere."""
    if weight.is_cuda and triton is not None:
        return dequant_fp8_blocks_triton(weight, scale_inv, block, dtype)
    return dequant_fp8_blocks_ref(weight, scale_inv, block, dtype)


def _check(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> None:
    if weight.dim() != 2:
        raise ValueError(f"FP8 block dequantization needs a 2-D weight, got shape {tuple(weight.shape)}")
    expected = (-(-weight.shape[0] // block[0]), -(-weight.shape[1] // block[1]))
    if tuple(scale_inv.shape) != expected:
        raise ValueError(
            f"weight_scale_inv has shape {tuple(scale_inv.shape)}, a {tuple(weight.shape)} weight with "
            f"{block[0]}x{block[1]} blocks needs {expected}"
        )


if triton is not None:

    @triton.jit
    def _dequant_kernel(
        w_ptr,
        s_ptr,
        out_ptr,
        rows,
        cols,
        s_cols,
        block_m,
        block_n,
        TILE_M: tl.constexpr,
        TILE_N: tl.constexpr,
        ROUND_BF16: tl.constexpr,
    ):
        # int64 offsets: an embedding-sized matrix has more than 2**31 elements.
        r = tl.program_id(0).to(tl.int64) * TILE_M + tl.arange(0, TILE_M)[:, None]
        c = tl.program_id(1).to(tl.int64) * TILE_N + tl.arange(0, TILE_N)[None, :]
        mask = (r < rows) & (c < cols)
        w = tl.load(w_ptr + r * cols + c, mask=mask, other=0.0).to(tl.float32)
        s = tl.load(s_ptr + (r // block_m) * s_cols + c // block_n, mask=mask, other=0.0)
        value = w * s
        if ROUND_BF16:
            # Round to nearest even by hand: Triton's CPU interpreter truncates float32 -> bfloat16, and the
            # kernel must agree bit for bit with torch on both. Inputs are finite (FP8 e4m3fn times a scale).
            bits = value.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            tl.store(out_ptr + r * cols + c, bits.to(tl.uint16).to(tl.int16, bitcast=True), mask=mask)
        else:
            tl.store(out_ptr + r * cols + c, value.to(out_ptr.dtype.element_ty), mask=mask)


FP8_MAX = 448.0  # largest finite float8 e4m3fn


def quantize_fp8_blocks(weight: torch.Tensor, block: tuple[int, int] = (128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of ``dequant_fp8_blocks``: float8 e4m3 values and float32 ``scale_inv`` per block,
    each block scaled so that its largest magnitude maps to the largest finite FP8 value (as DeepSeek does)."""
    rows, cols = weight.shape
    bm, bn = block
    rb, cb = -(-rows // bm), -(-cols // bn)
    padded = torch.nn.functional.pad(weight.float(), (0, cb * bn - cols, 0, rb * bm - rows))
    tiles = padded.view(rb, bm, cb, bn)
    scale = tiles.abs().amax(dim=(1, 3)).clamp(min=1e-12) / FP8_MAX
    q = (tiles / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.view(rb * bm, cb * bn)[:rows, :cols].contiguous(), scale
