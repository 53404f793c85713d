"""The streaming checkpoint reader: FP8 dequantization, both expert layouts, and clear errors for bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import pytest
import torch
from export_helpers import save_tensors

from streamq.errors import StreamqError
from streamq.io.safetensors_stream import INDEX_NAME, CheckpointReader
from streamq.kernels.fp8_blocks import dequant_fp8_blocks_ref, dequant_fp8_blocks_triton, quantize_fp8_blocks

RAGGED_SHAPES = [(128, 128), (300, 200), (576, 256), (129, 1), (1, 385)]


def random_fp8(shape: tuple[int, int], gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh FP8 bytes (any finite e4m3 value) and positive scales spanning several decades."""
    codes = torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0  # 0x7F / 0xFF are NaN in e4m3fn
    blocks = (-(-shape[0] // 128), -(-shape[1] // 128))
    scale = torch.exp(torch.randn(blocks, generator=gen) * 3).float()
    return codes.view(torch.float8_e4m3fn), scale


def float64_reference(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    out = torch.empty(weight.shape, dtype=torch.float64)
    for i in range(weight.shape[0]):
        for jb in range(scale.shape[1]):
            cols = slice(jb * 128, (jb + 1) * 128)
            out[i, cols] = weight[i, cols].double() * scale[i // 128, jb].double()
    return out


@pytest.mark.parametrize("shape", RAGGED_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_dequant_matches_float64_reference(shape: tuple[int, int], dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(zlib.crc32(f"{shape}{dtype}".encode()))
    weight, scale = random_fp8(shape, gen)
    ref = float64_reference(weight, scale)
    out = dequant_fp8_blocks_ref(weight, scale, (128, 128), dtype)
    # One rounding to the output dtype: at most half an ulp (2**-24 for float32, 2**-8 for bfloat16).
    half_ulp = 2.0**-24 if dtype == torch.float32 else 2.0**-8
    assert ((out.double() - ref).abs() <= half_ulp * ref.abs() + 1e-300).all()


@pytest.mark.parametrize("shape", RAGGED_SHAPES[1:3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_dequant_triton_equals_reference(shape: tuple[int, int], dtype: torch.dtype, triton_interpret) -> None:
    gen = torch.Generator().manual_seed(7 + shape[0])
    weight, scale = random_fp8(shape, gen)
    ref = dequant_fp8_blocks_ref(weight, scale, (128, 128), dtype)
    out = dequant_fp8_blocks_triton(weight.to(triton_interpret), scale.to(triton_interpret), (128, 128), dtype)
    assert torch.equal(out.cpu(), ref)


def test_fp8_quantize_roundtrip_is_close() -> None:
    w = torch.randn(300, 200)
    q, scale = quantize_fp8_blocks(w)
    back = dequant_fp8_blocks_ref(q, scale, (128, 128), torch.float32)
    assert ((back - w).norm() / w.norm()).item() < 0.05  # e4m3 has 3 mantissa bits
    assert scale.shape == (3, 2)


def test_reader_dequantizes_ragged_checkpoint_weights(tiny_checkpoint: Path) -> None:
    reader = CheckpointReader(tiny_checkpoint)
    name = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"  # 160 rows: a partial block of 32
    raw, scale = reader.raw(name), reader.raw(name + "_scale_inv")
    assert raw.dtype == torch.float8_e4m3fn and raw.shape[0] % 128 != 0
    ref = float64_reference(raw, scale)
    got = reader.weight(name, dtype=torch.float32)
    assert ((got.double() - ref).abs() <= 2.0**-24 * ref.abs()).all()


def test_block_tensors_are_read_without_other_layers(tiny_checkpoint: Path) -> None:
    reader = CheckpointReader(tiny_checkpoint)
    tensors = reader.load_prefix("model.layers.2.", "cpu", torch.bfloat16)
    assert all(not n.endswith("_scale_inv") for n in tensors)
    assert tensors["mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert tensors["mlp.experts.15.down_proj.weight"].dtype == torch.bfloat16
    assert not any(n.startswith("model.") for n in tensors)


def test_fused_expert_layout_reads_like_per_expert(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """transformers 5 saves experts fused: gate_up_proj [E, 2I, H] and down_proj [E, H, I]."""
    reader = CheckpointReader(tiny_checkpoint)
    cfg = reader.config
    layer = cfg.first_k_dense_replace
    prefix = f"model.layers.{layer}.mlp.experts."
    per_expert = {n: reader.weight(n) for n in reader.names(prefix) if not n.endswith("_scale_inv")}
    gate_up = torch.stack(
        [
            torch.cat([per_expert[f"{prefix}{e}.gate_proj.weight"], per_expert[f"{prefix}{e}.up_proj.weight"]])
            for e in range(cfg.n_routed_experts)
        ]
    )
    down = torch.stack([per_expert[f"{prefix}{e}.down_proj.weight"] for e in range(cfg.n_routed_experts)])
    fused_dir = tmp_path / "fused"
    fused_dir.mkdir()
    save_tensors(fused_dir / "model.safetensors", {prefix + "gate_up_proj": gate_up, prefix + "down_proj": down})
    (fused_dir / "config.json").write_text(json.dumps(cfg.raw))
    fused = CheckpointReader(fused_dir)
    for name, tensor in per_expert.items():
        assert torch.equal(fused.weight(name), tensor), name


# -- bad input -------------------------------------------------------------------------------------------------


@pytest.fixture
def broken(tiny_checkpoint: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, copy)
    return copy


def first_shard(model_dir: Path) -> Path:
    return sorted(model_dir.glob("model-*.safetensors"))[0]


def test_missing_shard_is_named(broken: Path) -> None:
    shard = first_shard(broken)
    shard.unlink()
    with pytest.raises(StreamqError, match=rf"{shard}: missing shard listed in {INDEX_NAME}; download it again"):
        CheckpointReader(broken)


def test_tensor_listed_in_index_but_absent_is_named(broken: Path) -> None:
    index = json.loads((broken / INDEX_NAME).read_text())
    shard = first_shard(broken).name
    index["weight_map"]["model.layers.0.self_attn.not_a_tensor.weight"] = shard
    (broken / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(StreamqError, match=r"not_a_tensor.weight is listed in .* but absent from this shard") as err:
        CheckpointReader(broken)
    assert shard in str(err.value) and "download both again" in str(err.value)


@pytest.mark.parametrize(
    ("damage", "why"),
    [
        (lambda b: b[:5], "shorter than the 8-byte header length"),
        (lambda b: (10**9).to_bytes(8, "little") + b[8:], "header length 1000000000 exceeds the file size"),
        (lambda b: b[:8] + b"#" + b[9:], "header is not valid JSON"),
        (lambda b: b[: len(b) // 2], r"ends at byte \d+, the file has \d+"),
    ],
    ids=["tiny-file", "huge-header-length", "garbage-json", "truncated-data"],
)
def test_corrupt_or_truncated_shard_is_named(broken: Path, damage, why: str) -> None:
    shard = first_shard(broken)
    shard.write_bytes(damage(shard.read_bytes()))
    with pytest.raises(
        StreamqError, match=rf"{shard}: corrupt or truncated safetensors file \(.*{why}.*\); download this shard again"
    ):
        CheckpointReader(broken)


def test_unsupported_architecture_is_named(broken: Path) -> None:
    cfg = json.loads((broken / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["LlamaForCausalLM"], "llama"
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        StreamqError,
        match=r"config.json: unsupported architecture LlamaForCausalLM; streamq reads architectures "
        r"DeepseekV2ForCausalLM, DeepseekV3ForCausalLM",
    ):
        CheckpointReader(broken)


def test_missing_config_and_missing_weights_are_named(broken: Path, tmp_path: Path) -> None:
    with pytest.raises(StreamqError, match=r"not a directory"):
        CheckpointReader(tmp_path / "nowhere")
    (broken / INDEX_NAME).unlink()
    with pytest.raises(StreamqError, match=r"no model.safetensors.index.json or model.safetensors"):
        CheckpointReader(broken)
    (broken / "config.json").unlink()
    with pytest.raises(StreamqError, match=r"config.json: not found; MODEL must be"):
        CheckpointReader(broken)


def test_corrupt_index_is_named(broken: Path) -> None:
    (broken / INDEX_NAME).write_text("{not json")
    with pytest.raises(StreamqError, match=rf"{INDEX_NAME}: not a valid index"):
        CheckpointReader(broken)


# -- memory ---------------------------------------------------------------------------------------------------

RSS_SCRIPT = textwrap.dedent(
    """
    import json, math, resource, sys
    import torch
    from streamq.io.safetensors_stream import CheckpointReader

    reader = CheckpointReader(sys.argv[1])
    layers = range(reader.config.num_layers_with_mtp)
    names = [[n for n in reader.names(reader.layer_prefix(i)) if not n.endswith("_scale_inv")] for i in layers]
    block_bf16 = max(sum(math.prod(reader.infos[n].shape) * 2 for n in layer) for layer in names)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    for i in layers:
        tensors = reader.load_prefix(reader.layer_prefix(i), "cpu", torch.bfloat16)
        del tensors
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    total = sum(f.stat().st_size for f in reader.shard_files)
    print(json.dumps({"base": base, "peak": peak, "block_bf16": block_bf16, "total_bytes": total}))
    """
)


@pytest.mark.slow
def test_reading_every_block_keeps_rss_bounded(tmp_path: Path) -> None:
    from streamq.synth import SynthOptions, write_synthetic_checkpoint

    overrides = {
        "hidden_size": 512,
        "moe_intermediate_size": 512,
        "n_routed_experts": 32,
        "num_hidden_layers": 10,
        "first_k_dense_replace": 1,
        "vocab_size": 1024,
    }
    model = write_synthetic_checkpoint(tmp_path / "m", SynthOptions(preset="tiny", overrides=overrides, mtp=False))
    out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(model)], capture_output=True, text=True, check=True)
    stats = json.loads(out.stdout)
    block = stats["block_bf16"]
    assert stats["total_bytes"] >= 8 * block / 2  # the checkpoint (FP8) holds at least 8 blocks' worth
    assert stats["peak"] < 2 * block + 2**30  # the acceptance bound
    # The discriminating check: reading everything must not grow the peak by more than ~2 blocks. Without
    # releasing mapped pages it would grow by the whole checkpoint.
    assert stats["peak"] - stats["base"] < 2 * block + 32 * 2**20, stats


# The peak from this process's own high-water mark (VmHWM): ru_maxrss would carry the parent's over exec.
READ_RSS = """
import sys
from pathlib import Path
import torch
import streamq.io.safetensors_stream as stream
def peak():
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024
path, pieces = Path(sys.argv[1]), sys.argv[2]
if pieces == "one":
    stream.READ_PIECE = 1 << 40
(info,) = stream.read_header(path).values()
mapped = stream._MappedFile(path)
before = peak()
tensor = mapped.read(info)
print(peak() - before, tensor.nbytes)
"""


@pytest.mark.parametrize(("pieces", "bound"), [("default", (1.0, 1.4)), ("one", (1.7, 2.3))])
def test_a_large_tensor_is_read_holding_one_piece_of_the_file(tmp_path: Path, pieces: str, bound: tuple) -> None:
    """A 2 GB embedding read through the map must cost its own bytes, not twice them: each 64 MiB piece's pages are
    dropped once copied. Read in one piece (the old way) the file's pages and the copy coexist: the measurement
    tells the two apart."""
    from safetensors.torch import save_file

    path = tmp_path / "big.safetensors"
    save_file({"embed": torch.ones(384 << 20, dtype=torch.uint8).view(torch.bfloat16)}, str(path))  # 384 MiB
    done = subprocess.run([sys.executable, "-c", READ_RSS, str(path), pieces], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    grown, size = map(int, done.stdout.split())
    assert bound[0] * size < grown < bound[1] * size, (grown, size)
