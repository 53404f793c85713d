"""The GPTQ column sweep over one narrow block of columns, for a batch of matrices.

Both forms of GPTQ used by ``streamq.solvers.gptq`` reduce to one recurrence over the block's columns j:

    v_j = work_j + sum_{i<j} d_i * M[i, j]        (value at the moment column j is quantized)
    q_j = round_to_grid(v_j / s_j + z_j)          (clamp to the grid, nearest grid value, ties to even)
    d_j = orig_j - deq_j   (``babai=True``)   or   deq_j - v_j   (``babai=False``),   deq_j = (q_j - z_j) * s_j

where ``M`` is the block's strictly upper feedback matrix, ``work`` the columns after every earlier block's
feedback, ``orig`` the original (permuted) weights, and ``s_j``/``z_j`` the scale/zero of column j's group
``gidx[j]``. ``deq_j`` is computed with compressed-tensors' two roundings, so it *is* the exported weight.
The grid (``streamq.solvers.scheme.Grid``) is an integer range or a minifloat such as FP4 E2M1; both are
"multiples of a power-of-two step", the step growing with |v| on a minifloat, so rounding is one formula and
the code written is q_j / grid.unit.

Calling convention (the same for the reference and the kernel; tensors are [E, ...] batches):
    work  [E, R, C] float32, overwritten with deq    orig  [E, R, C] float32, overwritten with d
    m     [E, C, C] float32, strictly upper           scale [E, R, G] float32;  zero like scale, or None
    gidx  [E, C] int32 (may be expanded)             codes [E, R, C] int8 (multiples of grid.unit), written
Views with a unit stride on the last dimension are fine; nothing is copied.

Rows are independent, so a Triton program owns ``BLOCK_R`` rows of one matrix, one row per thread: each
thread keeps its row's ``d`` and codes for the block in registers and walks the columns with no exchange
between threads (a layout with threads along columns spent most of its time in warp shuffles and in
recomputing every row's quantization on all 32 lanes; bench/gptq_notes.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # the solvers package imports this module
    from streamq.solvers.scheme import Grid

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with every Linux torch build we support
    triton = None

DEFAULT_BLOCK_R = 64


def add_product(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``out += a @ b``, batched: how the sweeps pass a finished panel's changes to the columns after it. On the CPU
    through a temporary: an in-place ``baddbmm_`` into a column slice of a wider tensor takes a path tens of times
    slower there (13.5 ms against 0.3 ms for a [4, 256, 32] × [4, 32, 96] update, torch 2.13). On a GPU in place,
    without a temporary as large as the rest of the matrix."""
    if out.is_cuda:
        out.baddbmm_(a, b)
    else:
        out += torch.bmm(a, b)


def gptq_block_ref(
    work: torch.Tensor,
    orig: torch.Tensor,
    m: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    gidx: torch.Tensor,
    codes: torch.Tensor,
    grid: Grid,
    babai: bool,
) -> None:
    """Pure-torch sweep with the kernel's signature (any float dtype; the solver's CPU path)."""
    # Column-major working copies: each step reads one column and updates the columns after it, which is
    # contiguous memory this way round (the arithmetic, and so every bit of the result, is the same).
    experts, rows, cols = work.shape
    g = gidx.long().unsqueeze(1).expand(experts, rows, cols)
    s_cols = scale.gather(2, g).transpose(1, 2).contiguous()
    z_cols = None if zero is None else zero.gather(2, g).transpose(1, 2).contiguous()
    v = work.transpose(1, 2).contiguous()
    d_cols = orig.transpose(1, 2).contiguous()
    c_cols = torch.empty_like(v, dtype=codes.dtype)
    m_cols = m.unsqueeze(-1)
    for j in range(cols):
        s = s_cols[:, j]
        z = None if z_cols is None else z_cols[:, j]
        scaled = v[:, j] / s if z is None else v[:, j] / s + z
        q = grid.round(scaled)
        deq = (q if z is None else q - z) * s
        d = d_cols[:, j] - deq if babai else deq - v[:, j]
        v[:, j + 1 :] += d.unsqueeze(1) * m_cols[:, j, j + 1 :]
        d_cols[:, j] = d
        v[:, j] = deq
        c_cols[:, j] = (q / grid.unit).to(codes.dtype)
    work.copy_(v.transpose(1, 2))
    orig.copy_(d_cols.transpose(1, 2))
    codes.copy_(c_cols.transpose(1, 2))


def gptq_block_triton(
    work: torch.Tensor,
    orig: torch.Tensor,
    m: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    gidx: torch.Tensor,
    codes: torch.Tensor,
    grid: Grid,
    babai: bool,
    block_r: int = DEFAULT_BLOCK_R,
) -> None:
    """Triton sweep (float32 only). Runs on CUDA, or on CPU under ``TRITON_INTERPRET=1``."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    experts, rows, cols = work.shape
    if zero is not None and zero.stride() != scale.stride():
        raise ValueError("zero must have the same strides as scale")
    zero_arg = scale if zero is None else zero  # never read when HAS_ZERO is false
    # The kernel reads column j of M (all i < j at once): transposed, that is one contiguous row.
    m_t = m.transpose(1, 2).contiguous()
    programs = (triton.cdiv(rows, block_r), experts)
    _gptq_block_kernel[programs](
        work, orig, m_t, scale, zero_arg, gidx, codes,
        rows, cols, grid.lo, grid.hi, 1.0 / grid.unit,
        *work.stride(), *orig.stride(), *scale.stride(), *gidx.stride(), *codes.stride(),
        MINIFLOAT=not grid.uniform,
        MANTISSA=grid.mantissa_bits,
        MIN_EXP=grid.min_exp,
        MAX_EXP=grid.max_exp,
        HAS_ZERO=zero is not None,
        BABAI=babai,
        BLOCK_R=block_r,
        BLOCK_C=max(16, triton.next_power_of_2(cols)),
        num_warps=max(1, block_r // 32),
    )  # fmt: skip


def gptq_block(
    work: torch.Tensor,
    orig: torch.Tensor,
    m: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    gidx: torch.Tensor,
    codes: torch.Tensor,
    grid: Grid,
    babai: bool,
    use_triton: bool,
    block_r: int = DEFAULT_BLOCK_R,
) -> None:
    """Dispatch to the kernel (``block_r`` rows per program, one per thread) or the reference."""
    if use_triton:
        gptq_block_triton(work, orig, m, scale, zero, gidx, codes, grid, babai, block_r)
    else:
        gptq_block_ref(work, orig, m, scale, zero, gidx, codes, grid, babai)


if triton is not None:

    @triton.jit
    def _round_half_even(x):
        # libdevice.rint has no CPU-interpreter implementation; this is exact for |x| < 2**23.
        low = tl.floor(x)
        frac = x - low
        low_is_odd = low - 2.0 * tl.floor(0.5 * low)
        return tl.where(frac > 0.5, low + 1.0, tl.where(frac < 0.5, low, low + low_is_odd))

    @triton.jit
    def _round_to_grid(x, lo, hi, MINIFLOAT: tl.constexpr, MANTISSA: tl.constexpr, MIN_EXP: tl.constexpr,
                       MAX_EXP: tl.constexpr):  # fmt: skip
        x = tl.minimum(tl.maximum(x, lo), hi)
        if MINIFLOAT:
            # The step is 2**(clamp(floor(log2|x|)) - mantissa bits), built from float32 exponent bits: exact,
            # where a log2 would be an approximation on the GPU.
            biased = (x.to(tl.int32, bitcast=True) >> 23) & 0xFF
            exp = tl.minimum(tl.maximum(biased - 127, MIN_EXP), MAX_EXP) - MANTISSA
            step = ((exp + 127) << 23).to(tl.float32, bitcast=True)
            inv_step = ((127 - exp) << 23).to(tl.float32, bitcast=True)
            return _round_half_even(x * inv_step) * step
        else:
            return _round_half_even(x)

    # The column strides are not specialized to 1: told that columns are contiguous, Triton lays tiles out
    # with threads along columns, which is the layout this kernel exists to avoid.
    @triton.jit(do_not_specialize=["s_work_c", "s_orig_c", "s_codes_c"])
    def _gptq_block_kernel(
        work_ptr, orig_ptr, m_t_ptr, scale_ptr, zero_ptr, gidx_ptr, codes_ptr,
        n_rows, n_cols, qmin, qmax, inv_unit,
        s_work_e, s_work_r, s_work_c,
        s_orig_e, s_orig_r, s_orig_c,
        s_scale_e, s_scale_r, s_scale_g,
        s_gidx_e, s_gidx_c,
        s_codes_e, s_codes_r, s_codes_c,
        MINIFLOAT: tl.constexpr,
        MANTISSA: tl.constexpr,
        MIN_EXP: tl.constexpr,
        MAX_EXP: tl.constexpr,
        HAS_ZERO: tl.constexpr,
        BABAI: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        # int64 expert offsets: a batch of gate+up rows of DeepSeek-V3 passes 2**31 elements.
        expert = tl.program_id(1).to(tl.int64)
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_C)
        row_ok = rows < n_rows
        tile_ok = (cols[:, None] < n_cols) & row_ok[None, :]

        work_rows = work_ptr + expert * s_work_e + rows * s_work_r
        orig_rows = orig_ptr + expert * s_orig_e + rows * s_orig_r
        scale_rows = scale_ptr + expert * s_scale_e + rows * s_scale_r
        zero_rows = zero_ptr + expert * s_scale_e + rows * s_scale_r
        m_t_block = m_t_ptr + expert * n_cols * n_cols
        gidx_row = gidx_ptr + expert * s_gidx_e

        # Tiles are [column, row]: the reductions over columns stay inside a thread. The sweep is
        # left-looking: column j's feedback is the dot of the finished columns' d with M[:, j].
        feedback = tl.zeros([BLOCK_C, BLOCK_R], dtype=tl.float32)
        code_tile = tl.zeros([BLOCK_C, BLOCK_R], dtype=tl.float32)
        for j in range(n_cols):
            # M is strictly upper, so M[i, j] = 0 for i >= j: no mask on j, and the load vectorizes.
            m_col = tl.load(m_t_block + j * n_cols + cols, mask=cols < n_cols, other=0.0)
            v = tl.load(work_rows + j * s_work_c, mask=row_ok, other=0.0)
            v += tl.sum(feedback * m_col[:, None], axis=0)
            group = tl.load(gidx_row + j * s_gidx_c)
            s = tl.load(scale_rows + group * s_scale_g, mask=row_ok, other=1.0)
            if HAS_ZERO:
                z = tl.load(zero_rows + group * s_scale_g, mask=row_ok, other=0.0)
                q = _round_to_grid(tl.div_rn(v, s) + z, qmin, qmax, MINIFLOAT, MANTISSA, MIN_EXP, MAX_EXP)
            else:
                z = 0.0
                q = _round_to_grid(tl.div_rn(v, s), qmin, qmax, MINIFLOAT, MANTISSA, MIN_EXP, MAX_EXP)
            deq = (q - z) * s
            tl.store(work_rows + j * s_work_c, deq, mask=row_ok)
            d = tl.load(orig_rows + j * s_orig_c, mask=row_ok, other=0.0) - deq if BABAI else deq - v
            hit = cols[:, None] == j
            feedback = tl.where(hit, d[None, :], feedback)
            code_tile = tl.where(hit, q[None, :] * inv_unit, code_tile)

        tl.store(orig_rows[None, :] + cols[:, None] * s_orig_c, feedback, mask=tile_ok)
        codes_tile_ptr = codes_ptr + expert * s_codes_e + rows[None, :] * s_codes_r + cols[:, None] * s_codes_c
        tl.store(codes_tile_ptr, code_tile.to(tl.int8), mask=tile_ok)
