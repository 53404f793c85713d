"""AWQ: the scale search from running statistics, folding into the checkpoint, and loading the result."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from streamq.data import DataConfig
from streamq.groups import linear_groups
from streamq.io.safetensors_stream import CheckpointReader
from streamq.model.deepseek import forward_blocks, load_block, rope_cos_sin
from streamq.pipeline import RunOptions, run
from streamq.recipe import Recipe
from streamq.smooth import fold, fold_sites
from streamq.solvers.awq import alphas, scaled_error, scales, search_losses, weight_magnitude
from streamq.solvers.rtn import rtn_quantize
from streamq.solvers.scheme import QuantScheme, SolverConfig
from streamq.tui import Reporter

DATA = DataConfig(num_samples=6, seq_len=32)
OPTIONS = RunOptions(device="cpu", dtype="float32", token_budget=64)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_scaled_error_is_the_output_error_on_the_inputs() -> None:
    torch.manual_seed(0)
    w, x = torch.randn(16, 64), torch.randn(512, 64) * torch.linspace(0.1, 5, 64)
    h = x.t() @ x / x.shape[0]
    cfg = SolverConfig(scheme=QuantScheme(bits=3, group_size=32))
    s = torch.rand(64) + 0.5
    wq = rtn_quantize(w * s, cfg).weight / s
    direct = ((x @ (w - wq).t()) ** 2).sum() / x.shape[0]
    torch.testing.assert_close(scaled_error(w, h, s, cfg), direct, rtol=1e-4, atol=1e-6)


def test_search_finds_scales_that_beat_rtn_on_outlier_channels() -> None:
    torch.manual_seed(1)
    w = torch.randn(64, 128)
    x = torch.randn(2048, 128)
    x[:, :4] *= 40  # a few channels carry most of the activation energy, as in real LLMs
    h = x.t() @ x / x.shape[0]
    cfg = SolverConfig(scheme=QuantScheme(bits=3, group_size=64))
    act, mag = h.diagonal().sqrt(), weight_magnitude([w], 64)
    losses = search_losses(w[None], h[None], act, mag, cfg)
    assert alphas()[0] is None and losses[0] == scaled_error(w, h, torch.ones(128), cfg)  # plain RTN
    best = int(losses.argmin())
    assert best != 0 and losses[best] < 0.8 * losses[0]
    s = scales(act, mag, alphas()[best])
    assert torch.isclose(s.max() * s.min(), torch.tensor(1.0))


@pytest.mark.parametrize("scope", ["experts", "all"])
def test_folding_scales_leaves_the_unquantized_block_unchanged(tiny_checkpoint: Path, scope: str) -> None:
    reader = CheckpointReader(tiny_checkpoint)
    cfg = reader.config
    for layer in (0, cfg.first_k_dense_replace):  # a dense and an MoE block
        block = load_block(reader, layer, "cpu", torch.float64)
        cos, sin = rope_cos_sin(cfg, 16, "cpu")
        x = torch.randn(2, 16, cfg.hidden_size, dtype=torch.float64)
        before = block(x, cos.double(), sin.double())
        sites = fold_sites(cfg, layer, linear_groups(cfg, layer, Recipe(scope=scope)))
        assert sites or (scope == "experts" and not cfg.is_moe_layer(layer))
        gen = torch.Generator().manual_seed(layer)
        for site in sites:
            size = len(site.rows) if site.rows else dict(block.named_modules())[site.producer].weight.shape[-1]
            if site.producer.endswith("up_proj"):
                size = dict(block.named_modules())[site.producer].weight.shape[0]
            s = torch.exp(torch.randn(size, generator=gen, dtype=torch.float64) * 0.5)
            fold(block, site, s, lambda _name: torch.float64)
            for consumer in site.consumers:
                for member in next(
                    g for g in linear_groups(cfg, layer, Recipe(scope=scope)) if g.key == consumer
                ).members:
                    module = dict(block.named_modules())[member]
                    module.weight.data = module.weight.data * s
        # float64 except the router, which scores in float32 by design
        assert rel(block(x, cos.double(), sin.double()), before) < 1e-6


@pytest.mark.slow
def test_awq_output_loads_in_transformers_and_matches_streamqs_forward(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    out = tmp_path / "awq"
    with Reporter(None, display="none") as reporter:
        run(tiny_checkpoint, out, Recipe(method="awq", scope="all", data=DATA), OPTIONS, reporter)
    reader = CheckpointReader(out)
    torch.manual_seed(0)
    ids = torch.randint(0, reader.config.vocab_size, (2, 24))
    ours = forward_blocks(reader, ids, dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(
        out, quantization_config=CompressedTensorsConfig(dequantize=True), dtype=torch.float32
    )
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        theirs = model.float()(input_ids=ids).logits
    assert rel(ours, theirs) < 1e-3
    # The folded norms and router were written: the checkpoint differs from the source there.
    source = CheckpointReader(tiny_checkpoint)
    name = f"model.layers.{source.config.first_k_dense_replace}.post_attention_layernorm.weight"
    assert not torch.equal(reader.raw(name), source.raw(name))


@pytest.mark.slow
def test_awq_runs_on_two_chunks_like_on_one(tiny_checkpoint: Path, tmp_path: Path) -> None:
    cfg = CheckpointReader(tiny_checkpoint).config
    # All the experts' routed-token Hessians (gate/up + down, float32), or half of them, fit the budget: one or
    # two passes per MoE block.
    per_expert = 4 * (cfg.hidden_size**2 + cfg.moe_intermediate_size**2)
    one_chunk = replace(OPTIONS, hessian_budget=per_expert * cfg.n_routed_experts)
    two_chunks = replace(OPTIONS, hessian_budget=per_expert * cfg.n_routed_experts // 2)

    def shards(out: Path, options: RunOptions) -> tuple[dict[str, bytes], set[int]]:
        events = tmp_path / f"{out.name}.jsonl"
        with Reporter(events, display="none") as reporter:
            run(tiny_checkpoint, out, Recipe(method="awq", data=DATA), options, reporter)
        stages = [json.loads(line) for line in events.read_text().splitlines()]
        passes = {e["steps"] for e in stages if e.get("stage") == "calibrate" and "steps" in e}
        return {p.name: p.read_bytes() for p in out.glob("model-*.safetensors")}, passes

    one, one_passes = shards(tmp_path / "one", one_chunk)
    two, two_passes = shards(tmp_path / "two", two_chunks)
    assert (one_passes, two_passes) == ({1}, {2})
    assert one == two


def test_awq_refuses_to_keep_the_shared_experts_in_fp8() -> None:
    from streamq.errors import StreamqError

    with pytest.raises(StreamqError, match=r"cannot stay FP8: use --unquantized bf16 or --scope all"):
        Recipe(method="awq", unquantized="fp8", scope="experts")
    Recipe(method="awq", unquantized="fp8", scope="all")  # nothing left unquantized to fold into
