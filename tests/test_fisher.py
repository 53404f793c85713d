"""The output Fisher pre-pass (streamq/fisher.py) and the row-chunked solve under an output metric
(streamq/solvers/row_chunks.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from streamq.fisher import fisher_done, fisher_samples, load_fisher, output_fisher
from streamq.io.safetensors_stream import CheckpointReader
from streamq.model.deepseek import load_block, load_embedding, load_head, rope_cos_sin
from streamq.solvers.gptq import gptq_quantize
from streamq.solvers.row_chunks import output_metric, row_gains, solve_in_row_chunks
from streamq.solvers.scheme import QuantResult, QuantScheme, SolverConfig


def reference_fisher(reader: CheckpointReader, tokens: torch.Tensor, seed: int) -> dict[int, torch.Tensor]:
    """The definition, one autograd graph through the whole model (float32, CPU): each block's output gradient
    of Σ log p(y), y drawn sequence by sequence from the model's own prediction with the same generator."""
    cfg = reader.config
    cos, sin = rope_cos_sin(cfg, tokens.shape[1], "cpu")
    embed = load_embedding(reader, "cpu", torch.float32)
    blocks = [load_block(reader, i, "cpu", torch.float32) for i in range(cfg.num_hidden_layers)]
    head = load_head(reader, "cpu", torch.float32)
    generator = torch.Generator().manual_seed(seed)
    sums = {i: torch.zeros(cfg.hidden_size, cfg.hidden_size) for i in range(cfg.num_hidden_layers)}
    for s in range(tokens.shape[0]):
        outputs = []
        with torch.enable_grad():
            h = embed(tokens[s : s + 1]).requires_grad_(True)  # a leaf: every block output gets a grad
            for block in blocks:
                h = block(h, cos, sin)
                h.retain_grad()
                outputs.append(h)
            logits = head(h).float().flatten(0, 1)
            labels = torch.multinomial(torch.softmax(logits.detach(), -1), 1, generator=generator).squeeze(1)
            torch.nn.functional.cross_entropy(logits, labels, reduction="sum").backward()
        for i, out in enumerate(outputs):
            g = out.grad.flatten(0, 1)
            sums[i] += g.T @ g
    return sums


def test_fisher_prepass_equals_whole_model_autograd(tiny_checkpoint: Path, tmp_path: Path) -> None:
    reader = CheckpointReader(tiny_checkpoint)
    cfg = reader.config
    tokens = torch.randint(0, cfg.vocab_size, (3, 12), generator=torch.Generator().manual_seed(0))
    layers = [i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]
    assert not fisher_done(tmp_path)
    output_fisher(reader, tokens, layers, torch.device("cpu"), torch.float32, tmp_path, seed=7)
    want = reference_fisher(reader, tokens, seed=7)
    assert fisher_done(tmp_path)
    for layer in range(cfg.num_hidden_layers):
        got = load_fisher(tmp_path, layer)
        if layer not in layers:
            assert got is None
            continue
        assert got is not None and got.shape == (cfg.hidden_size, cfg.hidden_size)
        assert float(got.diagonal().sum()) > 0
        torch.testing.assert_close(got, want[layer], rtol=1e-4, atol=1e-6 * float(want[layer].abs().max()))
    # Only the estimates and the marker stay: the block inputs the backward needed are gone.
    assert sorted(p.name for p in (tmp_path / "fisher").iterdir()) == sorted(
        ["complete", *(f"layer-{i}.safetensors" for i in layers)]
    )


def test_fisher_depends_on_its_labels_seed(tiny_checkpoint: Path, tmp_path: Path) -> None:
    reader = CheckpointReader(tiny_checkpoint)
    tokens = torch.randint(0, reader.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(1))
    layer = max(i for i in range(reader.config.num_hidden_layers) if reader.config.is_moe_layer(i))
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        output_fisher(reader, tokens, [layer], torch.device("cpu"), torch.float32, tmp_path / name, seed=seed)
    a, b, c = (load_fisher(tmp_path / name, layer) for name in "abc")
    assert a is not None and b is not None and c is not None
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_no_layer_to_weigh_writes_the_marker_only(tiny_checkpoint: Path, tmp_path: Path) -> None:
    reader = CheckpointReader(tiny_checkpoint)
    tokens = torch.zeros(1, 4, dtype=torch.long)
    assert output_fisher(reader, tokens, [], torch.device("cpu"), torch.float32, tmp_path, seed=0) == []
    assert fisher_done(tmp_path) and load_fisher(tmp_path, 0) is None


def test_fisher_samples_budget() -> None:
    assert fisher_samples(32768, 4096, 512) == 8
    assert fisher_samples(32768, 256, 128) == 128  # never more than the calibration set
    assert fisher_samples(100, 4096, 512) == 1


# -- the row-chunked solve ------------------------------------------------------------------------------------------


def coupled_problem(seed: int, experts: int = 3, out: int = 48, n: int = 64) -> tuple[torch.Tensor, ...]:
    """Weights, Hessians and an output metric with a few strongly felt directions (a Fisher-like spectrum)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(experts, out, n, generator=g, dtype=torch.float64)
    x = torch.randn(experts, 4 * n, n, generator=g, dtype=torch.float64)
    h = x.transpose(1, 2) @ x / x.shape[1]
    v = torch.randn(out, 4, generator=g, dtype=torch.float64)
    fisher = v @ v.T * 10 + 0.05 * torch.eye(out, dtype=torch.float64)
    return w, h, fisher


def weighted_error(w: torch.Tensor, q: torch.Tensor, h: torch.Tensor, f: torch.Tensor) -> float:
    d = (w - q).double()
    return float(torch.einsum("eij,ejk,elk,il->", d, h, d, f))


def test_row_gains_are_the_conditional_least_squares_correction() -> None:
    """G_c D_f is the minimiser over the remaining rows' real-valued errors, restricted to chunk c's rows."""
    fisher = coupled_problem(0)[2]
    metric = output_metric(fisher, 0.5)
    gains = row_gains(metric, 4)
    a, b = gains.bounds[2]
    d_f = torch.randn(5, a, 7, dtype=torch.float64)
    rest = metric[a:, a:]
    want = -torch.linalg.solve(rest, metric[a:, :a] @ d_f)  # D_l* = -F_ll⁻¹ F_lf D_f
    got = gains.gains[2].double() @ d_f
    torch.testing.assert_close(-got, want[:, : b - a], rtol=1e-5, atol=1e-6)
    assert gains.gains[0] is None and gains.bounds[-1][1] == fisher.shape[0]


def test_one_chunk_is_plain_gptq_and_chunks_lower_the_weighted_error() -> None:
    cfg = SolverConfig(scheme=QuantScheme(bits=3, group_size=32))
    better = 0
    for seed in range(3):
        w, h, fisher = coupled_problem(seed)
        metric = output_metric(fisher, 0.5)

        def solve(target: torch.Tensor, h: torch.Tensor = h) -> QuantResult:
            return gptq_quantize(target.float(), h.float(), cfg)

        plain = gptq_quantize(w.float(), h.float(), cfg)
        one = solve_in_row_chunks(w.float(), row_gains(metric, 1), solve)
        assert torch.equal(one.q, plain.q) and torch.equal(one.weight, plain.weight)
        chunked = solve_in_row_chunks(w.float(), row_gains(metric, 8), solve)
        assert chunked.q.shape == plain.q.shape and chunked.scale.shape == plain.scale.shape
        # Every chunk's codes decode with its own scales to the weights it reports.
        assert torch.allclose(chunked.q.float() * chunked.scale.repeat_interleave(32, -1), chunked.weight)
        better += weighted_error(w, chunked.weight, h, metric) < 0.8 * weighted_error(w, plain.weight, h, metric)
    assert better == 3


def test_output_metric_normalises_and_guards_a_zero_fisher() -> None:
    fisher = torch.diag(torch.tensor([4.0, 2.0, 0.0]))
    metric = output_metric(fisher, 0.5)
    torch.testing.assert_close(metric.diagonal(), torch.tensor([1.5, 1.0, 0.5], dtype=torch.float64))
    assert torch.equal(output_metric(torch.zeros(3, 3), 0.5), torch.eye(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="rows"):
        solve_in_row_chunks(torch.zeros(1, 4, 8), row_gains(torch.eye(3, dtype=torch.float64), 2), lambda t: t)


# -- through the pipeline -------------------------------------------------------------------------------------------


def test_the_run_solves_the_down_projections_under_the_fisher(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """`streamq run`'s default measures the Fisher and changes the down projections only: the first MoE block's
    gate/up (same input in both runs) come out byte for byte as with --fisher-tokens 0, its down projections not;
    the recipe file says so, and the work directory (the Fisher with it) is gone from the finished output."""
    from safetensors import safe_open

    from streamq.data_config import DataConfig
    from streamq.pipeline import RunOptions, run
    from streamq.recipe import RECIPE_NAME, Recipe
    from streamq.resume import WORK_DIR
    from streamq.tui import Reporter

    data = DataConfig(num_samples=4, seq_len=32)
    options = RunOptions(device="cpu", dtype="float32")
    outs = {}
    for name, recipe in (("fisher", Recipe(data=data)), ("plain", Recipe(data=data, fisher_tokens=0))):
        with Reporter(None, display="none") as reporter:
            outs[name] = run(tiny_checkpoint, tmp_path / name, recipe, options, reporter)
    assert '"fisher_tokens": 32768' in (outs["fisher"] / RECIPE_NAME).read_text()
    assert "fisher" not in (outs["plain"] / RECIPE_NAME).read_text()
    assert not (outs["fisher"] / WORK_DIR).exists()

    def expert_tensors(out: Path, projection: str) -> dict[str, torch.Tensor]:
        tensors = {}
        for shard in sorted(out.glob("model-*.safetensors")):
            with safe_open(str(shard), "pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    if ".layers.2.mlp.experts." in key and f".{projection}." in key:
                        tensors[key] = f.get_tensor(key)
        assert tensors
        return tensors

    for projection, same in (("gate_proj", True), ("up_proj", True), ("down_proj", False)):
        a, b = expert_tensors(outs["fisher"], projection), expert_tensors(outs["plain"], projection)
        assert a.keys() == b.keys()
        equal = all(torch.equal(a[k], b[k]) for k in a)
        assert equal == same, projection
