"""Synthetic checkpoints in DeepSeek's release layout, one preset per architecture streamq reads: ``tiny`` and
``v3`` (DeepSeek-V3 at tiny and at full width), ``v2-lite`` (DeepSeek-V2-Lite) and ``kimi-k2`` (Kimi-K2), the
last two at tiny width with their real routing and rope fields.

The config uses the release's field names (``rope_scaling`` yarn, ``quantization_config`` fp8 [128, 128], …),
or transformers 5's (``rope_parameters``, ``rope_interleave``) with ``SynthOptions(config_style="transformers5")``;
linear weights are float8 e4m3 with ``weight_scale_inv`` block scales, norms and the router are bf16, the
router's correction bias (noaux_tc routing only) float32 (``SynthOptions.source_format`` "bf16" stores the Linears
in bf16 and "int4" packs the routed experts as Kimi-K2-Thinking does: see synth_formats.py); the first layers are
dense, the rest MoE, and the multi-token-prediction layers follow the decoder layers. Tensors are generated and
written one row slab at a time, so even the full DeepSeek-V3 width never holds more than one slab in RAM. Every
tensor's values come from a generator seeded by its name, so a checkpoint is reproducible and independent of the
shard layout.
"""

from __future__ import annotations

import json
import shutil
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from streamq.config import ModelConfig
from streamq.errors import StreamqError
from streamq.io.safetensors_stream import INDEX_NAME, SCALE_SUFFIX
from streamq.io.safetensors_write import TensorSpec, write_safetensors
from streamq.kernels.fp8_blocks import quantize_fp8_blocks
from streamq.synth_formats import (
    FP8_BLOCK,
    INT4_GROUP,
    check_int4_widths,
    check_source_format,
    linear_kind,
    pack_int4_rows,
    quantization_config,
)
from streamq.tiktoken_tokenizer import load_tiktoken_tokenizer

CONFIG_STYLES = ("release", "transformers5")
_SLAB_ROWS = 1024  # a multiple of the FP8 block, small enough that a slab of any DeepSeek tensor is < 60 MB

_COMMON = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "max_position_embeddings": 163840,
    "moe_layer_freq": 1,
    "norm_topk_prob": True,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "scoring_func": "sigmoid",
    "topk_method": "noaux_tc",
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
}

# DeepSeek-V3.2(-Exp) on top of a V3 preset: its config.json's architecture and indexer fields (index_n_heads is
# half the attention heads, index_head_dim twice qk_rope_head_dim, as in the release).
_V32 = {"architectures": ["DeepseekV32ForCausalLM"], "model_type": "deepseek_v32"}

PRESETS: dict[str, dict[str, object]] = {
    # Small enough for CPU tests, with dimensions that are and are not multiples of the FP8 block.
    "tiny": {
        "vocab_size": 2048,
        "hidden_size": 256,
        "intermediate_size": 384,
        "moe_intermediate_size": 256,
        "num_hidden_layers": 4,
        "first_k_dense_replace": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "q_lora_rank": 384,
        "kv_lora_rank": 128,
        "qk_nope_head_dim": 32,
        "qk_rope_head_dim": 32,
        "v_head_dim": 32,
        "n_routed_experts": 16,
        "n_shared_experts": 1,
        "num_experts_per_tok": 4,
        "n_group": 4,
        "topk_group": 2,
        "routed_scaling_factor": 2.5,
        "num_nextn_predict_layers": 1,
    },
    # DeepSeek-V2-Lite's architecture at tiny width: q projected directly (q_lora_rank null), softmax scores,
    # greedy top-6 of 64 experts without renormalisation, two shared experts, one dense layer, its YaRN rope.
    "v2-lite": {
        "architectures": ["DeepseekV2ForCausalLM"],
        "model_type": "deepseek_v2",
        "vocab_size": 2048,
        "hidden_size": 256,
        "intermediate_size": 384,
        "moe_intermediate_size": 128,
        "num_hidden_layers": 3,
        "first_k_dense_replace": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "q_lora_rank": None,
        "kv_lora_rank": 128,
        "qk_nope_head_dim": 32,
        "qk_rope_head_dim": 32,
        "v_head_dim": 32,
        "n_routed_experts": 64,
        "n_shared_experts": 2,
        "num_experts_per_tok": 6,
        "n_group": 1,
        "topk_group": 1,
        "norm_topk_prob": False,
        "routed_scaling_factor": 1.0,
        "scoring_func": "softmax",
        "topk_method": "greedy",
        "rope_scaling": {
            "beta_fast": 32,
            "beta_slow": 1,
            "factor": 40,
            "mscale": 0.707,
            "mscale_all_dim": 0.707,
            "original_max_position_embeddings": 4096,
            "type": "yarn",
        },
        "num_nextn_predict_layers": 0,
    },
    # Kimi-K2's architecture at tiny width: DeepSeek-V3's under model_type kimi_k2, 384 experts in one group
    # (top-8), routed_scaling_factor 2.827, one dense layer, rope theta 50000 with YaRN factor 32, no MTP layer.
    "kimi-k2": {
        "model_type": "kimi_k2",
        "vocab_size": 2048,
        "hidden_size": 256,
        "intermediate_size": 384,
        "moe_intermediate_size": 128,
        "num_hidden_layers": 3,
        "first_k_dense_replace": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "q_lora_rank": 384,
        "kv_lora_rank": 128,
        "qk_nope_head_dim": 32,
        "qk_rope_head_dim": 32,
        "v_head_dim": 32,
        "n_routed_experts": 384,
        "n_shared_experts": 1,
        "num_experts_per_tok": 8,
        "n_group": 1,
        "topk_group": 1,
        "routed_scaling_factor": 2.827,
        "max_position_embeddings": 131072,
        "rope_theta": 50000.0,
        "rope_scaling": {
            "beta_fast": 1.0,
            "beta_slow": 1.0,
            "factor": 32.0,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
            "original_max_position_embeddings": 4096,
            "type": "yarn",
        },
        "num_nextn_predict_layers": 0,
    },
    # DeepSeek-V3/R1 width; choose the number of layers for a benchmark.
    "v3": {
        "vocab_size": 129280,
        "hidden_size": 7168,
        "intermediate_size": 18432,
        "moe_intermediate_size": 2048,
        "num_hidden_layers": 61,
        "first_k_dense_replace": 3,
        "num_attention_heads": 128,
        "num_key_value_heads": 128,
        "q_lora_rank": 1536,
        "kv_lora_rank": 512,
        "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64,
        "v_head_dim": 128,
        "n_routed_experts": 256,
        "n_shared_experts": 1,
        "num_experts_per_tok": 8,
        "n_group": 8,
        "topk_group": 4,
        "routed_scaling_factor": 2.5,
        "num_nextn_predict_layers": 1,
    },
}
# The tiny V3.2: index_topk 16, so that a CPU test's 32-token sequences already take the sparse path.
PRESETS["v32"] = {**PRESETS["tiny"], **_V32, "index_n_heads": 2, "index_head_dim": 64, "index_topk": 16}
# DeepSeek-V3.2's width: the release's config (index_n_heads 64, index_head_dim 128, index_topk 2048).
PRESETS["v32-full"] = {**PRESETS["v3"], **_V32, "index_n_heads": 64, "index_head_dim": 128, "index_topk": 2048}
# Kimi-K2's width: DeepSeek-V3's hidden and expert sizes with the release's 64 heads and 163,840-token vocabulary,
# and the tiny kimi-k2 preset's routing and rope fields.
_KIMI_FIELDS = (
    "model_type",
    "n_routed_experts",
    "n_group",
    "topk_group",
    "routed_scaling_factor",
    "first_k_dense_replace",
    "max_position_embeddings",
    "rope_theta",
    "rope_scaling",
    "num_nextn_predict_layers",
)
PRESETS["kimi-k2-full"] = {
    **PRESETS["v3"],
    **{key: PRESETS["kimi-k2"][key] for key in _KIMI_FIELDS},
    "vocab_size": 163840,
    "num_attention_heads": 64,
    "num_key_value_heads": 64,
}


@dataclass(frozen=True)
class SynthOptions:
    preset: str = "tiny"
    num_layers: int | None = None  # decoder layers, default: the preset's
    dense_layers: int | None = None  # first_k_dense_replace, default: the preset's
    experts: int | None = None  # n_routed_experts, default: the preset's
    mtp: bool = True  # write the multi-token-prediction layer(s)
    shards: int = 4
    seed: int = 0
    tokenizer_dir: Path | None = None
    device: str = "cpu"  # where values are generated; "cuda" is much faster at full width
    overrides: dict[str, object] = field(default_factory=dict)  # any config.json field, e.g. for tests
    config_style: str = "release"  # or "transformers5": the same model, its config.json as transformers 5 saves it
    source_format: str = "fp8"  # how Linears are stored: fp8 blocks, bf16, or int4 experts (see synth_formats.py)


def synth_config(opts: SynthOptions) -> dict[str, object]:
    if opts.preset not in PRESETS:
        raise ValueError(f"unknown preset {opts.preset!r}; choose one of {', '.join(PRESETS)}")
    cfg: dict[str, object] = {**_COMMON, **PRESETS[opts.preset]}
    if opts.num_layers is not None:
        cfg["num_hidden_layers"] = opts.num_layers
    if opts.dense_layers is not None:
        cfg["first_k_dense_replace"] = opts.dense_layers
    if opts.experts is not None:
        cfg.update(fit_routing(cfg, opts.experts))
    if not opts.mtp:
        cfg["num_nextn_predict_layers"] = 0
    if opts.config_style not in CONFIG_STYLES:
        raise ValueError(f"unknown config style {opts.config_style!r}; choose one of {', '.join(CONFIG_STYLES)}")
    if opts.config_style == "transformers5":
        cfg = transformers5_style(cfg)
    cfg.update(opts.overrides)
    if opts.tokenizer_dir is not None:
        cfg["vocab_size"] = max(int(cfg["vocab_size"]), tokenizer_vocab_size(opts.tokenizer_dir))
    check_source_format(opts.source_format)
    if opts.source_format == "int4":
        check_int4_widths(cfg)
    qcfg = quantization_config(opts.source_format, mtp=int(cfg["num_nextn_predict_layers"]) > 0)
    if qcfg is not None:
        cfg["quantization_config"] = qcfg
    if "index_topk" in cfg and opts.source_format == "fp8":
        # V3.2's release declares power-of-two activation scales (its indexer uses them)
        cfg["quantization_config"]["scale_fmt"] = "ue8m0"
    return cfg


def transformers5_style(cfg: dict[str, Any]) -> dict[str, Any]:
    """``cfg`` as transformers 5 writes it: the rope in ``rope_parameters`` (theta inside), ``rope_interleave``,
    no ``scoring_func`` (neither DeepseekV2Config nor DeepseekV3Config declares it), and no ``topk_method`` except
    for V2 (DeepseekV2Config declares it)."""
    legacy = ("rope_scaling", "rope_theta", "scoring_func")
    if cfg.get("model_type") != "deepseek_v2":
        legacy += ("topk_method",)
    out = {k: v for k, v in cfg.items() if k not in legacy}
    scaling = dict(cfg["rope_scaling"])
    scaling["rope_type"] = scaling.pop("type")
    out["rope_parameters"] = {**scaling, "rope_theta": float(cfg["rope_theta"])}
    out["rope_interleave"] = True
    return out


def fit_routing(cfg: dict[str, object], experts: int) -> dict[str, int]:
    """The routing fields for ``experts`` routed experts, kept as close to the preset's as a valid config allows:
    n_group must divide the experts, topk_group cannot exceed n_group, and the kept groups must hold at least
    num_experts_per_tok experts."""
    if experts < 1:
        raise StreamqError(f"--experts {experts}: a MoE model needs at least one routed expert")
    top_k = min(int(cfg["num_experts_per_tok"]), experts)
    groups = max(g for g in range(1, min(int(cfg["n_group"]), experts) + 1) if experts % g == 0)
    per_group = experts // groups
    topk_group = max(min(int(cfg["topk_group"]), groups), -(-top_k // per_group))
    return {"n_routed_experts": experts, "num_experts_per_tok": top_k, "n_group": groups, "topk_group": topk_group}


def tokenizer_vocab_size(tokenizer_dir: Path) -> int:
    """Ids used by tokenizer.json (base vocabulary and added tokens), or by a tiktoken BPE and its special
    tokens, rounded up to a multiple of 128."""
    if not any((Path(tokenizer_dir) / n).is_file() for n in ("tokenizer.json", "tiktoken.model")):
        raise StreamqError(
            f"--tokenizer {tokenizer_dir}: has neither tokenizer.json nor tiktoken.model; pass the directory of a "
            "model's tokenizer files"
        )
    if not (Path(tokenizer_dir) / "tokenizer.json").is_file():
        tokenizer = load_tiktoken_tokenizer(Path(tokenizer_dir))
        return -(-(tokenizer.encoding.max_token_value + 1) // 128) * 128
    tok = json.loads((Path(tokenizer_dir) / "tokenizer.json").read_text())
    ids = list(tok["model"]["vocab"].values()) + [t["id"] for t in tok.get("added_tokens", [])]
    return -(-(max(ids) + 1) // 128) * 128


def tokenizer_files(tokenizer_dir: Path) -> list[Path]:
    """The files of a tokenizer directory a checkpoint carries (tokenizer.json, or a tiktoken BPE and its code)."""
    names = ("tokenizer.json", "tokenizer_config.json", "tiktoken.model", "chat_template.jinja")
    found = [Path(tokenizer_dir) / n for n in names if (Path(tokenizer_dir) / n).is_file()]
    return found + sorted(Path(tokenizer_dir).glob("tokenization_*.py"))


# -- what the checkpoint holds -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Tensor:
    name: str
    shape: tuple[int, ...]
    # "linear" (FP8 + scale), "packed" (INT4 + scale + shape), "dense" (bf16 weight), "norm", "shift" (a norm's
    # bias), "bias", "embed"
    kind: str

    def specs(self) -> list[TensorSpec]:
        if self.kind == "packed":
            module, (rows, cols) = self.name.removesuffix(".weight"), self.shape
            return [
                TensorSpec(module + ".weight_packed", torch.int32, (rows, cols * 4 // 32)),
                TensorSpec(module + ".weight_scale", torch.bfloat16, (rows, cols // INT4_GROUP)),
                TensorSpec(module + ".weight_shape", torch.int64, (2,)),
            ]
        if self.kind == "linear":
            rb, cb = (-(-d // b) for d, b in zip(self.shape, FP8_BLOCK, strict=True))
            return [
                TensorSpec(self.name, torch.float8_e4m3fn, self.shape),
                TensorSpec(self.name + SCALE_SUFFIX, torch.float32, (rb, cb)),
            ]
        dtype = torch.float32 if self.kind == "bias" else torch.bfloat16
        return [TensorSpec(self.name, dtype, self.shape)]


def checkpoint_tensors(cfg: dict) -> list[_Tensor]:
    h, v = int(cfg["hidden_size"]), int(cfg["vocab_size"])
    # The parsed config decides the router's tensors: a correction bias only for noaux_tc routing.
    bias = ModelConfig.from_dict(cfg, "synthetic config").uses_correction_bias
    tensors = [_Tensor("model.embed_tokens.weight", (v, h), "embed")]
    n_layers = int(cfg["num_hidden_layers"])
    for layer in range(n_layers + int(cfg["num_nextn_predict_layers"])):
        p = f"model.layers.{layer}."
        if layer >= n_layers:
            tensors += [
                _Tensor(p + "embed_tokens.weight", (v, h), "embed"),
                _Tensor(p + "enorm.weight", (h,), "norm"),
                _Tensor(p + "hnorm.weight", (h,), "norm"),
                _Tensor(p + "eh_proj.weight", (h, 2 * h), "dense"),
            ]
        tensors += _block_tensors(cfg, layer, p, bias)
        if layer >= n_layers:
            tensors += [
                _Tensor(p + "shared_head.norm.weight", (h,), "norm"),
                _Tensor(p + "shared_head.head.weight", (v, h), "dense"),
            ]
    tensors += [_Tensor("model.norm.weight", (h,), "norm"), _Tensor("lm_head.weight", (v, h), "dense")]
    qcfg = cfg.get("quantization_config")
    # Linears as the source format stores them (FP8 blocks, bf16, or packed where the config quantizes them).
    return [_stored_as(t, qcfg) for t in tensors]


def _stored_as(tensor: _Tensor, qcfg: dict[str, Any] | None) -> _Tensor:
    if tensor.kind != "linear":
        return tensor
    return replace(tensor, kind=linear_kind(qcfg, tensor.name.removesuffix(".weight")))


def _block_tensors(cfg: dict, layer: int, p: str, bias: bool) -> list[_Tensor]:
    h, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    qk = int(cfg["qk_nope_head_dim"]) + int(cfg["qk_rope_head_dim"])
    kv_rank, q_rank = int(cfg["kv_lora_rank"]), cfg.get("q_lora_rank")
    a = p + "self_attn."
    out = [_Tensor(p + "input_layernorm.weight", (h,), "norm")]
    if q_rank:
        out += [
            _Tensor(a + "q_a_proj.weight", (int(q_rank), h), "linear"),
            _Tensor(a + "q_a_layernorm.weight", (int(q_rank),), "norm"),
            _Tensor(a + "q_b_proj.weight", (heads * qk, int(q_rank)), "linear"),
        ]
    else:
        out.append(_Tensor(a + "q_proj.weight", (heads * qk, h), "linear"))
    out += [
        _Tensor(a + "kv_a_proj_with_mqa.weight", (kv_rank + int(cfg["qk_rope_head_dim"]), h), "linear"),
        _Tensor(a + "kv_a_layernorm.weight", (kv_rank,), "norm"),
        _Tensor(
            a + "kv_b_proj.weight", (heads * (int(cfg["qk_nope_head_dim"]) + int(cfg["v_head_dim"])), kv_rank), "linear"
        ),
        _Tensor(a + "o_proj.weight", (h, heads * int(cfg["v_head_dim"])), "linear"),
        _Tensor(p + "post_attention_layernorm.weight", (h,), "norm"),
        *_indexer_tensors(cfg, a + "indexer."),
    ]
    if layer < int(cfg["first_k_dense_replace"]) or int(cfg["n_routed_experts"]) == 0:
        return out + _mlp_tensors(p + "mlp.", h, int(cfg["intermediate_size"]))
    n_exp, inter = int(cfg["n_routed_experts"]), int(cfg["moe_intermediate_size"])
    out.append(_Tensor(p + "mlp.gate.weight", (n_exp, h), "dense"))
    if bias:
        out.append(_Tensor(p + "mlp.gate.e_score_correction_bias", (n_exp,), "bias"))
    for e in range(n_exp):
        out += _mlp_tensors(f"{p}mlp.experts.{e}.", h, inter)
    if int(cfg["n_shared_experts"]):
        out += _mlp_tensors(p + "mlp.shared_experts.", h, inter * int(cfg["n_shared_experts"]))
    return out


def _indexer_tensors(cfg: dict, p: str) -> list[_Tensor]:
    """DeepSeek-V3.2's indexer, as its release stores it: wq_b and wk in FP8 blocks, the rest bf16."""
    if "index_topk" not in cfg:
        return []
    h, heads, dim = int(cfg["hidden_size"]), int(cfg["index_n_heads"]), int(cfg["index_head_dim"])
    return [
        _Tensor(p + "wq_b.weight", (heads * dim, int(cfg["q_lora_rank"])), "linear"),
        _Tensor(p + "wk.weight", (dim, h), "linear"),
        _Tensor(p + "k_norm.weight", (dim,), "norm"),
        _Tensor(p + "k_norm.bias", (dim,), "shift"),
        _Tensor(p + "weights_proj.weight", (heads, h), "dense"),
    ]


def _mlp_tensors(p: str, hidden: int, inter: int) -> list[_Tensor]:
    return [
        _Tensor(p + "gate_proj.weight", (inter, hidden), "linear"),
        _Tensor(p + "up_proj.weight", (inter, hidden), "linear"),
        _Tensor(p + "down_proj.weight", (hidden, inter), "linear"),
    ]


# -- values ----------------------------------------------------------------------------------------------------


Slabs = Callable[["_Tensor"], Iterator[torch.Tensor]]


class _Values:
    """Produces each tensor's stored data: float row slabs from ``slabs``, FP8-quantized for linear weights
    (the scale tensor follows its weight, from the scales collected while the weight was written)."""

    def __init__(self, slabs: Slabs) -> None:
        self.slabs = slabs
        self._pending_scales: dict[str, list[torch.Tensor]] = {}

    def produce(self, tensor: _Tensor, spec: TensorSpec) -> Iterator[torch.Tensor]:
        if spec.name != tensor.name and spec.name.endswith(("_scale_inv", "_scale")):
            yield torch.cat(self._pending_scales.pop(tensor.name))
            return
        if spec.name.endswith(".weight_shape"):
            yield torch.tensor(tensor.shape, dtype=torch.int64)
            return
        quantize = {"linear": lambda x: quantize_fp8_blocks(x, FP8_BLOCK), "packed": pack_int4_rows}.get(tensor.kind)
        scales: list[torch.Tensor] = []
        for slab in self.slabs(tensor):
            if quantize is None:
                yield slab.to(spec.dtype).cpu()
                continue
            q, scale = quantize(slab)
            scales.append(scale.cpu())
            yield q.cpu()
        if quantize is not None:
            self._pending_scales[tensor.name] = scales


def random_slabs(seed: int, device: str) -> Slabs:
    """Values from a generator seeded by the tensor's name, scaled so that activations stay O(1)."""

    def slabs(tensor: _Tensor) -> Iterator[torch.Tensor]:
        gen = torch.Generator(device).manual_seed(zlib.crc32(tensor.name.encode()) ^ (seed * 0x9E3779B1 % 2**31))
        if len(tensor.shape) == 1:
            noise = torch.randn(tensor.shape, generator=gen, device=device)
            yield 0.05 * noise if tensor.kind in ("bias", "shift") else 1.0 + 0.1 * noise
            return
        rows, cols = tensor.shape
        std = 1.0 if tensor.kind == "embed" else cols**-0.5
        for start in range(0, rows, _SLAB_ROWS):
            yield torch.randn(min(_SLAB_ROWS, rows - start), cols, generator=gen, device=device) * std

    return slabs


def state_slabs(state: dict[str, torch.Tensor]) -> Slabs:
    """Values of given (e.g. trained) full-precision tensors."""

    def slabs(tensor: _Tensor) -> Iterator[torch.Tensor]:
        value = state[tensor.name].detach().float()
        if tuple(value.shape) != tensor.shape:
            raise ValueError(f"{tensor.name}: shape {tuple(value.shape)}, the config needs {tensor.shape}")
        yield from value.split(_SLAB_ROWS) if value.dim() == 2 else [value]

    return slabs


# -- writing -----------------------------------------------------------------------------------------------------


def write_synthetic_checkpoint(
    out_dir: Path, opts: SynthOptions, progress: Callable[[str], None] | None = None
) -> Path:
    """Write config.json, shards, the index and (when given) the tokenizer files into ``out_dir``."""
    cfg = synth_config(opts)
    slabs = random_slabs(opts.seed, opts.device)
    return write_release_checkpoint(out_dir, cfg, slabs, opts.shards, opts.tokenizer_dir, progress)


def write_release_checkpoint(
    out_dir: Path,
    cfg: dict[str, object],
    slabs: Slabs,
    shards: int = 1,
    tokenizer_dir: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """A checkpoint in DeepSeek's release layout for ``cfg``, with values from ``slabs`` (``random_slabs``, or
    ``state_slabs`` of a trained model's tensors under the release's names)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = checkpoint_tensors(cfg)
    shard_lists = _split_into_shards(tensors, max(1, shards))
    values = _Values(slabs)
    weight_map: dict[str, str] = {}
    total = 0
    for i, shard in enumerate(shard_lists):
        file = f"model-{i + 1:05d}-of-{len(shard_lists):05d}.safetensors"
        owners = {spec.name: t for t in shard for spec in t.specs()}
        specs = list(owners_specs(shard))
        write_safetensors(out_dir / file, specs, lambda s, o=owners: values.produce(o[s.name], s), {"format": "pt"})
        weight_map.update({spec.name: file for spec in specs})
        total += sum(spec.nbytes for spec in specs)
        if progress:
            progress(f"wrote {file} ({len(specs)} tensors)")
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    generation = {"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"], "do_sample": True}
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    if tokenizer_dir is not None:
        for path in tokenizer_files(Path(tokenizer_dir)):
            shutil.copyfile(path, out_dir / path.name)
    return out_dir


def owners_specs(tensors: list[_Tensor]) -> Iterator[TensorSpec]:
    for tensor in tensors:
        yield from tensor.specs()


def _split_into_shards(tensors: list[_Tensor], n: int) -> list[list[_Tensor]]:
    """Consecutive runs of about equal bytes; a weight and its scale always stay together."""
    sizes = [sum(s.nbytes for s in t.specs()) for t in tensors]
    target = sum(sizes) / n
    shards: list[list[_Tensor]] = [[]]
    filled = 0.0
    for tensor, size in zip(tensors, sizes, strict=True):
        if filled >= target * len(shards) and len(shards) < n:
            shards.append([])
        shards[-1].append(tensor)
        filled += size
    return [s for s in shards if s]
