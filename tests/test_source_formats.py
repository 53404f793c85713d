"""Source checkpoints in each weight format a release ships: FP8 blocks (DeepSeek-V3), bf16, and compressed-tensors
INT4 experts (Kimi-K2-Thinking). Read, checked before OUT is touched, and quantized end to end by the user's
command; the INT4 experts come out exactly as compressed-tensors (through transformers) decompresses them."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from test_formats_end_to_end import decompressed, streamq_run

from streamq.cli import main
from streamq.io.safetensors_stream import INDEX_NAME, CheckpointReader
from streamq.synth import SynthOptions, write_synthetic_checkpoint
from streamq.synth_formats import INT4_GROUP, INT4_IGNORE

EXPERT = "model.layers.2.mlp.experts.1.down_proj"  # the tiny preset's first MoE layer
ATTENTION = "model.layers.2.self_attn.q_b_proj"


def synth(tmp_path: Path, fmt: str, name: str = "model") -> Path:
    opts = SynthOptions(preset="tiny", num_layers=3, experts=8, shards=2, source_format=fmt)
    return write_synthetic_checkpoint(tmp_path / name, opts)


def streamq(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """``streamq ARGS`` in this process: (exit code, stderr)."""
    monkeypatch.setattr(sys, "argv", ["streamq", *args])
    with pytest.raises(SystemExit) as exit_:
        main()
    return exit_.value.code or 0, capsys.readouterr().err


def run_args(model: Path, out: Path, *extra: str) -> tuple[str, ...]:
    # The output Fisher in 2 row chunks instead of 8: the same path, less CPU time.
    fisher = ("--row-chunks", "2")
    return ("run", str(model), str(out), "--num-samples", "4", "--seq-len", "32", "--device", "cpu", *fisher, *extra)


def error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def unpack_by_hand(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The INT4 weight from first principles: 8 codes per int32 word, lowest nibble first, offset by 8, times the
    scale of each group of 32 columns (an independent reference, not compressed-tensors' code)."""
    words = packed.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(0, 32, 4, dtype=torch.int64)
    codes = ((words.unsqueeze(-1) >> shifts) & 0xF).flatten(-2) - 8
    return codes.to(torch.bfloat16) * scale.repeat_interleave(INT4_GROUP, dim=-1)


# -- the synthetic sources --------------------------------------------------------------------------------------------


def test_a_bf16_source_has_no_quantization_config_and_is_read_as_stored(tmp_path: Path) -> None:
    model = synth(tmp_path, "bf16")
    assert "quantization_config" not in json.loads((model / "config.json").read_text())
    reader = CheckpointReader(model)
    linears = [n for n in reader.infos if n.endswith("_proj.weight")]
    assert linears and {reader.infos[n].dtype for n in linears} == {torch.bfloat16}
    assert not any(n.endswith(("_scale_inv", "_packed")) for n in reader.infos)
    assert reader.config.fp8_block is None and reader.compressed is None
    assert torch.equal(reader.weight(EXPERT + ".weight"), reader.raw(EXPERT + ".weight"))


def test_an_int4_source_is_laid_out_as_kimi_k2_thinking_ships_it(tmp_path: Path) -> None:
    model = synth(tmp_path, "int4")
    qcfg = json.loads((model / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == "compressed-tensors" and qcfg["format"] == "pack-quantized"
    weights = qcfg["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["group_size"], weights["symmetric"]) == (4, 32, True)
    assert qcfg["config_groups"]["group_0"]["targets"] == ["Linear"] and qcfg["ignore"][:4] == INT4_IGNORE
    reader = CheckpointReader(model)
    # Routed experts packed; attention, shared experts, dense MLPs and the router in bf16.
    assert reader.infos[EXPERT + ".weight_packed"].shape == (256, 256 * 4 // 32)
    assert reader.infos[EXPERT + ".weight_scale"].shape == (256, 256 // 32)
    assert EXPERT + ".weight" not in reader.infos and EXPERT + ".weight" in reader
    for dense in (ATTENTION, "model.layers.2.mlp.shared_experts.up_proj", "model.layers.0.mlp.gate_proj"):
        assert reader.infos[dense + ".weight"].dtype == torch.bfloat16
    assert reader.shape(EXPERT + ".weight") == (256, 256)


def test_int4_experts_dequantize_to_codes_times_group_scales(tmp_path: Path) -> None:
    reader = CheckpointReader(synth(tmp_path, "int4"))
    for module in (EXPERT, "model.layers.2.mlp.experts.3.gate_proj"):
        expected = unpack_by_hand(reader.raw(module + ".weight_packed"), reader.raw(module + ".weight_scale"))
        weight = reader.weight(module + ".weight", dtype=torch.bfloat16)
        assert torch.equal(weight, expected), module
        assert weight.abs().sum() > 0
    block = reader.load_prefix("model.layers.2.", dtype=torch.float32)
    assert torch.equal(block["mlp.experts.1.down_proj.weight"], reader.weight(EXPERT + ".weight", dtype=torch.float32))
    assert not any("weight_packed" in n or "weight_scale" in n for n in block)


@pytest.mark.slow
def test_int4_source_dequantizes_exactly_as_compressed_tensors_does_in_transformers(tmp_path: Path) -> None:
    """transformers loads the source with compressed-tensors' model decompressor: every expert it builds is the
    weight streamq reads, bit for bit."""
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    model = synth(tmp_path, "int4")
    hf = AutoModelForCausalLM.from_pretrained(model, quantization_config=CompressedTensorsConfig(dequantize=True))
    state = hf.state_dict()
    reader = CheckpointReader(model)
    gate_up, down = state["model.layers.2.mlp.experts.gate_up_proj"], state["model.layers.2.mlp.experts.down_proj"]
    for e in range(8):
        ours = [reader.weight(f"model.layers.2.mlp.experts.{e}.{p}_proj.weight") for p in ("gate", "up", "down")]
        assert torch.equal(gate_up[e], torch.cat(ours[:2]).to(gate_up.dtype)), e
        assert torch.equal(down[e], ours[2].to(down.dtype)), e
    assert torch.equal(state[ATTENTION + ".weight"], reader.weight(ATTENTION + ".weight").to(gate_up.dtype))


# -- checked before OUT exists ----------------------------------------------------------------------------------------


def test_unquantized_fp8_is_refused_on_a_source_without_fp8_blocks(tmp_path: Path, monkeypatch, capsys) -> None:
    for fmt in ("bf16", "int4"):
        model, out = synth(tmp_path, fmt, fmt), tmp_path / f"out-{fmt}"
        code, err = streamq(monkeypatch, capsys, *run_args(model, out, "--unquantized", "fp8"))
        assert code == 2 and not out.exists()
        assert "--unquantized fp8 keeps the FP8 blocks a checkpoint ships, but this one has none" in error_line(err)
        assert "use --unquantized bf16" in err


def _edit_config(model: Path, edit) -> None:
    path = model / "config.json"
    cfg = json.loads(path.read_text())
    edit(cfg["quantization_config"])
    path.write_text(json.dumps(cfg))


def test_int4_scales_that_disagree_with_the_config_group_are_named(tmp_path: Path, monkeypatch, capsys) -> None:
    model, out = synth(tmp_path, "int4"), tmp_path / "out"
    _edit_config(model, lambda q: q["config_groups"]["group_0"]["weights"].update(group_size=64))
    code, err = streamq(monkeypatch, capsys, *run_args(model, out))
    line = error_line(err)
    assert code == 2 and not out.exists()
    assert "tensor model.layers.2.mlp.experts.0.gate_proj.weight_scale is bfloat16 [256, 8]" in line
    assert "INT4 g64 sym (pack-quantized) needs bfloat16/float16/float32 [256, 4]" in line


def test_a_missing_int4_component_is_named(tmp_path: Path, monkeypatch, capsys) -> None:
    model, out = synth(tmp_path, "int4"), tmp_path / "out"
    index = json.loads((model / INDEX_NAME).read_text())
    del index["weight_map"][EXPERT + ".weight_shape"]
    (model / INDEX_NAME).write_text(json.dumps(index))
    code, err = streamq(monkeypatch, capsys, *run_args(model, out))
    assert code == 2 and not out.exists()
    assert f"packed Linear {EXPERT} has no {EXPERT}.weight_shape" in error_line(err)


def test_packed_experts_the_config_does_not_quantize_are_refused(tmp_path: Path, monkeypatch, capsys) -> None:
    model, out = synth(tmp_path, "int4"), tmp_path / "out"
    _edit_config(model, lambda q: q["ignore"].append(r"re:.*mlp\.experts.*"))
    code, err = streamq(monkeypatch, capsys, *run_args(model, out))
    assert code == 2 and not out.exists()
    assert "has packed weights but no config group of quantization_config matches it" in error_line(err)


def test_an_unknown_source_quantization_is_refused(tmp_path: Path, monkeypatch, capsys) -> None:
    model, out = synth(tmp_path, "bf16"), tmp_path / "out"
    cfg = json.loads((model / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (model / "config.json").write_text(json.dumps(cfg))
    code, err = streamq(monkeypatch, capsys, *run_args(model, out))
    assert code == 2 and not out.exists()
    assert "quantization_config.quant_method 'gptq'" in error_line(err)


# -- end to end: the user's command, the output loaded by transformers ------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["bf16", "int4"])
def test_run_quantizes_each_source_format_and_transformers_loads_it(fmt: str, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    model, out = synth(tmp_path, fmt), tmp_path / "out"
    done = streamq_run(model, out)
    assert done.returncode == 0, done.stderr[-2000:]
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["config_groups"]["group_0"]["weights"]["group_size"] == 128  # requantized: W4 g128 from the source
    theirs = decompressed(out)
    assert len([m for m in theirs if ".experts." in m]) == 8 * 3
    reader = CheckpointReader(out)
    assert reader.infos[EXPERT + ".weight_scale"].shape == (256, 2)
    hf = AutoModelForCausalLM.from_pretrained(out, quantization_config=CompressedTensorsConfig(dequantize=True))
    state = hf.state_dict()
    assert torch.equal(state["model.layers.2.mlp.experts.down_proj"][1].float(), theirs[EXPERT].float())
    source = CheckpointReader(model)
    assert torch.equal(
        state[ATTENTION + ".weight"], source.weight(ATTENTION + ".weight").to(state[ATTENTION + ".weight"].dtype)
    )
    with torch.no_grad():
        logits = hf.float()(input_ids=torch.arange(16).view(1, 16)).logits
    assert torch.isfinite(logits).all()
    # The MTP layer is copied unquantized: bf16, its packed source experts dequantized.
    mtp = "model.layers.3.mlp.experts.0.up_proj"
    assert reader.infos[mtp + ".weight"].dtype == torch.bfloat16 and mtp + ".weight_packed" not in reader.infos
    assert torch.equal(reader.raw(mtp + ".weight"), source.weight(mtp + ".weight"))
    shutil.rmtree(out)


# -- INT4 experts kept as shipped -------------------------------------------------------------------------------------


def test_keeping_source_experts_needs_packed_experts_and_another_scope(tmp_path: Path, monkeypatch, capsys) -> None:
    model, out = synth(tmp_path, "bf16"), tmp_path / "out"
    code, err = streamq(monkeypatch, capsys, *run_args(model, out, "--source-experts", "keep", "--scope", "all"))
    assert code == 2 and not out.exists()
    line = error_line(err)
    assert "--source-experts keep copies experts a source ships packed (compressed-tensors), but" in line
    assert "model.layers.2.mlp.experts.0.gate_proj.weight is bfloat16; use --source-experts requantize" in line
    int4 = synth(tmp_path, "int4", "int4")
    code, err = streamq(monkeypatch, capsys, *run_args(int4, out, "--source-experts", "keep"))
    assert code == 2 and not out.exists()
    assert "so this recipe would quantize nothing: use --scope all or --scheme FAMILY=SPEC" in error_line(err)
    code, err = streamq(
        monkeypatch, capsys, *run_args(int4, out, "--source-experts", "keep", "--scheme", "experts=w4a16")
    )
    assert code == 2 and not out.exists() and "contradicts --scheme experts=..." in error_line(err)
    code, err = streamq(
        monkeypatch, capsys, *run_args(int4, out, "--source-experts", "keep", "--scope", "all", "--method", "awq")
    )
    assert code == 2 and "experts kept as shipped cannot absorb" in error_line(err)


@pytest.mark.slow
def test_kept_int4_experts_are_copied_byte_for_byte_and_declared_with_their_scheme(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    model, out = synth(tmp_path, "int4"), tmp_path / "out"
    done = streamq_run(model, out, "--source-experts", "keep", "--scope", "all")
    assert done.returncode == 0, done.stderr[-2000:]
    source, reader = CheckpointReader(model), CheckpointReader(out)
    kept = [n for n in source.infos if ".layers.2.mlp.experts." in n]
    assert len(kept) == 8 * 3 * 3
    for name in kept:
        assert reader.infos[name].dtype == source.infos[name].dtype, name
        assert torch.equal(reader.raw(name), source.raw(name)), name
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    source_weights = json.loads((model / "config.json").read_text())["quantization_config"]["config_groups"]
    assert qcfg["config_groups"]["group_0"]["weights"] == source_weights["group_0"]["weights"]
    assert qcfg["config_groups"]["group_1"]["weights"]["group_size"] == 128
    assert reader.infos[ATTENTION + ".weight_scale"].shape == (4 * 64, 384 // 128)  # attention quantized: W4 g128
    hf = AutoModelForCausalLM.from_pretrained(out, quantization_config=CompressedTensorsConfig(dequantize=True))
    state = hf.state_dict()
    assert torch.equal(state["model.layers.2.mlp.experts.down_proj"][1], source.weight(EXPERT + ".weight"))
    theirs = decompressed_all(out)
    assert torch.equal(state[ATTENTION + ".weight"].float(), theirs[ATTENTION].float())
    assert torch.equal(reader.weight(ATTENTION + ".weight", dtype=torch.float32), theirs[ATTENTION].float())


def decompressed_all(out: Path) -> dict[str, torch.Tensor]:
    """Every packed Linear of ``out``, each decompressed by compressed-tensors for the config group it matches."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.utils.match import is_match

    qcfg = QuantizationConfig.model_validate(json.loads((out / "config.json").read_text())["quantization_config"])
    reader, linear = CheckpointReader(out), torch.nn.Linear(1, 1, device="meta")
    weights = {}
    for module in sorted(n.removesuffix(".weight_packed") for n in reader.infos if n.endswith(".weight_packed")):
        [group] = [g for g in qcfg.config_groups.values() if is_match(module, linear, g.targets, qcfg.ignore)]
        parts = {n.removeprefix(module + "."): reader.raw(n) for n in reader.names(module + ".weight_")}
        weights[module] = BaseCompressor.get_value_from_registry(group.format).decompress(parts, group)["weight"]
    return weights


def test_int4_experts_need_whole_groups_of_32(tmp_path: Path) -> None:
    opts = SynthOptions(preset="tiny", source_format="int4", overrides={"moe_intermediate_size": 200})
    with pytest.raises(ValueError, match="moe_intermediate_size 200 is not a multiple of 32"):
        write_synthetic_checkpoint(tmp_path / "model", opts)
    assert not (tmp_path / "model").exists()


def test_synth_command_writes_each_source_format(tmp_path: Path, monkeypatch, capsys) -> None:
    code, err = streamq(monkeypatch, capsys, "synth", str(tmp_path / "bad"), "--source-format", "int8")
    assert code == 2 and "--source-format int8: unknown; choose one of fp8, bf16, int4" in error_line(err)
    assert not (tmp_path / "bad").exists()
    args = ("--layers", "3", "--experts", "8", "--shards", "1", "--no-mtp")
    assert streamq(monkeypatch, capsys, "synth", str(tmp_path / "int4"), "--source-format", "int4", *args)[0] == 0
    reader = CheckpointReader(tmp_path / "int4")
    assert reader.compressed is not None and len(reader.packed) == 8 * 3
    assert reader.compressed.scheme_of(EXPERT).describe() == "INT4 g32 sym (pack-quantized)"


def test_keeping_experts_of_a_model_without_experts_is_refused(tmp_path: Path, monkeypatch, capsys) -> None:
    opts = SynthOptions(preset="tiny", num_layers=2, shards=1, mtp=False, source_format="int4")  # 2 dense layers
    model, out = write_synthetic_checkpoint(tmp_path / "model", opts), tmp_path / "out"
    code, err = streamq(monkeypatch, capsys, *run_args(model, out, "--source-experts", "keep", "--scope", "all"))
    assert code == 2 and not out.exists()
    assert "--source-experts keep, but this model has no routed experts to keep" in error_line(err)
