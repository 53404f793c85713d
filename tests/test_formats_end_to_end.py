"""`python -m streamq run` with each weight format on the tiny synthetic model: the command a user types, then
compressed-tensors' own decompressor and transformers on what it wrote."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import streamq_env

from streamq.io.safetensors_stream import CheckpointReader

# The default recipe, its output Fisher in 2 row chunks instead of 8: the same path, less CPU time.
RUN = ["--num-samples", "4", "--seq-len", "32", "--device", "cpu", "--dtype", "float32", "--display", "none"]
RUN += ["--row-chunks", "2"]


def streamq_run(model: Path, out: Path, *options: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "streamq", "run", str(model), str(out), *RUN, *options]
    return subprocess.run(cmd, capture_output=True, text=True, env=streamq_env(), timeout=1200)


def decompressed(out: Path) -> dict[str, torch.Tensor]:
    """Every quantized Linear of ``out`` decompressed by compressed-tensors' compressor for its config group."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig

    qcfg = QuantizationConfig.model_validate(json.loads((out / "config.json").read_text())["quantization_config"])
    group = qcfg.config_groups["group_0"]
    compressor = BaseCompressor.get_value_from_registry(group.format)
    reader = CheckpointReader(out)
    modules = sorted(n.removesuffix(".weight_packed") for n in reader.infos if n.endswith(".weight_packed"))
    assert modules
    weights = {}
    for module in modules:
        parts = {n.removeprefix(module + "."): reader.raw(n) for n in reader.names(module + ".weight_")}
        weights[module] = compressor.decompress(parts, group)["weight"]
    return weights


# Options, and whether transformers decompresses the format's fused experts correctly (5.24 drops NVFP4's
# weight_global_scale there; tests/test_export_compressed_tensors.py pins that).
FORMATS = {
    "w8a16": (("--bits", "8", "--group-size", "0"), True),
    "mxfp4": (("--format", "mxfp4"), True),
    "nvfp4": (("--format", "nvfp4"), False),
}


@pytest.mark.slow
@pytest.mark.parametrize(("options", "in_transformers"), FORMATS.values(), ids=FORMATS.keys())
def test_run_output_decompresses_and_loads_in_transformers(
    options: tuple[str, ...], in_transformers: bool, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    out = tmp_path / "out"
    done = streamq_run(tiny_checkpoint, out, *options)
    assert done.returncode == 0, done.stderr[-2000:]
    theirs = decompressed(out)
    reader = CheckpointReader(out)
    if reader.packed_bits is not None:  # streamq reads integer outputs back itself: the same weights
        for module, weight in theirs.items():
            assert torch.equal(weight, reader.weight(module + ".weight", dtype=weight.dtype)), module
    if not in_transformers:
        return

    model = AutoModelForCausalLM.from_pretrained(
        out, quantization_config=CompressedTensorsConfig(dequantize=True), dtype=torch.float32
    )
    state = model.state_dict()
    # transformers merges experts into fused tensors; the dense Linears keep their names.
    loaded = {m: state[m + ".weight"] for m in theirs if m + ".weight" in state}
    experts = [m for m in theirs if ".experts." in m]
    assert len(experts) == len(theirs) - len(loaded)
    for module, weight in loaded.items():
        assert torch.equal(weight.to(weight.dtype), theirs[module].to(weight.dtype)), module
    layer, expert = experts[0].split(".layers.")[1].split(".")[0], experts[0].split(".experts.")[1].split(".")[0]
    down = state[f"model.layers.{layer}.mlp.experts.down_proj"][int(expert)]
    name = f"model.layers.{layer}.mlp.experts.{expert}.down_proj"
    assert torch.equal(down.float(), theirs[name].float())
    with torch.no_grad():
        logits = model.float()(input_ids=torch.arange(16).view(1, 16)).logits
    assert torch.isfinite(logits).all()


def test_format_option_refuses_a_conflicting_group_size(tiny_checkpoint: Path, tmp_path: Path) -> None:
    done = streamq_run(tiny_checkpoint, tmp_path / "out", "--format", "nvfp4", "--group-size", "128")
    assert done.returncode == 2
    assert done.stderr.strip().startswith("error: invalid option: nvfp4 is 4-bit, symmetric, in groups of 16")
    assert "Traceback" not in done.stderr and not (tmp_path / "out" / "config.json").exists()
