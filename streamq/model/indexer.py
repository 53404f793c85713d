"""DeepSeek-V3.2's lightning indexer: the keys each query attends to under DeepSeek Sparse Attention (DSA).

Written from the published formulas (DeepSeek-V3.2-Exp technical report, section 2.1) and the release's
inference code, which was read, not copied: github.com/deepseek-ai/DeepSeek-V3.2-Exp ``inference/model.py``
(``Indexer``, ``MLA``) and ``inference/kernel.py`` (``act_quant``, ``fp8_index``), with DeepSeek's 2025-11 fix
that the indexer's RoPE rotates half-split pairs, not MLA's interleaved ones. For query t (hidden state h_t, the
MLA's normalised q latent c_t) and key s::

    q_{t,j} = RoPE(wq_b(c_t))_j                    index_n_heads heads j of index_head_dim
    k_s     = RoPE(LayerNorm(wk(h_s)))             one key head
    w_{t,j} = weights_proj(h_t)_j / sqrt(index_n_heads · index_head_dim)
    I_{t,s} = sum_j w_{t,j} · ReLU(q_{t,j} · k_s)

RoPE rotates the first qk_rope_head_dim dims of each head (the MLA's frequencies, without YaRN's magnitude
factor: the release's ``freqs_cis`` has unit modulus). Query t keeps the ``index_topk`` causal keys s <= t with
the highest I_{t,s}; MLA's softmax then runs over those keys only. With ``index_topk`` or fewer keys every
causal key is kept, so attention is exactly dense causal attention and the indexer is not computed at all.

Precision, as the release computes it: wq_b and wk in the block's compute dtype (bf16 in a GPU run; the release
also rounds their inputs to FP8, which streamq does for no Linear), LayerNorm and weights_proj in float32, RoPE
and the Hadamard rotation in float32 rounded back to the compute dtype, then q and k rounded to FP8 E4M3 with
one scale per 128 values (a power of two for ``scale_fmt`` ue8m0, as ``act_quant``), and the scores summed in
float32. The Hadamard rotation leaves dot products unchanged; it only spreads outliers before the FP8 rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from streamq.config import IndexerConfig, ModelConfig

FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP8_GROUP = 128  # values sharing one FP8 scale (the release's act_quant block)
SCORE_CHUNK_ELEMENTS = 1 << 27  # float32 scores per query chunk (512 MiB), whatever the sequence length


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """x @ H / sqrt(n) over the last dim (n a power of two), H the Sylvester Hadamard matrix, in float32."""
    n = x.shape[-1]
    y = x.float()
    h = 1
    while h < n:
        pairs = y.reshape(*x.shape[:-1], n // (2 * h), 2, h)
        y = torch.stack((pairs[..., 0, :] + pairs[..., 1, :], pairs[..., 0, :] - pairs[..., 1, :]), dim=-2)
        h *= 2
    return y.reshape(x.shape) * n**-0.5


def fp8_round(x: torch.Tensor, scale_fmt: str | None) -> torch.Tensor:
    """x rounded to FP8 E4M3 with one scale per 128 values of the last dim (the whole dim when shorter), and
    scaled back: float32. The scale is amax / 448, rounded up to a power of two for ``ue8m0``."""
    group = min(FP8_GROUP, x.shape[-1])
    xf = x.float().reshape(*x.shape[:-1], -1, group)
    scale = xf.abs().amax(-1, keepdim=True).clamp_min(1e-4) / FP8_MAX
    if scale_fmt == "ue8m0":
        mantissa, exponent = torch.frexp(scale)  # scale = mantissa · 2^exponent, mantissa in [0.5, 1)
        scale = torch.ldexp(torch.ones_like(scale), exponent - (mantissa == 0.5).to(exponent.dtype))
    codes = (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return (codes.float() * scale).reshape(x.shape)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """RoPE on x [B, S, heads, rope_dim] with unit-modulus cos/sin [S, rope_dim / 2], in float32."""
    xf = x.float()
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    if interleave:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    x1, x2 = xf.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class Indexer(nn.Module):
    """The lightning indexer of one attention layer; parameter names are the checkpoint's
    (``self_attn.indexer.wq_b.weight``, ``.wk.weight``, ``.k_norm.weight`` / ``.bias``, ``.weights_proj.weight``)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        assert cfg.indexer is not None and cfg.q_lora_rank
        self.spec: IndexerConfig = cfg.indexer
        self.rope_dim = cfg.qk_rope_head_dim
        heads, dim = cfg.indexer.n_heads, cfg.indexer.head_dim
        self.wq_b = nn.Linear(cfg.q_lora_rank, heads * dim, bias=False)
        self.wk = nn.Linear(cfg.hidden_size, dim, bias=False)
        self.k_norm = nn.LayerNorm(dim, eps=1e-6)
        self.weights_proj = nn.Linear(cfg.hidden_size, heads, bias=False)

    def keep_mask(
        self, x: torch.Tensor, q_latent: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor | None:
        """Which keys each query attends to, [B, 1, S, S] (True: kept), or None when every causal key is kept
        (S <= index_topk): then attention is plain causal attention. ``cos``/``sin``: unit-modulus RoPE tables."""
        seq = x.shape[1]
        if seq <= self.spec.topk:
            return None
        scores = self.scores(x, q_latent, cos, sin)
        chosen = scores.topk(self.spec.topk, dim=-1).indices
        keep = torch.zeros(scores.shape, dtype=torch.bool, device=x.device).scatter_(-1, chosen, True)
        return (keep & _causal(seq, x.device))[:, None]

    def scores(self, x: torch.Tensor, q_latent: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Index scores I [B, S, S] in float32, -inf at future keys; computed a chunk of queries at a time."""
        b, seq, _ = x.shape
        q, k = self.queries_keys(x, q_latent, cos, sin)
        weights = (
            F.linear(x.float(), self.weights_proj.weight.float()) * (self.spec.n_heads * self.spec.head_dim) ** -0.5
        )
        out = torch.empty((b, seq, seq), dtype=torch.float32, device=x.device)
        step = max(1, SCORE_CHUNK_ELEMENTS // (b * self.spec.n_heads * seq))
        for t in range(0, seq, step):
            logits = torch.einsum("bthd,bsd->bths", q[:, t : t + step], k).relu_()
            out[:, t : t + step] = torch.einsum("bths,bth->bts", logits, weights[:, t : t + step])
        return out.masked_fill_(~_causal(seq, x.device), float("-inf"))

    def queries_keys(
        self, x: torch.Tensor, q_latent: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """FP8-rounded q [B, S, heads, head_dim] and k [B, S, head_dim], float32."""
        b, seq, _ = x.shape
        q = self.wq_b(q_latent).view(b, seq, self.spec.n_heads, self.spec.head_dim)
        k = F.layer_norm(
            self.wk(x).float(), (self.spec.head_dim,), self.k_norm.weight.float(), self.k_norm.bias.float(), 1e-6
        )
        k = k.to(x.dtype).view(b, seq, 1, self.spec.head_dim)
        q, k = (self._rope_and_rotate(t, cos, sin) for t in (q, k))
        return fp8_round(q, self.spec.scale_fmt), fp8_round(k, self.spec.scale_fmt).squeeze(2)

    def _rope_and_rotate(self, t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        pe, rest = t.split([self.rope_dim, t.shape[-1] - self.rope_dim], dim=-1)
        pe = rotate(pe, cos, sin, self.spec.rope_interleave).to(t.dtype)
        return hadamard(torch.cat((pe, rest), dim=-1)).to(t.dtype)


def _causal(seq: int, device: torch.device) -> torch.Tensor:
    """[S, S], True where key s <= query t."""
    return torch.ones((seq, seq), dtype=torch.bool, device=device).tril_()
