"""A minimal DeepSeek-V2/V3 in PyTorch, built one transformer block at a time from a checkpoint.

MLA attention (low-rank kv, q low-rank or projected directly as in V2-Lite, a shared rotary key, YaRN scaling),
MoE with the routing config.json names (softmax or sigmoid scores; greedy, group-limited or bias-corrected
group-limited top-k) and shared experts, dense MLPs for the first layers, RMSNorm. Module names mirror the
checkpoint's tensor names (``self_attn.q_a_proj.weight``, ``mlp.experts.7.down_proj.weight``, …), so a
block's state dict is exactly its slice of the checkpoint, and calibration can hook any Linear by name.

Routing is the router module's output, ``(weights, indices)``: a forward hook on ``mlp.gate`` sees which
tokens each expert gets.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from streamq.config import ModelConfig, yarn_mscale
from streamq.errors import StreamqError
from streamq.io.safetensors_stream import CheckpointReader
from streamq.model.indexer import Indexer

# Tensors of a multi-token-prediction layer that are not part of its transformer block.
MTP_EXTRAS = ("embed_tokens.", "enorm.", "hnorm.", "eh_proj.", "shared_head.")
MASKED_CHUNK_ELEMENTS = 1 << 28  # attention scores per query chunk under a sparse-attention mask (512 MiB in bf16)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


# -- rotary embedding ----------------------------------------------------------------------------------------


def rope_frequencies(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies for the rotary dims, and the factor applied to cos/sin (YaRN's attention factor)."""
    rope, dim = cfg.rope, cfg.qk_rope_head_dim
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if rope.kind != "yarn":
        return inv_freq, 1.0

    def correction_dim(rotations: float) -> float:
        return (
            dim
            * math.log(rope.original_max_position_embeddings / (rotations * 2 * math.pi))
            / (2 * math.log(rope.theta))
        )

    low = max(math.floor(correction_dim(rope.beta_fast)), 0)
    high = min(math.ceil(correction_dim(rope.beta_slow)), dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / max(high - low, 1e-3)).clamp(0, 1)
    # Low frequencies (long wavelengths) are interpolated by the factor, high ones kept, a ramp between.
    inv_freq = inv_freq / rope.factor * ramp + inv_freq * (1 - ramp)
    if rope.mscale and rope.mscale_all_dim:
        attention_factor = yarn_mscale(rope.factor, rope.mscale) / yarn_mscale(rope.factor, rope.mscale_all_dim)
    else:
        attention_factor = yarn_mscale(rope.factor)
    return inv_freq, attention_factor


def rope_cos_sin(cfg: ModelConfig, seq_len: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape [seq_len, rope_dim / 2] in float32, for positions 0..seq_len-1."""
    inv_freq, factor = rope_frequencies(cfg)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq).to(device)
    return angles.cos() * factor, angles.sin() * factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """Rotate x [B, S, heads, rope_dim]. DeepSeek's weights pair dims (0,1), (2,3), …; the other layout pairs
    dim i with i + rope_dim/2."""
    xf = x.float()
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    if interleave:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    else:
        x1, x2 = xf.chunk(2, dim=-1)
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)


# -- attention -------------------------------------------------------------------------------------------------


class MLA(nn.Module):
    """Multi-head latent attention, in its plain (non-absorbed) form: causal SDPA over full keys and values.
    DeepSeek-V3.2 adds an indexer (``streamq/model/indexer.py``) that restricts each query to index_topk keys."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        h, heads = cfg.hidden_size, cfg.num_attention_heads
        if cfg.q_lora_rank:
            self.q_a_proj = nn.Linear(h, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, heads * cfg.qk_head_dim, bias=False)
        else:
            self.q_proj = nn.Linear(h, heads * cfg.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(h, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = nn.Linear(heads * cfg.v_head_dim, h, bias=False)
        self.indexer = Indexer(cfg) if cfg.indexer else None
        # The indexer's RoPE has unit modulus (the release's freqs_cis); the tables passed in carry YaRN's factor.
        self.rope_factor = rope_frequencies(cfg)[1] if cfg.indexer else 1.0

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        b, s, _ = x.shape
        heads, nope, rope_dim = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
        q_latent = self.q_a_layernorm(self.q_a_proj(x)) if cfg.q_lora_rank else None
        q = self.q_b_proj(q_latent) if q_latent is not None else self.q_proj(x)
        q_nope, q_pe = q.view(b, s, heads, cfg.qk_head_dim).split([nope, rope_dim], dim=-1)
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([cfg.kv_lora_rank, rope_dim], dim=-1)
        kv = self.kv_b_proj(self.kv_a_layernorm(latent)).view(b, s, heads, nope + cfg.v_head_dim)
        k_nope, v = kv.split([nope, cfg.v_head_dim], dim=-1)
        q_pe = apply_rope(q_pe, cos, sin, cfg.rope.interleave)
        k_pe = apply_rope(k_pe.view(b, s, 1, rope_dim), cos, sin, cfg.rope.interleave)
        q = torch.cat((q_nope, q_pe), dim=-1).transpose(1, 2)
        k = torch.cat((k_nope, k_pe.expand(b, s, heads, rope_dim)), dim=-1).transpose(1, 2)
        # Values padded with zeros to the query/key head size: flash attention needs one head size, and without
        # it SDPA may fall back to materialising [batch, heads, seq, seq] scores (34 GB at DeepSeek-V3 width).
        v = F.pad(v, (0, max(0, cfg.qk_head_dim - cfg.v_head_dim))).transpose(1, 2)
        keep = None
        if self.indexer is not None:
            keep = self.indexer.keep_mask(x, q_latent, cos / self.rope_factor, sin / self.rope_factor)
        if keep is None:  # every causal key: always without an indexer, and with one up to index_topk keys
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=cfg.softmax_scale)
        else:
            out = masked_attention(q, k, v, keep, cfg.softmax_scale)
        out = out[..., : cfg.v_head_dim]
        return self.o_proj(out.transpose(1, 2).reshape(b, s, heads * cfg.v_head_dim))


def masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor, scale: float
) -> torch.Tensor:
    """SDPA over the keys ``keep`` [B, 1, S, S] marks, a chunk of queries at a time: with a mask no flash kernel
    applies, and a fallback that materialises the scores then holds at most MASKED_CHUNK_ELEMENTS of them."""
    b, heads, seq, _ = q.shape
    step = max(1, MASKED_CHUNK_ELEMENTS // (b * heads * seq))
    return torch.cat(
        [
            F.scaled_dot_product_attention(q[:, :, t : t + step], k, v, attn_mask=keep[:, :, t : t + step], scale=scale)
            for t in range(0, seq, step)
        ],
        dim=2,
    )


# -- feed-forward ------------------------------------------------------------------------------------------------


class MLP(nn.Module):
    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# -- routing: one function per config.json topk_method ------------------------------------------------------------
# Each takes the scores experts are chosen by ([tokens, experts], float32) and returns the chosen indices.


def _greedy(choice: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """DeepSeek-V2-Lite: the top-k experts over all of them (n_group plays no part)."""
    return choice.topk(cfg.num_experts_per_tok, dim=-1).indices


def _group_limited_greedy(choice: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """DeepSeek-V2: groups ranked by their best expert; top-k among the experts of the best topk_group groups."""
    grouped = choice.view(choice.shape[0], cfg.n_group, -1)
    return _top_k_in_groups(grouped, grouped.max(-1).values, cfg)


def _noaux_tc(choice: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """DeepSeek-V3: groups ranked by the sum of their two best (bias-corrected) experts, then top-k within the
    best topk_group groups."""
    grouped = choice.view(choice.shape[0], cfg.n_group, -1)
    return _top_k_in_groups(grouped, grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1), cfg)


def _top_k_in_groups(grouped: torch.Tensor, group_scores: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    if cfg.n_group > 1:
        keep = group_scores.topk(cfg.topk_group, dim=-1).indices
        dropped = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, keep, False)
        grouped = grouped.masked_fill(dropped[..., None], float("-inf"))
    return grouped.flatten(1).topk(cfg.num_experts_per_tok, dim=-1).indices


TOPK_METHODS: dict[str, Callable[[torch.Tensor, ModelConfig], torch.Tensor]] = {
    "greedy": _greedy,
    "group_limited_greedy": _group_limited_greedy,
    "noaux_tc": _noaux_tc,
}
SCORING = {"softmax": lambda logits: logits.softmax(-1), "sigmoid": torch.sigmoid}


class Gate(nn.Module):
    """The router: scores by config.json's scoring_func, experts chosen by its topk_method. noaux_tc's correction
    bias steers which experts are chosen, not their weights; the weights are the chosen experts' scores,
    renormalised (norm_topk_prob), then scaled by routed_scaling_factor."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        self.e_score_correction_bias = (
            nn.Parameter(torch.zeros(cfg.n_routed_experts, dtype=torch.float32)) if cfg.uses_correction_bias else None
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, hidden] -> (weights [T, k] float32, expert indices [T, k])."""
        cfg = self.cfg
        scores = SCORING[cfg.scoring_func](F.linear(x.float(), self.weight.float()))
        bias = self.e_score_correction_bias
        indices = TOPK_METHODS[cfg.topk_method](scores if bias is None else scores + bias.float(), cfg)
        weights = scores.gather(1, indices)
        if cfg.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return weights * cfg.routed_scaling_factor, indices


def route_order(indices: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, list[int]]:
    """The routed (token, slot) pairs grouped by expert, with one host synchronisation for the whole batch.

    Returns the flat positions ``token * top_k + slot`` sorted by expert (stable, so tokens ascend within an
    expert, as ``torch.where(indices == e)`` lists them) and each expert's start in them (``n_experts + 1``
    offsets). A per-expert ``torch.where`` would wait for the device once per expert, which left the GPU idle
    between the experts' small matrix products."""
    flat = indices.flatten()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=n_experts)
    return order, [0, *torch.cumsum(counts, 0).tolist()]


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.gate = Gate(cfg)
        self.experts = nn.ModuleList(
            MLP(cfg.hidden_size, cfg.moe_intermediate_size) for _ in range(cfg.n_routed_experts)
        )
        inter = cfg.moe_intermediate_size * cfg.n_shared_experts
        self.shared_experts = MLP(cfg.hidden_size, inter) if cfg.n_shared_experts else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, indices = self.gate(x)
        slots = self.expert_slots(x, weights, indices, range(len(self.experts)))
        return self.combine(x, slots).view(shape)

    def expert_slots(
        self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, experts: Sequence[int]
    ) -> torch.Tensor:
        """Weighted outputs [tokens, top_k, hidden] (float32) of ``experts`` for the slots routed to them; the
        other slots stay zero. With expert parallelism each rank fills its experts' slots, and since every slot
        has exactly one owner, summing the ranks' buffers is exact."""
        k = indices.shape[1]
        slots = torch.zeros((indices.numel(), x.shape[-1]), dtype=torch.float32, device=x.device)
        order, offsets = route_order(indices, len(self.experts))
        flat_weights = weights.reshape(-1, 1)
        for e in experts:
            pos = order[offsets[e] : offsets[e + 1]]
            if pos.numel():
                slots[pos] = self.experts[e](x[pos // k]).float() * flat_weights[pos]
        return slots.view(*indices.shape, x.shape[-1])

    def combine(self, x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Sum the slots in slot order, then the shared experts: a fixed order, so the result does not depend on
        how tokens or experts were split across micro-batches or ranks."""
        out = slots[:, 0].clone()
        for k in range(1, slots.shape[1]):
            out += slots[:, k]
        if self.shared_experts is not None:
            out += self.shared_experts(x).float()
        return out.to(x.dtype)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp: nn.Module = MoE(cfg) if cfg.is_moe_layer(layer) else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Head(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(x))


# -- building from a checkpoint ----------------------------------------------------------------------------------


def build_module(
    module_fn: Callable[[], nn.Module],
    tensors: dict[str, torch.Tensor],
    where: str,
    absent: Callable[[str], bool] = lambda _name: False,
) -> nn.Module:
    """Instantiate without allocating (meta device), then adopt the checkpoint's tensors as parameters.
    Parameters for which ``absent(name)`` holds are meant to be missing and stay on the meta device."""
    with torch.device("meta"):
        module = module_fn()
    expected = {name for name in module.state_dict() if not absent(name)}
    missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or extra:
        raise StreamqError(
            f"{where}: checkpoint tensors do not match a DeepSeek-V2/V3 block (missing: {missing[:3]}, "
            f"unexpected: {extra[:3]}); check config.json matches the weights"
        )
    module.load_state_dict(tensors, assign=True, strict=False)
    return module.eval().requires_grad_(False)


def load_block(
    reader: CheckpointReader,
    layer: int,
    device: torch.device | str,
    dtype: torch.dtype = torch.bfloat16,
    experts: Sequence[int] | None = None,
) -> Block:
    """Block ``layer`` on ``device``; with ``experts``, only those routed experts are read (the others stay on the
    meta device: another process owns them)."""
    absent = _not_in(experts)
    prefix = reader.layer_prefix(layer)
    tensors = reader.load_prefix(prefix, device, dtype, keep=lambda n: not n.startswith(MTP_EXTRAS) and not absent(n))
    return build_module(lambda: Block(reader.config, layer), tensors, f"{reader.dir} layer {layer}", absent)


def _not_in(experts: Sequence[int] | None) -> Callable[[str], bool]:
    """True for the parameter names of routed experts outside ``experts`` (None: all are wanted)."""
    if experts is None:
        return lambda _name: False
    owned = {str(e) for e in experts}

    def absent(name: str) -> bool:
        parts = name.split(".")
        return len(parts) > 2 and parts[:2] == ["mlp", "experts"] and parts[2] not in owned

    return absent


def load_embedding(reader: CheckpointReader, device: torch.device | str, dtype: torch.dtype) -> nn.Embedding:
    weight = reader.weight("model.embed_tokens.weight", device, dtype)
    return nn.Embedding.from_pretrained(weight, freeze=True)


def load_head(reader: CheckpointReader, device: torch.device | str, dtype: torch.dtype) -> Head:
    name = "model.embed_tokens.weight" if reader.config.tie_word_embeddings else "lm_head.weight"
    tensors = {
        "norm.weight": reader.weight("model.norm.weight", device, dtype),
        "lm_head.weight": reader.weight(name, device, dtype),
    }
    return build_module(lambda: Head(reader.config), tensors, f"{reader.dir} final norm/lm_head")


@torch.no_grad()
def forward_blocks(
    reader: CheckpointReader,
    input_ids: torch.Tensor,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    on_block: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Logits of the whole model, holding one block at a time. ``on_block(layer, hidden)`` sees each block's
    output."""
    cfg = reader.config
    cos, sin = rope_cos_sin(cfg, input_ids.shape[1], device)
    hidden = load_embedding(reader, device, dtype)(input_ids.to(device))
    for layer in range(cfg.num_hidden_layers):
        hidden = load_block(reader, layer, device, dtype)(hidden, cos, sin)
        if on_block is not None:
            on_block(layer, hidden)
    return load_head(reader, device, dtype)(hidden)
