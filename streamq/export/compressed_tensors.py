"""Quantized weights and their config in compressed-tensors' on-disk layout (checked against compressed-tensors 0.20).

Integer weights: format "pack-quantized" for every bit width streamq produces (2, 3, 4, 8). compressed-tensors
packs 1 to 8 bits in this one format; 8-bit weight-only is pack-quantized too ("int-quantized" is what it infers
only when activations are also quantized), and vLLM's WNA16 kernels read 4 and 8-bit pack-quantized weights.
Tensors of one Linear, named relative to the module:

* ``weight_packed`` int32 [out, ceil(in·bits/32)], packed by compressed-tensors' own ``pack_to_int32``. Codes
  are made unsigned (code + 2^(bits-1)) and each row is one little-endian bit stream: code j occupies bits
  [j·bits, (j+1)·bits), 32 bits to a word, so a 3-bit code may straddle two words. For 2, 4 and 8 bits nothing
  straddles and this is the classic "32/bits codes per int32, lowest bits first" layout that vLLM repacks for
  Marlin. 3 bits is the dense layout compressed-tensors 0.20 introduced (older releases left 2 bits of each word
  unused); no vLLM kernel reads 3 bits.
* ``weight_scale`` [out, groups] (channel: [out, 1]) in ``scale_dtype``, multiplying: w = (q - zero_point)·scale.
  bfloat16 by default: vLLM copies scales into parameters of the model dtype and compressed-tensors dequantizes
  in the scale's dtype, so bf16 is what gets served. The scales must already be exact in that dtype (the solver
  rounds them before computing codes); otherwise the checkpoint would not reproduce ``QuantResult.weight`` and
  exporting raises.
* ``weight_shape`` int64 [2] = (out, in); the packed width alone does not pin down ``in`` for 3 bits.
* ``weight_zero_point``, asymmetric only: int32 [ceil(out·bits/32), groups], the same bit stream run down the
  output dimension (compressed-tensors packs zero points with packed_dim=0; vLLM's loaders expect that).
* never ``weight_g_idx``: compressed-tensors 0.20 removed actorder "group" (its QuantizationArgs rejects the
  value and nothing reads g_idx any more), so a g_idx that really permutes groups cannot be exported; a trivial
  one (natural order, or per channel) is dropped.

FP4 weights (``QuantScheme.format`` "nvfp4" / "mxfp4"): compressed-tensors' NVFP4A16 and MXFP4A16 presets, in
its "nvfp4-pack-quantized" and "mxfp4-pack-quantized" formats, tensors as its NVFP4/MXFP4 compressors write them:

* ``weight_packed`` uint8 [out, in/2]: two E2M1 codes a byte, the even column in the low nibble; a code is
  sign (bit 3) and the index of |value| in 0, 0.5, 1, 1.5, 2, 3, 4, 6 (packed by compressed-tensors'
  ``pack_fp4_to_uint8``).
* NVFP4: ``weight_scale`` float8_e4m3fn [out, in/16] and ``weight_global_scale`` float32 [1]; the weight is
  ``value * (weight_scale / weight_global_scale)``, the quotient taken in float32 (compressed-tensors' and
  vLLM's order). One global scale per Linear, so gate and up, solved together, share it (vLLM's fused
  w13 reads a single one).
* MXFP4: ``weight_scale`` uint8 [out, in/32], the biased exponent (E8M0, bias 127) of a power-of-two scale.
* no ``weight_shape`` and no zero point (both presets are symmetric), no ``weight_g_idx``.
* activations: none (the A16 presets). The W4A4 presets need, for NVFP4, an ``input_global_scale`` per Linear
  calibrated from activation maxima, which streamq does not collect.

compressed-tensors decompresses both into the model's dtype after one float32 product, so the served weight is
``QuantResult.weight`` rounded once to that dtype (exactly ``QuantResult.weight`` when the solver ran on bf16
weights, as the pipeline's are).

FP8 weights kept as shipped: format "float-quantized", strategy "block" with block_structure [128, 128], and
dynamic per-token-group (128) FP8 activations: DeepSeek-V3's own recipe, and what vLLM's W8A8-FP8 block path
expects. DeepSeek's ``weight_scale_inv`` already multiplies (w = fp8·scale_inv), exactly like compressed-tensors'
``weight_scale``, so it is renamed, not inverted, and kept in float32 (vLLM's block-scale parameter is float32).

Config and module names. Checkpoints keep DeepSeek's per-expert names (``model.layers.N.mlp.experts.E.gate_proj``),
which vLLM's DeepSeek loader maps onto its fused MoE parameters (``experts.w13_weight_packed`` ...) and
transformers 5 merges into ``mlp.experts.gate_up_proj`` / ``down_proj`` after decompressing. Targets are ``re:``
regexes, matched with ``re.match`` against module names by compressed-tensors and vLLM alike. vLLM picks the
scheme of a fused MoE layer by probing ``<layer>.experts.0.{gate,up,down}_proj`` and requires all three to agree,
and it fuses gate/up and q_a/kv_a into single Linears, so scopes are whole projection families. Every config
group carries its own ``format`` ("mixed-precision" is only a summary; no compressor by that name exists).
transformers 5.23 decompresses all fused experts with the first group whose ``re:`` targets contain the substring
"experts", and every other module with the first group whose targets do not: so the integer group comes first
and the FP8 regexes avoid the word "experts" (shared experts are matched as ``mlp.shared_\\w+``). The MTP layers
(index >= ``num_hidden_layers``) and anything else to leave alone go in ``ignore``; see ``mtp_ignore``.

Mixed recipes (``recipe.Plan``): one config group per distinct quantized scheme, its targets the families that
scheme quantizes (routed experts first, so the experts' group comes first), then one FP8 block group for the
families kept in FP8; families left in bf16 go in ``ignore``. The top-level ``format`` is what compressed-tensors'
own ``ModelCompressor`` infers for the same model: the groups' format when they share one, else
"mixed-precision". transformers 5.24's ``dequantize=True`` load decompresses every non-expert module with one group
(see above), so it reads a mixed output correctly only when the non-expert families use at most one quantized
scheme; vLLM and compressed-tensors match each module against every group's targets.

Loading in transformers 5.23: ``AutoModelForCausalLM.from_pretrained(path,
quantization_config=CompressedTensorsConfig(dequantize=True))`` gives a dense model. Two limits there: fused
experts are decompressed without their zero points, so asymmetric experts fail to load; and decompressed experts
keep the scale dtype (bf16) even when another ``dtype`` is requested.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Literal

import compressed_tensors
import torch
from compressed_tensors.compressors import pack_to_int32
from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8

from streamq.errors import StreamqError
from streamq.groups import Family
from streamq.solvers.scheme import QuantResult, QuantScheme, SolverConfig

if TYPE_CHECKING:
    from streamq.recipe import Plan

Scope = Literal["experts", "all"]

PACK_QUANTIZED = "pack-quantized"
NVFP4_PACK_QUANTIZED = "nvfp4-pack-quantized"
MXFP4_PACK_QUANTIZED = "mxfp4-pack-quantized"
_COMPRESSION_FORMAT = {"int": PACK_QUANTIZED, "nvfp4": NVFP4_PACK_QUANTIZED, "mxfp4": MXFP4_PACK_QUANTIZED}
# The weight arguments of compressed-tensors' NVFP4A16 / MXFP4A16 presets, as its QuantizationArgs serialise them.
_FP4_WEIGHTS = {
    "nvfp4": {"strategy": "tensor_group", "group_size": 16, "scale_dtype": "torch.float8_e4m3fn"},
    "mxfp4": {"strategy": "group", "group_size": 32, "scale_dtype": "torch.uint8"},
}
FLOAT_QUANTIZED = "float-quantized"
MIXED_PRECISION = "mixed-precision"

ROUTED_EXPERTS = r"re:.*mlp\.experts\.\d+\.(gate|up|down)_proj$"
# Dense MLPs and shared experts; deliberately free of the word "experts" (see the module docstring).
DENSE_MLPS = r"re:.*mlp\.(shared_\w+\.)?(gate|up|down)_proj$"
SHARED_MLPS = r"re:.*mlp\.shared_\w+\.(gate|up|down)_proj$"
DENSE_BLOCK_MLPS = r"re:.*mlp\.(gate|up|down)_proj$"
ATTENTION = r"re:.*self_attn\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)$"
# DeepSeek-V3.2's indexer is never quantized (it only ranks keys, and no loader has a scheme for it): its Linears
# are ignored, except wq_b and wk when they keep the source's FP8 blocks (they then join the FP8 group).
INDEXER_LINEARS = r"re:.*self_attn\.indexer\.(wq_b|wk|weights_proj)$"
INDEXER_FP8 = r"re:.*self_attn\.indexer\.(wq_b|wk)$"
INDEXER_BF16 = r"re:.*self_attn\.indexer\.weights_proj$"
# What a loader must skip for families written in bf16 (the entries the one-scheme outputs have always carried).
_IGNORE_ATTENTION = r"re:.*self_attn\..*"
_IGNORE_MLPS = {
    frozenset({Family.SHARED, Family.DENSE}): r"re:.*mlp\.(shared_experts\.)?(gate|up|down)_proj$",
    frozenset({Family.SHARED}): r"re:.*mlp\.shared_experts\.(gate|up|down)_proj$",
    frozenset({Family.DENSE}): r"re:.*mlp\.(gate|up|down)_proj$",
}

_NO_GROUP_ACTORDER = (
    'actorder "group" (a g_idx that permutes groups) cannot be exported: compressed-tensors 0.20 removed it; '
    'quantize with actorder "weight"'
)
_SCOPE_TARGETS: dict[str, tuple[str, ...]] = {
    "experts": (ROUTED_EXPERTS,),
    "all": (ROUTED_EXPERTS, DENSE_MLPS, ATTENTION),
}


def int_targets(scope: Scope) -> list[str]:
    """The modules the integer group quantizes."""
    if scope not in _SCOPE_TARGETS:
        raise StreamqError(f"scope {scope!r} is not supported; use one of {', '.join(_SCOPE_TARGETS)}")
    return list(_SCOPE_TARGETS[scope])


def fp8_passthrough_targets(scope: Scope) -> list[str]:
    """The decoder Linears a DeepSeek FP8 checkpoint ships in FP8 that ``scope`` leaves unquantized."""
    return [t for t in _SCOPE_TARGETS["all"] if t not in int_targets(scope)]


def family_targets(families: Collection[Family]) -> list[str]:
    """The ``re:`` targets of ``families``, in FAMILIES order; shared experts and dense MLPs together are one regex
    (the one one-scheme outputs carry)."""
    targets = [ROUTED_EXPERTS] if Family.EXPERTS in families else []
    mlps = frozenset(families) & {Family.SHARED, Family.DENSE}
    if mlps:
        targets.append(DENSE_MLPS if len(mlps) == 2 else SHARED_MLPS if Family.SHARED in mlps else DENSE_BLOCK_MLPS)
    return targets + ([ATTENTION] if Family.ATTENTION in families else [])


def bf16_ignore(families: Collection[Family]) -> list[str]:
    """Ignore entries for the decoder families written unquantized in bf16."""
    ignore = [_IGNORE_ATTENTION] if Family.ATTENTION in families else []
    mlps = frozenset(families) & {Family.SHARED, Family.DENSE}
    return ignore + ([_IGNORE_MLPS[mlps]] if mlps else [])


def mtp_ignore(num_hidden_layers: int, num_nextn_predict_layers: int) -> list[str]:
    """Ignore entries for the multi-token-prediction layers stored after the decoder layers."""
    return [rf"re:.*layers\.{i}\." for i in range(num_hidden_layers, num_hidden_layers + num_nextn_predict_layers)]


def pack_linear(
    result: QuantResult, scheme: QuantScheme, scale_dtype: torch.dtype = torch.bfloat16
) -> dict[str, torch.Tensor]:
    """The compressed tensors of one quantized Linear [out, in], named relative to the module. ``scale_dtype``
    is the stored scale dtype of integer schemes; FP4 formats store their scales as the format says."""
    _check_result(result, scheme)
    if scheme.format != "int":
        return _pack_fp4(result, scheme)
    tensors = {
        "weight_packed": pack_to_int32(result.q, scheme.bits),
        "weight_scale": _exact_scale(result.scale, scale_dtype),
        "weight_shape": torch.tensor(result.q.shape, dtype=torch.int64, device=result.q.device),
    }
    if result.zero_point is not None:
        tensors["weight_zero_point"] = pack_to_int32(result.zero_point, scheme.bits, packed_dim=0)
    return tensors


def packed_layout(
    out_features: int, in_features: int, scheme: QuantScheme, scale_dtype: torch.dtype = torch.bfloat16
) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Dtype and shape of each tensor ``pack_linear`` writes for an [out, in] Linear, without any data: a shard's
    header can be laid out before (or by another process than) the one that solves the weights."""
    if scheme.format != "int":
        layout = {
            "weight_packed": (torch.uint8, (out_features, in_features // 2)),
            "weight_scale": (scheme.scale_torch_dtype, (out_features, scheme.num_groups(in_features))),
        }
        if scheme.scale_code == "fp8_global":
            layout["weight_global_scale"] = (torch.float32, (1,))
        return layout
    words = -(-in_features * scheme.bits // 32)
    groups = scheme.num_groups(in_features)
    layout = {
        "weight_packed": (torch.int32, (out_features, words)),
        "weight_scale": (scale_dtype, (out_features, groups)),
        "weight_shape": (torch.int64, (2,)),
    }
    if not scheme.symmetric:
        layout["weight_zero_point"] = (torch.int32, (-(-out_features * scheme.bits // 32), groups))
    return layout


def quantization_config(
    scheme: QuantScheme,
    solver_cfg: SolverConfig,
    *,
    ignore: list[str],
    fp8_targets: list[str] | None = None,
    scope: Scope = "experts",
    fp8_block: tuple[int, int] = (128, 128),
) -> dict[str, Any]:
    """The ``quantization_config`` of one quantized scheme over ``scope``, with ``fp8_targets`` kept in FP8 blocks
    (a plan's config, ``plan_quantization_config``, for callers that hold one scheme and target regexes)."""
    if solver_cfg.scheme != scheme:
        raise ValueError(f"solver config was run with {solver_cfg.scheme}, not {scheme}")
    targets = int_targets(scope)
    overlap = sorted(set(targets) & set(fp8_targets or ()))
    if overlap:
        raise StreamqError(f"{overlap} are both quantized and kept in FP8; drop them from fp8_targets")
    groups = [_quantized_group(scheme, solver_cfg, targets)]
    if fp8_targets:
        groups.append(_fp8_block_group(fp8_targets, fp8_block))
    return _config(groups, ignore)


def plan_quantization_config(
    plan: Plan,
    solver_cfg: SolverConfig,
    *,
    ignore: list[str],
    fp8_block: tuple[int, int] = (128, 128),
    fp8_extra: list[str] | None = None,
) -> dict[str, Any]:
    """The ``quantization_config`` of a run's plan: one group per quantized scheme (targets: its families), one
    FP8 block group for the families kept in FP8 and the ``fp8_extra`` targets that travel with them (see the
    module docstring)."""
    groups = [
        _quantized_group(scheme, replace(solver_cfg, scheme=scheme), family_targets(families))
        for scheme, families in plan.by_scheme().items()
    ]
    if plan.kept("fp8"):
        groups.append(_fp8_block_group(family_targets(plan.kept("fp8")) + list(fp8_extra or ()), fp8_block))
    return _config(groups, ignore)


def _config(groups: list[dict[str, Any]], ignore: list[str]) -> dict[str, Any]:
    formats = {group["format"] for group in groups}
    return {
        "quant_method": "compressed-tensors",
        # compressed-tensors' own inference (compressors/format.py): one format, or "mixed-precision".
        "format": formats.pop() if len(formats) == 1 else MIXED_PRECISION,
        "quantization_status": "compressed",
        "config_groups": {f"group_{i}": group for i, group in enumerate(groups)},
        "ignore": list(ignore),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "version": compressed_tensors.__version__,
    }


def _quantized_group(scheme: QuantScheme, solver_cfg: SolverConfig, targets: list[str]) -> dict[str, Any]:
    if scheme.format != "int":
        return _fp4_group(scheme, solver_cfg, targets)
    per_channel = scheme.group_size == 0
    return {
        "targets": targets,
        "format": PACK_QUANTIZED,
        "weights": {
            "num_bits": scheme.bits,
            "type": "int",
            "symmetric": scheme.symmetric,
            "strategy": "channel" if per_channel else "group",
            "group_size": None if per_channel else scheme.group_size,
            "actorder": _actorder(solver_cfg, per_channel),
            "dynamic": False,
            "observer": solver_cfg.observer,
        },
        "input_activations": None,
        "output_activations": None,
    }


def _fp4_group(scheme: QuantScheme, solver_cfg: SolverConfig, targets: list[str]) -> dict[str, Any]:
    weights = {"num_bits": 4, "type": "float", "symmetric": True, **_FP4_WEIGHTS[scheme.format]}
    weights.update(actorder=_actorder(solver_cfg, per_channel=False), dynamic=False, observer=solver_cfg.observer)
    return {
        "targets": targets,
        "format": _COMPRESSION_FORMAT[scheme.format],
        "weights": weights,
        "input_activations": None,
        "output_activations": None,
    }


def _pack_fp4(result: QuantResult, scheme: QuantScheme) -> dict[str, torch.Tensor]:
    values = result.q.float() * scheme.grid.unit  # exact: E2M1 values are multiples of the unit
    tensors = {"weight_packed": pack_fp4_to_uint8(values)}
    if scheme.scale_code == "fp8_global":
        tensors["weight_scale"], tensors["weight_global_scale"] = _fp8_global_scales(result)
    else:
        tensors["weight_scale"] = _e8m0_scales(result.scale)
    return tensors


def _fp8_global_scales(result: QuantResult) -> tuple[torch.Tensor, torch.Tensor]:
    if result.global_scale is None or result.global_scale.numel() != 1:
        raise StreamqError(
            "an NVFP4 result needs its matrix's global scale (QuantResult.global_scale, one value); keep it when "
            "slicing a solver result"
        )
    gscale = result.global_scale.reshape(1).to(torch.float32)
    fp8 = (result.scale * gscale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    if not torch.equal(fp8.float() / gscale, result.scale):
        raise StreamqError(
            "NVFP4 scales are not FP8 E4M3 group scales over the global scale, so the checkpoint would not "
            "reproduce the solved weight; solve with the nvfp4 scheme"
        )
    return fp8, gscale


def _e8m0_scales(scale: torch.Tensor) -> torch.Tensor:
    significand, exponent = torch.frexp(scale)
    biased = exponent - 1 + 127
    if not (torch.all(significand == 0.5) and torch.all((biased >= 0) & (biased <= 254))):
        raise StreamqError(
            "MXFP4 scales must be powers of two within E8M0's range, or the checkpoint would not reproduce the "
            "solved weight; solve with the mxfp4 scheme"
        )
    return biased.to(torch.uint8)


def _actorder(solver_cfg: SolverConfig, per_channel: bool) -> str | None:
    """The declared actorder. It is informational for "weight" (same tensors as none), and "group" is only
    expressible per channel, where every column shares one group and it means the same as "weight"."""
    if solver_cfg.actorder == "none":
        return None
    if solver_cfg.actorder == "group" and not per_channel:
        raise StreamqError(_NO_GROUP_ACTORDER)
    return "weight"


def _fp8_block_group(targets: list[str], block: tuple[int, int]) -> dict[str, Any]:
    if any("experts" in target for target in targets):
        # transformers would pick this group for the fused routed experts (see the module docstring).
        raise StreamqError(
            f"FP8 targets {targets} contain the word 'experts', which transformers reads as the experts' "
            r"group; match shared experts as 'mlp\.shared_\w+' instead"
        )
    return {
        "targets": list(targets),
        "format": FLOAT_QUANTIZED,
        "weights": {
            "num_bits": 8,
            "type": "float",
            "symmetric": True,
            "strategy": "block",
            "block_structure": list(block),
            "dynamic": False,
        },
        "input_activations": {
            "num_bits": 8,
            "type": "float",
            "symmetric": True,
            "strategy": "group",
            "group_size": block[1],
            "dynamic": True,
        },
        "output_activations": None,
    }


def _check_result(result: QuantResult, scheme: QuantScheme) -> None:
    if result.q.dim() != 2:
        raise ValueError("pack_linear takes one matrix [out, in]; split stacked experts with QuantResult.unbatched")
    out_features, in_features = result.q.shape
    if scheme.group_size and in_features % scheme.group_size:
        raise StreamqError(
            f"in_features {in_features} is not a multiple of group_size {scheme.group_size}, which "
            "compressed-tensors and vLLM require; choose a group size that divides it or group_size 0"
        )
    _check_codes(result.q, scheme, "codes")
    groups = scheme.num_groups(in_features)
    if tuple(result.scale.shape) != (out_features, groups):
        raise ValueError(f"scale has shape {tuple(result.scale.shape)}, expected {(out_features, groups)}")
    if scheme.symmetric != (result.zero_point is None):
        raise ValueError(f"zero_point must be given exactly when the scheme is asymmetric ({scheme})")
    if result.zero_point is not None:
        if tuple(result.zero_point.shape) != (out_features, groups):
            raise ValueError(
                f"zero_point has shape {tuple(result.zero_point.shape)}, expected {(out_features, groups)}"
            )
        _check_codes(result.zero_point, scheme, "zero points")
    if result.g_idx is not None and not _is_natural_order(result.g_idx, in_features, scheme):
        raise StreamqError(_NO_GROUP_ACTORDER)


def _check_codes(values: torch.Tensor, scheme: QuantScheme, what: str) -> None:
    if values.dtype != torch.int8:
        raise ValueError(f"{what} must be int8, got {values.dtype}")
    grid = scheme.grid
    if values.numel() and (values.min() < grid.code_min or values.max() > grid.code_max):
        raise ValueError(f"{what} leave [{grid.code_min}, {grid.code_max}], the code range of {_describe(scheme)}")
    on_grid = grid.uniform or torch.equal(grid.round(values.float() * grid.unit), values.float() * grid.unit)
    if not on_grid:
        raise ValueError(f"{what} are not all {scheme.format} grid values")


def _describe(scheme: QuantScheme) -> str:
    return f"{scheme.bits}-bit integers" if scheme.format == "int" else scheme.format


def _is_natural_order(g_idx: torch.Tensor, in_features: int, scheme: QuantScheme) -> bool:
    if tuple(g_idx.shape) != (in_features,):
        raise ValueError(f"g_idx has shape {tuple(g_idx.shape)}, expected ({in_features},)")
    columns = torch.arange(in_features, device=g_idx.device)
    natural = torch.zeros_like(columns) if scheme.group_size == 0 else columns // scheme.group_size
    return bool(torch.equal(g_idx.to(natural.dtype), natural))


def _exact_scale(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    cast = scale.to(dtype)
    if not torch.isfinite(scale).all():
        raise StreamqError("scales contain NaN or Inf; check the solver's fallbacks for this matrix")
    if not torch.equal(cast.to(scale.dtype), scale):
        raise StreamqError(
            f"scales are not exactly representable in {dtype}, so the checkpoint would not reproduce the solved "
            f"weight; have the solver round scales to {dtype} before computing codes, or pass that scale_dtype"
        )
    return cast
