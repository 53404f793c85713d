"""The trained fixture tests/fixtures/tiny-moe-shakespeare (written by bench/train_tiny_moe.py): it has the layout
that streamq quantizes, its tokenizer is the one streamq.data loads, and it has really learned the text."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import SHAKESPEARE, needs_shared

from streamq.data import ByteTokenizer, DataConfig, HFTokenizer, load_token_batches, load_tokenizer
from streamq.io.safetensors_stream import SCALE_SUFFIX, CheckpointReader
from streamq.model.deepseek import forward_blocks
from streamq.synth import checkpoint_tensors

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "tiny-moe-shakespeare"
MAX_BYTES = 16_000_000
# A byte-unigram model of the training split scores 3.35 nats/byte on the held-out text, a uniform one ln(384) =
# 5.95; the fixture scores 1.50 over the whole held-out split (README.md). Anything above this bound learned
# little more than byte frequencies.
MAX_HELD_OUT_LOSS = 2.0


def _fail(message: str) -> None:
    raise AssertionError(f"unexpected warning: {message}")


@pytest.fixture(scope="module")
def reader() -> CheckpointReader:
    return CheckpointReader(FIXTURE)


def test_config_has_the_deepseek_v3_layout(reader: CheckpointReader) -> None:
    cfg = reader.config
    assert cfg.raw["architectures"] == ["DeepseekV3ForCausalLM"]
    assert (cfg.num_hidden_layers, cfg.first_k_dense_replace, cfg.num_nextn_predict_layers) == (4, 1, 0)
    routing = (cfg.n_routed_experts, cfg.n_group, cfg.topk_group, cfg.num_experts_per_tok, cfg.n_shared_experts)
    assert routing == (32, 4, 2, 4, 1)
    assert cfg.q_lora_rank and cfg.rope.kind == "yarn" and cfg.fp8_block == (128, 128)
    # Every quantized Linear's input dim, so that group-128 quantization has whole groups.
    inputs = (cfg.hidden_size, cfg.intermediate_size, cfg.moe_intermediate_size, cfg.q_lora_rank, cfg.kv_lora_rank)
    assert all(d % 128 == 0 for d in (*inputs, cfg.num_attention_heads * cfg.v_head_dim))


def test_tensors_are_stored_as_deepseeks_release_stores_them(reader: CheckpointReader) -> None:
    expected = {spec.name: spec for t in checkpoint_tensors(reader.config.raw) for spec in t.specs()}
    assert set(reader.infos) == set(expected)
    assert all((reader.infos[n].dtype, reader.infos[n].shape) == (s.dtype, s.shape) for n, s in expected.items())
    expert = "model.layers.3.mlp.experts.31.down_proj.weight"
    assert reader.infos[expert].dtype == torch.float8_e4m3fn and reader.infos[expert + SCALE_SUFFIX].shape == (2, 1)
    assert len(reader.shard_files) >= 3
    assert sum(f.stat().st_size for f in FIXTURE.iterdir()) < MAX_BYTES


def test_balancing_moved_every_router_bias(reader: CheckpointReader) -> None:
    cfg = reader.config
    for layer in range(cfg.first_k_dense_replace, cfg.num_hidden_layers):
        bias = reader.raw(f"model.layers.{layer}.mlp.gate.e_score_correction_bias")
        assert bias.dtype == torch.float32 and bias.std() > 0.01


def test_tokenizer_loads_through_streamq_and_round_trips(reader: CheckpointReader) -> None:
    tokenizer = load_tokenizer(FIXTURE, warn=_fail)
    assert isinstance(tokenizer, HFTokenizer)  # tokenizer.json through AutoTokenizer, not the byte fallback
    assert tokenizer.bos_id == reader.config.raw["bos_token_id"]
    text = "ROMEO:\nBut, soft! what light through yonder window breaks? — Ça, 桜\n"
    ids = tokenizer.encode([text])[0]
    assert ids == ByteTokenizer().encode([text])[0]  # id = byte + 3, as streamq's fallback
    assert tokenizer.tokenizer.decode(ids) == text


@needs_shared(SHAKESPEARE)
def test_held_out_loss_shows_a_trained_model(reader: CheckpointReader) -> None:
    cfg = DataConfig(source=str(SHAKESPEARE), num_samples=4, seq_len=128, split="eval")
    ids = load_token_batches(cfg, FIXTURE, warn=_fail)
    logits = forward_blocks(reader, ids, dtype=torch.float32)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).item()
    assert loss < MAX_HELD_OUT_LOSS < math.log(reader.config.vocab_size)
