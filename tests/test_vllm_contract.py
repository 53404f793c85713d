"""The config.json `streamq run` writes makes vLLM compute the model streamq calibrated.

The contract (streamq/export/vllm_contract.py) lists every config attribute vLLM's DeepSeek model reads, as read
from github.com/vllm-project/vllm:
  vllm/model_executor/models/deepseek_v2.py @ 002d6073aa034d4f5545d45021b0e56d1f3c3593
  vllm/model_executor/layers/rotary_embedding/__init__.py (get_rope) @ 07b12f1b16d5568eeb29a52fd8c9296a51f478ed
  vllm/model_executor/layers/rotary_embedding/deepseek_scaling_rope.py @ 00d678e109f09c2d1845e7a6626ba9fd5980e4f0
  vllm/model_executor/layers/fused_moe/router/grouped_topk_router.py @ 055e47c28003156421365af985d676fc921cb075
  vllm/transformers_utils/config.py (config loading through transformers' AutoConfig)
    @ 0036026e7171bd02e3c1d4687b102dec9c446049
  vllm/model_executor/layers/mla.py @ 00b9b7ad3a37ff624e5816d1b7ae713ecb0a705f (reads no config attribute)
Outputs come from both config styles of the same synthetic model: DeepSeek's release (rope_scaling, topk_method,
scoring_func) and transformers 5 (rope_parameters, rope_interleave, neither topk_method nor scoring_func), for
DeepSeek-V3's routing (sigmoid + noaux_tc) and DeepSeek-V2's (softmax; greedy as V2-Lite, group-limited as V2). The
vLLM arithmetic below (YaRN frequencies and scales, grouped top-k routing) is re-derived from those files, and
reads the config the way vLLM does: through transformers, then getattr / .get with vLLM's defaults.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hf_reference import hf_classes

from streamq.config import ModelConfig
from streamq.data import DataConfig
from streamq.errors import StreamqError
from streamq.export.vllm_contract import (
    ABSENT,
    ATTRIBUTES,
    Attribute,
    read_like_vllm,
    vllm_config,
    vllm_mismatches,
    vllm_values,
)
from streamq.io.safetensors_stream import INDEX_NAME, CheckpointReader
from streamq.model.deepseek import Gate, load_block, rope_frequencies
from streamq.pipeline import RunOptions, run
from streamq.recipe import Recipe
from streamq.synth import CONFIG_STYLES, SynthOptions, synth_config, write_synthetic_checkpoint
from streamq.tui import Reporter

# One dense and one MoE block, RTN: the config is what is under test, not the solver.
SYNTH = dict(num_layers=2, dense_layers=1, shards=2)
V2_GROUPED = {"q_lora_rank": 384, "n_group": 8, "topk_group": 3, "topk_method": "group_limited_greedy"}
SOURCES = {
    **{f"v3-{style}": SynthOptions(preset="tiny", **SYNTH, config_style=style) for style in CONFIG_STYLES},
    **{f"v2-lite-{style}": SynthOptions(preset="v2-lite", **SYNTH, config_style=style) for style in CONFIG_STYLES},
    "v2-group-limited": SynthOptions(
        preset="v2-lite", **SYNTH, overrides={**V2_GROUPED, "routed_scaling_factor": 16.0}
    ),
    # Kimi-K2's routing (one group, scaling 2.827) under model_type kimi_k2, with 48 of its 384 experts.
    "kimi-k2": SynthOptions(preset="kimi-k2", **SYNTH, experts=48),
}
RECIPE = Recipe(method="rtn", data=DataConfig(num_samples=2, seq_len=16))
OPTIONS = RunOptions(device="cpu", dtype="float32", token_budget=32)


@pytest.fixture(scope="module", params=SOURCES)
def style_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(source checkpoint, `streamq run` output) for one routing family and config style."""
    root = tmp_path_factory.mktemp(request.param)
    source = write_synthetic_checkpoint(root / "model", SOURCES[request.param])
    with Reporter(None, display="none") as reporter:
        out = run(source, root / "out", RECIPE, OPTIONS, reporter)
    return source, out


def index_names(model_dir: Path) -> set[str]:
    return set(json.loads((model_dir / INDEX_NAME).read_text())["weight_map"])


def at(config: dict[str, Any], attribute: Attribute) -> Any:
    """The value at ``attribute.path`` in a config.json dict, ABSENT when a key is missing."""
    value: Any = config
    for key in attribute.path:
        if not isinstance(value, dict) or key not in value:
            return ABSENT
        value = value[key]
    return value


def as_vllm_loads(config: dict[str, Any]) -> Any:
    """The config object vLLM's HFConfigParser hands the model: transformers 5's DeepseekV2Config for model_type
    deepseek_v2, else DeepseekV3Config (vLLM registers it for kimi_k2 and deepseek_v32 too)."""
    from transformers import DeepseekV2Config, DeepseekV3Config

    config_class = DeepseekV2Config if config.get("model_type") == "deepseek_v2" else DeepseekV3Config
    return config_class(**{k: v for k, v in config.items() if k not in ("quantization_config", "model_type")})


def vllm_sees(written: dict[str, Any]) -> dict[str, Any]:
    hf = as_vllm_loads(written)
    return {a.name: read_like_vllm(hf, a) for a in ATTRIBUTES}


# -- vLLM's arithmetic, from the files cited above -----------------------------------------------------------------


def yarn_get_mscale(scale: float, mscale: float) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def vllm_rope(seen: dict[str, Any], rotary_dim: int, qk_head_dim: int) -> tuple[torch.Tensor, float, float]:
    """(inverse frequencies, cos/sin factor, attention softmax scale) as vLLM's MLA computes them."""
    base = seen["rope_parameters.rope_theta"]
    pos_freqs = base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim)
    softmax_scale = qk_head_dim**-0.5
    if seen["rope_parameters.rope_type"] == "default":
        return 1.0 / pos_freqs, 1.0, softmax_scale
    factor = seen["rope_parameters.factor"]
    original = seen["rope_parameters.original_max_position_embeddings"]

    def correction_dim(rotations: float) -> float:
        return rotary_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(seen["rope_parameters.beta_fast"])), 0)
    high = min(math.ceil(correction_dim(seen["rope_parameters.beta_slow"])), rotary_dim - 1)
    high = high + 0.001 if low == high else high
    ramp = ((torch.arange(rotary_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = (1 - ramp) * seen["rope_parameters.extrapolation_factor"]
    inv_freq = 1.0 / (factor * pos_freqs) * (1 - keep) + 1.0 / pos_freqs * keep
    mscale_all_dim = float(seen["rope_parameters.mscale_all_dim"])
    cos_factor = (
        yarn_get_mscale(factor, float(seen["rope_parameters.mscale"]))
        / yarn_get_mscale(factor, mscale_all_dim)
        * seen["rope_parameters.attn_factor"]
    )
    return inv_freq, cos_factor, softmax_scale * yarn_get_mscale(factor, mscale_all_dim) ** 2


def vllm_route(
    seen: dict[str, Any], logits: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """grouped_topk: the bias exists only for topk_method noaux_tc (DeepseekV2MoE)."""
    correction = bias if seen["topk_method"] == "noaux_tc" else None
    scores = logits.sigmoid() if seen["scoring_func"] == "sigmoid" else logits.softmax(-1)
    tokens, groups = scores.shape[0], seen["n_group"]
    choice = scores if correction is None else scores + correction
    grouped = choice.view(tokens, groups, -1)
    group_scores = grouped.max(-1).values if correction is None else grouped.topk(2, dim=-1).values.sum(-1)
    keep = torch.zeros_like(group_scores).scatter_(1, group_scores.topk(seen["topk_group"], dim=-1).indices, 1)
    masked = choice.masked_fill(~keep.bool().repeat_interleave(grouped.shape[-1], dim=1), float("-inf"))
    ids = masked.topk(seen["num_experts_per_tok"], dim=-1).indices
    weights = scores.gather(1, ids)
    if seen["norm_topk_prob"]:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights * seen["routed_scaling_factor"], ids


# -- the written config --------------------------------------------------------------------------------------------


def test_written_config_carries_every_contract_attribute(style_run: tuple[Path, Path]) -> None:
    source, out = style_run
    written = json.loads((out / "config.json").read_text())
    cfg = ModelConfig.load(source)
    expected = vllm_values(cfg, index_names(source))
    assert (expected[("topk_method",)], expected[("scoring_func",)]) == (cfg.topk_method, cfg.scoring_func)
    for attribute in ATTRIBUTES:
        assert at(written, attribute) == expected[attribute.path], attribute.name


def test_vllm_reads_the_values_streamq_computed_with(style_run: tuple[Path, Path]) -> None:
    source, out = style_run
    seen = vllm_sees(json.loads((out / "config.json").read_text()))
    expected = vllm_values(ModelConfig.load(source), index_names(source))
    for attribute in ATTRIBUTES:
        want = attribute.vllm_default if expected[attribute.path] is ABSENT else expected[attribute.path]
        assert seen[attribute.name] == want, attribute.name


def test_vllm_routes_tokens_like_streamq(style_run: tuple[Path, Path]) -> None:
    source, out = style_run
    seen = vllm_sees(json.loads((out / "config.json").read_text()))
    reader = CheckpointReader(source)
    layer = next(i for i in range(reader.config.num_hidden_layers) if reader.config.is_moe_layer(i))
    gate = load_block(reader, layer, "cpu", torch.float32).mlp.gate
    x = torch.randn(64, reader.config.hidden_size, generator=torch.Generator().manual_seed(0))
    ours_w, ours_ids = gate(x)
    # Logits in float32 as streamq computes them (the written moe_router_dtype asks vLLM for that).
    theirs_w, theirs_ids = vllm_route(seen, F.linear(x.float(), gate.weight.float()), gate.e_score_correction_bias)
    order, theirs_order = ours_ids.sort(-1), theirs_ids.sort(-1)
    assert torch.equal(order.values, theirs_order.values)
    torch.testing.assert_close(ours_w.gather(1, order.indices), theirs_w.gather(1, theirs_order.indices))


def test_vllm_rotates_and_scales_like_streamq(style_run: tuple[Path, Path]) -> None:
    source, out = style_run
    cfg = ModelConfig.load(source)
    seen = vllm_sees(json.loads((out / "config.json").read_text()))
    inv_freq, cos_factor, softmax_scale = vllm_rope(seen, cfg.qk_rope_head_dim, cfg.qk_head_dim)
    ours_inv_freq, ours_factor = rope_frequencies(cfg)
    torch.testing.assert_close(inv_freq, ours_inv_freq)
    assert cos_factor == pytest.approx(ours_factor, rel=1e-12)
    assert softmax_scale == pytest.approx(cfg.softmax_scale, rel=1e-12)


@pytest.mark.parametrize(
    "rope",
    [
        {"mscale": 0.707, "mscale_all_dim": 0.707},  # DeepSeek-V2-Lite's
        {"mscale_all_dim": 1.0},  # streamq (and transformers) then use mscale 1 for cos/sin, vLLM divides anyway
        {"mscale": 1.0},
        {},
        None,  # no scaling at all
    ],
)
def test_rope_edge_cases_reach_vllm_as_streamq_computes_them(rope: dict[str, float] | None) -> None:
    source = synth_config(SynthOptions(preset="tiny", config_style="transformers5"))
    if rope is None:
        source["rope_parameters"] = {"rope_type": "default", "rope_theta": 50000.0}
    else:
        base = {"rope_type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "rope_theta": 1e4}
        source["rope_parameters"] = {**base, **rope}
    cfg = ModelConfig.from_dict(source)
    names = {f"model.layers.{i}.mlp.gate.e_score_correction_bias" for i in range(cfg.num_hidden_layers)}
    seen = vllm_sees(vllm_config(cfg, names))
    inv_freq, cos_factor, softmax_scale = vllm_rope(seen, cfg.qk_rope_head_dim, cfg.qk_head_dim)
    ours_inv_freq, ours_factor = rope_frequencies(cfg)
    torch.testing.assert_close(inv_freq, ours_inv_freq)
    assert cos_factor == pytest.approx(ours_factor, rel=1e-9)
    assert softmax_scale == pytest.approx(cfg.softmax_scale, rel=1e-12)


def test_defaults_that_differ_between_streamq_and_transformers_are_written_out() -> None:
    """A source config that omits n_group, routed_scaling_factor, first_k_dense_replace and q_lora_rank: streamq
    used 1, 1.0, 0 and no q LoRA; transformers (and so vLLM) would fill in DeepSeek-V3's 8, 2.5, 3 and 1536."""
    source = synth_config(SynthOptions(preset="tiny", config_style="transformers5"))
    for name in ("n_group", "topk_group", "routed_scaling_factor", "first_k_dense_replace", "q_lora_rank"):
        del source[name]
    cfg = ModelConfig.from_dict(source)
    names = {f"model.layers.{i}.mlp.gate.e_score_correction_bias" for i in range(cfg.num_hidden_layers)}
    seen = vllm_sees(vllm_config(cfg, names))
    assert (seen["n_group"], seen["topk_group"], seen["routed_scaling_factor"]) == (1, 1, 1.0)
    assert (seen["first_k_dense_replace"], seen["q_lora_rank"]) == (0, None)


def test_greedy_routing_reaches_vllm_as_one_group() -> None:
    """vLLM always routes through grouped_topk: a greedy source with n_group 8 is written as one group, so vLLM
    ranks all experts together as DeepSeek-V2's greedy (and streamq) does."""
    cfg = ModelConfig.from_dict(synth_config(SynthOptions(preset="v2-lite", overrides={"n_group": 8, "topk_group": 3})))
    seen = vllm_sees(vllm_config(cfg, set()))  # no correction bias needed (nor present) for softmax routing
    assert (seen["topk_method"], seen["scoring_func"], seen["n_group"], seen["topk_group"]) == (
        "greedy",
        "softmax",
        1,
        1,
    )
    gate = Gate(cfg)
    gen = torch.Generator().manual_seed(0)
    gate.weight.data = torch.randn(cfg.n_routed_experts, cfg.hidden_size, generator=gen)
    x = torch.randn(256, cfg.hidden_size, generator=gen)
    ours_w, ours_ids = gate(x)
    theirs_w, theirs_ids = vllm_route(seen, F.linear(x, gate.weight), None)
    order, theirs_order = ours_ids.sort(-1), theirs_ids.sort(-1)
    assert torch.equal(order.values, theirs_order.values)
    torch.testing.assert_close(ours_w.gather(1, order.indices), theirs_w.gather(1, theirs_order.indices))
    grouped = vllm_route({**seen, "n_group": 8, "topk_group": 3}, F.linear(x, gate.weight), None)[1]
    assert not torch.equal(grouped.sort(-1).values, order.values)  # the source's groups would have changed routing


def test_a_router_without_its_correction_bias_is_refused() -> None:
    cfg = ModelConfig.from_dict(synth_config(SynthOptions(preset="tiny")))
    names = {f"model.layers.{i}.mlp.gate.e_score_correction_bias" for i in range(cfg.num_hidden_layers)}
    names.discard("model.layers.3.mlp.gate.e_score_correction_bias")
    with pytest.raises(StreamqError, match=r"model\.layers\.3\.mlp\.gate\.e_score_correction_bias is missing"):
        vllm_values(cfg, names)


def test_what_vllm_cannot_express_is_reported() -> None:
    source = synth_config(SynthOptions(preset="tiny", config_style="transformers5"))
    assert vllm_mismatches(ModelConfig.from_dict(source)) == []
    source["rope_interleave"] = False
    source["tie_word_embeddings"] = True
    problems = vllm_mismatches(ModelConfig.from_dict(source))
    assert [p.split(":")[0] for p in problems] == ["rope_interleave false", "tie_word_embeddings true"]


@pytest.mark.slow
def test_transformers_loads_the_transformers5_style_output_and_matches_streamq(style_run: tuple[Path, Path]) -> None:
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    from streamq.model.deepseek import forward_blocks

    _, out = style_run
    reader = CheckpointReader(out)
    ids = torch.randint(0, reader.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    ours = forward_blocks(reader, ids, dtype=torch.float32)
    written = json.loads((out / "config.json").read_text())
    model_class, config = AutoModelForCausalLM, None
    if written["model_type"] == "kimi_k2":  # unknown to transformers: load through the classes its config names
        config_class, model_class = hf_classes(written)
        config = config_class.from_dict({k: v for k, v in written.items() if k != "model_type"})
    model = model_class.from_pretrained(
        out, config=config, quantization_config=CompressedTensorsConfig(dequantize=True), dtype=torch.float32
    )
    model.config._attn_implementation = "eager"
    model.float()
    with torch.no_grad():
        theirs = model(input_ids=ids).logits.float()
    assert ((ours - theirs).norm() / theirs.norm()).item() < 1e-2
