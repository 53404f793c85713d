"""The weight formats a synthetic checkpoint's Linears can be stored in, as real releases ship them.

* ``fp8``: DeepSeek-V3/R1's release: float8 e4m3 with float32 ``weight_scale_inv`` per 128 x 128 block.
* ``bf16``: an unquantized release (no ``quantization_config``), e.g. a bf16 fine-tune or V2-Lite.
* ``int4``: Kimi-K2-Thinking's release: routed experts as compressed-tensors ``pack-quantized`` INT4, symmetric,
  one bf16 scale per 32 input columns, ``targets: ["Linear"]``; attention, shared experts, dense MLPs and
  ``lm_head`` in ``ignore`` and stored in bf16. The packed tensors are written by compressed-tensors' own
  compressor, from scales that round-to-nearest chooses per group.
"""

from __future__ import annotations

from typing import Any

import torch

SOURCE_FORMATS = ("fp8", "bf16", "int4")
FP8_BLOCK = (128, 128)
INT4_GROUP = 32
# What Kimi-K2-Thinking leaves in bf16; the MTP layer's extra Linears are added when the checkpoint has one.
INT4_IGNORE = ["lm_head", r"re:.*self_attn.*", r"re:.*shared_experts.*", r"re:.*mlp\.(gate|up|gate_up|down)_proj.*"]
MTP_LINEARS = [r"re:.*\.eh_proj$", r"re:.*\.shared_head\.head$"]


def check_source_format(fmt: str) -> None:
    if fmt not in SOURCE_FORMATS:
        raise ValueError(f"unknown source format {fmt!r}; choose one of {', '.join(SOURCE_FORMATS)}")


def check_int4_widths(cfg: dict[str, Any]) -> None:
    """Packed experts need whole groups of 32 input columns in both of their shapes."""
    for field in ("hidden_size", "moe_intermediate_size"):
        if int(cfg[field]) % INT4_GROUP:
            raise ValueError(f"{field} {cfg[field]} is not a multiple of {INT4_GROUP}, which int4 experts need")


def quantization_config(fmt: str, mtp: bool) -> dict[str, Any] | None:
    """config.json's ``quantization_config`` for a checkpoint stored in ``fmt`` (None: unquantized)."""
    check_source_format(fmt)
    if fmt == "bf16":
        return None
    if fmt == "fp8":
        return {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [*FP8_BLOCK]}
    weights = {
        "actorder": None,
        "block_structure": None,
        "dynamic": False,
        "group_size": INT4_GROUP,
        "num_bits": 4,
        "observer": "minmax",
        "observer_kwargs": {},
        "strategy": "group",
        "symmetric": True,
        "type": "int",
    }
    group = {"input_activations": None, "output_activations": None, "targets": ["Linear"], "weights": weights}
    return {
        "config_groups": {"group_0": group},
        "format": "pack-quantized",
        "ignore": INT4_IGNORE + (MTP_LINEARS if mtp else []),
        "kv_cache_scheme": None,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
    }


def linear_kind(qcfg: dict[str, Any] | None, module: str) -> str:
    """How the Linear ``module`` is stored under ``qcfg``: "linear" (FP8 + scale), "dense" (bf16) or "packed"."""
    if qcfg is None:
        return "dense"
    if qcfg.get("quant_method") == "fp8":
        return "linear"
    from streamq.io.source_quant import CompressedSource

    return "packed" if CompressedSource(qcfg, "synthetic config").packs(module) else "dense"


def pack_int4_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows`` [r, in] as compressed-tensors packs them: (``weight_packed`` int32, ``weight_scale`` bf16)."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    groups = rows.float().unflatten(-1, (-1, INT4_GROUP))
    # Symmetric round to nearest onto [-8, 7]; the scale is rounded to bf16 first so that it is the stored one.
    scale = (groups.abs().amax(dim=-1) / 7.5).clamp(min=1e-8).to(torch.bfloat16)
    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=INT4_GROUP)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    compressor = BaseCompressor.get_value_from_registry("pack-quantized")
    packed = compressor.compress({"weight": rows.to(torch.bfloat16), "weight_scale": scale}, scheme)
    return packed["weight_packed"], scale
