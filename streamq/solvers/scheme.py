"""What a quantized weight looks like, shared by the solvers and the exporter.

Integer codes follow compressed-tensors' convention: signed integers in [-2**(bits-1), 2**(bits-1) - 1]
for symmetric and asymmetric schemes alike, dequantized as ``(q - zero_point) * scale``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

ActOrder = Literal["none", "weight", "group"]
Observer = Literal["minmax", "mse"]


@dataclass(frozen=True)
class QuantScheme:
    """The integer grid: what the exported checkpoint declares."""

    bits: int = 4
    group_size: int = 128  # 0 means one scale per output channel
    symmetric: bool = True
    # Scales are rounded to the dtype they are stored and served in (vLLM keeps them in the model's dtype) before
    # any code is chosen, so the checkpoint reproduces the solved weight exactly.
    scale_dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        if self.bits not in (2, 3, 4, 8):
            raise ValueError(f"bits must be 2, 3, 4 or 8, not {self.bits}")
        if self.group_size < 0:
            raise ValueError(f"group_size must be >= 0 (0 = per channel), not {self.group_size}")
        if self.scale_dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError(f"scale_dtype must be bfloat16, float16 or float32, not {self.scale_dtype}")

    @property
    def scale_torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.scale_dtype)

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


@dataclass
class QuantResult:
    """Solver output for one matrix [out, in] or a batch [E, out, in] (every tensor then has the leading E).

    ``fallbacks`` counts, per reason, the matrices the solver could not treat normally (dead columns are
    not fallbacks; an all-zero Hessian, a non-positive-definite one that needed more damping, NaN/Inf input).
    """

    q: torch.Tensor  # int8 codes, [.., out, in]
    scale: torch.Tensor  # float32, [.., out, num_groups]
    zero_point: torch.Tensor | None  # int8, [.., out, num_groups]; None when symmetric
    g_idx: torch.Tensor | None  # int32, [.., in]; only for actorder="group"
    weight: torch.Tensor  # dequantized weight, [.., out, in], in the input's dtype
    fallbacks: dict[str, int] = field(default_factory=dict)

    def entry(self, index: int) -> QuantResult:
        """Entry ``index`` of a batched result (its fallbacks stay with the batch)."""
        return QuantResult(
            q=self.q[index],
            scale=self.scale[index],
            zero_point=None if self.zero_point is None else self.zero_point[index],
            g_idx=None if self.g_idx is None else self.g_idx[index],
            weight=self.weight[index],
        )

    def rows(self, first: int, stop: int) -> QuantResult:
        """Output rows [first, stop) of one matrix's result (members of a group solved with rows stacked)."""
        return QuantResult(
            q=self.q[first:stop],
            scale=self.scale[first:stop],
            zero_point=None if self.zero_point is None else self.zero_point[first:stop],
            g_idx=self.g_idx,
            weight=self.weight[first:stop],
        )

    def unbatched(self) -> list[QuantResult]:
        """Every entry of a batched result."""
        return [self.entry(i) for i in range(self.q.shape[0])]
