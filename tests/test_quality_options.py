"""The quality options of issue 13: a float target (GPTAQ), router-weighted expert Hessians, least-squares
group scales. Each is checked against its defining formula, then through the pipeline the user's command runs."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import streamq_env
from safetensors.torch import load_file

from streamq.calibrate import Accumulators, Hessians, calibration_pass, expert_down_input, mlp_input
from streamq.data import DataConfig
from streamq.errors import StreamqError
from streamq.io.safetensors_stream import CheckpointReader
from streamq.passes import PassPlan
from streamq.pipeline import RunOptions, run
from streamq.recipe import REFINED, Recipe, default_solver
from streamq.report import REPORT_NAME
from streamq.resume import MANIFEST_NAME
from streamq.solvers.gptaq import asymmetric_target
from streamq.solvers.gptq import gptq_quantize
from streamq.solvers.hessian import hessian_weighted_error
from streamq.solvers.scale_refine import refine_scales
from streamq.solvers.scheme import QuantScheme, SolverConfig
from streamq.tui import EVENTS_FILENAME, Reporter

REPO = Path(__file__).resolve().parents[1]
DATA = DataConfig(num_samples=6, seq_len=32)
OPTIONS = RunOptions(device="cpu", dtype="float32", token_budget=64)


def _streams(seed: int, experts: int = 2, tokens: int = 600, n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantized-stream inputs x̃ [E, T, n] (uneven channel scales) and float-stream x = x̃ + a drift that
    depends on x̃ (as an upstream block's quantization error does) plus noise."""
    gen = torch.Generator().manual_seed(seed)
    quantized = torch.randn(experts, tokens, n, generator=gen, dtype=torch.float64) * torch.linspace(0.3, 2.0, n)
    mix = 0.2 * torch.randn(experts, n, n, generator=gen, dtype=torch.float64) / n**0.5
    noise = 0.02 * torch.randn(quantized.shape, generator=gen, dtype=torch.float64)
    return quantized + quantized @ mix + noise, quantized


# -- float target (GPTAQ) -------------------------------------------------------------------------------------------


def test_the_float_target_is_the_least_squares_fit_of_the_float_output() -> None:
    x, xq = _streams(0)
    w = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t = x.shape[1]
    h, cross = xq.transpose(1, 2) @ xq / t, x.transpose(1, 2) @ xq / t
    target = asymmetric_target(w.float(), h.float(), cross.float(), damp=0.0).double()
    # min over Ŵ of ||W X - Ŵ X̃||: the least-squares solution of X̃ Ŵᵀ = X Wᵀ.
    lstsq = torch.linalg.lstsq(xq, x @ w.transpose(1, 2)).solution.transpose(1, 2)
    torch.testing.assert_close(target, lstsq, rtol=1e-3, atol=1e-3)
    # And the asymmetric objective is GPTQ's objective around W* plus a constant, for any candidate Ŵ.
    candidate = w + 0.05 * torch.randn(w.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    full = ((x @ w.transpose(1, 2) - xq @ candidate.transpose(1, 2)) ** 2).sum((-2, -1)) / t
    floor = ((x @ w.transpose(1, 2) - xq @ target.transpose(1, 2)) ** 2).sum((-2, -1)) / t
    d = target - candidate
    torch.testing.assert_close(full, floor + ((d @ h) * d).sum((-2, -1)), rtol=1e-3, atol=1e-6)


def test_without_drift_the_float_target_is_the_weight_itself() -> None:
    _, xq = _streams(3)
    h = (xq.transpose(1, 2) @ xq / xq.shape[1]).float()
    w = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(4))
    assert torch.equal(asymmetric_target(w, h, h.clone(), damp=0.01), w)


def test_an_unusable_hessian_keeps_the_weight() -> None:
    x, xq = _streams(5)
    h = (xq.transpose(1, 2) @ xq / xq.shape[1]).float()
    cross = (x.transpose(1, 2) @ xq / xq.shape[1]).float()
    h[0] = 0.0  # no token reached expert 0
    cross[1, 0, 0] = float("nan")
    w = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(6))
    assert torch.equal(asymmetric_target(w, h, cross, damp=0.01), w)


def test_gptq_towards_the_float_target_lowers_the_float_output_error() -> None:
    x, xq = _streams(7)
    t = x.shape[1]
    h, cross = (xq.transpose(1, 2) @ xq / t).float(), (x.transpose(1, 2) @ xq / t).float()
    w = torch.randn(2, 32, 64, generator=torch.Generator().manual_seed(8))
    cfg = SolverConfig(scheme=QuantScheme(bits=4, group_size=32))

    def float_error(q: torch.Tensor) -> torch.Tensor:
        return ((x.float() @ w.transpose(1, 2) - xq.float() @ q.transpose(1, 2)) ** 2).sum((-2, -1))

    plain = gptq_quantize(w, h, cfg).weight
    aimed = gptq_quantize(asymmetric_target(w, h, cross, cfg.damp), h, cfg).weight
    assert (float_error(aimed) < 0.5 * float_error(plain)).all()


def test_a_pass_with_targets_collects_each_experts_float_times_quantized_inputs(moe_block) -> None:
    cfg, _, block, cos, sin = moe_block
    gen = torch.Generator().manual_seed(9)
    xs = [torch.randn(2, 16, cfg.hidden_size, generator=gen, dtype=torch.float64) for _ in range(2)]
    fs = [x + 0.05 * torch.randn(x.shape, generator=gen, dtype=torch.float64) for x in xs]
    into = Accumulators(Hessians(), cross=Hessians())
    experts = tuple(range(cfg.n_routed_experts))
    calibration_pass(block, xs, cos, sin, PassPlan(experts, ()), into, targets=fs)

    m = torch.cat([mlp_input(block, x, cos, sin) for x in xs])
    mf = torch.cat([mlp_input(block, f, cos, sin) for f in fs])
    _, indices = block.mlp.gate(m)  # the quantized stream's routing picks the tokens
    for e in experts:
        mine = (indices == e).any(-1)
        key = f"mlp.experts.{e}"
        if not mine.any():
            assert f"{key}.gate_up" not in into.cross.sums
            continue
        expected = (mf[mine].t() @ m[mine]).float()
        torch.testing.assert_close(into.cross.sums[f"{key}.gate_up"], expected, rtol=1e-4, atol=1e-4)
        expert = block.mlp.experts[e]
        down_f, down_q = expert_down_input(expert, mf[mine]), expert_down_input(expert, m[mine])
        torch.testing.assert_close(
            into.cross.sums[f"{key}.down_proj"], (down_f.t() @ down_q).float(), rtol=1e-4, atol=1e-4
        )


def test_router_weighting_scales_each_token_by_its_router_weight_squared(moe_block) -> None:
    cfg, _, block, cos, sin = moe_block
    xs = [torch.randn(2, 16, cfg.hidden_size, generator=torch.Generator().manual_seed(10), dtype=torch.float64)]
    into = Accumulators(Hessians(), router_weighted=True)
    experts = tuple(range(cfg.n_routed_experts))
    calibration_pass(block, xs, cos, sin, PassPlan(experts, ()), into)

    m = mlp_input(block, xs[0], cos, sin)
    weights, indices = block.mlp.gate(m)
    for e in experts:
        g = (weights * (indices == e)).sum(-1)  # the token's weight for e (0 when not routed there)
        mine = (indices == e).any(-1)
        if mine.any():
            xe = m[mine] * g[mine, None]
            expected = (xe.t() @ xe).float()
            torch.testing.assert_close(into.hessians.sums[f"mlp.experts.{e}.gate_up"], expected, rtol=1e-4, atol=1e-4)
            assert into.hessians.count(f"mlp.experts.{e}.gate_up") == int(mine.sum())


# -- least-squares scales -------------------------------------------------------------------------------------------


def test_refined_scales_minimise_the_output_error_for_fixed_codes() -> None:
    _, xq = _streams(11)
    h = (xq.transpose(1, 2) @ xq / xq.shape[1]).float()
    w = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(12))
    cfg = SolverConfig(scheme=QuantScheme(bits=3, group_size=16, scale_dtype="float32"))
    first = gptq_quantize(w, h, cfg)
    refined = refine_scales(w, h, first.q, first.scale, None, cfg)

    def error(scale: torch.Tensor) -> torch.Tensor:
        weight = first.q.float() * scale.repeat_interleave(16, dim=-1)
        return hessian_weighted_error(w, weight, h)

    best = error(refined)
    assert (best < error(first.scale)).all()
    nudge = torch.randn(refined.shape, generator=torch.Generator().manual_seed(13))
    for step in (1e-3, -1e-3):
        assert (best <= error(refined * (1 + step * nudge)) + 1e-9).all()


def test_scale_rounds_lower_the_solvers_output_error() -> None:
    _, xq = _streams(14, n=256)
    h = (xq.transpose(1, 2) @ xq / xq.shape[1]).float()
    w = torch.randn(2, 32, 256, generator=torch.Generator().manual_seed(15))
    errors = []
    for rounds in (0, 1, 2):
        cfg = SolverConfig(scheme=QuantScheme(bits=3, group_size=128), scale_rounds=rounds)
        result = gptq_quantize(w, h, cfg)
        # The written checkpoint holds exactly codes × stored scales.
        stored = result.scale.to(torch.bfloat16).float()
        torch.testing.assert_close(result.weight, result.q.float() * stored.repeat_interleave(128, dim=-1))
        errors.append(hessian_weighted_error(w, result.weight, h))
    assert (errors[1] < errors[0]).all() and (errors[2] < errors[1]).all()


def test_hessian_weighted_scale_search_lowers_gptqs_output_error() -> None:
    """Input channels of very different energy (as in real activations): the MSE observer that weighs each
    column's rounding error by the Hessian's diagonal picks clippings that suit the output, not the weights."""
    gen = torch.Generator().manual_seed(16)
    energy = torch.linspace(0.2, 3.0, 256)[torch.randperm(256, generator=gen)]
    x = torch.randn(2, 2000, 256, generator=gen) * energy
    h = x.transpose(1, 2) @ x / x.shape[1]
    w = torch.randn(2, 64, 256, generator=gen)
    errors = {}
    for weighted in (False, True):
        cfg = SolverConfig(scheme=QuantScheme(bits=4, group_size=128), observer="mse", mse_hessian=weighted)
        errors[weighted] = hessian_weighted_error(w, gptq_quantize(w, h, cfg).weight, h)
    assert (errors[True] < 0.97 * errors[False]).all()


@pytest.mark.parametrize(
    ("recipe", "message"),
    [
        (dict(solver=SolverConfig(scale_rounds=-1)), "--scale-rounds must be >= 0"),
        (dict(solver=SolverConfig(scale_rounds=1, actorder="none")), "--act-order"),
        (dict(solver=SolverConfig(scheme=QuantScheme.preset("nvfp4"), scale_rounds=1)), "--format nvfp4"),
        (dict(target="output"), "--target 'output' is not supported"),
    ],
)
def test_bad_quality_options_are_refused_with_the_fix(recipe: dict, message: str) -> None:
    with pytest.raises(StreamqError, match=message):
        Recipe(**recipe)


# -- through the pipeline -------------------------------------------------------------------------------------------


def quantize(model: Path, out: Path, recipe: Recipe) -> Path:
    with Reporter(None, display="none") as reporter:
        return run(model, out, recipe, OPTIONS, reporter)


def expert_tensors(out: Path, layer: int) -> dict[str, torch.Tensor]:
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    prefix = f"model.layers.{layer}.mlp.experts."
    files = {f for name, f in index.items() if name.startswith(prefix)}
    return {n: t for f in files for n, t in load_file(out / f).items() if n.startswith(prefix)}


# What `streamq run --bits 3 --target float` builds (``streamq_run``), the default solver included.
FLOAT_TARGET = Recipe(data=DATA, target="float", solver=replace(default_solver(), scheme=QuantScheme(bits=3)))


@pytest.fixture(scope="module")
def float_out(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return quantize(tiny_checkpoint, tmp_path_factory.mktemp("float") / "out", FLOAT_TARGET)


@pytest.mark.slow
def test_the_float_stream_is_the_unquantized_models(tiny_checkpoint: Path, float_out: Path, tmp_path: Path) -> None:
    """The tiny model's first MoE block sees the same input in both streams (only experts are quantized), so a
    float target changes nothing there; the second MoE block's float input is the *unquantized* first MoE block's
    output, so its experts change. A float stream propagated through the quantized block would change neither."""
    layer_out = quantize(tiny_checkpoint, tmp_path / "layer", Recipe(**{**FLOAT_TARGET.__dict__, "target": "layer"}))
    first, second = [i for i in range(4) if CheckpointReader(tiny_checkpoint).config.is_moe_layer(i)]
    a, b = expert_tensors(layer_out, first), expert_tensors(float_out, first)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    a, b = expert_tensors(layer_out, second), expert_tensors(float_out, second)
    assert any(not torch.equal(a[k], b[k]) for k in a if k.endswith("weight_packed"))
    assert json.loads((float_out / MANIFEST_NAME).read_text())["complete"] is True
    assert not (float_out / ".streamq").exists()  # the float stream's files went with the work directory


@pytest.mark.slow
@pytest.mark.parametrize("crash", ["calibrate:16", "block-done:3"])
def test_a_killed_float_target_run_resumes_to_identical_bytes(
    crash: str, tiny_checkpoint: Path, float_out: Path, tmp_path: Path
) -> None:
    """Killed inside the second MoE block's calibration (which reads both streams; the first MoE block makes 12
    calibrate steps here) or right after a block (the next block's float input must have been saved with the
    manifest's step), the rerun gives the same bytes."""
    out = tmp_path / "out"
    killed = streamq_run(tiny_checkpoint, out, crash)
    assert killed.returncode == -9, f"the fault point {crash} was not reached:\n{killed.stderr[-2000:]}"
    assert json.loads((out / MANIFEST_NAME).read_text())["next_layer"] == 3
    resumed = streamq_run(tiny_checkpoint, out, None)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert output_files(out) == output_files(float_out)


def streamq_run(model: Path, out: Path, crash: str | None) -> subprocess.CompletedProcess[str]:
    """``quantize`` with FLOAT_TARGET through `streamq run`, in a process that ``crash`` may kill."""
    args = ["--num-samples", str(DATA.num_samples), "--seq-len", str(DATA.seq_len), "--dtype", "float32"]
    args += ["--bits", "3", "--target", "float", "--device", "cpu", "--token-budget", str(OPTIONS.token_budget)]
    env = streamq_env(STREAMQ_CRASH_AT=crash or "")
    command = [sys.executable, "-m", "streamq", "run", str(model), str(out), *args, "--display", "plain"]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def output_files(out: Path) -> dict[str, bytes]:
    timing = {EVENTS_FILENAME, REPORT_NAME}
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file() and p.name not in timing}


def test_the_default_recipe_searches_scales_refines_the_down_projections_and_the_earlier_defaults_stay() -> None:
    from streamq.cli import build_recipe

    default = Recipe()
    assert (default.solver.observer, default.solver.mse_grid, default.solver.mse_max_shrink) == ("mse", 100, 0.2)
    assert (default.solver.code_rounds, default.solver.scale_candidates) == (2, (0.88, 0.91, 0.94, 0.97, 1.03, 1.06))
    assert default.refine == "down" and default.to_dict()["refine"] == "down"
    assert Recipe.from_dict(default.to_dict()) == default
    assert (default.target, default.router_weighted, default.solver.scale_rounds) == ("layer", False, 0)
    # --refine all with the earlier refinements: the refined option of issue 13's second round.
    refined = build_recipe(Recipe(), data={}, scheme={}, solver=dict(REFINED), top={"refine": "all"})
    assert (refined.solver.code_rounds, refined.solver.scale_candidates) == (2, (0.94, 0.97, 1.03))
    assert refined.refine == "all"
    assert "refine" not in refined.to_dict() and refined.to_dict()["solver"]["code_rounds"] == 2
    # --scale-candidates none --code-rounds 0: issue 13's first default, with its file and digest of then.
    first = build_recipe(Recipe(), data={}, scheme={}, solver={"scale_candidates": (), "code_rounds": 0}, top={})
    assert first.refine == "all"
    assert not {"code_rounds", "scale_candidates"} & set(first.to_dict()["solver"]) and "refine" not in first.to_dict()
    # ... and with --observer absmax the default before issue 13.
    none = {"scale_candidates": (), "code_rounds": 0}
    earlier = build_recipe(Recipe(), data={}, scheme={}, solver={"observer": "minmax", **none}, top={})
    assert earlier.solver == SolverConfig(mse_max_shrink=0.2)  # unused by absmax scales
