"""NVFP4 and MXFP4 solved by streamq and read by compressed-tensors 0.20's own code.

For each format and solver, compressed-tensors' compressor must (a) decompress our tensors to exactly the
weight streamq solved, and (b) compress that weight, with our scales, into exactly our tensors. Its observer
formulas must give our scales, its config parser and transformers must accept our config, and the config must
select vLLM's weight-only FP4 schemes.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from compressed_tensors.compressors import BaseCompressor, ModelCompressor
from compressed_tensors.compressors.mxfp4.base import MXFP4PackedCompressor
from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
from compressed_tensors.quantization import QuantizationConfig, preset_name_to_scheme
from compressed_tensors.quantization.lifecycle.forward import quantize
from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam

from streamq.errors import StreamqError
from streamq.export.compressed_tensors import (
    fp8_passthrough_targets,
    pack_linear,
    packed_layout,
    quantization_config,
)
from streamq.solvers import SolveOptions, SolverConfig, gptq_quantize, rtn_quantize
from streamq.solvers.scheme import QuantResult, QuantScheme
from streamq.solvers.synthetic import random_problem

PRESETS = {"nvfp4": ("NVFP4A16", NVFP4PackedCompressor), "mxfp4": ("MXFP4A16", MXFP4PackedCompressor)}
FORMATS = list(PRESETS)


def ct_scheme(fmt: str):
    return preset_name_to_scheme(PRESETS[fmt][0], ["Linear"])


def their_compress(result: QuantResult, tensors: dict[str, torch.Tensor], fmt: str) -> dict[str, torch.Tensor]:
    """compressed-tensors' compressor run on our solved weight with the module state an observer would leave:
    float scales (NVFP4: the FP8 values, with the global scale)."""
    state = {"weight": result.weight}
    if fmt == "nvfp4":
        state["weight_scale"] = tensors["weight_scale"].float()
        state["weight_global_scale"] = tensors["weight_global_scale"]
    else:
        state["weight_scale"] = result.scale
    return PRESETS[fmt][1].compress(state, ct_scheme(fmt))


def solve(fmt: str, solver: str, w: torch.Tensor, h: torch.Tensor) -> QuantResult:
    scheme = QuantScheme.preset(fmt)  # type: ignore[arg-type]
    if solver == "rtn":
        return rtn_quantize(w, SolverConfig(scheme=scheme))
    actorder, _, rest = solver.removeprefix("gptq-").partition("-")
    cfg = SolverConfig(scheme=scheme, actorder=actorder, observer="mse" if rest == "mse" else "minmax")  # type: ignore[arg-type]
    if rest != "triton":
        return gptq_quantize(w, h, cfg, SolveOptions(backend="torch", sweep_width=16))
    # The Triton sweep: compiled on a GPU, Triton's interpreter on the CPU.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result = gptq_quantize(w.to(device), h.to(device), cfg, SolveOptions(backend="triton", sweep_width=16))
    fields = ("q", "scale", "zero_point", "g_idx", "weight", "global_scale")
    return QuantResult(**{f: None if getattr(result, f) is None else getattr(result, f).cpu() for f in fields})


SOLVERS = ["rtn", "gptq-weight", "gptq-none", "gptq-weight-mse", "gptq-none-triton"]


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_compressed_tensors_decompresses_exactly_what_streamq_solved(fmt: str, solver: str) -> None:
    # Two experts at once, as the pipeline solves them: each gets its own NVFP4 global scale.
    w, h = random_problem(2, 16, 64, seed=7)
    w[1] *= 40.0  # experts of very different magnitudes
    result = solve(fmt, solver, w.bfloat16(), h)
    scheme = QuantScheme.preset(fmt)  # type: ignore[arg-type]
    assert result.q.abs().max() <= 12 and result.weight.dtype == torch.bfloat16
    for part in result.unbatched():
        tensors = pack_linear(part, scheme)
        theirs = PRESETS[fmt][1].decompress(dict(tensors), ct_scheme(fmt))["weight"]
        assert theirs.dtype == torch.bfloat16
        assert torch.equal(theirs, part.weight)
        recompressed = their_compress(part, tensors, fmt)
        assert recompressed.keys() == tensors.keys()
        for name, tensor in tensors.items():
            assert recompressed[name].dtype == tensor.dtype and torch.equal(recompressed[name], tensor), name
    if fmt == "nvfp4":
        assert result.global_scale is not None and result.global_scale[1] < result.global_scale[0] / 10


@pytest.mark.parametrize("fmt", FORMATS)
def test_gptq_beats_rtn_on_its_objective(fmt: str) -> None:
    from streamq.solvers import hessian_weighted_error

    w, h = random_problem(1, 32, 128, seed=8)
    rtn = solve(fmt, "rtn", w, h)
    gptq = solve(fmt, "gptq-weight", w, h)
    assert hessian_weighted_error(w, gptq.weight, h).item() < 0.9 * hessian_weighted_error(w, rtn.weight, h).item()


@pytest.mark.parametrize("fmt", FORMATS)
def test_our_fp4_scales_and_codes_are_compressed_tensors_own(fmt: str) -> None:
    w, _ = random_problem(1, 16, 128, seed=9)
    w = w[0]
    scheme = QuantScheme.preset(fmt)  # type: ignore[arg-type]
    result = rtn_quantize(w, SolverConfig(scheme=scheme))
    tensors = pack_linear(result, scheme)
    args = ct_scheme(fmt).weights
    groups = w.unflatten(-1, (-1, scheme.group_size))
    gscale = generate_gparam(w.amin(), w.amax()) if fmt == "nvfp4" else None
    ct_scale, _ = calculate_qparams(groups.amin(-1), groups.amax(-1), args, global_scale=gscale)
    if fmt == "nvfp4":
        assert torch.equal(tensors["weight_global_scale"], gscale)
        assert torch.equal(tensors["weight_scale"].float(), ct_scale)
    else:
        assert torch.equal(result.scale, ct_scale)
    assert torch.equal(quantize(w, ct_scale, None, args, global_scale=gscale), result.q.float() / 2)


@pytest.mark.parametrize("fmt", FORMATS)
def test_fp4_config_is_the_preset_and_selects_vllms_weight_only_fp4(fmt: str) -> None:
    from transformers import CompressedTensorsConfig
    from transformers.integrations.compressed_tensors import get_experts_scheme

    scheme = QuantScheme.preset(fmt)  # type: ignore[arg-type]
    for fp8 in (None, fp8_passthrough_targets("experts")):
        cfg = quantization_config(scheme, SolverConfig(scheme=scheme), ignore=["lm_head"], fp8_targets=fp8)
        parsed = QuantizationConfig.model_validate(json.loads(json.dumps(cfg)))
        group = parsed.config_groups["group_0"]
        preset = ct_scheme(fmt)
        ignored = {"actorder", "observer"}  # informational: how the grid was fitted
        assert group.weights.model_dump(exclude=ignored) == preset.weights.model_dump(exclude=ignored)
        assert group.input_activations is None and group.output_activations is None
        assert parsed.format == ("mixed-precision" if fp8 else f"{fmt}-pack-quantized")
        assert BaseCompressor.get_value_from_registry(group.format) is PRESETS[fmt][1]
        assert set(PRESETS[fmt][1].compression_param_names(group)) == set(packed_layout(8, 64, scheme))
        # vLLM's compressed-tensors dispatch: weight-only FP4 is 4-bit float, symmetric, no input
        # activations, tensor_group/16 for NVFP4 and group/32 for MXFP4.
        w = group.weights
        assert (w.num_bits, w.type, w.symmetric) == (4, "float", True)
        assert (w.strategy, w.group_size) == (("tensor_group", 16) if fmt == "nvfp4" else ("group", 32))
        hf = CompressedTensorsConfig.from_dict({"quantization_config": cfg})
        ModelCompressor.from_compression_config(hf)
        assert get_experts_scheme(hf.quantization_config) is hf.quantization_config.config_groups["group_0"]


def test_fp4_schemes_are_fixed_and_exports_refuse_foreign_scales() -> None:
    with pytest.raises(ValueError, match="groups of 16"):
        QuantScheme(bits=4, group_size=128, format="nvfp4")
    with pytest.raises(ValueError, match="symmetric"):
        QuantScheme(bits=4, group_size=32, symmetric=False, format="mxfp4")
    w = random_problem(1, 8, 64, seed=10)[0][0]
    nv = rtn_quantize(w, SolverConfig(scheme=QuantScheme.preset("nvfp4")))
    with pytest.raises(StreamqError, match="global scale"):
        pack_linear(QuantResult(nv.q, nv.scale, None, None, nv.weight), QuantScheme.preset("nvfp4"))
    mx = rtn_quantize(w, SolverConfig(scheme=QuantScheme.preset("mxfp4")))
    mx.scale = mx.scale * 1.5
    with pytest.raises(StreamqError, match="powers of two"):
        pack_linear(mx, QuantScheme.preset("mxfp4"))
