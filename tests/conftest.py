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

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
TOKENIZER_DIR = SHARED / "fixtures" / "tokenizers" / "deepseek-v3"
SHAKESPEARE = SHARED / "fixtures" / "text" / "tinyshakespeare.txt"


def needs_shared(path: Path) -> pytest.MarkDecorator:
    return pytest.mark.skipif(not path.exists(), reason=f"{path} is absent (a fresh clone has no ../shared)")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny preset: 2 dense + 2 MoE layers, 16 experts in 4 groups, an MTP layer, 4 shards."""
    return write_synthetic_checkpoint(tmp_path_factory.mktemp("tiny"), SynthOptions(preset="tiny", shards=4))


@pytest.fixture
def triton_interpret() -> str:
    """The device Triton kernels run on here: the GPU when there is one, else the CPU interpreter."""
    pytest.importorskip("triton")
    return "cuda" if torch.cuda.is_available() else "cpu"
