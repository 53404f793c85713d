"""The model's shape and routing, read from a checkpoint's config.json.

The architecture is config.json's ``architectures`` / ``model_type`` (DeepSeek-V2 and V2-Lite, V3 and R1, V3.2,
Kimi-K2), never the model's name; the router is its ``scoring_func`` + ``topk_method`` pair, checked against the
pairs the native Gate implements. Both config styles are accepted: DeepSeek's release (``rope_scaling``,
``rope_theta``) and transformers 5 (``rope_parameters``, ``rope_interleave``). Nothing here is a default for
DeepSeek-V3 itself: every checkpoint fact comes from the file, and a field the file leaves out takes the default of
its family's reference configuration code.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from streamq.errors import StreamqError

# The architecture comes from config.json's ``architectures`` or ``model_type``, never from the model's name. Each
# maps to the family whose reference code sets the defaults of routing fields a config leaves out (DeepSeek-V2's
# configuration code: softmax + greedy, no renormalisation; DeepSeek-V3's: sigmoid + noaux_tc, renormalised).
# Kimi-K2 ships DeepSeek-V3's architecture under model_type kimi_k2; V3.2 adds an indexer to V3's attention.
V2, V3 = "deepseek_v2", "deepseek_v3"
ARCHITECTURES = {"DeepseekV2ForCausalLM": V2, "DeepseekV3ForCausalLM": V3, "DeepseekV32ForCausalLM": V3}
MODEL_TYPES = {"deepseek_v2": V2, "deepseek_v3": V3, "deepseek_v32": V3, "kimi_k2": V3}
ROUTING_DEFAULTS = {
    V2: {"scoring_func": "softmax", "topk_method": "greedy", "norm_topk_prob": False},
    V3: {"scoring_func": "sigmoid", "topk_method": "noaux_tc", "norm_topk_prob": True},
}
# (scoring_func, topk_method) pairs the published models use, each implemented by model/deepseek.py's Gate.
ROUTINGS = {
    ("softmax", "greedy"): "DeepSeek-V2-Lite",
    ("softmax", "group_limited_greedy"): "DeepSeek-V2",
    ("sigmoid", "noaux_tc"): "DeepSeek-V3, Kimi-K2",
}


@dataclass(frozen=True)
class RopeConfig:
    theta: float
    kind: str = "default"  # "default" or "yarn"
    factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    interleave: bool = True


@dataclass(frozen=True)
class IndexerConfig:
    """DeepSeek-V3.2's lightning indexer (DeepSeek Sparse Attention): each query attends only to the ``topk`` keys
    the indexer scores highest. Field names as in the release's config.json (``index_n_heads``, ``index_head_dim``,
    ``index_topk``); ``scale_fmt`` is its ``quantization_config.scale_fmt`` ("ue8m0": the indexer's FP8 activation
    scales are powers of two), ``rope_interleave`` its ``indexer_rope_interleave`` where present (GLM-MoE-DSA
    configs carry it; V3.2's config has none: its indexer rotates half-split pairs, unlike its MLA)."""

    n_heads: int
    head_dim: int
    topk: int
    scale_fmt: str | None = None
    rope_interleave: bool = False


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    n_group: int
    topk_group: int
    norm_topk_prob: bool
    routed_scaling_factor: float
    first_k_dense_replace: int
    moe_layer_freq: int
    num_nextn_predict_layers: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    tie_word_embeddings: bool = False
    fp8_block: tuple[int, int] | None = None
    indexer: IndexerConfig | None = None  # DeepSeek-V3.2's sparse attention; None for dense-attention models
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def uses_correction_bias(self) -> bool:
        """The router reads ``e_score_correction_bias`` (it steers which experts are chosen)."""
        return self.topk_method == "noaux_tc"

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_layers_with_mtp(self) -> int:
        """Blocks stored in the checkpoint: the decoder layers plus the multi-token-prediction layers."""
        return self.num_hidden_layers + self.num_nextn_predict_layers

    def is_moe_layer(self, layer: int) -> bool:
        return (
            self.n_routed_experts > 0
            and layer >= self.first_k_dense_replace
            and layer % max(self.moe_layer_freq, 1) == 0
        )

    @property
    def softmax_scale(self) -> float:
        scale = self.qk_head_dim**-0.5
        if self.rope.kind == "yarn" and self.rope.mscale_all_dim:
            m = yarn_mscale(self.rope.factor, self.rope.mscale_all_dim)
            scale *= m * m
        return scale

    @classmethod
    def from_dict(cls, cfg: dict[str, Any], source: str = "config.json") -> ModelConfig:
        family = architecture_family(cfg, source)
        try:
            return _parse(cfg, family)
        except KeyError as exc:
            raise StreamqError(
                f"{source}: required field {exc.args[0]!r} is missing; is this a DeepSeek-V2/V3 config?"
            ) from None
        except (TypeError, ValueError) as exc:
            raise StreamqError(f"{source}: invalid value ({exc}); fix the field or re-download the config") from None

    @classmethod
    def load(cls, model_dir: str | Path) -> ModelConfig:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise StreamqError(f"{path}: not found; MODEL must be a Hugging Face checkpoint directory with config.json")
        try:
            cfg = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise StreamqError(f"{path}: not valid JSON ({exc}); re-download the file") from None
        return cls.from_dict(cfg, str(path))


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def architecture_family(cfg: dict[str, Any], source: str) -> str:
    """``deepseek_v2`` or ``deepseek_v3``, from config.json's ``architectures`` or ``model_type``."""
    for arch in cfg.get("architectures") or []:
        if arch in ARCHITECTURES:
            return ARCHITECTURES[arch]
    model_type = cfg.get("model_type")
    if model_type in MODEL_TYPES:
        return MODEL_TYPES[model_type]
    found = ", ".join(cfg.get("architectures") or []) or model_type or "nothing"
    raise StreamqError(
        f"{source}: unsupported architecture {found}; streamq reads architectures {', '.join(ARCHITECTURES)} "
        f"(model_type {', '.join(MODEL_TYPES)}): DeepSeek-V2/V2-Lite, V3/R1, V3.2, Kimi-K2 and their fine-tunes"
    )


def _routing(cfg: dict[str, Any], family: str) -> tuple[str, str]:
    """(scoring_func, topk_method), refused unless the pair is one the Gate implements."""
    defaults = ROUTING_DEFAULTS[family]
    scoring = cfg.get("scoring_func") or defaults["scoring_func"]
    method = cfg.get("topk_method") or defaults["topk_method"]
    if (scoring, method) not in ROUTINGS:
        known = "; ".join(f"{s} + {m} ({models})" for (s, m), models in ROUTINGS.items())
        raise ValueError(f"scoring_func {scoring!r} with topk_method {method!r} is not supported; supported: {known}")
    return scoring, method


def _check_groups(n_experts: int, top_k: int, n_group: int, topk_group: int, method: str) -> None:
    if n_experts and n_experts % n_group:
        raise ValueError(f"n_routed_experts={n_experts} is not divisible by n_group={n_group}")
    if method == "greedy" or not n_experts:
        return
    if not 1 <= topk_group <= n_group:
        raise ValueError(f"topk_group={topk_group} must be between 1 and n_group={n_group}")
    if topk_group * (n_experts // n_group) < top_k:
        raise ValueError(
            f"num_experts_per_tok={top_k} exceeds the {topk_group * (n_experts // n_group)} experts of the "
            f"topk_group={topk_group} groups {method} keeps"
        )


def _check_weighting(scoring: str, norm: bool, scaling: float) -> None:
    if scoring == "softmax" and norm and scaling != 1.0:
        # DeepSeek-V2's code scales only unnormalised weights; vLLM and transformers' V3 scale after normalising.
        raise ValueError(
            f"norm_topk_prob true with scoring_func softmax and routed_scaling_factor {scaling}: DeepSeek-V2's "
            "code and vLLM disagree on this combination; supported: routed_scaling_factor 1.0 or norm_topk_prob false"
        )


def _parse(cfg: dict[str, Any], family: str) -> ModelConfig:
    scoring, topk_method = _routing(cfg, family)
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={cfg['hidden_act']!r}; only silu is supported")
    n_experts = int(cfg.get("n_routed_experts") or 0)
    n_group = int(cfg.get("n_group") or 1)
    topk_group = int(cfg.get("topk_group") or 1)
    top_k = int(cfg.get("num_experts_per_tok") or 0)
    _check_groups(n_experts, top_k, n_group, topk_group, topk_method)
    norm = bool(cfg.get("norm_topk_prob", ROUTING_DEFAULTS[family]["norm_topk_prob"]))
    scaling = float(cfg.get("routed_scaling_factor", 1.0))
    _check_weighting(scoring, norm, scaling)
    q_lora = cfg.get("q_lora_rank")
    return ModelConfig(
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=int(cfg["hidden_size"]),
        intermediate_size=int(cfg["intermediate_size"]),
        moe_intermediate_size=int(cfg["moe_intermediate_size"]),
        num_hidden_layers=int(cfg["num_hidden_layers"]),
        num_attention_heads=int(cfg["num_attention_heads"]),
        q_lora_rank=int(q_lora) if q_lora else None,
        kv_lora_rank=int(cfg["kv_lora_rank"]),
        qk_nope_head_dim=int(cfg["qk_nope_head_dim"]),
        qk_rope_head_dim=int(cfg["qk_rope_head_dim"]),
        v_head_dim=int(cfg["v_head_dim"]),
        n_routed_experts=n_experts,
        n_shared_experts=int(cfg.get("n_shared_experts") or 0),
        num_experts_per_tok=top_k,
        n_group=n_group,
        topk_group=topk_group,
        norm_topk_prob=norm,
        routed_scaling_factor=scaling,
        first_k_dense_replace=int(cfg.get("first_k_dense_replace") or 0),
        moe_layer_freq=int(cfg.get("moe_layer_freq") or 1),
        num_nextn_predict_layers=int(cfg.get("num_nextn_predict_layers", cfg.get("num_mtp_layers", 0)) or 0),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        rope=_parse_rope(cfg),
        scoring_func=scoring,
        topk_method=topk_method,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        fp8_block=_parse_fp8(cfg.get("quantization_config")),
        indexer=_parse_indexer(cfg),
        raw=cfg,
    )


def _parse_indexer(cfg: dict[str, Any]) -> IndexerConfig | None:
    """The indexer fields, present exactly when the model has DeepSeek Sparse Attention."""
    if "index_topk" not in cfg and cfg.get("model_type") != "deepseek_v32":
        return None
    indexer = IndexerConfig(
        n_heads=int(cfg["index_n_heads"]),
        head_dim=int(cfg["index_head_dim"]),
        topk=int(cfg["index_topk"]),
        scale_fmt=(cfg.get("quantization_config") or {}).get("scale_fmt"),
        rope_interleave=bool(cfg.get("indexer_rope_interleave", False)),
    )
    rope_dim = int(cfg["qk_rope_head_dim"])
    if min(indexer.n_heads, indexer.topk) < 1:
        raise ValueError(f"index_n_heads={indexer.n_heads}, index_topk={indexer.topk}; both must be positive")
    # The indexer's Hadamard rotation needs a power of two, and its rotary part is the first qk_rope_head_dim.
    if indexer.head_dim & (indexer.head_dim - 1) or indexer.head_dim < rope_dim:
        raise ValueError(
            f"index_head_dim={indexer.head_dim}; it must be a power of two of at least qk_rope_head_dim={rope_dim}"
        )
    if not cfg.get("q_lora_rank"):
        raise ValueError("index_topk is set but q_lora_rank is not; the indexer's queries read the q LoRA latent")
    if indexer.scale_fmt not in (None, "ue8m0"):
        raise ValueError(f"quantization_config.scale_fmt={indexer.scale_fmt!r}; only ue8m0 (or none) is supported")
    return indexer


def _parse_rope(cfg: dict[str, Any]) -> RopeConfig:
    # transformers 5 writes rope_parameters (theta inside); the release writes rope_scaling + rope_theta.
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind not in ("default", "yarn"):
        raise ValueError(f"rope type {kind!r}; only default and yarn RoPE are supported")
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    interleave = bool(cfg.get("rope_interleave", True))
    if kind == "default":
        return RopeConfig(theta=theta, interleave=interleave)
    max_pos = int(cfg.get("max_position_embeddings", 4096))
    orig = int(params.get("original_max_position_embeddings", max_pos))
    return RopeConfig(
        theta=theta,
        kind="yarn",
        factor=float(params.get("factor") or max_pos / orig),
        original_max_position_embeddings=orig,
        beta_fast=float(params.get("beta_fast") or 32),
        beta_slow=float(params.get("beta_slow") or 1),
        mscale=float(params.get("mscale") or 0.0),
        mscale_all_dim=float(params.get("mscale_all_dim") or 0.0),
        interleave=interleave,
    )


# How a source checkpoint's Linears may be stored: quantization_config's quant_method (none: bf16 / fp16).
SOURCE_QUANT_METHODS = ("fp8", "compressed-tensors")


def _parse_fp8(qcfg: dict[str, Any] | None) -> tuple[int, int] | None:
    """The FP8 block of a DeepSeek FP8 release; None for bf16 and compressed-tensors sources (the reader parses
    those, streamq/io/source_quant.py). Any other quant_method is refused here, before a tensor is read."""
    method = qcfg.get("quant_method") if qcfg else None
    if method is not None and method not in SOURCE_QUANT_METHODS:
        raise ValueError(
            f"quantization_config.quant_method {method!r}; streamq reads fp8 (block scales), compressed-tensors "
            "(pack-quantized) or unquantized bf16/fp16 sources: dequantize the checkpoint to bf16 first"
        )
    if method != "fp8":
        return None
    block = qcfg.get("weight_block_size") or [128, 128]
    if len(block) != 2 or any(int(b) <= 0 for b in block):
        raise ValueError(f"quantization_config.weight_block_size {block}; needs two positive sizes, e.g. [128, 128]")
    return int(block[0]), int(block[1])
