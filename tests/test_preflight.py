"""Bad input is refused before OUT is touched, and NaN/Inf stop the run: driven through `streamq run` in-process.

Each case builds a tiny checkpoint with one defect and asserts the one-line message (file, tensor, fix), the exit
code and what OUT holds afterwards: nothing at all for what the preflight can see from headers and data, no
config.json and no index for what only shows while blocks run.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
from export_helpers import save_tensors

from streamq.cli import main
from streamq.config import ModelConfig
from streamq.data_config import DataConfig
from streamq.errors import StreamqError
from streamq.io.safetensors_stream import INDEX_NAME, CheckpointReader, read_header
from streamq.preflight import check_before_output
from streamq.recipe import Recipe
from streamq.report import REPORT_NAME
from streamq.resume import MANIFEST_NAME
from streamq.solvers.scheme import QuantScheme, SolverConfig
from streamq.synth import PRESETS, SynthOptions, fit_routing, write_synthetic_checkpoint
from streamq.tui import EVENTS_FILENAME

RUN_ARGS = ("--num-samples", "6", "--seq-len", "32", "--dtype", "float32", "--device", "cpu", "--display", "none")
RUN_ARGS += ("--token-budget", "64")
EXPERT = "model.layers.2.mlp.experts.5.up_proj.weight"  # layer 2 is the tiny preset's first MoE layer


def streamq(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """``streamq ARGS`` in this process: (exit code, stderr)."""
    monkeypatch.setattr(sys, "argv", ["streamq", *args])
    with pytest.raises(SystemExit) as exit_:
        main()
    return exit_.value.code or 0, capsys.readouterr().err


def run(monkeypatch, capsys, model: Path, out: Path, *extra: str) -> tuple[int, str]:
    return streamq(monkeypatch, capsys, "run", str(model), str(out), *RUN_ARGS, *extra)


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


@pytest.fixture
def model(tiny_checkpoint: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "model"
    shutil.copytree(tiny_checkpoint, copy)
    return copy


def edit(model: Path, name: str, change) -> Path:
    """Rewrite the shard holding ``name`` with ``change(tensors)`` applied; returns the shard."""
    shard = model / json.loads((model / INDEX_NAME).read_text())["weight_map"][name]
    reader = CheckpointReader(model)
    tensors = {n: reader.raw(n) for n in read_header(shard)}
    reader.close()
    change(tensors)
    save_tensors(shard, tensors, {"format": "pt"})
    return shard


def untouched(out: Path) -> bool:
    return not out.exists()


def unfinished(out: Path) -> bool:
    return not (out / "config.json").exists() and not (out / INDEX_NAME).exists()


# -- refused before OUT exists ------------------------------------------------------------------------------------


def test_a_wrong_shape_fp8_scale_is_named_before_out_exists(model: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    name = "model.layers.1.self_attn.o_proj.weight_scale_inv"

    def widen(t: dict[str, torch.Tensor]) -> None:
        t[name] = torch.ones(t[name].shape[0], t[name].shape[1] + 1)

    shard = edit(model, name, widen)
    code, err = run(monkeypatch, capsys, model, tmp_path / "out")
    assert code == 2 and untouched(tmp_path / "out")
    assert one_error_line(err) == (
        f"error: {shard}: tensor {name} is torch.float32 [2, 2], the [256, 128] FP8 weight needs float [2, 1] "
        "(ceil(out/128) x ceil(in/128), weight_block_size in config.json); download this shard again or fix "
        "weight_block_size"
    )


def test_a_missing_tensor_is_named_before_out_exists(model: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    edit(model, EXPERT, lambda t: (t.pop(EXPERT), t.pop(EXPERT + "_scale_inv")))
    index = json.loads((model / INDEX_NAME).read_text())
    del index["weight_map"][EXPERT], index["weight_map"][EXPERT + "_scale_inv"]
    (model / INDEX_NAME).write_text(json.dumps(index))
    code, err = run(monkeypatch, capsys, model, tmp_path / "out")
    assert code == 2 and untouched(tmp_path / "out")
    assert one_error_line(err) == (
        f"error: {model / INDEX_NAME}: tensor {EXPERT} is missing, and config.json needs it; download the complete "
        "checkpoint (index and every shard) or fix config.json"
    )


def test_a_weight_of_the_wrong_shape_is_named(model: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    name = "model.layers.3.mlp.experts.0.down_proj.weight"
    shard = edit(model, name, lambda t: t.update({name: t[name][:, :-1].contiguous()}))
    code, err = run(monkeypatch, capsys, model, tmp_path / "out")
    assert code == 2 and untouched(tmp_path / "out")
    assert one_error_line(err) == (
        f"error: {shard}: tensor {name} has shape [256, 255], config.json needs [256, 256]; the weights and "
        "config.json disagree: download both again"
    )


def test_a_group_size_that_does_not_divide_the_experts_is_refused(
    model: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    code, err = run(monkeypatch, capsys, model, tmp_path / "out", "--group-size", "100")
    assert code == 2 and untouched(tmp_path / "out")
    line = one_error_line(err)
    assert line.startswith("error: ") and "model-0000" in line
    assert line.endswith(
        "tensor model.layers.2.mlp.experts.0.gate_proj.weight has in_features 256, not a multiple of --group-size "
        "100; use --group-size 0 (per channel), 32, 64, 128, 256 (they fit every Linear in scope)"
    )


def test_scope_all_names_a_small_attention_linear_and_the_way_out(tmp_path: Path, monkeypatch, capsys) -> None:
    small = write_synthetic_checkpoint(tmp_path / "m", SynthOptions(overrides={"kv_lora_rank": 64}, mtp=False))
    code, err = run(monkeypatch, capsys, small, tmp_path / "out", "--scope", "all", "--method", "rtn")
    assert code == 2 and untouched(tmp_path / "out")
    assert one_error_line(err).endswith(
        "tensor model.layers.0.self_attn.kv_b_proj.weight has in_features 64, not a multiple of --group-size 128; "
        "use --group-size 0 (per channel), 32, 64 (they fit every Linear in scope) or --scope experts"
    )
    code, err = run(
        monkeypatch, capsys, small, tmp_path / "out", "--scope", "all", "--method", "rtn", "--group-size", "64"
    )
    assert code == 0, err
    assert json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]["config_groups"]


def test_a_dataset_too_short_is_refused_before_out_exists(model: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    text = tmp_path / "short.txt"
    text.write_text("Too short.\n")
    code, err = run(monkeypatch, capsys, model, tmp_path / "out", "--dataset", str(text))
    assert code == 2 and untouched(tmp_path / "out")
    assert one_error_line(err).startswith(f"error: {text} (calib split): found ")
    assert one_error_line(err).endswith("tokens but one sample needs 32; pass more text or a smaller sequence length")


@pytest.mark.parametrize("where", ["inside", "same", "around"])
def test_out_and_model_must_not_overlap(model: Path, tmp_path: Path, monkeypatch, capsys, where: str) -> None:
    if where == "around":
        model = shutil.move(model, tmp_path / "out" / "model")
    out = {"inside": model / "q", "same": model, "around": tmp_path / "out"}[where]
    before = sorted(p.name for p in out.rglob("*")) if out.exists() else None
    code, err = run(monkeypatch, capsys, Path(model), out)
    assert code == 2
    assert (sorted(p.name for p in out.rglob("*")) if out.exists() else None) == before
    expected = {
        "inside": f"error: OUT {out} is inside MODEL {model}; choose an OUT directory outside the model",
        "same": f"error: OUT {out} is MODEL itself; choose an OUT directory outside {model}",
        "around": f"error: MODEL {model} is inside OUT {out}; choose an OUT directory that does not hold it",
    }[where]
    assert one_error_line(err) == expected


def test_the_fused_expert_layout_is_checked_too(model: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """transformers 5's fused gate_up_proj [E, 2I, H] / down_proj [E, H, I]: a wrong one is named as stored."""
    fused = tmp_path / "fused"
    fuse_experts(model, fused)
    code, err = run(monkeypatch, capsys, fused, tmp_path / "ok", "--method", "rtn")
    assert code == 0, err
    name = "model.layers.3.mlp.experts.down_proj"
    edit(fused, name, lambda t: t.update({name: t[name][:-1].contiguous()}))
    code, err = run(monkeypatch, capsys, fused, tmp_path / "out")
    assert code == 2 and untouched(tmp_path / "out")
    assert one_error_line(err) == (
        f"error: {fused / 'model.safetensors'}: tensor {name} has shape [15, 256, 256], config.json needs "
        "[16, 256, 256]; the weights and config.json disagree: download both again"
    )


def fuse_experts(model: Path, out: Path) -> None:
    """``model`` in one shard with each MoE layer's experts fused (bf16), as transformers 5 saves them."""
    reader = CheckpointReader(model)
    cfg = reader.config
    tensors: dict[str, torch.Tensor] = {}
    for name in reader.names():
        parts = name.split(".")
        if "experts" not in parts or "shared_experts" in parts:
            tensors[name] = reader.raw(name)
    for layer in range(cfg.num_layers_with_mtp):
        if not cfg.is_moe_layer(layer):
            continue
        p = f"model.layers.{layer}.mlp.experts."
        experts = range(cfg.n_routed_experts)
        gate_up = [torch.cat([reader.weight(f"{p}{e}.{k}_proj.weight") for k in ("gate", "up")]) for e in experts]
        tensors[p + "gate_up_proj"] = torch.stack(gate_up)
        tensors[p + "down_proj"] = torch.stack([reader.weight(f"{p}{e}.down_proj.weight") for e in experts])
    reader.close()
    out.mkdir()
    save_tensors(out / "model.safetensors", dict(sorted(tensors.items())), {"format": "pt"})
    shutil.copyfile(model / "config.json", out / "config.json")
    index = {"metadata": {}, "weight_map": dict.fromkeys(sorted(tensors), "model.safetensors")}
    (out / INDEX_NAME).write_text(json.dumps(index))


# -- NaN and Inf -----------------------------------------------------------------------------------------------------


def test_a_nan_in_an_expert_fp8_weight_stops_the_run(model: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    def poison(t: dict[str, torch.Tensor]) -> None:
        t[EXPERT] = t[EXPERT].clone()
        t[EXPERT].view(torch.uint8)[3, 7] = 0x7F  # NaN in float8_e4m3fn

    shard = edit(model, EXPERT, poison)
    out = tmp_path / "out"
    code, err = run(monkeypatch, capsys, model, out)
    assert code == 2 and unfinished(out)
    assert one_error_line(err) == (
        f"error: {shard}: tensor {EXPERT} has 1 NaN/Inf value(s) (after FP8 dequantization); the checkpoint is "
        "corrupt: download this shard again, or rerun with --allow-nonfinite to go on with the solver's fallbacks"
    )
    # The flag restores the fallback, and the block's error is NaN in the report and in the summary.
    code, err = run(monkeypatch, capsys, model, tmp_path / "allowed", "--allow-nonfinite")
    assert code == 0, err
    blocks = json.loads((tmp_path / "allowed" / REPORT_NAME).read_text())["blocks"]
    assert math.isnan(blocks[2]["rel_error"]) and blocks[2]["fallbacks"].get("nonfinite_weight") == 1
    events = [json.loads(line) for line in (tmp_path / "allowed" / EVENTS_FILENAME).read_text().splitlines()]
    assert events[-1]["event"] == "run_end" and events[-1]["rel_error_mean"] == "nan"
    assert any(e["event"] == "warning" and EXPERT in e["message"] for e in events)


def test_an_inf_in_a_layernorm_stops_the_run(model: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    name = "model.layers.1.post_attention_layernorm.weight"

    def poison(t: dict[str, torch.Tensor]) -> None:
        t[name] = t[name].clone()
        t[name][5] = float("inf")

    shard = edit(model, name, poison)
    out = tmp_path / "out"
    code, err = run(monkeypatch, capsys, model, out)
    assert code == 2 and unfinished(out)
    assert one_error_line(err) == (
        f"error: {shard}: tensor {name} has 1 NaN/Inf value(s); the checkpoint is corrupt: download this shard "
        "again, or rerun with --allow-nonfinite to go on with the solver's fallbacks"
    )


def test_a_nan_outside_the_layers_stops_the_run_before_the_first_shard(
    model: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    name = "model.norm.weight"
    shard = edit(model, name, lambda t: t.update({name: torch.full_like(t[name], float("nan"))}))
    out = tmp_path / "out"
    code, err = run(monkeypatch, capsys, model, out)
    assert code == 2 and unfinished(out) and not list(out.glob("model-*.safetensors"))
    assert one_error_line(err).startswith(f"error: {shard}: tensor {name} has 256 NaN/Inf value(s)")


@pytest.mark.parametrize(
    ("layer", "message"),
    [
        (0, "error: block 0, stage propagate: the block's output has "),
        (2, "error: block 2, stage solve: the Hessian of mlp.experts.0.gate_up has "),
    ],
)
def test_overflowing_activations_stop_the_run_with_block_and_stage(
    model: Path, tmp_path: Path, monkeypatch, capsys, layer: int, message: str
) -> None:
    """Finite weights whose block overflows: a huge post-attention norm makes the MLP input ~1e38."""
    name = f"model.layers.{layer}.post_attention_layernorm.weight"
    edit(model, name, lambda t: t.update({name: torch.full_like(t[name], 1e38)}))
    out = tmp_path / "out"
    code, err = run(monkeypatch, capsys, model, out)
    assert code == 2 and unfinished(out)
    assert json.loads((out / MANIFEST_NAME).read_text())["next_layer"] == layer
    line = one_error_line(err)
    assert line.startswith(message) and line.endswith(
        "or rerun with --allow-nonfinite to go on with the solver's fallbacks"
    )


# -- restarting an OUT with no finished block ---------------------------------------------------------------------


class Stop(Exception):
    pass


def stop_at(monkeypatch: pytest.MonkeyPatch, point: str) -> None:
    import streamq.forward
    import streamq.pipeline
    import streamq.solve

    def crash(name: str) -> None:
        if name == point:
            raise Stop(name)

    for module in (streamq.pipeline, streamq.forward, streamq.solve):  # every module that names fault points
        monkeypatch.setattr(module, "crash_point", crash)


def test_an_out_with_no_finished_block_restarts_with_a_corrected_command(
    model: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    out = tmp_path / "out"
    stop_at(monkeypatch, "propagate")  # the head shard and first activations are written, no block is
    with pytest.raises(Stop):
        run(monkeypatch, capsys, model, out, "--method", "rtn", "--seq-len", "16")
    assert json.loads((out / MANIFEST_NAME).read_text())["shards"].keys() == {"head"}
    monkeypatch.undo()
    code, err = run(monkeypatch, capsys, model, out, "--method", "rtn")
    assert code == 0, err
    assert Recipe.load(out / "streamq_recipe.json").data.seq_len == 32
    events = [json.loads(line) for line in (out / EVENTS_FILENAME).read_text().splitlines()]
    assert any(e["event"] == "warning" and e["message"].endswith("no finished block; restarting") for e in events)
    clean = tmp_path / "clean"
    assert run(monkeypatch, capsys, model, clean, "--method", "rtn")[0] == 0
    assert files(out) == files(clean)


def test_an_out_with_a_finished_block_still_refuses_another_recipe(
    model: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    out = tmp_path / "out"
    stop_at(monkeypatch, "block-done")
    with pytest.raises(Stop):
        run(monkeypatch, capsys, model, out, "--method", "rtn")
    monkeypatch.undo()
    code, err = run(monkeypatch, capsys, model, out, "--method", "rtn", "--seq-len", "16")
    assert code == 2 and "holds a run with a different recipe" in one_error_line(err)


def files(out: Path) -> dict[str, bytes]:
    skip = {EVENTS_FILENAME, REPORT_NAME}
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file() and p.name not in skip}


# -- synth writes what run accepts ------------------------------------------------------------------------------------


def test_synth_with_few_experts_writes_a_config_run_accepts(tmp_path: Path, monkeypatch, capsys) -> None:
    m = tmp_path / "m"
    code, err = streamq(monkeypatch, capsys, "synth", str(m), "--experts", "6", "--layers", "3", "--no-mtp")
    assert code == 0, err
    cfg = ModelConfig.load(m)  # the tiny preset's 4 groups cannot hold 6 experts: 3 groups of 2, top-2 groups
    assert (cfg.n_routed_experts, cfg.n_group, cfg.topk_group, cfg.num_experts_per_tok) == (6, 3, 2, 4)
    code, err = run(monkeypatch, capsys, m, tmp_path / "out", "--method", "rtn")
    assert code == 0, err
    # DeepSeek-V3's 8 groups with 4 experts: 4 groups of one, and the 4 kept groups hold the top-8's 4 experts.
    v3 = fit_routing(dict(PRESETS["v3"]), 4)
    assert v3 == {"n_routed_experts": 4, "num_experts_per_tok": 4, "n_group": 4, "topk_group": 4}


def test_preflight_reads_headers_only(model: Path, monkeypatch) -> None:
    """The shape checks never read tensor data (instant at DeepSeek-V3's size)."""
    import streamq.io.safetensors_stream as stream
    from streamq.preflight import check_scheme, check_tensors

    def no_data(*_args):
        raise AssertionError("tensor data was read")

    monkeypatch.setattr(stream._MappedFile, "read", no_data)
    with CheckpointReader(model) as reader:
        check_tensors(reader)
        check_scheme(reader, Recipe(scope="all"))
        with pytest.raises(StreamqError, match="not a multiple of --group-size 100"):
            check_scheme(reader, Recipe(solver=SolverConfig(scheme=QuantScheme(group_size=100))))


def test_what_vllm_cannot_reproduce_is_a_warning_before_the_run(tmp_path: Path) -> None:
    opts = SynthOptions(preset="tiny", overrides={"rope_interleave": False})
    model = write_synthetic_checkpoint(tmp_path / "model", opts)
    recipe = Recipe(data=DataConfig(source="builtin", num_samples=2, seq_len=8))
    checked = check_before_output(model, tmp_path / "out", recipe)
    assert any("config.json: rope_interleave false" in w for w in checked.warnings), checked.warnings
    assert not (tmp_path / "out").exists()
    plain = check_before_output(
        write_synthetic_checkpoint(tmp_path / "plain", SynthOptions(preset="tiny")), tmp_path / "o2", recipe
    )
    assert not any("rope_interleave" in w for w in plain.warnings)
