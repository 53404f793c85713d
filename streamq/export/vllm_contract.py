"""What vLLM's DeepSeek model reads from config.json, and the value streamq writes for each attribute.

streamq calibrated the model with its own forward pass (``streamq/model/deepseek.py`` on the ``ModelConfig`` parsed
by ``streamq/config.py``). A loader that falls back to a different default than streamq did — or that reads a field
streamq's source config never spelled out — runs a different model than the one the weights were fitted to. So the
written config.json carries every attribute vLLM reads, each with the value that makes vLLM compute what streamq
computed; nothing is left to a default.

Source of the list (vLLM read at these commits of github.com/vllm-project/vllm, the newest stored versions):

* ``vllm/model_executor/models/deepseek_v2.py`` @ 002d6073aa034d4f5545d45021b0e56d1f3c3593
  (DeepseekV2MoE, DeepseekV2MLAAttention, DeepseekV2DecoderLayer, DeepseekV2Model, DeepseekV2ForCausalLM)
* ``vllm/model_executor/layers/rotary_embedding/__init__.py`` @ 07b12f1b16d5568eeb29a52fd8c9296a51f478ed (get_rope)
* ``vllm/model_executor/layers/rotary_embedding/deepseek_scaling_rope.py`` @ 00d678e109f09c2d1845e7a6626ba9fd5980e4f0
* ``vllm/model_executor/layers/fused_moe/router/grouped_topk_router.py`` @ 055e47c28003156421365af985d676fc921cb075
* ``vllm/transformers_utils/config.py`` @ 0036026e7171bd02e3c1d4687b102dec9c446049 (config loading)
* ``vllm/model_executor/layers/mla.py`` @ 00b9b7ad3a37ff624e5816d1b7ae713ecb0a705f (takes the sizes above as
  arguments; reads no config attribute itself)

How vLLM gets the attributes: ``HFConfigParser`` loads config.json with transformers' ``AutoConfig`` (vLLM requires
transformers >= 5; vLLM's own config registry maps model_type ``kimi_k2`` and ``deepseek_v32`` to a DeepseekV3Config),
so every attribute absent from the file takes transformers' ``DeepseekV3Config`` default (``DeepseekV2Config`` for
model_type deepseek_v2) — which are DeepSeek-V3's own numbers (n_group 8, routed_scaling_factor 2.5,
first_k_dense_replace 3, q_lora_rank 1536, …), not the ``getattr`` fallbacks in deepseek_v2.py; only attributes the
config class does not declare (scoring_func, moe_layer_freq, moe_router_dtype, and topk_method for V3) fall through
to those. The same DeepseekV2MoE serves every family: scoring_func picks softmax or sigmoid, and grouped_topk ranks
groups by their best expert without a correction bias (DeepSeek-V2's group_limited_greedy; one group is plain
greedy) or by their two best with it (noaux_tc). Rope: deepseek_v2.py reads only
``config.rope_parameters`` (the transformers-5 attribute). transformers builds it from config.json's
``rope_parameters``, or from the release's ``rope_scaling`` + ``rope_theta`` (``rope_scaling`` wins when both are
present: transformers 5.24), and vLLM's ``patch_rope_parameters`` then turns a legacy ``type`` into ``rope_type``.
The MLA layer renames any non-default ``rope_type`` to ``deepseek_yarn`` (unless ``apply_yarn_scaling`` is false)
and always rotates interleaved pairs (``is_neox_style=False``); it never reads ``rope_interleave``.
streamq writes both ``rope_scaling`` (with ``type`` and ``rope_type``) + ``rope_theta`` and an equal
``rope_parameters``, so older readers of either key and transformers all see the same rope.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from streamq.config import ModelConfig, RopeConfig, yarn_mscale
from streamq.errors import StreamqError


class _Absent:
    """The attribute must not be in the written config: streamq computes what vLLM does without it."""

    def __repr__(self) -> str:
        return "ABSENT"


ABSENT: Any = _Absent()
REQUIRED: Any = "required (no fallback: a missing key raises)"

Derive = Callable[[ModelConfig, frozenset[str]], Any]


@dataclass(frozen=True)
class Attribute:
    """One config attribute vLLM reads: ``path`` in config.json (``("rope_parameters", "factor")`` for a key of the
    rope dict); ``vllm_default``, the ``getattr`` / ``.get`` default in vLLM (REQUIRED where vLLM indexes it);
    ``transformers_default``, the ``DeepseekV3Config`` class default that fills the attribute first when
    config.json lacks it (ABSENT when the class does not declare it); where vLLM reads it; and how streamq derives
    the value it writes from the source checkpoint."""

    path: tuple[str, ...]
    vllm_default: Any
    transformers_default: Any
    read_at: str
    how: str
    derive: Derive

    @property
    def name(self) -> str:
        return ".".join(self.path)


def _field(name: str) -> Derive:
    return lambda cfg, _names: getattr(cfg, name)


def _rope(value: Callable[[RopeConfig], Any]) -> Derive:
    return lambda cfg, _names: value(cfg.rope)


def _yarn(value: Callable[[RopeConfig], Any]) -> Derive:
    return lambda cfg, _names: value(cfg.rope) if cfg.rope.kind == "yarn" else ABSENT


def _index(name: str) -> Derive:
    return lambda cfg, _names: getattr(cfg.indexer, name) if cfg.indexer is not None else ABSENT


def bias_name(layer: int) -> str:
    return f"model.layers.{layer}.mlp.gate.e_score_correction_bias"


def moe_layers(cfg: ModelConfig) -> list[int]:
    return [i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]


def topk_method(cfg: ModelConfig, names: frozenset[str]) -> Any:
    """The source's routing method (config.json, or its family's default). vLLM creates
    ``gate.e_score_correction_bias`` only for ``noaux_tc`` (a KeyError at load if the tensor is absent) and
    otherwise picks experts without one, so noaux_tc needs the bias of every MoE layer in the index."""
    if cfg.uses_correction_bias:
        missing = [bias_name(i) for i in moe_layers(cfg) if bias_name(i) not in names]
        if missing:
            raise StreamqError(
                f"model.safetensors.index.json: {missing[0]} is missing; topk_method noaux_tc (sigmoid scores + "
                "correction bias) needs it in every MoE layer: use the complete checkpoint"
            )
    return cfg.topk_method


def scoring_func(cfg: ModelConfig, _names: frozenset[str]) -> Any:
    return cfg.scoring_func


def expert_groups(name: str) -> Derive:
    """n_group / topk_group: vLLM always routes through grouped_topk, so greedy routing (which ignores groups,
    as DeepSeek-V2's code does) is written as a single group."""
    return lambda cfg, _names: 1 if cfg.topk_method == "greedy" else getattr(cfg, name)


def vllm_mscale(rope: RopeConfig) -> float:
    """The ``mscale`` for which vLLM's cos/sin factor, yarn_mscale(f, mscale) / yarn_mscale(f, mscale_all_dim),
    equals streamq's. streamq (like transformers) uses that ratio only when both are set and yarn_mscale(f)
    otherwise; vLLM always divides by yarn_mscale(f, mscale_all_dim), with mscale defaulting to 1."""
    if rope.mscale and rope.mscale_all_dim:
        return rope.mscale
    if not rope.mscale_all_dim or rope.factor <= 1:
        return 1.0
    wanted = yarn_mscale(rope.factor) * yarn_mscale(rope.factor, rope.mscale_all_dim)
    return (wanted - 1.0) / (0.1 * math.log(rope.factor))


_DS = "deepseek_v2.py"
_MLA = "deepseek_v2.py DeepseekV2MLAAttention"
_MOE = "deepseek_v2.py DeepseekV2MoE"
_ROPE = "get_rope('deepseek_yarn') -> DeepseekScalingRotaryEmbedding"
R, A = REQUIRED, ABSENT


def _never(_cfg: ModelConfig, _names: frozenset[str]) -> Any:
    return ABSENT


# (path, vLLM default, transformers DeepseekV3Config default, where vLLM reads it, how streamq derives it, derive)
ATTRIBUTES: tuple[Attribute, ...] = tuple(
    Attribute(*row)
    for row in (
        # -- shape --
        (("vocab_size",), R, 129280, _DS + " DeepseekV2Model", "source", _field("vocab_size")),
        (("hidden_size",), R, 7168, _DS + " DecoderLayer", "source", _field("hidden_size")),
        (("intermediate_size",), R, 18432, _DS + " DeepseekV2MLP", "source", _field("intermediate_size")),
        (("moe_intermediate_size",), R, 2048, _MOE, "source", _field("moe_intermediate_size")),
        (("num_hidden_layers",), R, 61, _DS + " DeepseekV2Model", "source", _field("num_hidden_layers")),
        (("num_attention_heads",), R, 128, _DS + " DecoderLayer", "source", _field("num_attention_heads")),
        (
            ("q_lora_rank",),
            None,
            1536,
            _DS + " hasattr(config, 'q_lora_rank')",
            "source; null when absent or 0",
            _field("q_lora_rank"),
        ),
        (("kv_lora_rank",), 0, 512, _DS + " DecoderLayer getattr", "source", _field("kv_lora_rank")),
        (("qk_nope_head_dim",), 0, 128, _DS + " DecoderLayer getattr", "source", _field("qk_nope_head_dim")),
        (("qk_rope_head_dim",), 0, 64, _DS + " DecoderLayer getattr", "source", _field("qk_rope_head_dim")),
        (("v_head_dim",), 0, 128, _DS + " DecoderLayer getattr", "source", _field("v_head_dim")),
        (("rms_norm_eps",), R, 1e-6, _DS + " RMSNorm", "source (streamq default 1e-6)", _field("rms_norm_eps")),
        (("hidden_act",), R, "silu", _DS + " (only silu)", "silu: streamq refuses any other", lambda _cfg, _n: "silu"),
        (
            ("max_position_embeddings",),
            8192,
            4096,
            _DS + " DecoderLayer getattr",
            "source (streamq default 4096)",
            _field("max_position_embeddings"),
        ),
        (
            ("num_nextn_predict_layers",),
            0,
            1,
            "models/utils get_spec_layer_idx_from_weight_name",
            "source num_nextn_predict_layers or num_mtp_layers",
            _field("num_nextn_predict_layers"),
        ),
        # -- which layers are MoE --
        (
            ("first_k_dense_replace",),
            R,
            3,
            _DS + " DecoderLayer",
            "source (streamq default 0)",
            _field("first_k_dense_replace"),
        ),
        (
            ("moe_layer_freq",),
            1,
            A,
            _DS + " DecoderLayer getattr",
            "source (streamq default 1)",
            _field("moe_layer_freq"),
        ),
        (
            ("n_routed_experts",),
            R,
            256,
            _DS + " DecoderLayer (None: no MoE layer)",
            "source; null when 0",
            lambda cfg, _n: cfg.n_routed_experts or None,
        ),
        (
            ("n_shared_experts",),
            R,
            1,
            _MOE + " (None: no shared experts)",
            "source; null when 0",
            lambda cfg, _n: cfg.n_shared_experts or None,
        ),
        # -- routing --
        (("num_experts_per_tok",), R, 8, _MOE + " top_k", "source", _field("num_experts_per_tok")),
        (
            ("norm_topk_prob",),
            R,
            True,
            _MOE + " renormalize",
            "source (streamq default true)",
            _field("norm_topk_prob"),
        ),
        (
            ("routed_scaling_factor",),
            1.0,
            2.5,
            _MOE + " getattr",
            "source (streamq default 1.0)",
            _field("routed_scaling_factor"),
        ),
        (
            ("n_group",),
            1,
            8,
            _MOE + " getattr num_expert_group",
            "source (streamq default 1); 1 for greedy",
            expert_groups("n_group"),
        ),
        (
            ("topk_group",),
            1,
            4,
            _MOE + " getattr",
            "source (streamq default 1); 1 for greedy",
            expert_groups("topk_group"),
        ),
        (
            ("topk_method",),
            None,
            A,
            _MOE + " getattr: 'noaux_tc' creates gate.e_score_correction_bias",
            "source (family default); noaux_tc needs every MoE layer's gate.e_score_correction_bias in the index",
            topk_method,
        ),
        (("scoring_func",), "softmax", A, _MOE + " getattr", "source (family default)", scoring_func),
        (
            ("moe_router_dtype",),
            None,
            A,
            _DS + " _get_moe_router_dtype getattr",
            "float32: streamq's router computes its logits in float32",
            lambda _cfg, _n: "float32",
        ),
        # -- attention variants streamq does not compute --
        # -- DeepSeek-V3.2's sparse attention (vLLM builds the indexer when index_topk is present) --
        (
            ("index_topk",),
            A,
            A,
            _DS + " hasattr: DeepSeek-V3.2 sparse attention",
            "source; absent without",
            _index("topk"),
        ),
        (("index_n_heads",), A, A, _DS + " Indexer (V3.2 only)", "source; absent without", _index("n_heads")),
        (("index_head_dim",), A, A, _DS + " Indexer (V3.2 only)", "source; absent without", _index("head_dim")),
        (("llama_4_scaling",), None, A, _DS + " DeepseekV2Model getattr", "absent", _never),
        # -- rope: keys of the rope_parameters transformers builds, as vLLM reads them --
        (
            ("rope_parameters", "rope_type"),
            R,
            A,
            _MLA + " rope_parameters['rope_type']",
            "yarn or default, from rope_scaling type/rope_type or rope_parameters.rope_type",
            _rope(lambda r: r.kind),
        ),
        (
            ("rope_parameters", "rope_theta"),
            10000,
            A,
            "get_rope .get",
            "source rope_theta (either style)",
            _rope(lambda r: r.theta),
        ),
        (
            ("rope_parameters", "factor"),
            R,
            A,
            _ROPE + "; MLA softmax scale",
            "source (else max_pos / original)",
            _yarn(lambda r: r.factor),
        ),
        (
            ("rope_parameters", "original_max_position_embeddings"),
            R,
            A,
            _ROPE,
            "source (else max_pos)",
            _yarn(lambda r: r.original_max_position_embeddings),
        ),
        (("rope_parameters", "beta_fast"), 32, A, _ROPE, "source (streamq default 32)", _yarn(lambda r: r.beta_fast)),
        (("rope_parameters", "beta_slow"), 1, A, _ROPE, "source (streamq default 1)", _yarn(lambda r: r.beta_slow)),
        (
            ("rope_parameters", "mscale"),
            1,
            A,
            _ROPE,
            "source, or the value giving streamq's cos/sin factor",
            _yarn(vllm_mscale),
        ),
        (
            ("rope_parameters", "mscale_all_dim"),
            0,
            A,
            _ROPE + "; MLA softmax scale .get(…, False)",
            "source (0 when absent)",
            _yarn(lambda r: r.mscale_all_dim),
        ),
        (("rope_parameters", "apply_yarn_scaling"), True, A, _MLA + " .get", "absent: plain YaRN", _never),
        (("rope_parameters", "extrapolation_factor"), 1, A, _ROPE, "absent: streamq's YaRN uses 1", _never),
        (("rope_parameters", "attn_factor"), 1, A, _ROPE, "absent: streamq's YaRN uses 1", _never),
        (("rope_parameters", "partial_rotary_factor"), 1.0, A, "get_rope .get", "absent: all rope dims rotate", _never),
    )
)

# Read by the transformers model (and streamq), never by vLLM: values vLLM cannot reproduce are reported by
# ``vllm_mismatches``.
NOT_READ_BY_VLLM = {
    "rope_interleave": "vLLM's MLA always rotates interleaved pairs (get_rope(..., is_neox_style=False))",
    "tie_word_embeddings": "vLLM's DeepseekV2ForCausalLM always loads a separate lm_head.weight",
}


def vllm_values(cfg: ModelConfig, names: Iterable[str]) -> dict[tuple[str, ...], Any]:
    """Each attribute's value (or ABSENT) for the source ``cfg`` whose index holds tensor ``names``."""
    names = frozenset(names)
    return {a.path: a.derive(cfg, names) for a in ATTRIBUTES}


def vllm_config(cfg: ModelConfig, names: Iterable[str]) -> dict[str, Any]:
    """``cfg.raw`` with every contract attribute set as vLLM must read it; the rope written both ways."""
    out = dict(cfg.raw)
    rope_params: dict[str, Any] = {}
    for path, value in vllm_values(cfg, names).items():
        target = rope_params if path[0] == "rope_parameters" else out
        key = path[-1]
        if value is ABSENT:
            target.pop(key, None)
        else:
            target[key] = value
    out["rope_parameters"] = rope_params
    out["rope_theta"] = rope_params["rope_theta"]
    out["rope_interleave"] = cfg.rope.interleave
    out["rope_scaling"] = _legacy_rope_scaling(rope_params)
    return out


def _legacy_rope_scaling(rope_params: Mapping[str, Any]) -> dict[str, Any] | None:
    """The release's form: no theta inside (``rope_theta`` is top level), the type under both names."""
    if rope_params["rope_type"] == "default":
        return None
    scaling = {k: v for k, v in rope_params.items() if k != "rope_theta"}
    return {**scaling, "type": rope_params["rope_type"]}


def vllm_mismatches(cfg: ModelConfig) -> list[str]:
    """What in ``cfg`` vLLM cannot compute as streamq does, whatever config.json says; empty when none."""
    problems = []
    if not cfg.rope.interleave:
        problems.append(f"rope_interleave false: {NOT_READ_BY_VLLM['rope_interleave']}")
    if cfg.tie_word_embeddings:
        problems.append(f"tie_word_embeddings true: {NOT_READ_BY_VLLM['tie_word_embeddings']}")
    return problems


def read_like_vllm(hf_config: Any, attribute: Attribute) -> Any:
    """``attribute`` as vLLM reads it from a config transformers loaded (what ``HFConfigParser`` hands the model):
    ABSENT when neither the config nor a vLLM fallback supplies it (where vLLM would raise)."""
    default = ABSENT if attribute.vllm_default is REQUIRED else attribute.vllm_default
    if len(attribute.path) == 1:
        return getattr(hf_config, attribute.path[0], default)
    container = getattr(hf_config, attribute.path[0], None) or {}
    return container.get(attribute.path[1], default)
