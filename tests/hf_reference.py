"""transformers' DeepseekV2ForCausalLM / DeepseekV3ForCausalLM on a streamq checkpoint's dequantized weights: the
reference model, chosen by the architecture config.json names (Kimi-K2 declares DeepseekV3ForCausalLM; transformers
has no kimi_k2 model type).

transformers 5 keeps routed experts fused (``mlp.experts.gate_up_proj`` [E, 2I, H], ``mlp.experts.down_proj``
[E, H, I]); the release stores them per expert. This maps one onto the other.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from transformers import (
    DeepseekV2Config,
    DeepseekV2ForCausalLM,
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
)

from streamq.config import V2, architecture_family
from streamq.io.safetensors_stream import CheckpointReader
from streamq.model.deepseek import MTP_EXTRAS, forward_blocks

_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$")


def hf_classes(raw: dict) -> tuple[type[PretrainedConfig], type[PreTrainedModel]]:
    if architecture_family(raw, "config.json") == V2:
        return DeepseekV2Config, DeepseekV2ForCausalLM
    return DeepseekV3Config, DeepseekV3ForCausalLM


def hf_config(reader: CheckpointReader) -> PretrainedConfig:
    raw = {k: v for k, v in reader.config.raw.items() if k not in ("quantization_config", "model_type")}
    cfg = hf_classes(reader.config.raw)[0].from_dict(raw)
    cfg._attn_implementation = "eager"
    return cfg


def hf_state_dict(reader: CheckpointReader, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Dequantized decoder weights under transformers' names (the MTP layers are left out, as transformers
    does)."""
    cfg = reader.config
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for name in reader.names():
        if name.endswith("_scale_inv"):
            continue
        layer = re.match(r"model\.layers\.(\d+)\.(.*)", name)
        if layer and (int(layer[1]) >= cfg.num_hidden_layers or layer[2].startswith(MTP_EXTRAS)):
            continue
        want = torch.float32 if reader.infos[name].dtype == torch.float32 else dtype
        match = _EXPERT.match(name)
        if match:
            experts.setdefault(match[1], {}).setdefault(int(match[2]), {})[match[3]] = reader.weight(name, "cpu", want)
        else:
            out[name] = reader.weight(name, "cpu", want)
    for prefix, per_expert in experts.items():
        order = sorted(per_expert)
        out[f"{prefix}.gate_up_proj"] = torch.stack(
            [torch.cat([per_expert[e]["gate"], per_expert[e]["up"]]) for e in order]
        )
        out[f"{prefix}.down_proj"] = torch.stack([per_expert[e]["down"] for e in order])
    return out


def hf_model(reader: CheckpointReader, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    with torch.device("meta"):
        model = hf_classes(reader.config.raw)[1](hf_config(reader))
    model.load_state_dict(hf_state_dict(reader, dtype), assign=True, strict=True)
    # Non-persistent buffers (rotary frequencies) were created on the meta device: rebuild them.
    model.model.rotary_emb = type(model.model.rotary_emb)(model.config)
    return model.to(dtype).eval()


@dataclass(frozen=True)
class Forwards:
    """Both models on the same ids, in float32: each one's output of every decoder block (by layer) and logits."""

    ours: dict[int, torch.Tensor]
    logits: torch.Tensor
    theirs: dict[int, torch.Tensor]
    ref_logits: torch.Tensor
    ref: PreTrainedModel


def both_forwards(reader: CheckpointReader, ids: torch.Tensor) -> Forwards:
    """streamq's block-by-block forward and transformers' model (``hf_model``) on ``ids``."""
    ours: dict[int, torch.Tensor] = {}
    logits = forward_blocks(reader, ids, dtype=torch.float32, on_block=lambda i, h: ours.__setitem__(i, h.clone()))
    ref = hf_model(reader)
    theirs: dict[int, torch.Tensor] = {}
    for i, layer in enumerate(ref.model.layers):
        layer.register_forward_hook(
            lambda _m, _a, out, i=i: theirs.__setitem__(i, out[0] if isinstance(out, tuple) else out)
        )
    with torch.no_grad():
        ref_logits = ref(input_ids=ids).logits
    return Forwards(ours, logits, theirs, ref_logits, ref)
