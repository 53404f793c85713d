"""GPTQ (Frantar et al., 2022) for batches of same-shape matrices, e.g. all experts of one MoE layer.

``gptq_quantize(W, H, cfg)`` takes one matrix ``[out, in]`` with its Hessian ``[in, in]``, or a batch
``[E, out, in]`` with ``[E, in, in]``; the single matrix is the E = 1 case of the same code.

Gate and up projections see the same input, so they share a Hessian: concatenate their rows,
``W = cat([gate, up], dim=-2)`` of shape ``[E, 2I, H]``, pass one H per expert, and split the result's
rows. GPTQ's rows are independent given H (the recurrence mixes columns, never rows), so this is the same
result as two calls, for half the Cholesky work.

How it runs (see ``hessian.py`` for the algebra):

1. Each Hessian is validated, damped, reordered and factored once: H = R R^T with R upper, by a blocked
   Cholesky batched over the experts on tensor cores (``cholesky.py``; cuSOLVER/LAPACK on CPU).
2. Columns are solved in panels, recursively: a narrow leaf of ``sweep_width`` columns is swept by
   ``streamq.kernels.gptq_block`` (Triton on CUDA), and every finished panel passes its feedback to the
   rest of its parent panel with one batched matmul. The matmuls hold nearly all the flops; TF32 for them
   is measured in bench/gptq_notes.md.
3. Group scales: ``actorder="weight"`` and per-channel fit them on the original weights before the sweep;
   ``"none"`` and ``"group"`` fit each group when the sweep reaches its first column, on the values updated
   by every earlier column (the reference GPTQ's behaviour). Panels are aligned so that a group is always
   complete and up to date at that moment.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Literal

import torch

from streamq.kernels.gptq_block import add_product, gptq_block
from streamq.solvers import fallbacks as fb
from streamq.solvers.cholesky import tf32_matmuls
from streamq.solvers.code_descent import DescentRun, refine_codes, weighs
from streamq.solvers.hessian import FactorForm, FactorOptions, PreparedHessians, prepare_hessians
from streamq.solvers.observers import fit_qparams, global_scale
from streamq.solvers.rtn import make_result, static_qparams
from streamq.solvers.scale_refine import refine_scales
from streamq.solvers.scheme import QuantResult, SolverConfig

Backend = Literal["auto", "triton", "torch"]

_CPU_MEMORY_BUDGET = 4 << 30
_CUDA_FREE_MEMORY_SHARE = 0.5


@dataclass(frozen=True)
class SolveOptions:
    """How to run the solver. None of these change the algorithm; ``tf32``, ``factor.precision``,
    ``factor.form`` and ``dtype`` change where it rounds."""

    memory_budget: int | None = None  # bytes of working memory for a chunk of experts; None = automatic
    tf32: bool = True  # TF32 tensor cores for the feedback matmuls (CUDA only)
    sweep_width: int = 32  # columns swept by one kernel launch
    sweep_rows: int = 64  # rows per Triton program (one per thread)
    outer_panel: int = 1024  # panel above cfg.block_size, so most feedback flops go to large matmuls; 0 = off
    backend: Backend = "auto"  # auto: Triton for CUDA tensors, torch otherwise
    dtype: torch.dtype = torch.float32  # the torch backend's working precision (Triton is float32 only)
    factor: FactorOptions = field(default_factory=FactorOptions)


@dataclass
class _Sweep:
    """The buffers of one chunk's column sweep, all in solving order."""

    work: torch.Tensor  # [E, out, n] values after all feedback applied so far
    orig: torch.Tensor  # [E, out, n] original weights; each leaf overwrites its columns with d
    feedback: torch.Tensor  # [E, n, n] strictly upper M
    scale: torch.Tensor  # [E, out, groups]
    zero: torch.Tensor | None
    gscale: torch.Tensor | None  # [E] NVFP4's global scale, fixed from the original weights before the sweep
    gidx: torch.Tensor  # [E, n] group of each solving position
    codes: torch.Tensor  # [E, out, n] int8
    widths: tuple[int, ...]  # panel widths, outermost first; the last is the leaf
    cfg: SolverConfig
    dynamic_groups: bool
    babai: bool
    use_triton: bool
    rows_per_program: int


def gptq_quantize(
    w: torch.Tensor, h: torch.Tensor, cfg: SolverConfig | None = None, options: SolveOptions | None = None
) -> QuantResult:
    """Quantize ``w`` ``[out, in]`` / ``[E, out, in]`` with Hessians ``h`` ``[in, in]`` / ``[E, in, in]``.

    Works on the device of ``w``; experts are solved in chunks that fit ``options.memory_budget``. The
    inputs are not modified. Unusable Hessians fall back to RTN for that matrix, counted in ``fallbacks``.
    """
    cfg = cfg or SolverConfig()
    options = options or SolveOptions()
    batched = w.dim() == 3
    w3, h3 = (w, h) if batched else (w.unsqueeze(0), h.unsqueeze(0))
    _check_inputs(w3, h3, cfg)
    use_triton = _use_triton(options.backend, w3)
    experts, out, n = w3.shape
    refined = bool(cfg.code_rounds or (cfg.scale_candidates and candidates_apply(cfg)))
    weighted = bool(cfg.code_rounds) and weighs(out, n, cfg.outside_weight)
    step = experts_per_chunk(out, n, _memory_budget(options, w3.device), options.factor.form, refined, weighted)
    result: QuantResult | None = None
    for lo in range(0, experts, step):
        part = _solve_chunk(w3[lo : lo + step], h3[lo : lo + step], cfg, options, use_triton)
        result = part if step >= experts else _place(result, part, lo, experts)
    assert result is not None
    return result if batched else replace(result.entry(0), fallbacks=result.fallbacks)


def experts_per_chunk(
    out: int, n: int, budget: int, form: FactorForm = "cholesky", refined: bool = False, weighted: bool = False
) -> int:
    """How many experts one chunk holds: per expert the n x n float32 factor, its finiteness mask and, for
    the classic form, its inverse; ~5 float32 copies of W (working, original, codes, dequantized, output);
    plus the transient copies of one Hessian and the Cholesky panels. ``refined`` (scale candidates, code
    descent): two more n x n float32 matrices (the damped Hessian, the descent's feedback) and ~6 copies of W
    (a second result, the target, the descent's vertices, values and products). ``weighted`` (an output metric
    for the descent): the Gram matrix, its factor and the factor's inverse, and three more copies of W (the span's
    orthonormal basis, the weighted residual and the projection)."""
    per_expert = (9 if form == "inverse" else 5) * n * n + 20 * out * n
    if refined:
        per_expert += 8 * n * n + 24 * out * n
    if weighted:
        per_expert += 12 * n * n + 12 * out * n
    transient = 16 * n * n
    return max(1, (budget - transient) // per_expert)


def dynamic_groups(cfg: SolverConfig) -> bool:
    """Whether group scales are fitted during the sweep (in solving order) rather than before it."""
    return cfg.scheme.group_size > 0 and cfg.actorder in ("none", "group")


def panel_widths(cfg: SolverConfig, options: SolveOptions) -> tuple[int, ...]:
    """Nested panel widths, outermost first, each a multiple of the next. A dynamic group never straddles
    the innermost non-leaf panel, and starts on a leaf boundary, so it is up to date when fitted."""
    gs = cfg.scheme.group_size
    leaf = max(1, min(options.sweep_width, cfg.block_size))
    block = cfg.block_size
    if dynamic_groups(cfg):
        leaf = math.gcd(leaf, gs)
        block = math.lcm(block, gs)
    block = _round_up(block, leaf)
    widths = [leaf] if block == leaf else [block, leaf]
    if options.outer_panel > widths[0]:
        widths.insert(0, _round_up(options.outer_panel, widths[0]))
    return tuple(widths)


def _solve_chunk(
    w: torch.Tensor, h: torch.Tensor, cfg: SolverConfig, options: SolveOptions, use_triton: bool
) -> QuantResult:
    dtype = torch.float32 if use_triton else options.dtype
    prep = prepare_hessians(h, cfg, options.factor, dtype)
    result = gptq_solve_prepared(w, prep, cfg, options)
    if cfg.scale_candidates and candidates_apply(cfg):
        result = _best_rows(w, damped_hessians(h, prep, cfg), prep, result, cfg, options)
    for _ in range(cfg.scale_rounds):
        # Scales refitted to the output error with these codes, then a new sweep on that grid (scale_refine.py).
        scale = refine_scales(w, h, result.q, result.scale, result.zero_point, cfg)
        result = gptq_solve_prepared(w, prep, cfg, options, scale=scale)
    if cfg.code_rounds:
        result = _descend_codes(w, damped_hessians(h, prep, cfg), prep, result, cfg, options)
    return result


def candidates_apply(cfg: SolverConfig) -> bool:
    """Scale candidates multiply integer scales fixed before the sweep: other grids (FP4's coded scales) and
    groups fitted during the sweep are solved without them."""
    return cfg.scheme.format == "int" and not dynamic_groups(cfg)


def damped_hessians(h: torch.Tensor, prep: PreparedHessians, cfg: SolverConfig) -> torch.Tensor:
    """The Hessians the sweep solved with, in natural order and float32: damped alike, dead columns at 1 (their
    weights are zeroed), the identity for matrices solved as RTN. What the refinements after the sweep minimise."""
    diag = prep.diag.to(torch.float32)
    damped = h.float().clone()
    damped.diagonal(dim1=-2, dim2=-1).copy_(diag + cfg.damp * diag.mean(1, keepdim=True))
    damped = torch.where(prep.dead.unsqueeze(1) | prep.dead.unsqueeze(2), 0.0, damped)
    damped.diagonal(dim1=-2, dim2=-1).copy_(torch.where(prep.dead, 1.0, damped.diagonal(dim1=-2, dim2=-1)))
    eye = torch.eye(h.shape[-1], dtype=torch.float32, device=h.device)
    return torch.where(prep.use_rtn.view(-1, 1, 1), eye, damped)


def _target_weights(w: torch.Tensor, prep: PreparedHessians) -> torch.Tensor:
    """``w`` in float32 as the sweep read it: NaN/Inf and dead columns at 0."""
    return fb.zero_nonfinite(w.float(), Counter()).masked_fill(prep.dead.unsqueeze(1), 0.0)


def _descend_codes(
    w: torch.Tensor,
    damped: torch.Tensor,
    prep: PreparedHessians,
    result: QuantResult,
    cfg: SolverConfig,
    options: SolveOptions,
) -> QuantResult:
    """``cfg.code_rounds`` rounds of coordinate descent on the sweep's codes (code_descent.py) against ``damped``
    (an identity Hessian, for matrices solved as RTN, leaves their codes as they are), run by the sweep's kernel
    with its panels (scales are fixed, so static-group panels)."""
    use_triton = _use_triton(options.backend, w)
    run = DescentRun(panel_widths(replace(cfg, actorder="weight"), options), use_triton, options.sweep_rows)
    zero = None if result.zero_point is None else result.zero_point.float()
    with tf32_matmuls(options.tf32 and w.is_cuda):
        codes, weight = refine_codes(
            _target_weights(w, prep), damped, result.q, result.scale, zero, result.g_idx, cfg.scheme,
            cfg.code_rounds, run, cfg.outside_weight,
        )  # fmt: skip
    fallbacks = Counter(result.fallbacks)
    return make_result(codes, result.scale, zero, result.g_idx, cfg, w.dtype, fallbacks, weight, result.global_scale)


def _best_rows(
    w: torch.Tensor,
    damped: torch.Tensor,
    prep: PreparedHessians,
    result: QuantResult,
    cfg: SolverConfig,
    options: SolveOptions,
) -> QuantResult:
    """One more sweep per multiplier of ``result``'s scales; each row keeps the sweep with the smallest output
    error (w - ŵ) H (w - ŵ)ᵀ. GPTQ's rows are independent given H, so the rows picked are each a complete sweep."""
    target = _target_weights(w, prep)
    tf32 = options.tf32 and w.is_cuda
    best, best_err = result, _row_errors(target, result, damped, tf32)
    for multiplier in cfg.scale_candidates:
        scale = (result.scale * multiplier).to(cfg.scheme.scale_torch_dtype).float()
        zero = None if result.zero_point is None else result.zero_point.float()
        other = gptq_solve_prepared(w, prep, cfg, options, scale=scale, zero=zero)
        err = _row_errors(target, other, damped, tf32)
        best = _pick_rows(best, other, err < best_err)
        best_err = torch.minimum(err, best_err)
    return best


def _row_errors(target: torch.Tensor, result: QuantResult, h: torch.Tensor, tf32: bool) -> torch.Tensor:
    """[E, out] output error of each row (one n x n product per matrix: TF32 where the sweep's products are)."""
    d = target - result.weight.float()
    with tf32_matmuls(tf32):
        return (torch.bmm(d, h) * d).sum(-1)


def _pick_rows(a: QuantResult, b: QuantResult, take_b: torch.Tensor) -> QuantResult:
    """Rows of ``b`` where ``take_b`` [E, out], of ``a`` elsewhere (one grid's scales, so g_idx is shared)."""
    rows = take_b.unsqueeze(-1)
    zero = None if a.zero_point is None else torch.where(rows, b.zero_point, a.zero_point)
    return replace(
        a,
        q=torch.where(rows, b.q, a.q),
        scale=torch.where(rows, b.scale, a.scale),
        zero_point=zero,
        weight=torch.where(rows, b.weight, a.weight),
        fallbacks=dict(Counter(a.fallbacks) | Counter(b.fallbacks)),
    )


def gptq_solve_prepared(
    w: torch.Tensor,
    prep: PreparedHessians,
    cfg: SolverConfig,
    options: SolveOptions | None = None,
    scale: torch.Tensor | None = None,
    zero: torch.Tensor | None = None,
) -> QuantResult:
    """Solve ``w`` ``[E, out, in]`` against Hessians already prepared by ``prepare_hessians`` with the same
    ``cfg``: one factorisation can serve several weight matrices (gate and up, kept apart). ``scale``
    ``[E, out, groups]``: fixed scales to sweep with instead of the observer's (static groups only; an
    asymmetric grid keeps the observer's zero points, or ``zero`` when given). Fixed scales with a symmetric grid
    or a given ``zero`` skip the observer, whose search can cost more than the sweep.

    No chunking here: the caller holds the whole batch in memory.
    """
    options = options or SolveOptions()
    use_triton = _use_triton(options.backend, w)
    dtype = prep.feedback.dtype
    if use_triton and dtype != torch.float32:
        raise ValueError(f"the Triton sweep is float32 only; the Hessians were prepared in {dtype}")
    counter: Counter[str] = Counter(prep.fallbacks)
    w_in = fb.zero_nonfinite(w.to(dtype), counter)  # may still be the caller's tensor: only read below
    if prep.dead.any():
        w_in = w_in.masked_fill(prep.dead.unsqueeze(1), 0.0)

    experts, out, n = w_in.shape
    gs = cfg.scheme.group_size
    dynamic = dynamic_groups(cfg)
    gscale = global_scale(w_in, cfg.scheme)
    importance = prep.diag.to(dtype) if cfg.mse_hessian and prep.diag is not None else None
    scale, zero, gidx = _grid(w_in, prep.perm, cfg, gscale, (scale, zero), importance)
    orig = w_in.clone() if prep.perm is None else w_in.gather(2, prep.perm.unsqueeze(1).expand(experts, out, n))
    del w_in
    sweep = _Sweep(
        work=orig.clone(),
        orig=orig,
        feedback=prep.feedback,
        scale=scale,
        zero=zero,
        gscale=gscale,
        gidx=gidx,
        codes=torch.empty(experts, out, n, dtype=torch.int8, device=w.device),
        widths=panel_widths(cfg, options),
        cfg=cfg,
        dynamic_groups=dynamic,
        babai=prep.form == "cholesky",
        use_triton=use_triton,
        rows_per_program=options.sweep_rows,
    )
    with tf32_matmuls(options.tf32 and w.is_cuda):
        _solve_panel(sweep, 0, n, 0)

    # The sweep left the dequantized weight in ``work``, computed exactly as compressed-tensors would.
    codes, weight, g_idx = sweep.codes, sweep.work, None
    if prep.perm is not None:
        position = torch.argsort(prep.perm, dim=-1).unsqueeze(1).expand(experts, out, n)
        codes = codes.gather(2, position)
        weight = weight.gather(2, position)
        if dynamic:
            g_idx = _group_of_position(position[:, 0], gs)
    return make_result(codes, scale, zero, g_idx, cfg, w.dtype, counter, weight=weight, gscale=gscale)


def _grid(
    w: torch.Tensor,
    perm: torch.Tensor | None,
    cfg: SolverConfig,
    gscale: torch.Tensor | None,
    fixed_grid: tuple[torch.Tensor | None, torch.Tensor | None],
    importance: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Scale, zero and the group of each solving position: static groups fitted now (or the ``fixed_grid``'s
    scales, and its zero points when given; ``importance`` [E, in] weighs the MSE observer's error per column),
    dynamic ones allocated for the sweep."""
    experts, out, n = w.shape
    gs = cfg.scheme.group_size
    fixed, fixed_zero = fixed_grid
    if dynamic_groups(cfg):
        if fixed is not None:
            raise ValueError("fixed scales need static groups (actorder 'weight', or per channel)")
        scale = torch.empty(experts, out, cfg.scheme.num_groups(n), dtype=w.dtype, device=w.device)
        zero = None if cfg.scheme.symmetric else torch.empty_like(scale)
        return scale, zero, _group_of_position(torch.arange(n, device=w.device), gs).expand(experts, n)
    natural = torch.arange(n, device=w.device).expand(experts, n) if perm is None else perm
    if fixed is not None and (cfg.scheme.symmetric or fixed_zero is not None):
        zero = None if fixed_zero is None else fixed_zero.to(w.dtype)
        return fixed.to(w.dtype), zero, _group_of_position(natural, gs)
    fitted, zero = static_qparams(w, cfg, gscale, importance)
    return fitted if fixed is None else fixed.to(fitted.dtype), zero, _group_of_position(natural, gs)


def _solve_panel(sweep: _Sweep, lo: int, hi: int, level: int) -> None:
    """Solve columns [lo, hi) in sub-panels of ``widths[level]``; each finished sub-panel feeds its error
    forward to the rest of [lo, hi) at once (the parent panel passes it further when it finishes)."""
    width = sweep.widths[level]
    for a in range(lo, hi, width):
        b = min(a + width, hi)
        if level + 1 == len(sweep.widths):
            _solve_leaf(sweep, a, b)
        else:
            _solve_panel(sweep, a, b, level + 1)
        if b < hi:
            add_product(sweep.work[:, :, b:hi], sweep.orig[:, :, a:b], sweep.feedback[:, a:b, b:hi])


def _solve_leaf(sweep: _Sweep, a: int, b: int) -> None:
    gs = sweep.cfg.scheme.group_size
    if sweep.dynamic_groups and a % gs == 0:
        scale, zero = fit_qparams(_group_values(sweep, a, a + gs), sweep.cfg, sweep.gscale)
        sweep.scale[:, :, a // gs] = scale
        if sweep.zero is not None:
            sweep.zero[:, :, a // gs] = zero
    gptq_block(
        sweep.work[:, :, a:b],
        sweep.orig[:, :, a:b],
        sweep.feedback[:, a:b, a:b],
        sweep.scale,
        sweep.zero,
        sweep.gidx[:, a:b],
        sweep.codes[:, :, a:b],
        sweep.cfg.scheme.grid,
        babai=sweep.babai,
        use_triton=sweep.use_triton,
        block_r=sweep.rows_per_program,
    )


def _group_values(sweep: _Sweep, a: int, b: int) -> torch.Tensor:
    """The values of columns [a, b) that the classic GPTQ fits a group's scale on: the optimal update of
    the weights given every column before a quantized (OBS), w_g + d_<a H_<a,g H_g,g^-1 restricted to g.

    The classic form's ``work`` holds exactly that. The Cholesky form's partial sums differ: with H = R R^T
    they are w_g + (d_<a R_<a,g) D_g^-1 (D = diag R) where the OBS update is w_g + d_<a R_<a,g R_g,g^-1;
    as the feedback block M_gg = R_gg D_g^-1 - I, one unit-triangular solve with the group's own block
    converts one into the other.
    """
    work = sweep.work[:, :, a:b]
    if not sweep.babai:
        return work
    orig = sweep.orig[:, :, a:b]
    unit_upper = sweep.feedback[:, a:b, a:b]  # its zero diagonal is read as ones
    return orig + torch.linalg.solve_triangular(unit_upper, work - orig, upper=True, left=False, unitriangular=True)


def _group_of_position(columns: torch.Tensor, group_size: int) -> torch.Tensor:
    """int32 group index of input columns (all 0 per channel)."""
    if group_size == 0:
        return torch.zeros_like(columns, dtype=torch.int32)
    return torch.div(columns, group_size, rounding_mode="floor").to(torch.int32)


def _check_inputs(w: torch.Tensor, h: torch.Tensor, cfg: SolverConfig) -> None:
    if w.dim() != 3 or h.dim() != 3:
        raise ValueError(f"expected W [out, in] with H [in, in], or W [E, out, in] with H [E, in, in]; got "
                         f"{tuple(w.shape)} and {tuple(h.shape)}")  # fmt: skip
    experts, _, n = w.shape
    if h.shape != (experts, n, n):
        raise ValueError(f"H has shape {tuple(h.shape)}, expected {(experts, n, n)} for W {tuple(w.shape)}")
    if h.device != w.device:
        raise ValueError(f"W is on {w.device} and H on {h.device}")
    gs = cfg.scheme.group_size
    if gs and n % gs:
        raise ValueError(f"in_features {n} is not a multiple of group_size {gs}")


def _use_triton(backend: Backend, w: torch.Tensor) -> bool:
    if backend == "auto":
        return w.is_cuda
    if backend in ("triton", "torch"):
        return backend == "triton"
    raise ValueError(f"unknown backend {backend!r}")


def _memory_budget(options: SolveOptions, device: torch.device) -> int:
    if options.memory_budget is not None:
        return options.memory_budget
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * _CUDA_FREE_MEMORY_SHARE)
    return _CPU_MEMORY_BUDGET


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def _place(total: QuantResult | None, part: QuantResult, lo: int, experts: int) -> QuantResult:
    """Write a chunk's result into the batch result (allocated from the first chunk)."""
    if total is None:
        total = QuantResult(
            **{name: _batch_like(getattr(part, name), experts) for name in ("q", "scale", "zero_point", "g_idx")},
            weight=_batch_like(part.weight, experts),
            global_scale=_batch_like(part.global_scale, experts),
        )
    for name in ("q", "scale", "zero_point", "g_idx", "weight", "global_scale"):
        dst = getattr(total, name)
        if dst is not None:
            dst[lo : lo + getattr(part, name).shape[0]] = getattr(part, name)
    total.fallbacks = dict(Counter(total.fallbacks) + Counter(part.fallbacks))
    return total


def _batch_like(t: torch.Tensor | None, experts: int) -> torch.Tensor | None:
    return None if t is None else t.new_empty((experts, *t.shape[1:]))
