from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Triton reads this when a kernel is defined, so it must be set before streamq's kernels are imported: without a
# GPU, kernels run in Triton's interpreter and are compared with their torch references on the CPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from streamq.synth import SynthOptions, write_synthetic_checkpoint

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
TOKENIZER_DIR = SHARED / "fixtures" / "tokenizers" / "deepseek-v3"
SHAKESPEARE = SHARED / "fixtures" / "text" / "tinyshakespeare.txt"


def streamq_env(**extra: str) -> dict[str, str]:
    """The environment for a ``python -m streamq`` subprocess: this checkout first on PYTHONPATH, whatever the
    caller had after it (on the device, compressed-tensors comes from a carried site directory)."""
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, **extra}


def needs_shared(path: Path) -> pytest.MarkDecorator:
    return pytest.mark.skipif(not path.exists(), reason=f"{path} is absent (a fresh clone has no ../shared)")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny preset: 2 dense + 2 MoE layers, 16 experts in 4 groups, an MTP layer, 4 shards."""
    return write_synthetic_checkpoint(tmp_path_factory.mktemp("tiny"), SynthOptions(preset="tiny", shards=4))


@pytest.fixture(scope="module")
def moe_block(tiny_checkpoint: Path) -> tuple:
    """The tiny model's first MoE block in float64 on the CPU, with rotary tables for 16 positions:
    (config, layer, block, cos, sin)."""
    from streamq.io.safetensors_stream import CheckpointReader
    from streamq.model.deepseek import load_block, rope_cos_sin

    reader = CheckpointReader(tiny_checkpoint)
    layer = reader.config.first_k_dense_replace
    block = load_block(reader, layer, "cpu", torch.float64)
    cos, sin = rope_cos_sin(reader.config, 16, "cpu")
    return reader.config, layer, block, cos.double(), sin.double()


@pytest.fixture
def triton_interpret() -> str:
    """The device Triton kernels run on here: the GPU when there is one, else the CPU interpreter."""
    pytest.importorskip("triton")
    return "cuda" if torch.cuda.is_available() else "cpu"
