"""What a quantized weight looks like, shared by the solvers, the sweep kernel and the exporter.

A scheme's ``grid`` is the set of values a code stands for before scaling; the weight is
``(value - zero_point) * scale``. Integer formats use compressed-tensors' signed integers in
[-2**(bits-1), 2**(bits-1) - 1] for symmetric and asymmetric schemes alike. The FP4 formats (compressed-tensors'
NVFP4A16 and MXFP4A16 presets) use the FP4 E2M1 values 0, ±0.5, ±1, ±1.5, ±2, ±3, ±4, ±6 and differ only in how
a group's scale is stored (see ``ScaleCode``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

ActOrder = Literal["none", "weight", "group"]
Observer = Literal["minmax", "mse"]
Format = Literal["int", "nvfp4", "mxfp4"]
FORMATS: tuple[str, ...] = ("int", "nvfp4", "mxfp4")
# How a group's scale is stored. "float": in ``scale_dtype``. "fp8_global": FP8 E4M3 group scales divided by one
# float32 global scale per matrix (NVFP4). "e8m0": a power of two, stored as its biased exponent (MXFP4).
ScaleCode = Literal["float", "fp8_global", "e8m0"]


@dataclass(frozen=True)
class Grid:
    """Code values as a sign-symmetric minifloat: the multiples of ``2**(e - mantissa_bits)`` in [lo, hi], where
    e = clamp(floor(log2|x|), min_exp, max_exp). An integer grid is the case min_exp = max_exp = mantissa_bits
    = 0 (step 1 everywhere); FP4 E2M1 is mantissa_bits 1, exponents 0..2 (steps 0.5, 1, 2).

    Codes are stored as int8 multiples of ``unit``, the finest step, so the int8 code of an integer grid is
    the integer itself and an E2M1 code is twice its value."""

    lo: float
    hi: float
    mantissa_bits: int = 0
    min_exp: int = 0
    max_exp: int = 0

    @property
    def uniform(self) -> bool:
        return self.min_exp == self.max_exp

    @property
    def unit(self) -> float:
        return 2.0 ** (self.min_exp - self.mantissa_bits)

    @property
    def code_min(self) -> int:
        return round(self.lo / self.unit)

    @property
    def code_max(self) -> int:
        return round(self.hi / self.unit)

    def round(self, x: torch.Tensor) -> torch.Tensor:
        """Clamp to [lo, hi], round to the nearest grid value, ties to even (exact: steps are powers of two)."""
        x = torch.clamp(x, self.lo, self.hi)
        if self.uniform:
            return torch.round(x) if self.unit == 1.0 else torch.round(x / self.unit) * self.unit
        _, exponent = torch.frexp(x)  # |x| in [2**(exponent - 1), 2**exponent)
        power = (exponent - 1).clamp(self.min_exp, self.max_exp) - self.mantissa_bits
        step = torch.ldexp(torch.ones_like(x), power)
        return torch.round(x / step) * step


FP4_E2M1 = Grid(lo=-6.0, hi=6.0, mantissa_bits=1, min_exp=0, max_exp=2)
_FP4_GROUP = {"nvfp4": 16, "mxfp4": 32}


@dataclass(frozen=True)
class QuantScheme:
    """The integer grid: what the exported checkpoint declares."""

    bits: int = 4
    group_size: int = 128  # 0 means one scale per output channel
    symmetric: bool = True
    # Scales are rounded to the dtype they are stored and served in (vLLM keeps them in the model's dtype) before
    # any code is chosen, so the checkpoint reproduces the solved weight exactly. Integer formats only: the FP4
    # formats store their scales as their format says.
    scale_dtype: str = "bfloat16"
    format: Format = "int"

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}, not {self.format!r}")
        if self.format != "int":
            fixed = (4, _FP4_GROUP[self.format], True)
            if (self.bits, self.group_size, self.symmetric) != fixed:
                raise ValueError(
                    f"{self.format} is 4-bit, symmetric, in groups of {fixed[1]}; got bits={self.bits}, "
                    f"group_size={self.group_size}, symmetric={self.symmetric} (use QuantScheme.preset)"
                )
        if self.bits not in (2, 3, 4, 8):
            raise ValueError(f"bits must be 2, 3, 4 or 8, not {self.bits}")
        if self.group_size < 0:
            raise ValueError(f"group_size must be >= 0 (0 = per channel), not {self.group_size}")
        if self.scale_dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError(f"scale_dtype must be bfloat16, float16 or float32, not {self.scale_dtype}")

    @classmethod
    def preset(cls, fmt: Format) -> QuantScheme:
        """The scheme of a fixed-shape format ("nvfp4", "mxfp4"); "int" gives the default integer scheme."""
        if fmt not in _FP4_GROUP:
            return cls(format=fmt)
        return cls(bits=4, group_size=_FP4_GROUP[fmt], symmetric=True, format=fmt)

    @property
    def grid(self) -> Grid:
        return Grid(lo=float(self.qmin), hi=float(self.qmax)) if self.format == "int" else FP4_E2M1

    @property
    def scale_code(self) -> ScaleCode:
        return {"int": "float", "nvfp4": "fp8_global", "mxfp4": "e8m0"}[self.format]  # type: ignore[return-value]

    @property
    def scale_torch_dtype(self) -> torch.dtype:
        """The dtype of the stored ``weight_scale``."""
        code = self.scale_code
        if code == "fp8_global":
            return torch.float8_e4m3fn
        return torch.uint8 if code == "e8m0" else getattr(torch, self.scale_dtype)

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1))

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def num_groups(self, in_features: int) -> int:
        return 1 if self.group_size == 0 else -(-in_features // self.group_size)


@dataclass(frozen=True)
class SolverConfig:
    """How the grid is fitted. ``actorder``: "none" keeps column order; "weight" solves columns by decreasing
    Hessian diagonal but keeps scales per natural input group (no g_idx in the output); "group" also forms
    the groups in activation order and returns ``g_idx`` (compressed-tensors actorder "group")."""

    scheme: QuantScheme = field(default_factory=QuantScheme)
    actorder: ActOrder = "weight"
    damp: float = 0.01  # relative to the mean of the Hessian's diagonal
    block_size: int = 128
    observer: Observer = "minmax"
    mse_grid: int = 100
    mse_max_shrink: float = 0.8
    mse_norm: float = 2.4
    # GPTQ with static groups: the MSE observer weighs each column's rounding error by the Hessian's diagonal (its
    # input's mean square), so the clipping is chosen for the output error rather than the weight error.
    mse_hessian: bool = False
    # Rounds of (least-squares scales against the output error for the codes found, then a new GPTQ sweep with
    # them); integer grids with static groups only (see solvers/scale_refine.py).
    scale_rounds: int = 0
    # Rounds of coordinate descent on the codes after the sweep, each column re-rounded given all others against
    # the output error (solvers/code_descent.py); the grid stays as fitted.
    code_rounds: int = 0
    # Multipliers of the observer's group scales, each swept by GPTQ; each output row keeps the sweep whose output
    # error is smallest. Integer grids with static groups only; other solves ignore them. Empty: one sweep.
    scale_candidates: tuple[float, ...] = ()
    # β < 1: the code descent weighs an output error across the matrix's column space β and along it 1 (the
    # directions a down projection writes matter more to what follows; solvers/code_descent.py). 1: GPTQ's objective.
    outside_weight: float = 1.0


@dataclass
class QuantResult:
    """Solver output for one matrix [out, in] or a batch [E, out, in] (every tensor then has the leading E).

    ``fallbacks`` counts, per reason, the matrices the solver could not treat normally (dead columns are
    not fallbacks; an all-zero Hessian, a non-positive-definite one that needed more damping, NaN/Inf input).
    """

    q: torch.Tensor  # int8 codes (multiples of the grid's unit), [.., out, in]
    scale: torch.Tensor  # float32, [.., out, num_groups]: the multiplying scale, global scale already divided out
    zero_point: torch.Tensor | None  # int8, [.., out, num_groups]; None when symmetric
    g_idx: torch.Tensor | None  # int32, [.., in]; only for actorder="group"
    weight: torch.Tensor  # dequantized weight, [.., out, in], in the input's dtype
    global_scale: torch.Tensor | None = None  # float32, [..] one per matrix; only for NVFP4
    fallbacks: dict[str, int] = field(default_factory=dict)

    def entry(self, index: int) -> QuantResult:
        """Entry ``index`` of a batched result (its fallbacks stay with the batch)."""
        return QuantResult(
            q=self.q[index],
            scale=self.scale[index],
            zero_point=None if self.zero_point is None else self.zero_point[index],
            g_idx=None if self.g_idx is None else self.g_idx[index],
            weight=self.weight[index],
            global_scale=None if self.global_scale is None else self.global_scale[index],
        )

    def rows(self, first: int, stop: int) -> QuantResult:
        """Output rows [first, stop) of one matrix's result (members of a group solved with rows stacked)."""
        return QuantResult(
            q=self.q[first:stop],
            scale=self.scale[first:stop],
            zero_point=None if self.zero_point is None else self.zero_point[first:stop],
            g_idx=self.g_idx,
            weight=self.weight[first:stop],
            global_scale=self.global_scale,  # one per matrix: members solved together share it
        )

    def unbatched(self) -> list[QuantResult]:
        """Every entry of a batched result."""
        return [self.entry(i) for i in range(self.q.shape[0])]
