"""Every DeepSeek-architecture release streamq reads, told apart by config.json alone: DeepSeek-V2 (softmax scores,
group-limited greedy), V2-Lite (greedy, q projected directly), V3 and Kimi-K2 (sigmoid scores with a correction
bias; Kimi-K2 with 384 experts in one group). The native block is compared with transformers' DeepseekV2 /
DeepseekV3 models on the same weights, routing decision by routing decision; `python -m streamq run` quantizes the
tiny presets, and transformers loads what it wrote.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import streamq_env
from hf_reference import both_forwards, hf_classes

from streamq.config import ModelConfig
from streamq.errors import StreamqError
from streamq.io.safetensors_stream import INDEX_NAME, CheckpointReader
from streamq.model.deepseek import Gate, forward_blocks, load_block
from streamq.preflight import check_tensors
from streamq.synth import SynthOptions, synth_config, write_synthetic_checkpoint

# The fields that matter, as the released config.json files spell them (shape fields shortened where noted).
SHAPE = {
    "vocab_size": 102400,
    "intermediate_size": 10944,
    "num_attention_heads": 16,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "rope_theta": 10000,
}
V2_LITE = {
    **SHAPE,
    "architectures": ["DeepseekV2ForCausalLM"],
    "model_type": "deepseek_v2",
    "hidden_size": 2048,
    "num_hidden_layers": 27,
    "moe_intermediate_size": 1408,
    "q_lora_rank": None,
    "first_k_dense_replace": 1,
    "n_routed_experts": 64,
    "n_shared_experts": 2,
    "num_experts_per_tok": 6,
    "n_group": 1,
    "topk_group": 1,
    "norm_topk_prob": False,
    "routed_scaling_factor": 1.0,
    "scoring_func": "softmax",
    "topk_method": "greedy",
}
V2 = {
    **V2_LITE,
    "hidden_size": 5120,
    "num_hidden_layers": 60,
    "moe_intermediate_size": 1536,
    "q_lora_rank": 1536,
    "n_routed_experts": 160,
    "n_group": 8,
    "topk_group": 3,
    "routed_scaling_factor": 16.0,
    "topk_method": "group_limited_greedy",
}
KIMI_K2 = {
    **SHAPE,
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "kimi_k2",
    "vocab_size": 163840,
    "hidden_size": 7168,
    "num_hidden_layers": 61,
    "moe_intermediate_size": 2048,
    "q_lora_rank": 1536,
    "first_k_dense_replace": 1,
    "n_routed_experts": 384,
    "n_shared_experts": 1,
    "num_experts_per_tok": 8,
    "n_group": 1,
    "topk_group": 1,
    "norm_topk_prob": True,
    "routed_scaling_factor": 2.827,
    "scoring_func": "sigmoid",
    "topk_method": "noaux_tc",
}
V3 = {
    **KIMI_K2,
    "model_type": "deepseek_v3",
    "n_routed_experts": 256,
    "n_group": 8,
    "topk_group": 4,
    "routed_scaling_factor": 2.5,
    "first_k_dense_replace": 3,
}
V32 = {
    **V3,
    "architectures": ["DeepseekV32ForCausalLM"],
    "model_type": "deepseek_v32",
    "index_n_heads": 64,
    "index_head_dim": 128,
    "index_topk": 2048,
}


def routing(cfg: ModelConfig) -> tuple[Any, ...]:
    return (cfg.scoring_func, cfg.topk_method, cfg.n_routed_experts, cfg.n_group, cfg.topk_group)


# -- config.json ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected", "q_lora", "bias"),
    [
        (V2_LITE, ("softmax", "greedy", 64, 1, 1), None, False),
        (V2, ("softmax", "group_limited_greedy", 160, 8, 3), 1536, False),
        (V3, ("sigmoid", "noaux_tc", 256, 8, 4), 1536, True),
        (V32, ("sigmoid", "noaux_tc", 256, 8, 4), 1536, True),
        (KIMI_K2, ("sigmoid", "noaux_tc", 384, 1, 1), 1536, True),
    ],
    ids=["v2-lite", "v2", "v3", "v3.2", "kimi-k2"],
)
def test_released_configs_give_their_routing(raw: dict, expected: tuple, q_lora: int | None, bias: bool) -> None:
    cfg = ModelConfig.from_dict(raw)
    assert routing(cfg) == expected
    assert (cfg.q_lora_rank, cfg.uses_correction_bias) == (q_lora, bias)
    assert (cfg.norm_topk_prob, cfg.routed_scaling_factor) == (raw["norm_topk_prob"], raw["routed_scaling_factor"])


def test_the_architecture_comes_from_the_config_not_the_name() -> None:
    """A config that leaves the routing fields out gets its family's defaults, whatever the repo is called."""
    bare = {k: v for k, v in V2_LITE.items() if k not in ("scoring_func", "topk_method", "norm_topk_prob")}
    named_v3 = {**bare, "_name_or_path": "deepseek-ai/DeepSeek-V3"}
    cfg = ModelConfig.from_dict(named_v3)
    assert (cfg.scoring_func, cfg.topk_method, cfg.norm_topk_prob) == ("softmax", "greedy", False)
    only_type = {k: v for k, v in KIMI_K2.items() if k not in ("architectures", "scoring_func", "topk_method")}
    cfg = ModelConfig.from_dict(only_type)
    assert (cfg.scoring_func, cfg.topk_method, cfg.norm_topk_prob) == ("sigmoid", "noaux_tc", True)


def test_an_unknown_architecture_is_refused_naming_the_supported_ones() -> None:
    with pytest.raises(StreamqError) as err:
        ModelConfig.from_dict({**V3, "architectures": ["LlamaForCausalLM"], "model_type": "llama"}, "m/config.json")
    assert str(err.value) == (
        "m/config.json: unsupported architecture LlamaForCausalLM; streamq reads architectures DeepseekV2ForCausalLM, "
        "DeepseekV3ForCausalLM, DeepseekV32ForCausalLM (model_type deepseek_v2, deepseek_v3, deepseek_v32, kimi_k2): "
        "DeepSeek-V2/V2-Lite, V3/R1, V3.2, Kimi-K2 and their fine-tunes"
    )


@pytest.mark.parametrize(
    ("base", "change", "message"),
    [
        (V3, {"scoring_func": "sqrtsoftplus"}, r"scoring_func 'sqrtsoftplus' with topk_method 'noaux_tc' is not"),
        (V2, {"topk_method": "noaux_tc"}, r"scoring_func 'softmax' with topk_method 'noaux_tc' is not supported"),
        (V2, {"topk_group": 9}, r"topk_group=9 must be between 1 and n_group=8"),
        (V2, {"n_group": 7}, r"n_routed_experts=160 is not divisible by n_group=7"),
        (V3, {"num_experts_per_tok": 40, "topk_group": 1}, r"num_experts_per_tok=40 exceeds the 32 experts"),
        (V2_LITE, {"norm_topk_prob": True, "routed_scaling_factor": 2.0}, r"norm_topk_prob true with scoring_func"),
    ],
)
def test_unsupported_routing_values_are_refused_naming_the_field(base: dict, change: dict, message: str) -> None:
    with pytest.raises(StreamqError, match=r"^c\.json: invalid value \(" + message):
        ModelConfig.from_dict({**base, **change}, "c.json")


def test_the_refusal_lists_the_supported_routings() -> None:
    with pytest.raises(StreamqError) as err:
        ModelConfig.from_dict({**V3, "topk_method": "static_hash"}, "c.json")
    assert "supported: softmax + greedy (DeepSeek-V2-Lite); softmax + group_limited_greedy (DeepSeek-V2); " in str(
        err.value
    )
    assert "sigmoid + noaux_tc (DeepSeek-V3, Kimi-K2)" in str(err.value)


# -- the router against transformers' -------------------------------------------------------------------------------


def tiny(raw: dict) -> dict:
    """``raw``'s routing at a width transformers' routers build in a moment."""
    return {**raw, "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32, "num_hidden_layers": 2}


@pytest.mark.parametrize("raw", [V2_LITE, V2, V3, KIMI_K2], ids=["v2-lite", "v2", "v3", "kimi-k2"])
def test_the_gate_routes_like_transformers(raw: dict) -> None:
    """Identical expert choices and weights for 512 tokens, against transformers' DeepseekV2TopkRouter (softmax)
    or DeepseekV3TopkRouter (sigmoid + bias), with the same router weights."""
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    cfg = ModelConfig.from_dict(tiny(raw))
    config_class, _ = hf_classes(cfg.raw)
    hf_cfg = config_class.from_dict({k: v for k, v in cfg.raw.items() if k != "model_type"})
    theirs = DeepseekV2TopkRouter(hf_cfg) if cfg.scoring_func == "softmax" else DeepseekV3TopkRouter(hf_cfg)
    ours = Gate(cfg)
    gen = torch.Generator().manual_seed(0)
    ours.weight.data = torch.randn(cfg.n_routed_experts, cfg.hidden_size, generator=gen)
    theirs.weight.data = ours.weight.data.clone()
    if cfg.uses_correction_bias:
        ours.e_score_correction_bias.data = 0.1 * torch.randn(cfg.n_routed_experts, generator=gen)
        theirs.e_score_correction_bias.copy_(ours.e_score_correction_bias.data)
    else:
        assert not hasattr(theirs, "e_score_correction_bias") and ours.e_score_correction_bias is None
    x = torch.randn(512, cfg.hidden_size, generator=gen)
    weights, idx = ours(x)
    _, ref_weights, ref_idx = theirs(x)
    order, ref_order = idx.sort(-1), ref_idx.sort(-1)
    assert torch.equal(order.values, ref_order.values)
    torch.testing.assert_close(weights.gather(1, order.indices), ref_weights.gather(1, ref_order.indices))
    if cfg.n_group > cfg.topk_group:  # the groups really limit the choice: plain top-k would differ
        per_group = cfg.n_routed_experts // cfg.n_group
        assert max(len(set((row // per_group).tolist())) for row in idx) <= cfg.topk_group
        choice = torch.nn.functional.linear(x, ours.weight)
        choice = (
            choice.softmax(-1) if cfg.scoring_func == "softmax" else choice.sigmoid() + ours.e_score_correction_bias
        )
        plain = choice.topk(cfg.num_experts_per_tok, dim=-1).indices.sort(-1).values
        assert not torch.equal(plain, order.values)


# -- whole blocks against transformers' models ----------------------------------------------------------------------

# DeepSeek-V2's grouping (8 groups, best 3, scaling 16) and low-rank q on the V2-Lite preset's 64 experts.
V2_GROUPED = {
    "q_lora_rank": 384,
    "n_group": 8,
    "topk_group": 3,
    "topk_method": "group_limited_greedy",
    "routed_scaling_factor": 16.0,
}
PRESET_CASES = {
    "v2-lite": SynthOptions(preset="v2-lite", shards=2),
    "v2-group-limited": SynthOptions(preset="v2-lite", shards=2, overrides=V2_GROUPED),
    "kimi-k2": SynthOptions(preset="kimi-k2", num_layers=2, shards=2),  # one dense + one MoE block, 384 experts
}


@pytest.fixture(scope="module", params=PRESET_CASES, ids=PRESET_CASES)
def preset_reader(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> CheckpointReader:
    model = write_synthetic_checkpoint(tmp_path_factory.mktemp(request.param), PRESET_CASES[request.param])
    return CheckpointReader(model)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.slow
def test_every_block_and_every_routing_decision_match_transformers(preset_reader: CheckpointReader) -> None:
    reader, cfg = preset_reader, preset_reader.config
    ids = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    run = both_forwards(reader, ids)
    assert type(run.ref).__name__ == (
        "DeepseekV2ForCausalLM" if cfg.scoring_func == "softmax" else "DeepseekV3ForCausalLM"
    )
    assert sorted(run.ours) == sorted(run.theirs) == list(range(cfg.num_hidden_layers))
    for i in run.ours:
        assert rel_err(run.ours[i], run.theirs[i]) < 1e-3, f"block {i}"
    assert rel_err(run.logits, run.ref_logits) < 1e-3
    x = torch.randn(256, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    for layer in (i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)):
        weights, idx = load_block(reader, layer, "cpu", torch.float32).mlp.gate(x)
        _, ref_weights, ref_idx = run.ref.model.layers[layer].mlp.gate(x)
        order, ref_order = idx.sort(-1), ref_idx.sort(-1)
        assert torch.equal(order.values, ref_order.values), f"layer {layer}"
        torch.testing.assert_close(weights.gather(1, order.indices), ref_weights.gather(1, ref_order.indices))


# -- the checks before a run ----------------------------------------------------------------------------------------


def drop(model: Path, name: str) -> None:
    """Remove ``name`` from the index (the header check then finds it missing)."""
    index = json.loads((model / INDEX_NAME).read_text())
    del index["weight_map"][name]
    (model / INDEX_NAME).write_text(json.dumps(index))


def test_preflight_knows_v2_lite_tensor_names(tmp_path: Path) -> None:
    model = write_synthetic_checkpoint(tmp_path / "m", SynthOptions(preset="v2-lite", num_layers=2, shards=1))
    with CheckpointReader(model) as reader:
        check_tensors(reader)  # q_proj, no q_a/q_b, no correction bias: the layout V2-Lite ships
        names = set(reader.infos)
    assert "model.layers.0.self_attn.q_proj.weight" in names
    assert not any("q_a_proj" in n or "e_score_correction_bias" in n for n in names)
    drop(model, "model.layers.1.self_attn.q_proj.weight")
    with CheckpointReader(model) as reader, pytest.raises(StreamqError) as err:
        check_tensors(reader)
    assert "tensor model.layers.1.self_attn.q_proj.weight is missing, and config.json needs it" in str(err.value)


def test_a_correction_bias_in_a_softmax_model_is_not_part_of_it(tmp_path: Path) -> None:
    """A V3 checkpoint whose config.json says V2-Lite: the router's bias does not belong to a greedy router."""
    model = write_synthetic_checkpoint(tmp_path / "m", SynthOptions(preset="tiny", num_layers=2, dense_layers=1))
    cfg = json.loads((model / "config.json").read_text())
    cfg.update(scoring_func="softmax", topk_method="greedy", norm_topk_prob=False, routed_scaling_factor=1.0)
    (model / "config.json").write_text(json.dumps(cfg))
    with CheckpointReader(model) as reader, pytest.raises(StreamqError) as err:
        check_tensors(reader)
    assert "tensor model.layers.1.mlp.gate.e_score_correction_bias is not part of the model config.json" in str(
        err.value
    )


def test_a_kimi_router_without_its_correction_bias_is_refused(tmp_path: Path) -> None:
    opts = SynthOptions(preset="kimi-k2", num_layers=2, experts=16, shards=1)
    model = write_synthetic_checkpoint(tmp_path / "m", opts)
    drop(model, "model.layers.1.mlp.gate.e_score_correction_bias")
    with CheckpointReader(model) as reader, pytest.raises(StreamqError) as err:
        check_tensors(reader)
    assert "tensor model.layers.1.mlp.gate.e_score_correction_bias is missing" in str(err.value)


RELEASED_FIELDS = (
    "architectures",
    "model_type",
    "first_k_dense_replace",
    "n_routed_experts",
    "n_shared_experts",
    "num_experts_per_tok",
    "n_group",
    "topk_group",
    "norm_topk_prob",
    "routed_scaling_factor",
    "scoring_func",
    "topk_method",
)


@pytest.mark.parametrize(("preset", "released"), [("v2-lite", V2_LITE), ("kimi-k2", KIMI_K2)])
def test_tiny_presets_keep_the_released_architecture_fields(preset: str, released: dict) -> None:
    cfg = synth_config(SynthOptions(preset=preset))
    assert {k: cfg[k] for k in RELEASED_FIELDS} == {k: released[k] for k in RELEASED_FIELDS}
    assert (cfg["q_lora_rank"] is None) == (released["q_lora_rank"] is None)  # widths shrink, the q path stays


def test_the_full_width_kimi_preset_has_the_released_widths() -> None:
    """The preset the GPU benchmark runs: Kimi-K2's routing with its real widths (64 heads, not V3's 128)."""
    cfg = synth_config(SynthOptions(preset="kimi-k2-full"))
    widths = ("vocab_size", "hidden_size", "num_hidden_layers", "moe_intermediate_size", "q_lora_rank")
    assert {k: cfg[k] for k in RELEASED_FIELDS + widths} == {k: KIMI_K2[k] for k in RELEASED_FIELDS + widths}
    assert (cfg["num_attention_heads"], cfg["kv_lora_rank"], cfg["intermediate_size"]) == (64, 512, 18432)


def test_fewer_kimi_experts_keep_one_group() -> None:
    cfg = ModelConfig.from_dict(synth_config(SynthOptions(preset="kimi-k2", experts=24)))
    assert (cfg.n_routed_experts, cfg.n_group, cfg.topk_group, cfg.num_experts_per_tok) == (24, 1, 1, 8)


# -- end to end: the command a user types ---------------------------------------------------------------------------


def streamq(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "streamq", *args], capture_output=True, text=True, env=streamq_env(), timeout=1200
    )


RUN = ["--num-samples", "4", "--seq-len", "32", "--device", "cpu", "--dtype", "float32", "--display", "none"]
# Kimi-K2's end-to-end run keeps its routing fields but 48 experts (the 384-expert router is compared with
# transformers above): the run is about the pipeline and the written checkpoint, not the expert count.
E2E = {"v2-lite": ["--layers", "2"], "kimi-k2": ["--layers", "2", "--experts", "48"]}


@pytest.mark.slow
@pytest.mark.parametrize("preset", E2E)
def test_streamq_run_quantizes_the_preset_and_transformers_loads_it(preset: str, tmp_path: Path) -> None:
    from transformers.utils.quantization_config import CompressedTensorsConfig

    model, out = tmp_path / "model", tmp_path / "out"
    done = streamq("synth", str(model), "--preset", preset, *E2E[preset])
    assert done.returncode == 0, done.stderr[-2000:]
    done = streamq("run", str(model), str(out), *RUN)
    assert done.returncode == 0, done.stderr[-2000:]
    written = json.loads((out / "config.json").read_text())
    source = ModelConfig.load(model)
    assert (written["model_type"], written["scoring_func"], written["topk_method"]) == (
        source.raw["model_type"],
        source.scoring_func,
        source.topk_method,
    )
    reader = CheckpointReader(out)
    assert reader.packed_bits == 4
    ids = torch.randint(0, reader.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    ours = forward_blocks(reader, ids, dtype=torch.float32)
    # transformers has no kimi_k2 model type: Kimi-K2 loads through the DeepseekV3 classes its config names.
    config_class, model_class = hf_classes(written)
    hf_cfg = config_class.from_dict({k: v for k, v in written.items() if k != "model_type"})
    loaded, info = model_class.from_pretrained(
        out,
        config=hf_cfg,
        quantization_config=CompressedTensorsConfig(dequantize=True),
        dtype=torch.float32,
        output_loading_info=True,
    )
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    loaded.config._attn_implementation = "eager"
    with torch.no_grad():
        theirs = loaded.float()(input_ids=ids).logits.float()
    assert rel_err(ours, theirs) < 1e-3


def test_kimi_synth_takes_its_vocabulary_from_a_tiktoken_tokenizer(tmp_path: Path) -> None:
    """Kimi-K2 ships a tiktoken model (``base64-token rank`` per line) and its special tokens in
    tokenizer_config.json; the synthetic model's vocabulary covers both, and the files travel with it."""
    from test_tiktoken_tokenizer import MERGES, SPECIAL, write_tokenizer

    tok = write_tokenizer(tmp_path / "tok")
    small = {"vocab_size": 128}  # below the tokenizer's, which then decides
    opts = SynthOptions(preset="kimi-k2", num_layers=1, dense_layers=1, tokenizer_dir=tok, shards=1, overrides=small)
    model = write_synthetic_checkpoint(tmp_path / "m", opts)
    last = 256 + len(MERGES) + 3 + len(SPECIAL) - 1  # the last special id (write_tokenizer leaves a gap of 3)
    assert ModelConfig.load(model).vocab_size == -(-(last + 1) // 128) * 128
    assert (model / "tiktoken.model").read_text() == (tok / "tiktoken.model").read_text()
    with pytest.raises(StreamqError, match=r"has neither tokenizer\.json nor tiktoken\.model"):
        synth_config(SynthOptions(preset="kimi-k2", tokenizer_dir=tmp_path / "m" / "nothing"))


def test_the_output_keeps_a_tiktoken_tokenizer(tmp_path: Path) -> None:
    from streamq.export.checkpoint import copy_side_files

    (tmp_path / "model").mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "model" / "tiktoken.model").write_text("dA== 0\n")
    copy_side_files(tmp_path / "model", tmp_path / "out")
    assert (tmp_path / "out" / "tiktoken.model").read_text() == "dA== 0\n"
