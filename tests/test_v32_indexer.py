"""DeepSeek-V3.2's sparse attention in the native block, against a float64 reference written here.

The reference follows the published formulas (DeepSeek-V3.2-Exp report, section 2.1: I_{t,s} = sum_j w_{t,j} ·
ReLU(q_{t,j} · k_s), each query attending to its index_topk highest-scoring keys) and the release's inference
code for what the formulas leave open (deepseek-ai/DeepSeek-V3.2-Exp inference/model.py, read: the indexer's key
LayerNorm, its half-split RoPE on the first qk_rope_head_dim dims, the Hadamard rotation, the FP8 E4M3 rounding
of q and k with power-of-two scales per 128 values, the 1/sqrt(n_heads · head_dim) weight scale). Everything is
computed in float64 from the block's weights, with an explicit Sylvester Hadamard matrix; only the RoPE
frequencies come from streamq (rope_frequencies, tested against transformers and vLLM in test_vllm_contract.py).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from streamq.config import ModelConfig
from streamq.errors import StreamqError
from streamq.groups import linear_groups
from streamq.io.safetensors_stream import CheckpointReader
from streamq.model import deepseek as deepseek_module
from streamq.model import indexer as indexer_module
from streamq.model.deepseek import MLA, Block, build_module, load_block, rope_cos_sin, rope_frequencies
from streamq.model.indexer import Indexer, fp8_round, hadamard
from streamq.recipe import Recipe
from streamq.smooth import fold, fold_sites
from streamq.synth import SynthOptions, synth_config, write_synthetic_checkpoint

TOPK = 16  # the v32 preset's index_topk


@pytest.fixture(scope="module")
def v32_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    opts = SynthOptions(preset="v32", num_layers=2, dense_layers=1, shards=2, mtp=False)
    return write_synthetic_checkpoint(tmp_path_factory.mktemp("v32"), opts)


@pytest.fixture(scope="module")
def block(v32_checkpoint: Path) -> Block:
    return load_block(CheckpointReader(v32_checkpoint), 1, "cpu", torch.float32)


def attention_input(block: Block, seq: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return block.input_layernorm(torch.randn(batch, seq, block.self_attn.cfg.hidden_size, generator=gen))


# -- the float64 reference ----------------------------------------------------------------------------------------


def sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h / math.sqrt(n)


def rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def angles(cfg: ModelConfig, seq: int) -> tuple[torch.Tensor, float]:
    inv_freq, factor = rope_frequencies(cfg)
    return torch.outer(torch.arange(seq, dtype=torch.float64), inv_freq.double()), factor


def rope_pairs(x: torch.Tensor, theta: torch.Tensor, interleaved: bool, factor: float = 1.0) -> torch.Tensor:
    """Rotate pairs (2i, 2i+1) (interleaved) or (i, i + d/2) by theta [S, d/2]; x [B, S, heads, d]."""
    c, s = (theta.cos() * factor)[None, :, None], (theta.sin() * factor)[None, :, None]
    a, b = (x[..., 0::2], x[..., 1::2]) if interleaved else x.chunk(2, dim=-1)
    ra, rb = a * c - b * s, b * c + a * s
    return torch.stack((ra, rb), dim=-1).flatten(-2) if interleaved else torch.cat((ra, rb), dim=-1)


def e4m3(x: torch.Tensor) -> torch.Tensor:
    """Round to FP8 E4M3 with one power-of-two scale (ue8m0) per 128 values of the last dim (or all of it)."""
    group = min(128, x.shape[-1])
    g = x.reshape(*x.shape[:-1], -1, group)
    amax = g.abs().amax(-1, keepdim=True).clamp_min(1e-4)
    scale = torch.exp2(torch.ceil(torch.log2(amax / 448)))
    return ((g / scale).clamp(-448, 448).float().to(torch.float8_e4m3fn).double() * scale).reshape(x.shape)


def reference_index_scores(attn: MLA, x: torch.Tensor) -> torch.Tensor:
    """I [B, S, S] in float64, -inf at future keys."""
    cfg, ix, p = attn.cfg, attn.cfg.indexer, {n: t.double() for n, t in attn.named_parameters()}
    assert ix is not None
    b, seq, _ = x.shape
    rope_dim = cfg.qk_rope_head_dim
    theta, _ = angles(cfg, seq)
    latent = rms(x @ p["q_a_proj.weight"].T, p["q_a_layernorm.weight"], cfg.rms_norm_eps)
    q = (latent @ p["indexer.wq_b.weight"].T).view(b, seq, ix.n_heads, ix.head_dim)
    k = F.layer_norm(x @ p["indexer.wk.weight"].T, (ix.head_dim,), p["indexer.k_norm.weight"], p["indexer.k_norm.bias"])
    k = k.view(b, seq, 1, ix.head_dim)
    h = sylvester(ix.head_dim)
    q, k = (e4m3(torch.cat((rope_pairs(t[..., :rope_dim], theta, False), t[..., rope_dim:]), -1) @ h) for t in (q, k))
    w = x @ p["indexer.weights_proj.weight"].T / math.sqrt(ix.n_heads * ix.head_dim)
    scores = torch.einsum("btj,btjs->bts", w, torch.einsum("btjd,bsd->btjs", q, k[:, :, 0]).relu())
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    return scores.masked_fill(~causal, float("-inf"))


def reference_keep(scores: torch.Tensor, topk: int) -> torch.Tensor:
    seq = scores.shape[-1]
    chosen = scores.topk(min(topk, seq), dim=-1).indices
    keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, chosen, True)
    return keep & torch.ones(seq, seq, dtype=torch.bool).tril()


def reference_attention(attn: MLA, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """MLA in float64, each query attending to the keys ``keep`` [B, S, S] marks."""
    cfg, p = attn.cfg, {n: t.double() for n, t in attn.named_parameters()}
    b, seq, _ = x.shape
    heads, nope, rope_dim, vd = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    theta, factor = angles(cfg, seq)
    latent = rms(x @ p["q_a_proj.weight"].T, p["q_a_layernorm.weight"], cfg.rms_norm_eps)
    q = (latent @ p["q_b_proj.weight"].T).view(b, seq, heads, nope + rope_dim)
    kv_a = x @ p["kv_a_proj_with_mqa.weight"].T
    kv = rms(kv_a[..., : cfg.kv_lora_rank], p["kv_a_layernorm.weight"], cfg.rms_norm_eps) @ p["kv_b_proj.weight"].T
    kv = kv.view(b, seq, heads, nope + vd)
    k_pe = rope_pairs(kv_a[..., cfg.kv_lora_rank :].view(b, seq, 1, rope_dim), theta, True, factor)
    q = torch.cat((q[..., :nope], rope_pairs(q[..., nope:], theta, True, factor)), -1)
    k = torch.cat((kv[..., :nope], k_pe.expand(b, seq, heads, rope_dim)), -1)
    logits = torch.einsum("bthd,bshd->bhts", q, k) * cfg.softmax_scale
    probs = logits.masked_fill(~keep[:, None], float("-inf")).softmax(-1)
    out = torch.einsum("bhts,bshd->bthd", probs, kv[..., nope:]).reshape(b, seq, heads * vd)
    return out @ p["o_proj.weight"].T


def causal_keep(batch: int, seq: int) -> torch.Tensor:
    return torch.ones(batch, seq, seq, dtype=torch.bool).tril()


# -- the building blocks ----------------------------------------------------------------------------------------------


def test_hadamard_is_the_orthonormal_sylvester_matrix() -> None:
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.testing.assert_close(hadamard(x), (x @ sylvester(64)).float(), rtol=1e-6, atol=1e-6)


def test_fp8_rounding_uses_power_of_two_scales_per_128_values() -> None:
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(2)) * torch.logspace(-3, 3, 256)
    ours = fp8_round(x, "ue8m0")
    torch.testing.assert_close(ours.double(), e4m3(x.double()), rtol=0, atol=0)
    relative = ((ours - x).abs() / x.abs().clamp_min(1e-30)).amax().item()
    assert ours.ne(x).any() and relative < 1  # a real rounding, though not zero for the smallest of a group


# -- the indexer and sparse attention ----------------------------------------------------------------------------------


@pytest.mark.parametrize("seq", [5, TOPK])
def test_up_to_index_topk_keys_dsa_is_exactly_dense_causal_attention(block: Block, seq: int) -> None:
    attn = block.self_attn
    x = attention_input(block, seq)
    cos, sin = rope_cos_sin(attn.cfg, seq, "cpu")
    # The reference indexer keeps every causal key...
    keep = reference_keep(reference_index_scores(attn, x.double()), TOPK)
    assert torch.equal(keep, causal_keep(2, seq))
    # ...and the native block skips it: bit for bit the V3 attention of the same weights.
    v3 = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3"}
    dense_cfg = ModelConfig.from_dict({k: v for k, v in attn.cfg.raw.items() if not k.startswith("index_")} | v3)
    assert dense_cfg.indexer is None
    tensors = {n: t for n, t in attn.state_dict().items() if not n.startswith("indexer.")}
    dense = build_module(lambda: MLA(dense_cfg), tensors, "dense MLA")
    assert torch.equal(attn(x, cos, sin), dense(x, cos, sin))
    expected = reference_attention(attn, x.double(), keep)
    torch.testing.assert_close(attn(x, cos, sin).double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunked", [False, True])
def test_longer_sequences_select_the_reference_keys_and_attend_to_them_only(
    block: Block, chunked: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    attn, seq = block.self_attn, 48
    if chunked:  # a few queries at a time, for the scores and for the masked attention
        monkeypatch.setattr(indexer_module, "SCORE_CHUNK_ELEMENTS", 2 * 2 * seq * 5)
        monkeypatch.setattr(deepseek_module, "MASKED_CHUNK_ELEMENTS", 2 * 4 * seq * 7)
    x = attention_input(block, seq)
    cos, sin = rope_cos_sin(attn.cfg, seq, "cpu")
    latent = attn.q_a_layernorm(attn.q_a_proj(x))
    reference = reference_index_scores(attn, x.double())
    ours = attn.indexer.scores(x, latent, cos / attn.rope_factor, sin / attn.rope_factor)
    finite = reference.isfinite()
    assert torch.equal(ours.isfinite(), finite)
    scale = reference[finite].abs().max()
    torch.testing.assert_close(ours[finite].double() / scale, reference[finite] / scale, rtol=0, atol=1e-5)
    # The selection: index_topk causal keys per query, none scoring below the reference's k-th score (with few
    # index heads, ReLU makes exact ties at 0 common: either side of a tie is a valid choice).
    native_keep = attn.indexer.keep_mask(x, latent, cos / attn.rope_factor, sin / attn.rope_factor)
    assert native_keep is not None
    keep = native_keep[:, 0]
    assert torch.equal(keep.sum(-1), torch.arange(1, seq + 1).clamp(max=TOPK).expand(2, seq))
    assert not (keep & ~causal_keep(2, seq)).any()
    kth = reference.sort(-1, descending=True).values[..., TOPK - 1 : TOPK]
    tol = 1e-5 * scale
    assert (reference[keep] >= (kth.expand_as(reference)[keep] - tol)).all()
    dropped = causal_keep(2, seq) & ~keep
    assert (reference[dropped] <= (kth.expand_as(reference)[dropped] + tol)).all()
    assert (keep != reference_keep(reference, TOPK)).float().mean() < 0.01  # ties are few
    # Attention over the selected keys only: the reference output, and not the dense one.
    out = attn(x, cos, sin).double()
    expected = reference_attention(attn, x.double(), keep)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    dense = reference_attention(attn, x.double(), causal_keep(2, seq))
    assert (out - dense).norm() > 100 * (out - expected).norm()


def test_the_indexer_rotates_half_split_pairs_not_mlas_interleaved_ones(block: Block) -> None:
    """A check that the comparison above can fail: the release's first indexer (interleaved RoPE, fixed by
    DeepSeek in 2025-11) scores differently."""
    attn, seq = block.self_attn, 48
    x = attention_input(block, seq)
    cos, sin = rope_cos_sin(attn.cfg, seq, "cpu")
    latent = attn.q_a_layernorm(attn.q_a_proj(x))
    fixed = attn.indexer.scores(x, latent, cos, sin)
    cfg = ModelConfig.from_dict(attn.cfg.raw | {"indexer_rope_interleave": True})
    first = build_module(lambda: Indexer(cfg), attn.indexer.state_dict(), "interleaved indexer")
    interleaved = first.scores(x, latent, cos, sin)
    finite = fixed.isfinite()
    assert not torch.allclose(fixed[finite], interleaved[finite], rtol=1e-2, atol=1e-3)


# -- config ------------------------------------------------------------------------------------------------------------


def test_config_reads_the_indexer_fields_and_none_without_them() -> None:
    cfg = ModelConfig.from_dict(synth_config(SynthOptions(preset="v32")))
    assert cfg.indexer is not None
    assert (cfg.indexer.n_heads, cfg.indexer.head_dim, cfg.indexer.topk) == (2, 64, TOPK)
    assert cfg.indexer.scale_fmt == "ue8m0" and not cfg.indexer.rope_interleave
    full = ModelConfig.from_dict(synth_config(SynthOptions(preset="v32-full")))
    assert full.indexer is not None and (full.indexer.n_heads, full.indexer.head_dim) == (64, 128)
    assert full.indexer.topk == 2048
    assert ModelConfig.from_dict(synth_config(SynthOptions(preset="tiny"))).indexer is None


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"index_head_dim": 96}, "index_head_dim"),
        ({"index_head_dim": 16}, "index_head_dim"),
        ({"q_lora_rank": None}, "q_lora_rank"),
        ({"index_topk": 0}, "index_topk"),
    ],
)
def test_invalid_indexer_fields_are_refused_by_name(change: dict, named: str) -> None:
    raw = synth_config(SynthOptions(preset="v32")) | change
    with pytest.raises(StreamqError, match=named):
        ModelConfig.from_dict(raw)


def test_a_v32_config_without_its_indexer_fields_is_refused() -> None:
    raw = {k: v for k, v in synth_config(SynthOptions(preset="v32")).items() if k != "index_n_heads"}
    with pytest.raises(StreamqError, match="index_n_heads"):
        ModelConfig.from_dict(raw)


def test_awq_folds_leave_the_sparse_attention_unchanged(v32_checkpoint: Path) -> None:
    """AWQ divides the input norm and q_a_layernorm by s; the indexer reads both outputs (wk, weights_proj; wq_b)
    and must absorb s like the quantized readers do, or its key selection would change."""
    reader = CheckpointReader(v32_checkpoint)
    cfg, layer, recipe = reader.config, 1, Recipe(scope="all")
    block = load_block(reader, layer, "cpu", torch.float64)
    cos, sin = rope_cos_sin(cfg, 32, "cpu")
    x = torch.randn(2, 32, cfg.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    before = block(x, cos.double(), sin.double())
    groups = {g.key: g for g in linear_groups(cfg, layer, recipe)}
    modules = dict(block.named_modules())
    sites = [site for site in fold_sites(cfg, layer, list(groups.values())) if site.producer.endswith("layernorm")]
    compensated = {reader for site in sites for reader in site.compensate}
    assert {"self_attn.indexer.wk", "self_attn.indexer.weights_proj", "self_attn.indexer.wq_b"} <= compensated
    gen = torch.Generator().manual_seed(4)
    for site in sites:
        s = torch.exp(torch.randn(modules[site.producer].weight.shape[-1], generator=gen, dtype=torch.float64) * 0.5)
        fold(block, site, s, lambda _name: torch.float64)
        for member in (m for key in site.consumers for m in groups[key].members):
            modules[member].weight.data = modules[member].weight.data * s
    after = block(x, cos.double(), sin.double())
    assert ((after - before).norm() / before.norm()).item() < 1e-6
