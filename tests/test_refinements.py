"""Refinements after GPTQ's sweep (issue 13): coordinate descent on the codes, and per-row scale candidates. Each
is checked against its definition on problems where it matters, then through the user's command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel module is imported

from conftest import streamq_env

from streamq.errors import StreamqError
from streamq.recipe import RECIPE_NAME, REFINED, Recipe, default_solver
from streamq.solvers.code_descent import DescentRun, refine_codes
from streamq.solvers.gptq import SolveOptions, damped_hessians, experts_per_chunk, gptq_quantize, gptq_solve_prepared
from streamq.solvers.hessian import prepare_hessians
from streamq.solvers.observers import column_params, dequantize, quantize
from streamq.solvers.rtn import rtn_quantize
from streamq.solvers.scheme import QuantScheme, SolverConfig
from streamq.solvers.synthetic import random_problem

ENV = streamq_env()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SWEEP_ONLY = replace(default_solver(), scale_candidates=(), code_rounds=0)  # the default's scale search alone
REFINED_SOLVER = replace(default_solver(), **REFINED)  # the refinements that measured best (recipe.REFINED)


def output_error(w: torch.Tensor, wq: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """[E, out] (w - ŵ) H (w - ŵ)ᵀ of each row, in float64."""
    d = (w - wq).double()
    return ((d @ h.double()) * d).sum(-1)


def descend_naively(
    w: torch.Tensor, h: torch.Tensor, grid_values: torch.Tensor, scale: torch.Tensor, scheme: QuantScheme
) -> torch.Tensor:
    """The definition, one column at a time with the gradient recomputed from scratch: each column moves to the
    grid value nearest the vertex of the output error along it. Per-channel-expanded ``scale``, no zero points."""
    values = grid_values.clone()
    for j in range(w.shape[-1]):
        grad = torch.bmm(w - dequantize(values, scale, None), h)
        vertex = values[..., j] * scale[..., j] + grad[..., j] / h[:, j, j].unsqueeze(-1)
        values[..., j] = quantize(vertex, scale[..., j], None, scheme)
    return values


@pytest.mark.parametrize("scheme", [QuantScheme(bits=3, group_size=64), QuantScheme.preset("nvfp4")])
def test_coordinate_descent_is_the_column_by_column_definition(scheme: QuantScheme) -> None:
    """The lazy blocks (g outside a block of 128 columns updated once per block) give the codes of the textbook
    loop, on a uniform grid and on FP4's non-uniform one; 320 columns make the last block partial."""
    w, h = random_problem(2, 12, 320, seed=3)
    h = h + 0.01 * h.diagonal(dim1=-2, dim2=-1).mean() * torch.eye(320)
    start = rtn_quantize(w, SolverConfig(scheme=scheme))
    unit = scheme.grid.unit
    codes, weight = refine_codes(w, h, start.q, start.scale, None, None, scheme, rounds=1)
    col_scale = column_params(start.scale, scheme.group_size, None, 320)
    expected = descend_naively(w, h, start.q.float() * unit, col_scale, scheme)
    assert torch.equal(codes.float() * unit, expected)
    assert torch.equal(weight, dequantize(expected, col_scale, None))
    assert not torch.equal(codes, start.q)  # RTN is not coordinate-wise optimal here: the test moved codes


@pytest.mark.parametrize("asym", [False, True], ids=["sym", "asym"])
def test_the_kernels_descent_is_the_references(asym: bool) -> None:
    """The rounds through the Triton sweep (its interpreter without a GPU) give the torch reference's codes."""
    w, h = random_problem(2, 16, 96, seed=4, device=DEVICE)
    cfg = SolverConfig(scheme=QuantScheme(bits=3, group_size=32, symmetric=not asym))
    start = gptq_quantize(w, h, cfg)
    zero = None if start.zero_point is None else start.zero_point.float()
    runs = [DescentRun(widths=(64, 16), use_triton=use, block_r=32) for use in (True, False)]
    (tri, tri_w), (ref, ref_w) = [refine_codes(w, h, start.q, start.scale, zero, None, cfg.scheme, 2, r) for r in runs]
    assert (tri != ref).float().mean() <= 0.01  # float sums in another order may flip a near tie
    assert not torch.equal(ref, start.q)
    torch.testing.assert_close(output_error(w, tri_w, h).sum(), output_error(w, ref_w, h).sum(), rtol=1e-3, atol=0)


def test_coordinate_descent_lowers_gptqs_output_error_every_round() -> None:
    w, h = random_problem(3, 32, 256, seed=5)
    errors = []
    for rounds in (0, 1, 2):
        cfg = replace(SWEEP_ONLY, scheme=QuantScheme(bits=3, group_size=128), code_rounds=rounds)
        result = gptq_quantize(w, h, cfg)
        # The written checkpoint holds exactly codes × stored scales, and the codes stay on the grid.
        stored = result.scale.to(torch.bfloat16).float()
        torch.testing.assert_close(result.weight, result.q.float() * stored.repeat_interleave(128, dim=-1))
        assert result.q.min() >= -4 and result.q.max() <= 3
        prep = prepare_hessians(h, cfg)
        errors.append(output_error(w, result.weight, damped_hessians(h, prep, cfg)).sum(-1))
    assert (errors[1] < errors[0]).all() and (errors[2] <= errors[1]).all()


def test_coordinate_descent_keeps_the_scales_and_never_raises_a_rows_error() -> None:
    w, h = random_problem(2, 64, 256, seed=7)
    cfg = replace(SWEEP_ONLY, scheme=QuantScheme(bits=4, group_size=128))
    plain = gptq_quantize(w, h, cfg)
    refined = gptq_quantize(w, h, replace(cfg, code_rounds=1))
    assert torch.equal(plain.scale, refined.scale)
    damped = damped_hessians(h, prepare_hessians(h, cfg), cfg)
    before, after = output_error(w, plain.weight, damped), output_error(w, refined.weight, damped)
    assert (after <= before * (1 + 1e-9)).all()


def test_scale_candidates_keep_each_rows_best_complete_sweep() -> None:
    """Every row is one candidate's sweep as a whole (codes and scale), the one with the smallest output error."""
    w, h = random_problem(2, 48, 256, seed=9)
    cfg = replace(SWEEP_ONLY, scheme=QuantScheme(bits=3, group_size=128))
    multipliers = (0.9, 1.05)
    best = gptq_quantize(w, h, replace(cfg, scale_candidates=multipliers))
    prep = prepare_hessians(h, cfg)
    first = gptq_solve_prepared(w, prep, cfg)
    sweeps = [first] + [
        gptq_solve_prepared(w, prep, cfg, scale=(first.scale * m).to(torch.bfloat16).float()) for m in multipliers
    ]
    damped = damped_hessians(h, prep, cfg)
    errors = torch.stack([output_error(w, s.weight, damped) for s in sweeps])  # [K, E, out]
    pick = errors.argmin(0)
    for k, sweep in enumerate(sweeps):
        rows = pick == k
        assert torch.equal(best.q[rows], sweep.q[rows]) and torch.equal(best.scale[rows], sweep.scale[rows])
    assert len(set(pick.flatten().tolist())) == 3  # each candidate wins some rows here
    assert output_error(w, best.weight, damped).sum() < 0.97 * output_error(w, first.weight, damped).sum()


@pytest.mark.parametrize(
    ("solver", "message"),
    [
        (SolverConfig(code_rounds=-1), "--code-rounds must be >= 0"),
        (SolverConfig(scale_candidates=(1.0,)), "not 1"),
        (SolverConfig(scale_candidates=(0.0,)), r"in \(0, 2\)"),
        (SolverConfig(code_rounds=2, outside_weight=0.0), r"--outside-weight must be in \(0, 1\], not 0"),
        (SolverConfig(code_rounds=2, outside_weight=1.5), r"--outside-weight must be in \(0, 1\], not 1.5"),
        (SolverConfig(outside_weight=-1.0), r"--outside-weight must be in \(0, 1\], not -1"),
    ],
)
def test_bad_refinements_are_refused_with_the_fix(solver: SolverConfig, message: str) -> None:
    with pytest.raises(StreamqError, match=message):
        Recipe(solver=solver)


def test_refinements_left_off_leave_the_recipe_file_and_digest_as_before() -> None:
    """Recipes written before these options existed resume: with the options off, the serialised recipe has no
    trace of them, and a recipe with them on reads back equal."""
    plain = Recipe(solver=replace(default_solver(), code_rounds=0, scale_candidates=()))
    assert not {"code_rounds", "scale_candidates"} & set(plain.to_dict()["solver"])
    on = Recipe(solver=replace(default_solver(), code_rounds=2, scale_candidates=(0.94, 1.03)))
    assert Recipe.from_dict(json.loads(json.dumps(on.to_dict()))) == on
    assert on.digest() != plain.digest()


def test_the_cli_options_reach_the_recipe(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """`streamq run --code-rounds 1 --scale-candidates 0.95,1.05` through the command the user runs: the
    recipe it writes holds both, and the run finishes."""
    out = tmp_path / "out"
    args = ["--num-samples", "4", "--seq-len", "32", "--dtype", "float32", "--device", "cpu", "--bits", "3"]
    args += ["--code-rounds", "1", "--scale-candidates", "0.95,1.05", "--display", "plain"]
    command = [sys.executable, "-m", "streamq", "run", str(tiny_checkpoint), str(out), *args]
    done = subprocess.run(command, env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    solver = json.loads((out / RECIPE_NAME).read_text())["solver"]
    assert (solver["code_rounds"], solver["scale_candidates"]) == (1, [0.95, 1.05])


def test_a_bad_scale_candidates_list_is_one_line(tiny_checkpoint: Path, tmp_path: Path) -> None:
    command = [sys.executable, "-m", "streamq", "run", str(tiny_checkpoint), str(tmp_path / "out")]
    command += ["--scale-candidates", "0.9;1.1", "--device", "cpu"]
    done = subprocess.run(command, env=ENV, capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert (
        done.stderr.strip()
        == "error: --scale-candidates '0.9;1.1': write numbers separated by commas, e.g. 0.94,0.97,1.03"
    )
    assert not (tmp_path / "out").exists()


def test_a_candidate_sweep_given_the_zero_points_skips_the_observer_and_changes_nothing() -> None:
    """Asymmetric grid: sweeping fixed scales with the first sweep's zero points (what the candidates do, to skip
    the observer's search) gives the codes of the sweep that refits the zero points with the observer."""
    w, h = random_problem(2, 16, 256, seed=11)
    cfg = replace(SWEEP_ONLY, scheme=QuantScheme(bits=3, group_size=128, symmetric=False))
    prep = prepare_hessians(h, cfg)
    first = gptq_solve_prepared(w, prep, cfg)
    scale = (first.scale * 0.95).to(torch.bfloat16).float()
    given = gptq_solve_prepared(w, prep, cfg, scale=scale, zero=first.zero_point.float())
    refit = gptq_solve_prepared(w, prep, cfg, scale=scale)
    assert torch.equal(given.q, refit.q) and torch.equal(given.zero_point, refit.zero_point)
    assert not torch.equal(given.q, first.q)


def test_refined_solves_take_smaller_chunks_and_chunking_changes_nothing() -> None:
    w, h = random_problem(3, 16, 128, seed=12)
    cfg = replace(REFINED_SOLVER, scheme=QuantScheme(bits=3, group_size=64))
    whole = gptq_quantize(w, h, cfg)
    one_at_a_time = gptq_quantize(w, h, cfg, SolveOptions(memory_budget=1))
    assert torch.equal(whole.q, one_at_a_time.q) and torch.equal(whole.scale, one_at_a_time.scale)
    # DeepSeek-V3's tied gate/up in 4 GiB: the refinements' buffers leave room for fewer experts per chunk.
    assert experts_per_chunk(4096, 7168, 4 << 30, refined=True) < experts_per_chunk(4096, 7168, 4 << 30)


@pytest.mark.parametrize(
    "cfg",
    [
        SolverConfig(scheme=QuantScheme.preset("nvfp4"), observer="mse", mse_max_shrink=0.2),
        SolverConfig(scheme=QuantScheme(bits=4, group_size=32), actorder="none", observer="mse", mse_max_shrink=0.2),
    ],
    ids=["fp4-scales", "groups-fitted-in-the-sweep"],
)
def test_scale_candidates_leave_solves_they_cannot_apply_to_alone(cfg: SolverConfig) -> None:
    """The candidates multiply integer scales fixed before the sweep; an NVFP4 or no-act-order recipe given them
    is solved as without them (its code descent still runs)."""
    Recipe(solver=replace(cfg, scale_candidates=(0.94, 0.97, 1.03)))  # accepted, as `--format nvfp4` builds it
    w, h = random_problem(2, 16, 128, seed=13)
    with_them = gptq_quantize(w, h, replace(cfg, scale_candidates=(0.94, 0.97, 1.03), code_rounds=1))
    without = gptq_quantize(w, h, replace(cfg, code_rounds=1))
    assert torch.equal(with_them.q, without.q) and torch.equal(with_them.scale, without.scale)


@pytest.mark.slow
def test_the_default_refines_the_down_projections_alone(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """`streamq run` with the default refinements (down projections), with `--refine all` and with none, through
    the command the user runs. The first MoE layer's experts all see the same inputs in the three runs (each
    expert's down is fitted on its unquantized gate/up output), so the default's gate/up are the unrefined run's,
    byte for byte, and its down projections are the all-refined run's; the refinements change both somewhere."""
    base = ["--num-samples", "4", "--seq-len", "32", "--dtype", "float32", "--device", "cpu", "--bits", "3"]
    base += ["--row-chunks", "2"]  # the output Fisher on, in 2 row chunks instead of 8 (CPU time)
    runs = {"down": [], "all": ["--refine", "all"], "none": ["--scale-candidates", "none", "--code-rounds", "0"]}
    packed = {}
    for name, extra in runs.items():
        out = tmp_path / name
        command = [sys.executable, "-m", "streamq", "run", str(tiny_checkpoint), str(out), *base, *extra]
        done = subprocess.run(command, env=ENV, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        packed[name] = first_moe_layer_codes(out, layer=2)
    assert json.loads((tmp_path / "down" / RECIPE_NAME).read_text())["refine"] == "down"
    gate_up = [n for n in packed["down"] if ".down_proj." not in n]
    down = [n for n in packed["down"] if ".down_proj." in n]
    assert gate_up and down
    assert all(torch.equal(packed["down"][n], packed["none"][n]) for n in gate_up)
    assert all(torch.equal(packed["down"][n], packed["all"][n]) for n in down)
    assert not all(torch.equal(packed["all"][n], packed["none"][n]) for n in gate_up)
    assert not all(torch.equal(packed["down"][n], packed["none"][n]) for n in down)


def first_moe_layer_codes(out: Path, layer: int) -> dict[str, torch.Tensor]:
    """The packed codes and scales of layer ``layer``'s routed experts in a finished OUT."""
    from safetensors import safe_open

    found = {}
    for shard in sorted(out.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                if name.startswith(f"model.layers.{layer}.mlp.experts."):
                    found[name] = f.get_tensor(name)
    return found


# -- the output-weighted descent (code_descent.OutputMetric) --------------------------------------------------------


def output_metric(w: torch.Tensor, beta: float) -> torch.Tensor:
    """F = P + β (I - P) [E, out, out], P the projector on W's column space, from the pseudo-inverse (float64)."""
    w = w.double()
    p = w @ torch.linalg.pinv(w)
    return p + beta * (torch.eye(w.shape[1], dtype=torch.float64) - p)


def weighted_error(w: torch.Tensor, wq: torch.Tensor, h: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """[E] tr(D H Dᵀ F), D = W - Ŵ, in float64."""
    d = (w - wq).double()
    return ((f @ d @ h.double()) * d).sum((-2, -1))


def test_the_weighted_descent_is_its_column_by_column_definition() -> None:
    """With one-column leaves nothing is deferred: each column's rows move at once to the grid value nearest the
    vertex ŵ + (F D H)_ij / (F_ii H_jj) of the weighted error, F from the pseudo-inverse, the gradient
    recomputed from scratch (the textbook loop)."""
    w, h = random_problem(2, 40, 24, seed=6)
    h = h + 0.01 * h.diagonal(dim1=-2, dim2=-1).mean() * torch.eye(24)
    scheme = QuantScheme(bits=3, group_size=0)
    start = rtn_quantize(w, SolverConfig(scheme=scheme))
    run = DescentRun(widths=(8, 1))
    codes, weight = refine_codes(w, h, start.q, start.scale, None, None, scheme, 1, run, outside_weight=0.3)
    scale = column_params(start.scale, 0, None, 24)
    f = output_metric(w, 0.3)
    values = start.q.float()
    for j in range(24):
        grad = f @ (w - dequantize(values, scale, None)).double() @ h.double()
        diag_f = f.diagonal(dim1=-2, dim2=-1)
        vertex = values[..., j] * scale[..., j] + (grad[..., j] / (diag_f * h[:, j, j, None].double())).float()
        values[..., j] = quantize(vertex, scale[..., j], None, scheme)
    # The Gram-Cholesky projector and the pseudo-inverse's agree to float32 rounding: a near tie may flip.
    assert (codes.float() != values).float().mean() <= 0.005
    assert not torch.equal(codes, start.q)
    expected = weighted_error(w, dequantize(values, scale, None), h, f)
    torch.testing.assert_close(weighted_error(w, weight, h, f), expected, rtol=1e-4, atol=0)


def test_the_weighted_descent_lowers_its_own_objective_and_leaves_wide_matrices_alone() -> None:
    """On down-shaped matrices (more rows than columns) two weighted rounds end below both GPTQ's sweep and two
    plain rounds in the weighted error; on wide ones (gate/up: P = I) the weight changes no code."""
    tall_w, tall_h = random_problem(3, 96, 48, seed=7)
    cfg = replace(SWEEP_ONLY, scheme=QuantScheme(bits=3, group_size=0))
    settings = ((0, 1.0), (2, 1.0), (2, 0.4))  # (code rounds, outside weight)
    sweep, plain, weighted = (
        gptq_quantize(tall_w, tall_h, replace(cfg, code_rounds=r, outside_weight=b)) for r, b in settings
    )
    damped = damped_hessians(tall_h, prepare_hessians(tall_h, cfg), cfg)
    f = output_metric(tall_w, 0.4)
    errors = [weighted_error(tall_w, r.weight, damped, f) for r in (sweep, plain, weighted)]
    assert (errors[2] < errors[0]).all() and (errors[2] < errors[1]).all(), errors
    # ... at the price of GPTQ's own (unweighted) objective, which the plain rounds descend.
    assert (
        output_error(tall_w, plain.weight, damped).sum(-1) <= output_error(tall_w, weighted.weight, damped).sum(-1)
    ).all()
    assert torch.equal(weighted.scale, sweep.scale)  # the grid stays as fitted
    wide_w, wide_h = random_problem(2, 32, 64, seed=8)
    one, other = (gptq_quantize(wide_w, wide_h, replace(cfg, code_rounds=2, outside_weight=b)) for b in (1.0, 0.4))
    assert torch.equal(one.q, other.q)


def test_the_kernels_weighted_descent_is_the_references() -> None:
    w, h = random_problem(2, 96, 48, seed=9, device=DEVICE)
    cfg = SolverConfig(scheme=QuantScheme(bits=3, group_size=16))
    start = gptq_quantize(w, h, cfg)
    runs = [DescentRun(widths=(32, 8), use_triton=use, block_r=32) for use in (True, False)]
    (tri, tri_w), (ref, ref_w) = [
        refine_codes(w, h, start.q, start.scale, None, None, cfg.scheme, 2, r, outside_weight=0.4) for r in runs
    ]
    assert (tri != ref).float().mean() <= 0.01  # float sums in another order may flip a near tie
    assert not torch.equal(ref, start.q)
    f = output_metric(w.cpu(), 0.4)
    torch.testing.assert_close(weighted_error(w.cpu(), tri_w.cpu(), h.cpu(), f).sum(),
                               weighted_error(w.cpu(), ref_w.cpu(), h.cpu(), f).sum(), rtol=1e-3, atol=0)  # fmt: skip


def test_the_outside_weight_is_written_only_when_set_and_reaches_the_run(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """At 1 (the default before it existed, and again since the output Fisher replaced it) no trace in the recipe
    file, so older recipes keep their digest; 0.4 is written; `streamq run --outside-weight 0.3` writes it, names it
    in the recipe line, and finishes; 0 is refused in one line before OUT exists."""
    plain = Recipe(solver=replace(default_solver(), outside_weight=1.0))
    assert plain == Recipe() and "outside_weight" not in plain.to_dict()["solver"]
    weighed = Recipe(solver=replace(default_solver(), outside_weight=0.4))
    assert weighed.to_dict()["solver"]["outside_weight"] == 0.4
    # Without code descent it weighs nothing: the recipe drops it (one form, one digest).
    idle = Recipe(solver=replace(default_solver(), code_rounds=0, outside_weight=0.4))
    assert idle.solver.outside_weight == 1.0 and "outside_weight" not in idle.to_dict()["solver"]
    on = Recipe(solver=replace(default_solver(), outside_weight=0.3))
    assert Recipe.from_dict(json.loads(json.dumps(on.to_dict()))) == on and on.digest() != Recipe().digest()
    assert Recipe.from_dict(json.loads(json.dumps(weighed.to_dict()))) == weighed
    assert weighed.digest() != Recipe().digest()
    args = ["--num-samples", "4", "--seq-len", "32", "--dtype", "float32", "--device", "cpu", "--display", "plain"]
    args += ["--fisher-tokens", "0"]  # the weight applies without the output Fisher (whose row chunks are too short)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "streamq", "run", str(tiny_checkpoint), str(out), *args, "--outside-weight", "0.3"]
    done = subprocess.run(command, env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((out / RECIPE_NAME).read_text())["solver"]["outside_weight"] == 0.3
    assert "errors across W's span ×0.3" in done.stdout + done.stderr
    bad = tmp_path / "bad"
    command = [sys.executable, "-m", "streamq", "run", str(tiny_checkpoint), str(bad), *args, "--outside-weight", "0"]
    done = subprocess.run(command, env=ENV, capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.strip() == "error: --outside-weight must be in (0, 1], not 0"
    assert not bad.exists()


@pytest.mark.parametrize("refine", ["down", "all"])
def test_the_outside_weight_reaches_the_down_projections_only(refine: str) -> None:
    """Stacked gate/up rows (which may outnumber their columns in a small model) and attention are solved with
    GPTQ's own objective; the down projections with the weight, under either refine."""
    from streamq.groups import LinearGroup, Role
    from streamq.solve import Solver
    from streamq.solvers.gptq import SolveOptions

    config = replace(default_solver(), outside_weight=0.4)
    solver = Solver({}, config, SolveOptions(), batch=8, on_fallback=lambda *_: None, refine=refine)
    down = LinearGroup("mlp.experts.0.down_proj", ("mlp.experts.0.down_proj",), Role.DOWN, expert=0)
    members = ("mlp.experts.0.gate_proj", "mlp.experts.0.up_proj")
    gate_up = LinearGroup("mlp.experts.0.gate_up", members, Role.MLP_INPUT, expert=0)
    o_proj = LinearGroup("self_attn.o_proj", ("self_attn.o_proj",), Role.O_PROJ)
    assert solver.config_for(down).outside_weight == 0.4
    assert solver.config_for(gate_up).outside_weight == 1.0 and solver.config_for(o_proj).outside_weight == 1.0
    assert (solver.config_for(gate_up).code_rounds > 0) == (refine == "all")
