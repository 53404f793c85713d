"""The compressed-tensors exporter, checked against compressed-tensors' and transformers' own loaders."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from compressed_tensors.compressors import BaseCompressor, ModelCompressor
from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme, apply_quantization_config
from compressed_tensors.utils.match import match_name
from export_helpers import fp8_block_linear, with_prefix
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, CompressedTensorsConfig, DeepseekV3Config, DeepseekV3ForCausalLM
from transformers.integrations.compressed_tensors import get_dense_scheme, get_experts_scheme

from streamq.errors import StreamqError
from streamq.export.compressed_tensors import (
    fp8_passthrough_targets,
    int_targets,
    mtp_ignore,
    pack_linear,
    packed_layout,
    quantization_config,
)
from streamq.solvers import rtn_quantize
from streamq.solvers.scheme import QuantResult, QuantScheme, SolverConfig

BITS = (2, 3, 4, 8)
NVFP4, MXFP4 = QuantScheme.preset("nvfp4"), QuantScheme.preset("mxfp4")


def rtn(weight: torch.Tensor, scheme: QuantScheme, scale_dtype: torch.dtype = torch.bfloat16) -> QuantResult:
    """Round-to-nearest stand-in for the GPTQ solver, honouring its contract: signed codes, scales exact in
    ``scale_dtype``, ``weight`` = (q - zero_point)·scale. FP4 formats: streamq's own RTN."""
    if scheme.format != "int":
        return rtn_quantize(weight, SolverConfig(scheme=scheme))
    group = scheme.group_size or weight.shape[-1]
    w = weight.float().unflatten(-1, (-1, group))
    lo, hi = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)
    span = torch.maximum(-lo, hi) / scheme.qmax if scheme.symmetric else (hi - lo) / (2**scheme.bits - 1)
    scale = span.clamp(min=1e-6).to(scale_dtype).float()
    zero = torch.zeros_like(scale) if scheme.symmetric else (scheme.qmin - torch.round(lo / scale))
    zero = zero.clamp(scheme.qmin, scheme.qmax)
    q = (torch.round(w / scale[..., None]) + zero[..., None]).clamp(scheme.qmin, scheme.qmax)
    return QuantResult(
        q=q.flatten(-2).to(torch.int8),
        scale=scale,
        zero_point=None if scheme.symmetric else zero.to(torch.int8),
        g_idx=None,
        weight=((q - zero[..., None]) * scale[..., None]).flatten(-2).to(weight.dtype),
    )


def ct_scheme(scheme: QuantScheme, actorder: str = "weight") -> QuantizationScheme:
    cfg = quantization_config(scheme, SolverConfig(scheme=scheme, actorder=actorder), ignore=[])
    return QuantizationConfig.model_validate(cfg).config_groups["group_0"]


def random_weight(out_features: int, in_features: int, seed: int) -> torch.Tensor:
    return torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed))


# Shapes with partial int32 words both along rows (weight) and down columns (zero points).
@pytest.mark.parametrize("shape_group", [((12, 48), 16), ((7, 40), 0)], ids=["group16", "channel"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("bits", BITS)
def test_pack_linear_is_bit_equal_to_compressed_tensors(bits: int, symmetric: bool, shape_group: tuple) -> None:
    shape, group_size = shape_group
    scheme = QuantScheme(bits=bits, group_size=group_size, symmetric=symmetric)
    result = rtn(random_weight(*shape, seed=bits), scheme)
    ours = pack_linear(result, scheme)

    # compressed-tensors re-derives the codes from the dequantized weight, its scale and zero point; the fp32
    # weight makes that exact, so any difference is in the packing.
    state = {"weight": result.weight.float(), "weight_scale": result.scale.to(torch.bfloat16)}
    if not symmetric:
        state["weight_zero_point"] = result.zero_point
    theirs = BaseCompressor.get_value_from_registry("pack-quantized").compress(state, ct_scheme(scheme))

    assert ours.keys() == theirs.keys()
    for name, tensor in ours.items():
        assert tensor.dtype == theirs[name].dtype, name
        assert torch.equal(tensor, theirs[name]), name


def bit_stream(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """The documented layout, the slow way: each row one little-endian stream of unsigned codes cut into int32s.
    For 2, 4 and 8 bits that is vLLM's "32/bits codes per int32, lowest bits first"."""
    words_per_row = -(-codes.shape[1] * bits // 32)
    rows = []
    for row in codes.tolist():
        stream = sum((code + 2 ** (bits - 1)) << (j * bits) for j, code in enumerate(row))
        words = [(stream >> (32 * k)) & 0xFFFFFFFF for k in range(words_per_row)]
        rows.append([word - 2**32 if word >= 2**31 else word for word in words])
    return torch.tensor(rows, dtype=torch.int32)


@pytest.mark.parametrize("bits", BITS)
def test_packed_layout_is_the_documented_bit_stream(bits: int) -> None:
    scheme = QuantScheme(bits=bits, group_size=0, symmetric=False)
    result = rtn(random_weight(7, 40, seed=20 + bits), scheme)
    tensors = pack_linear(result, scheme)
    assert torch.equal(tensors["weight_packed"], bit_stream(result.q, bits))
    assert torch.equal(tensors["weight_zero_point"], bit_stream(result.zero_point.t(), bits).t())
    assert tensors["weight_shape"].tolist() == [7, 40]


@pytest.mark.parametrize("bits", BITS)
def test_pack_linear_decompresses_to_the_solved_weight(bits: int) -> None:
    scheme = QuantScheme(bits=bits, group_size=32, symmetric=False)
    result = rtn(random_weight(24, 96, seed=10 + bits), scheme)
    state = BaseCompressor.get_value_from_registry("pack-quantized").decompress(
        pack_linear(result, scheme), ct_scheme(scheme)
    )
    assert state["weight"].dtype == torch.bfloat16
    assert torch.equal(state["weight"], result.weight.to(torch.bfloat16))


def test_trivial_g_idx_is_dropped_and_a_real_one_refused() -> None:
    scheme = QuantScheme(bits=4, group_size=16)
    result = rtn(random_weight(8, 64, seed=1), scheme)
    plain = pack_linear(result, scheme)
    result.g_idx = (torch.arange(64) // 16).to(torch.int32)
    assert pack_linear(result, scheme).keys() == plain.keys()
    result.g_idx = result.g_idx[torch.randperm(64, generator=torch.Generator().manual_seed(0))]
    with pytest.raises(StreamqError, match="actorder"):
        pack_linear(result, scheme)


def test_pack_linear_refuses_what_no_loader_can_read() -> None:
    scheme = QuantScheme(bits=4, group_size=16)
    with pytest.raises(StreamqError, match="group_size 16"):
        pack_linear(rtn(random_weight(8, 40, seed=2), QuantScheme(bits=4, group_size=8)), scheme)

    result = rtn(random_weight(8, 64, seed=3), scheme, scale_dtype=torch.float32)
    with pytest.raises(StreamqError, match="bfloat16"):
        pack_linear(result, scheme)
    assert pack_linear(result, scheme, scale_dtype=torch.float32)["weight_scale"].dtype == torch.float32

    result = rtn(random_weight(8, 64, seed=4), scheme)
    result.q[0, 0] = 8  # one past the 4-bit range: packing it would corrupt its neighbour
    with pytest.raises(ValueError, match="range"):
        pack_linear(result, scheme)


def test_unbatched_splits_stacked_experts() -> None:
    scheme = QuantScheme(bits=4, group_size=16, symmetric=False)
    weights = torch.randn(3, 8, 32, generator=torch.Generator().manual_seed(5))
    experts = rtn(weights, scheme).unbatched()
    assert len(experts) == 3
    for expert, weight in zip(experts, weights, strict=True):
        alone = rtn(weight, scheme)
        assert pack_linear(expert, scheme).keys() == pack_linear(alone, scheme).keys()
        for name, tensor in pack_linear(expert, scheme).items():
            assert torch.equal(tensor, pack_linear(alone, scheme)[name]), name


def fp8_blocks(
    weight: torch.Tensor, block: int = 128, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A DeepSeek-style FP8 weight of ``weight``: (fp8, weight_scale_inv, dequantized = fp8·scale_inv)."""
    rows, cols = (-(-d // block) for d in weight.shape)
    scale_inv = torch.rand(rows, cols, generator=torch.Generator().manual_seed(seed)) * 1e-3 + 1e-3
    full = scale_inv.repeat_interleave(block, 0)[: weight.shape[0]].repeat_interleave(block, 1)[:, : weight.shape[1]]
    fp8 = (weight.float() / full).to(torch.float8_e4m3fn)
    return fp8, scale_inv, fp8.float() * full


def test_fp8_block_linear_dequantizes_like_deepseek() -> None:
    # Neither dimension is a multiple of 128, like DeepSeek's kv_a_proj_with_mqa (576 rows).
    fp8, scale_inv, expected = fp8_blocks(random_weight(200, 300, seed=6) * 0.05)
    cfg = quantization_config(QuantScheme(), SolverConfig(), ignore=[], fp8_targets=fp8_passthrough_targets("experts"))
    scheme = QuantizationConfig.model_validate(cfg).config_groups["group_1"]
    tensors = fp8_block_linear(fp8, scale_inv)
    assert set(tensors) == {"weight", "weight_scale"}
    weight = BaseCompressor.get_value_from_registry(scheme.format).decompress(tensors, scheme)["weight"]
    assert torch.equal(weight, expected)

    with pytest.raises(StreamqError, match="block size"):
        fp8_block_linear(fp8, scale_inv[:, :2])
    with pytest.raises(StreamqError, match="float8_e4m3fn"):
        fp8_block_linear(expected, scale_inv)


LINEAR_SHAPES = {  # out, in: DeepSeek names, dimensions divisible by every group size tested
    "model.layers.1.mlp.experts.0.gate_proj": (32, 64),
    "model.layers.1.mlp.experts.0.up_proj": (32, 64),
    "model.layers.1.mlp.experts.0.down_proj": (64, 32),
    "model.layers.1.mlp.experts.5.down_proj": (64, 32),
}


def module_tree(shapes: dict[str, tuple[int, int]]) -> torch.nn.Module:
    """Bias-free Linears at the given dotted names (out, in), with plain modules as their parents."""
    root = torch.nn.Module()
    for name, (out_features, in_features) in shapes.items():
        parent = root
        *path, leaf = name.split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, torch.nn.Module())
            parent = getattr(parent, part)
        parent.add_module(leaf, torch.nn.Linear(in_features, out_features, bias=False))
    return root


@pytest.mark.parametrize(
    "scheme",
    [
        QuantScheme(4, 32, True),
        QuantScheme(8, 0, False),
        QuantScheme(3, 16, False),
        QuantScheme(2, 32, True),
        NVFP4,
        MXFP4,
    ],
    ids=str,
)
def test_checkpoint_file_round_trips_through_compressed_tensors(scheme: QuantScheme, tmp_path: Path) -> None:
    results = {
        name: rtn(random_weight(*shape, seed=i), scheme) for i, (name, shape) in enumerate(LINEAR_SHAPES.items())
    }
    tensors = {}
    for name, result in results.items():
        tensors.update(with_prefix(name, pack_linear(result, scheme)))
    save_file(tensors, tmp_path / "model.safetensors")
    cfg = quantization_config(scheme, SolverConfig(scheme=scheme), ignore=["lm_head"])
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": cfg}))

    # transformers' path for plain Linears: attach the scheme, switch modules to the compressed layout, load
    # the file strictly into it, decompress.
    loaded_cfg = QuantizationConfig.model_validate(
        json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    )
    model = module_tree(LINEAR_SHAPES)
    apply_quantization_config(model, loaded_cfg)
    compressor = ModelCompressor(quantization_config=loaded_cfg)
    compressor.compress_model(model)
    model.load_state_dict(load_file(tmp_path / "model.safetensors"), strict=True)
    compressor.decompress_model(model)
    # The modules' qparams take the model's dtype (fp32 here), so the bf16 scales widen exactly and the
    # weights come back as the exact products the solver reported.
    for name, module in model.named_modules():
        if name in results:
            # FP4 decompresses to bf16 (one rounding of the float32 product), which the fp32 module widens.
            expected = results[name].weight if scheme.format == "int" else results[name].weight.bfloat16().float()
            assert torch.equal(module.weight, expected), name


# Module names of a DeepSeek-V3 checkpoint (layer 0 dense, layer 1 MoE) and the family each belongs to.
DEEPSEEK_MODULES = {
    "model.layers.1.mlp.experts.0.gate_proj": "routed",
    "model.layers.1.mlp.experts.17.up_proj": "routed",
    "model.layers.1.mlp.experts.255.down_proj": "routed",
    "model.layers.1.mlp.shared_experts.gate_proj": "dense",
    "model.layers.1.mlp.shared_experts.down_proj": "dense",
    "model.layers.0.mlp.up_proj": "dense",
    "model.layers.0.mlp.down_proj": "dense",
    "model.layers.0.self_attn.q_a_proj": "dense",
    "model.layers.0.self_attn.q_b_proj": "dense",
    "model.layers.1.self_attn.kv_a_proj_with_mqa": "dense",
    "model.layers.1.self_attn.kv_b_proj": "dense",
    "model.layers.1.self_attn.o_proj": "dense",
    "model.layers.1.mlp.gate": None,
    "model.layers.1.self_attn.kv_a_layernorm": None,
    "model.layers.1.input_layernorm": None,
    "model.embed_tokens": None,
    "model.norm": None,
    "lm_head": None,
}


def matched(module: str, targets: list[str]) -> bool:
    return any(match_name(module, target) for target in targets)


def matching(targets: list[str]) -> set[str]:
    return {name for name in DEEPSEEK_MODULES if matched(name, targets)}


def family(*kinds: str) -> set[str]:
    return {name for name, kind in DEEPSEEK_MODULES.items() if kind in kinds}


def test_targets_cover_exactly_the_scoped_projections() -> None:
    assert matching(int_targets("experts")) == family("routed")
    assert matching(fp8_passthrough_targets("experts")) == family("dense")
    assert matching(int_targets("all")) == family("routed", "dense")
    assert fp8_passthrough_targets("all") == []
    with pytest.raises(StreamqError, match="scope"):
        int_targets("attention")  # type: ignore[arg-type]


def test_mtp_ignore_matches_only_the_mtp_layers() -> None:
    ignore = mtp_ignore(num_hidden_layers=61, num_nextn_predict_layers=1)
    hits = ["model.layers.61.mlp.experts.3.gate_proj", "model.layers.61.eh_proj", "model.layers.61.self_attn.o_proj"]
    misses = [
        "model.layers.6.mlp.experts.1.up_proj",
        "model.layers.16.self_attn.o_proj",
        "model.layers.60.mlp.gate_proj",
    ]
    assert all(any(match_name(name, target) for target in ignore) for name in hits)
    assert not any(match_name(name, target) for name in misses for target in ignore)


@pytest.mark.parametrize("with_fp8", [False, True], ids=["int-only", "mixed"])
@pytest.mark.parametrize(
    "scheme", [QuantScheme(4, 128, True), QuantScheme(8, 0, False), QuantScheme(3, 64, True)], ids=str
)
def test_quantization_config_parses_in_compressed_tensors_and_transformers(scheme: QuantScheme, with_fp8: bool) -> None:
    fp8 = fp8_passthrough_targets("experts") if with_fp8 else None
    cfg = quantization_config(
        scheme, SolverConfig(scheme=scheme), ignore=["lm_head", *mtp_ignore(61, 1)], fp8_targets=fp8
    )
    parsed = QuantizationConfig.model_validate(json.loads(json.dumps(cfg)))
    assert parsed.format == ("mixed-precision" if with_fp8 else "pack-quantized")
    weights = parsed.config_groups["group_0"].weights
    assert (weights.num_bits, weights.symmetric, weights.type) == (scheme.bits, scheme.symmetric, "int")
    assert weights.strategy == ("channel" if scheme.group_size == 0 else "group")
    assert weights.group_size == (scheme.group_size or None)

    hf = CompressedTensorsConfig.from_dict({"quantization_config": cfg})
    ModelCompressor.from_compression_config(hf)
    # transformers 5.23 decompresses fused experts with one group and every other module with another.
    assert get_experts_scheme(hf.quantization_config) is hf.quantization_config.config_groups["group_0"]
    if with_fp8:
        dense = get_dense_scheme(hf.quantization_config)
        assert dense.format == "float-quantized" and dense.weights.block_structure == [128, 128]


@pytest.mark.parametrize(
    ("actorder", "group_size", "declared"),
    [("none", 128, None), ("weight", 128, "weight"), ("group", 0, "weight"), ("group", 128, StreamqError)],
)
def test_declared_actorder(actorder: str, group_size: int, declared: str | type | None) -> None:
    scheme = QuantScheme(bits=4, group_size=group_size)
    solver = SolverConfig(scheme=scheme, actorder=actorder)  # type: ignore[arg-type]
    if declared is StreamqError:
        with pytest.raises(StreamqError, match="actorder"):
            quantization_config(scheme, solver, ignore=[])
        return
    cfg = quantization_config(scheme, solver, ignore=[])
    assert cfg["config_groups"]["group_0"]["weights"]["actorder"] == declared
    assert QuantizationConfig.model_validate(cfg).config_groups["group_0"].weights.actorder == declared


def test_quantization_config_refuses_ambiguous_targets() -> None:
    with pytest.raises(StreamqError, match="both"):
        quantization_config(QuantScheme(), SolverConfig(), ignore=[], fp8_targets=int_targets("experts"))
    with pytest.raises(StreamqError, match="experts"):
        quantization_config(QuantScheme(), SolverConfig(), ignore=[], fp8_targets=[r"re:.*shared_experts\..*"])


TINY = dict(
    vocab_size=64,
    hidden_size=128,
    intermediate_size=128,
    moe_intermediate_size=64,
    num_hidden_layers=2,
    first_k_dense_replace=1,
    num_attention_heads=2,
    num_key_value_heads=2,
    q_lora_rank=32,
    kv_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
    n_routed_experts=8,
    n_shared_experts=1,
    num_experts_per_tok=2,
    n_group=2,
    topk_group=1,
    max_position_embeddings=64,
    num_mtp_layers=0,
)
_FUSED_EXPERTS = re.compile(r"(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$")


def per_expert(fused: torch.Tensor, kind: str) -> list[dict[str, torch.Tensor]]:
    """transformers' fused expert tensor as DeepSeek's per-expert projections."""
    if kind == "down_proj":
        return [{"down_proj": w} for w in fused]
    gate, up = fused.chunk(2, dim=1)
    return [{"gate_proj": g, "up_proj": u} for g, u in zip(gate, up, strict=True)]


def write_deepseek_checkpoint(model: DeepseekV3ForCausalLM, scheme: QuantScheme, out: Path) -> None:
    """Write ``model`` as a DeepSeek-style checkpoint: routed experts pack-quantized per expert, the other
    projections FP8 in 128x128 blocks, the rest as is. ``model`` is changed to hold the dequantized weights
    a loader should reproduce."""
    state = model.state_dict()
    fp8_targets = fp8_passthrough_targets("experts")
    tensors: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        if fused := _FUSED_EXPERTS.match(name):
            dequantized = []
            for e, projections in enumerate(per_expert(value, fused[2])):
                for proj, weight in projections.items():
                    result = rtn(weight, scheme)
                    tensors.update(with_prefix(f"{fused[1]}.{e}.{proj}", pack_linear(result, scheme)))
                    dequantized.append(result.weight.to(torch.bfloat16).float())
            value.copy_(torch.stack(dequantized).reshape(value.shape[0], -1, value.shape[-1]))
        elif name.endswith(".weight") and matched(name.removesuffix(".weight"), fp8_targets):
            fp8, scale_inv, dequantized = fp8_blocks(value, seed=len(tensors))
            tensors.update(with_prefix(name.removesuffix(".weight"), fp8_block_linear(fp8, scale_inv)))
            value.copy_(dequantized)
        else:
            tensors[name] = value.contiguous()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    config = model.config.to_dict()
    config["quantization_config"] = quantization_config(
        scheme, SolverConfig(scheme=scheme), ignore=["lm_head"], fp8_targets=fp8_targets
    )
    (out / "config.json").write_text(json.dumps(config, indent=2))


def tiny_deepseek(**overrides: int) -> DeepseekV3ForCausalLM:
    torch.manual_seed(0)
    return DeepseekV3ForCausalLM(DeepseekV3Config(**{**TINY, **overrides})).eval()


def tokens() -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(
    "scheme",
    [
        QuantScheme(4, 32, True),
        QuantScheme(3, 32, True),
        QuantScheme(8, 0, True),
        pytest.param(
            NVFP4,
            marks=pytest.mark.xfail(
                strict=True,
                reason="transformers 5.24 decompresses fused experts without their weight_global_scale (NVFP4 "
                "experts come out multiplied by it); compressed-tensors' own decompressor is exact (test_fp4_formats)",
            ),
        ),
        MXFP4,
        pytest.param(
            QuantScheme(4, 32, False),
            marks=pytest.mark.xfail(
                strict=True, reason="transformers 5.23 decompresses fused experts without their weight_zero_point"
            ),
        ),
    ],
    ids=str,
)
@pytest.mark.slow
def test_transformers_dequantizes_per_expert_checkpoint(scheme: QuantScheme, tmp_path: Path) -> None:
    reference = tiny_deepseek()
    write_deepseek_checkpoint(reference, scheme, tmp_path)

    loaded = AutoModelForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True)
    ).eval()
    for name, value in reference.state_dict().items():
        assert torch.equal(loaded.state_dict()[name].float(), value), name
    # transformers 5.23 leaves decompressed experts in the scale dtype (bf16) inside an fp32 model; the values
    # are exact (checked above), so widening them only undoes the dtype.
    loaded = loaded.float()

    with torch.no_grad():
        expected = reference(tokens()).logits
        got = loaded(tokens()).logits
    assert ((got - expected).norm() / expected.norm()).item() < 1e-3


def test_transformers_default_load_keeps_fp8_modules_compressed(tmp_path: Path) -> None:
    # Every matmul input is a multiple of 128, as in DeepSeek-V3: without dequantize=True compressed-tensors runs
    # the FP8 modules compressed and quantizes their inputs in groups of 128.
    reference = tiny_deepseek(
        q_lora_rank=128,
        kv_lora_rank=128,
        moe_intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=4,
        v_head_dim=32,
    )
    write_deepseek_checkpoint(reference, QuantScheme(4, 32), tmp_path)

    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    with torch.no_grad():
        assert torch.isfinite(loaded(tokens()).logits).all()  # the first forward decompresses the FP8 modules
    # Scales become bf16 parameters on this path, so FP8 weights match DeepSeek's fp32 product to bf16 precision.
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name].float(), value, rtol=2**-7, atol=0, msg=name)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize(("shape", "group_size"), [((24, 96), 32), ((7, 40), 0)])
def test_packed_layout_predicts_what_pack_linear_writes(
    bits: int, symmetric: bool, shape: tuple, group_size: int
) -> None:
    scheme = QuantScheme(bits=bits, group_size=group_size, symmetric=symmetric)
    tensors = pack_linear(rtn(random_weight(*shape, seed=bits), scheme), scheme)
    layout = packed_layout(*shape, scheme)
    assert {k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()} == layout


@pytest.mark.parametrize("scheme", [NVFP4, MXFP4], ids=str)
def test_packed_layout_predicts_what_pack_linear_writes_for_fp4(scheme: QuantScheme) -> None:
    tensors = pack_linear(rtn(random_weight(24, 96, seed=5), scheme), scheme)
    assert {k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()} == packed_layout(24, 96, scheme)
