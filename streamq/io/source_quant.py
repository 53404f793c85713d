"""Linears a source checkpoint ships compressed by compressed-tensors, dequantized one tensor at a time.

Kimi-K2-Thinking ships its routed experts as compressed-tensors ``pack-quantized`` INT4 (symmetric, groups of 32,
``targets: ["Linear"]`` with attention, shared experts and dense MLPs in ``ignore``); streamq's own outputs are
the same format. A packed Linear is stored as ``weight_packed`` int32 + ``weight_scale`` + ``weight_shape``
(+ ``weight_zero_point`` when asymmetric) and is read under its plain ``weight`` name.

Which scheme a Linear has is decided by compressed-tensors' own matching (``is_match``: ``re:`` targets, exact
names, or a class name such as ``Linear``, minus ``ignore``), and the weight is rebuilt by the compressor that
the config names (``PackedQuantizationCompressor.decompress``): the dense weight is exactly what
compressed-tensors, and so transformers and vLLM, make of the checkpoint. Only the Linear being read is
decompressed, on the device it is read to; nothing else of the model is held.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from streamq.errors import StreamqError

COMPONENTS = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_global_scale")
# Formats whose compressor streamq reads as a source (integers packed into int32).
SOURCE_FORMATS = ("pack-quantized",)


@dataclass(frozen=True)
class PackedScheme:
    """The config group a packed Linear belongs to, with its compressed-tensors scheme and format."""

    group: str
    scheme: Any  # compressed_tensors.quantization.QuantizationScheme
    format: str

    @property
    def bits(self) -> int:
        return int(self.scheme.weights.num_bits)

    @property
    def group_size(self) -> int:
        """Columns per scale (0: one scale per output channel)."""
        return int(self.scheme.weights.group_size or 0) if self.scheme.weights.strategy == "group" else 0

    @property
    def symmetric(self) -> bool:
        return bool(self.scheme.weights.symmetric)

    def components(self) -> tuple[str, ...]:
        """The tensors of one Linear in this format, named relative to the module."""
        return tuple(self.compressor().compression_param_names(self.scheme))

    def compressor(self) -> Any:
        from compressed_tensors.compressors import BaseCompressor

        return BaseCompressor.get_value_from_registry(self.format)

    def describe(self) -> str:
        grid = f"g{self.group_size}" if self.group_size else "per-channel"
        return f"INT{self.bits} {grid} {'sym' if self.symmetric else 'asym'} ({self.format})"


class CompressedSource:
    """The compressed-tensors ``quantization_config`` of a source checkpoint's config.json."""

    def __init__(self, qcfg: dict[str, Any], where: str) -> None:
        from compressed_tensors.quantization import QuantizationConfig

        self.where = where
        self.raw = qcfg
        try:
            self.config = QuantizationConfig.model_validate(qcfg)
        except Exception as exc:  # pydantic's ValidationError: report its first line only
            first = str(exc).strip().splitlines()
            raise StreamqError(
                f"{where}: quantization_config is not a valid compressed-tensors config ({' '.join(first[:3])}); "
                "fix it or download config.json again"
            ) from None
        self._linear = torch.nn.Linear(1, 1, device="meta")  # what a class target such as "Linear" matches

    @classmethod
    def from_config(cls, cfg: dict[str, Any], where: str) -> CompressedSource | None:
        qcfg = cfg.get("quantization_config") or {}
        return cls(qcfg, where) if qcfg.get("quant_method") == "compressed-tensors" else None

    def packs(self, module: str) -> bool:
        """Whether a config group quantizes the Linear ``module`` (compressed-tensors' matching)."""
        from compressed_tensors.utils.match import is_match

        ignore = list(self.config.ignore or [])
        return any(is_match(module, self._linear, s.targets, ignore) for s in self.config.config_groups.values())

    def scheme_of(self, module: str) -> PackedScheme:
        """The group whose targets match ``module`` and whose ``ignore`` does not (compressed-tensors' rule)."""
        from compressed_tensors.utils.match import is_match

        ignore = list(self.config.ignore or [])
        for name, scheme in self.config.config_groups.items():
            if is_match(module, self._linear, scheme.targets, ignore):
                fmt = scheme.format or self.config.format
                if fmt not in SOURCE_FORMATS:
                    raise StreamqError(
                        f"{self.where}: {module} is stored as {fmt!r} ({name}); streamq reads "
                        f"{', '.join(SOURCE_FORMATS)} sources (or bf16 / FP8 blocks): convert it to one of those"
                    )
                return PackedScheme(name, scheme, str(fmt))
        raise StreamqError(
            f"{self.where}: {module} has packed weights but no config group of quantization_config matches it "
            "(or it is in 'ignore'); the config does not describe these weights: download both again"
        )

    def dequantize(self, module: str, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """The dense weight of ``module`` from its stored tensors (named relative to the module), in the scale's
        dtype, exactly as compressed-tensors decompresses it."""
        scheme = self.scheme_of(module)
        state = dict(tensors)
        if "weight_shape" in state:
            state["weight_shape"] = torch.Size(int(d) for d in state["weight_shape"].tolist())
        return scheme.compressor().decompress(state, scheme.scheme)["weight"]


def logical_shape(scheme: PackedScheme, packed: tuple[int, ...], scale: tuple[int, ...]) -> tuple[int, int]:
    """[out, in] of a packed Linear from the stored shapes alone (headers): grouped scales pin ``in``; per channel
    the packed width gives it up to 32/bits columns, so the caller reads ``weight_shape`` instead."""
    if scheme.group_size:
        return packed[0], scale[-1] * scheme.group_size
    return packed[0], packed[-1] * 32 // scheme.bits
