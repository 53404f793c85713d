"""DeepSeek-V3.2 through `python -m streamq synth` / `run`: the indexer is carried unquantized, listed in the
quantization_config's ignore (or, kept in FP8, in the FP8 group), preflight knows its tensors, and transformers
(which has DeepseekV32ForCausalLM since 5.x) loads the output and computes what streamq computes.

The calibration sequences (32 tokens) are longer than the v32 preset's index_topk (16), so the run's forward
passes take the sparse path; the transformers comparison uses 12 tokens, where DSA is dense causal attention
(transformers' indexer scores in bf16/fp32 without the release's FP8 rounding, so beyond index_topk its key
selection may differ at near ties)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import streamq_env

from streamq.config import ModelConfig
from streamq.errors import StreamqError
from streamq.export.checkpoint import ignore_list, indexer_in_fp8, kept_fp8
from streamq.export.compressed_tensors import INDEXER_BF16, INDEXER_FP8, INDEXER_LINEARS
from streamq.io.safetensors_stream import CheckpointReader
from streamq.preflight import check_tensors
from streamq.recipe import Recipe
from streamq.synth import SynthOptions, synth_config, write_synthetic_checkpoint

INDEXER_LINEAR_NAMES = ("wq_b", "wk", "weights_proj")
# The default recipe, its output Fisher in 2 row chunks instead of 8: the same path, less CPU time.
RUN = ("--num-samples", "4", "--seq-len", "32", "--device", "cpu", "--dtype", "float32", "--display", "plain")
RUN += ("--row-chunks", "2")


def streamq(*args: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "streamq", *args], capture_output=True, text=True, env=streamq_env(), timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = tmp_path_factory.mktemp("v32") / "model"
    streamq("synth", str(model), "--preset", "v32", "--layers", "2", "--dense-layers", "1", "--shards", "2")
    return model


@pytest.fixture(scope="module")
def out_bf16(source: Path) -> Path:
    out = source.parent / "out-bf16"
    streamq("run", str(source), str(out), *RUN, "--scope", "all")
    return out


@pytest.fixture(scope="module")
def out_fp8(source: Path) -> Path:
    out = source.parent / "out-fp8"
    streamq("run", str(source), str(out), *RUN, "--unquantized", "fp8")
    return out


def matches(patterns: list[str], module: str) -> bool:
    """compressed-tensors' (and vLLM's) rule for a target or ignore entry: ``re:`` regexes by re.match."""
    return any(re.match(p.removeprefix("re:"), module) if p.startswith("re:") else p == module for p in patterns)


def indexer_modules(cfg: ModelConfig) -> list[str]:
    return [
        f"model.layers.{i}.self_attn.indexer.{n}" for i in range(cfg.num_hidden_layers) for n in INDEXER_LINEAR_NAMES
    ]


# -- what is decided about the indexer (fast) --------------------------------------------------------------------------


def test_the_indexer_is_ignored_or_kept_in_the_fp8_group_never_quantized() -> None:
    cfg = ModelConfig.from_dict(synth_config(SynthOptions(preset="v32", num_layers=2, dense_layers=1)))
    wk, weights_proj = (f"model.layers.1.self_attn.indexer.{n}" for n in ("wk", "weights_proj"))
    for scope in ("experts", "all"):
        plan = Recipe(scope=scope).plan()
        assert not indexer_in_fp8(cfg, plan) and not kept_fp8(plan)(wk)
        assert INDEXER_LINEARS in ignore_list(cfg, plan)
    fp8 = Recipe(unquantized="fp8").plan()
    assert indexer_in_fp8(cfg, fp8) and kept_fp8(fp8)(wk) and not kept_fp8(fp8)(weights_proj)
    assert INDEXER_BF16 in ignore_list(cfg, fp8) and INDEXER_LINEARS not in ignore_list(cfg, fp8)
    assert matches([INDEXER_FP8], wk) and not matches([INDEXER_FP8], weights_proj)
    # With --scope all an FP8 group for the indexer alone would be transformers' scheme for the int attention.
    assert not indexer_in_fp8(cfg, Recipe(scope="all", unquantized="fp8").plan())
    v3 = ModelConfig.from_dict(synth_config(SynthOptions(preset="tiny")))
    assert not any("indexer" in entry for entry in ignore_list(v3, Recipe(scope="all").plan()))
    assert matches([INDEXER_LINEARS], "model.layers.0.self_attn.indexer.weights_proj")
    assert not matches([INDEXER_LINEARS], "model.layers.0.self_attn.q_b_proj")


# -- preflight ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_v32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    opts = SynthOptions(preset="v32", num_layers=2, dense_layers=1, shards=1, mtp=False)
    return write_synthetic_checkpoint(tmp_path_factory.mktemp("small"), opts)


def with_config(model: Path, tmp_path: Path, change: dict, drop: tuple[str, ...] = ()) -> Path:
    """``model``'s shards under a changed config.json."""
    for file in model.iterdir():
        (tmp_path / file.name).symlink_to(file)
    (tmp_path / "config.json").unlink()
    cfg = {k: v for k, v in json.loads((model / "config.json").read_text()).items() if k not in drop} | change
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return tmp_path


def test_preflight_accepts_the_indexer_tensors(small_v32: Path) -> None:
    with CheckpointReader(small_v32) as reader:
        check_tensors(reader)
        assert reader.infos["model.layers.0.self_attn.indexer.wk.weight"].dtype == torch.float8_e4m3fn


def test_preflight_refuses_indexer_tensors_of_the_wrong_shape(small_v32: Path, tmp_path: Path) -> None:
    model = with_config(small_v32, tmp_path, {"index_n_heads": 4})
    with CheckpointReader(model) as reader, pytest.raises(StreamqError, match=r"self_attn\.indexer\.wq_b\.weight"):
        check_tensors(reader)


def test_preflight_refuses_a_v32_config_over_weights_without_an_indexer(tiny_checkpoint: Path, tmp_path: Path) -> None:
    v32 = {"architectures": ["DeepseekV32ForCausalLM"], "model_type": "deepseek_v32"}
    model = with_config(tiny_checkpoint, tmp_path, v32 | {"index_n_heads": 2, "index_head_dim": 64, "index_topk": 16})
    with CheckpointReader(model) as reader, pytest.raises(StreamqError, match=r"indexer\.wq_b\.weight is missing"):
        check_tensors(reader)


def test_preflight_refuses_indexer_tensors_a_v3_config_does_not_describe(small_v32: Path, tmp_path: Path) -> None:
    v3 = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3"}
    model = with_config(small_v32, tmp_path, v3, drop=("index_n_heads", "index_head_dim", "index_topk"))
    with CheckpointReader(model) as reader, pytest.raises(StreamqError, match=r"indexer.* is not part of the model"):
        check_tensors(reader)


# -- end to end --------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_run_writes_the_indexer_as_shipped_in_bf16_and_ignores_it(source: Path, out_bf16: Path) -> None:
    from compressed_tensors.quantization import QuantizationConfig

    src, out = CheckpointReader(source), CheckpointReader(out_bf16)
    written = json.loads((out_bf16 / "config.json").read_text())
    assert written["model_type"] == "deepseek_v32" and written["architectures"] == ["DeepseekV32ForCausalLM"]
    assert {k: written[k] for k in ("index_n_heads", "index_head_dim", "index_topk")} == {
        "index_n_heads": 2,
        "index_head_dim": 64,
        "index_topk": 16,
    }
    qcfg = written["quantization_config"]
    QuantizationConfig.model_validate(qcfg)
    targets = [t for group in qcfg["config_groups"].values() for t in group["targets"]]
    assert matches(targets, "model.layers.0.self_attn.q_b_proj")  # --scope all: the attention is quantized
    for module in indexer_modules(src.config):
        assert matches(qcfg["ignore"], module) and not matches(targets, module), module
        name = module + ".weight"
        assert out.infos[name].dtype == torch.bfloat16
        assert torch.equal(out.raw(name), src.weight(name, "cpu", torch.bfloat16)), name
        assert module + ".weight_scale" not in out
    for i in range(src.config.num_hidden_layers):
        for name in (f"model.layers.{i}.self_attn.indexer.k_norm.{p}" for p in ("weight", "bias")):
            assert torch.equal(out.raw(name), src.raw(name)), name
    report = json.loads((out_bf16 / "streamq_report.json").read_text())
    assert all(b["rel_error"] is not None and b["rel_error"] < 0.2 for b in report["blocks"] if b["kind"] == "moe")


@pytest.mark.slow
def test_run_keeps_the_indexers_fp8_blocks_in_the_fp8_group(source: Path, out_fp8: Path) -> None:
    src, out = CheckpointReader(source), CheckpointReader(out_fp8)
    qcfg = json.loads((out_fp8 / "config.json").read_text())["quantization_config"]
    fp8_group = next(g for g in qcfg["config_groups"].values() if g["format"] == "float-quantized")
    for module in indexer_modules(src.config):
        name = module + ".weight"
        if module.endswith("weights_proj"):
            assert matches(qcfg["ignore"], module) and torch.equal(out.raw(name), src.raw(name))
            continue
        assert matches(fp8_group["targets"], module) and not matches(qcfg["ignore"], module), module
        assert out.infos[name].dtype == torch.float8_e4m3fn and torch.equal(out.raw(name), src.raw(name))
        assert torch.equal(out.raw(module + ".weight_scale"), src.raw(name + "_scale_inv"))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["bf16", "fp8"])
def test_transformers_loads_the_v32_output_and_matches_streamq(kind: str, request: pytest.FixtureRequest) -> None:
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    from streamq.model.deepseek import forward_blocks

    out = request.getfixturevalue(f"out_{kind}")
    reader = CheckpointReader(out)
    ids = torch.randint(0, reader.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    ours = forward_blocks(reader, ids, dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(
        out, quantization_config=CompressedTensorsConfig(dequantize=True), dtype=torch.float32
    )
    assert type(model).__name__ == "DeepseekV32ForCausalLM"
    model.config._attn_implementation = "eager"
    model.float()  # transformers leaves decompressed experts in the scale dtype (bf16)
    theirs_wk = model.model.layers[1].self_attn.indexer.wk.weight
    assert torch.equal(theirs_wk, reader.weight("model.layers.1.self_attn.indexer.wk.weight", "cpu", torch.float32))
    with torch.no_grad():
        theirs = model(input_ids=ids).logits.float()
    assert ((ours - theirs).norm() / theirs.norm()).item() < 1e-2
