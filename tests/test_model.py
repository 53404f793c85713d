"""streamq's block-by-block DeepSeek-V3 against transformers' DeepseekV3ForCausalLM on the same weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hf_reference import both_forwards, hf_model

from streamq.io.safetensors_stream import CheckpointReader
from streamq.model.deepseek import Gate, load_block, rope_cos_sin


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def reader(tiny_checkpoint: Path) -> CheckpointReader:
    return CheckpointReader(tiny_checkpoint)


def test_tiny_checkpoint_has_the_layout_the_acceptance_needs(reader: CheckpointReader) -> None:
    cfg = reader.config
    dense = [i for i in range(cfg.num_hidden_layers) if not cfg.is_moe_layer(i)]
    assert len(dense) >= 2 and cfg.num_hidden_layers - len(dense) >= 2
    assert cfg.n_routed_experts >= 8 and cfg.n_group > 1 and len(reader.shard_files) >= 3


@pytest.mark.slow
def test_every_block_and_the_logits_match_transformers(reader: CheckpointReader) -> None:
    torch.manual_seed(0)
    ids = torch.randint(0, reader.config.vocab_size, (2, 24))
    run = both_forwards(reader, ids)
    assert sorted(run.ours) == sorted(run.theirs) == list(range(reader.config.num_hidden_layers))
    for i in run.ours:
        assert rel_err(run.ours[i], run.theirs[i]) < 1e-3, f"block {i}"
    assert rel_err(run.logits, run.ref_logits) < 1e-3


@pytest.mark.slow
def test_routing_decisions_match_transformers(reader: CheckpointReader) -> None:
    cfg = reader.config
    ref = hf_model(reader)
    torch.manual_seed(1)
    for layer in (i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)):
        x = torch.randn(64, cfg.hidden_size)
        gate = load_block(reader, layer, "cpu", torch.float32).mlp.gate
        assert isinstance(gate, Gate)
        weights, idx = gate(x)
        _, ref_weights, ref_idx = ref.model.layers[layer].mlp.gate(x)
        order, ref_order = idx.argsort(-1), ref_idx.argsort(-1)
        assert torch.equal(idx.gather(1, order), ref_idx.gather(1, ref_order))
        torch.testing.assert_close(weights.gather(1, order), ref_weights.gather(1, ref_order))


def test_group_limited_routing_only_picks_experts_of_the_best_groups(reader: CheckpointReader) -> None:
    cfg = reader.config
    layer = next(i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i))
    gate = load_block(reader, layer, "cpu", torch.float32).mlp.gate
    torch.manual_seed(2)
    _, idx = gate(torch.randn(256, cfg.hidden_size))
    groups_used = (idx // (cfg.n_routed_experts // cfg.n_group)).sort(-1).values
    per_token = [len(set(row.tolist())) for row in groups_used]
    assert max(per_token) <= cfg.topk_group
    assert idx.unique().numel() == cfg.n_routed_experts  # every expert is reachable


def test_yarn_rope_matches_transformers(reader: CheckpointReader) -> None:
    ref = hf_model(reader)
    x = torch.zeros(1, 10, 1)
    cos_ref, sin_ref = ref.model.rotary_emb(x, torch.arange(10)[None])
    cos, sin = rope_cos_sin(reader.config, 10, "cpu")
    half = cos.shape[-1]
    torch.testing.assert_close(cos, cos_ref[0, :, :half])
    torch.testing.assert_close(sin, sin_ref[0, :, :half])
