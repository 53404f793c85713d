"""Calibration activations on disk: one flat file of [samples, seq_len, hidden] per block boundary.

At DeepSeek-V3 scale the activations between two blocks are tens of GB (512 × 4096 tokens × 7168 × 2 bytes =
30 GB), so they never live in host RAM: a block reads its input a micro-batch at a time and writes its output the
same way. Positioned reads and writes (pread/pwrite) go through the page cache, which the kernel reclaims as
needed, instead of a mapping whose touched pages would count as this process's memory. An output file appears
under its final name only once complete, which is what lets an interrupted run resume from it exactly.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from streamq.errors import StreamqError
from streamq.io.atomic import fsync_dir, pwrite_tensor, temporary_name, write_error

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class ActivationSpec:
    samples: int
    seq_len: int
    hidden: int
    dtype: str = "bfloat16"

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def sample_bytes(self) -> int:
        return self.seq_len * self.hidden * self.torch_dtype.itemsize

    @property
    def nbytes(self) -> int:
        return self.samples * self.sample_bytes


def dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, d in _DTYPES.items() if d == dtype)


class ActivationReader:
    def __init__(self, path: Path, spec: ActivationSpec) -> None:
        self.path, self.spec = Path(path), spec
        size = self.path.stat().st_size if self.path.exists() else -1
        if size != spec.nbytes:
            raise StreamqError(
                f"{self.path}: saved activations are {size} bytes, expected {spec.nbytes}; "
                "the work directory is damaged: delete OUT and start again"
            )
        self._fd = os.open(self.path, os.O_RDONLY)

    def read(self, first: int, stop: int) -> torch.Tensor:
        """Samples [first, stop) as a [n, seq_len, hidden] tensor on the CPU."""
        spec = self.spec
        out = torch.empty((stop - first, spec.seq_len, spec.hidden), dtype=spec.torch_dtype)
        view = memoryview(out.view(torch.uint8).reshape(-1).numpy())
        offset, done = first * spec.sample_bytes, 0
        try:
            while done < len(view):
                n = os.preadv(self._fd, [view[done:]], offset + done)
                if n == 0:
                    raise OSError(0, "unexpected end of file")
                done += n
        except OSError as exc:
            raise StreamqError(
                f"{self.path}: read error ({exc.strerror}); check the disk, then rerun to resume"
            ) from None
        return out

    def close(self) -> None:
        os.close(self._fd)


class ActivationWriter:
    """Writes samples in any order; ``commit`` makes the file appear under its name."""

    def __init__(self, path: Path, spec: ActivationSpec) -> None:
        self.path, self.spec = Path(path), spec
        self.tmp = temporary_name(self.path)
        self._fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)

    def write(self, first: int, values: torch.Tensor) -> None:
        spec = self.spec
        if values.shape[1:] != (spec.seq_len, spec.hidden) or values.dtype != spec.torch_dtype:
            raise ValueError(f"activations {tuple(values.shape)} {values.dtype} do not match {spec}")
        try:
            pwrite_tensor(self._fd, values, first * spec.sample_bytes)
        except OSError as exc:
            self.abort()
            raise write_error(self.path, exc) from None

    def commit(self) -> None:
        os.fsync(self._fd)
        os.close(self._fd)
        if os.stat(self.tmp).st_size != self.spec.nbytes:
            raise StreamqError(f"{self.tmp}: incomplete activations; rerun to resume")
        os.replace(self.tmp, self.path)
        fsync_dir(self.path.parent)

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)
        self.tmp.unlink(missing_ok=True)


def microbatches(samples: int, per_batch: int) -> list[tuple[int, int]]:
    per_batch = max(1, per_batch)
    return [(i, min(i + per_batch, samples)) for i in range(0, samples, per_batch)]


def samples_per_batch(spec: ActivationSpec, token_budget: int) -> int:
    """Whole sequences (attention needs them whole) up to ``token_budget`` tokens."""
    return max(1, min(spec.samples, token_budget // max(spec.seq_len, 1)))


def disk_bytes_needed(spec: ActivationSpec) -> int:
    """Two activation files exist at once: a block's input and its output."""
    return 2 * spec.nbytes + math.ceil(0.01 * spec.nbytes)
