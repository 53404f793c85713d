"""Calibration activations on disk: one flat file of [samples, seq_len, hidden] per block boundary.

At DeepSeek-V3 scale the activations between two blocks are tens of GB (512 × 4096 tokens × 7168 × 2 bytes =
30 GB), so they never live in host RAM: a block reads its input a micro-batch at a time and writes its output the
same way. Positioned reads and writes (pread/pwrite) go through the page cache, which the kernel reclaims as
needed, instead of a mapping whose touched pages would count as this process's memory. An output file appears
under its final name only once complete, which is what lets an interrupted run resume from it exactly.

With a GPU the host side of every micro-batch is page-locked (pinned) memory from torch's caching host allocator:
reads land there and go to the device by DMA, writes come back the same way, and no fresh pageable buffer is
faulted in per micro-batch. The reader also reads the next micro-batch ahead in a thread while the caller computes
(calibration passes and propagation read the batches in order), and the writer writes in a thread, one micro-batch
behind, so the disk overlaps the forward passes. Host memory stays a few micro-batches.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from streamq.errors import StreamqError
from streamq.io.atomic import fsync_dir, temporary_name, write_error

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


def _on_gpu_machine() -> bool:
    return torch.cuda.is_available()


class ActivationReader:
    """Reads samples [first, stop). ``pin`` returns page-locked tensors; ``ahead`` reads the next range of the same
    size in a thread while the caller works. Both default to whether a GPU is present."""

    def __init__(self, path: Path, spec: ActivationSpec, pin: bool | None = None, ahead: bool | None = None) -> None:
        self.path, self.spec = Path(path), spec
        size = self.path.stat().st_size if self.path.exists() else -1
        if size != spec.nbytes:
            raise StreamqError(
                f"{self.path}: saved activations are {size} bytes, expected {spec.nbytes}; "
                "the work directory is damaged: delete OUT and start again"
            )
        self._fd = os.open(self.path, os.O_RDONLY)
        self._pin = _on_gpu_machine() if pin is None else pin
        threaded = _on_gpu_machine() if ahead is None else ahead
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="streamq-read") if threaded else None
        self._ahead: tuple[int, int, Future[torch.Tensor]] | None = None

    def read(self, first: int, stop: int) -> torch.Tensor:
        """Samples [first, stop) as a [n, seq_len, hidden] tensor on the CPU."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[:2] == (first, stop):
            out = ahead[2].result()
        else:
            if ahead is not None:
                ahead[2].cancel()
            out = self._read(first, stop)
        if self._pool is not None:
            # The next range of the same size; after the last one, the first (the next pass starts over).
            nxt = (stop, min(2 * stop - first, self.spec.samples)) if stop < self.spec.samples else (0, stop - first)
            self._ahead = (*nxt, self._pool.submit(self._read, *nxt))
        return out

    def _read(self, first: int, stop: int) -> torch.Tensor:
        spec = self.spec
        out = torch.empty((stop - first, spec.seq_len, spec.hidden), dtype=spec.torch_dtype, pin_memory=self._pin)
        view = memoryview(out.view(torch.uint8).reshape(-1).numpy())
        offset = first * spec.sample_bytes
        try:
            if self._pool is None:
                _pread_into(self._fd, view, offset)
            else:
                _in_parallel(_pread_into, self._fd, view, offset)
        except OSError as exc:
            raise StreamqError(
                f"{self.path}: read error ({exc.strerror}); check the disk, then rerun to resume"
            ) from None
        return out

    def close(self) -> None:
        if self._pool is not None:
            # The read ahead must finish before its file descriptor is closed.
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._ahead = None
        os.close(self._fd)


class ActivationWriter:
    """Writes samples in any order; ``commit`` makes the file appear under its name. ``behind`` copies each
    micro-batch to host memory (page-locked with ``pin``) and writes it from a thread while the caller computes the
    next one. Both default to whether a GPU is present."""

    def __init__(self, path: Path, spec: ActivationSpec, pin: bool | None = None, behind: bool | None = None) -> None:
        self.path, self.spec = Path(path), spec
        self.tmp = temporary_name(self.path)
        self._fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._pin = _on_gpu_machine() if pin is None else pin
        threaded = _on_gpu_machine() if behind is None else behind
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="streamq-write") if threaded else None
        self._pending: Future[int] | None = None

    def write(self, first: int, values: torch.Tensor) -> None:
        spec = self.spec
        if values.shape[1:] != (spec.seq_len, spec.hidden) or values.dtype != spec.torch_dtype:
            raise ValueError(f"activations {tuple(values.shape)} {values.dtype} do not match {spec}")
        self._wait()
        offset = first * spec.sample_bytes
        if self._pool is None:
            try:
                _pwrite_in_parallel(self._fd, values.detach().to("cpu").contiguous(), offset)
            except OSError as exc:
                self.abort()
                raise write_error(self.path, exc) from None
            return
        # A copy the caller cannot change while the thread writes it (from the GPU: one DMA into pinned memory).
        staged = torch.empty(values.shape, dtype=values.dtype, pin_memory=self._pin)
        staged.copy_(values)
        self._pending = self._pool.submit(_write_through, self._fd, staged, offset)

    def _wait(self) -> None:
        """The previous background write's outcome: an OSError becomes the same error as a direct write's."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        try:
            pending.result()
        except OSError as exc:
            self.abort()
            raise write_error(self.path, exc) from None

    def commit(self) -> None:
        self._wait()
        self._shutdown()
        os.fsync(self._fd)
        os.close(self._fd)
        if os.stat(self.tmp).st_size != self.spec.nbytes:
            raise StreamqError(f"{self.tmp}: incomplete activations; rerun to resume")
        os.replace(self.tmp, self.path)
        fsync_dir(self.path.parent)

    def abort(self) -> None:
        self._shutdown()
        with contextlib.suppress(OSError):
            os.close(self._fd)
        self.tmp.unlink(missing_ok=True)

    def _shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def _write_through(fd: int, values: torch.Tensor, offset: int) -> None:
    """Write and flush to the disk: the disk then works while the next micro-batch is computed, instead of all of
    it at ``commit``'s fsync (measured on an H200 machine: 3 s for 7.5 GB, on top of the writes)."""
    _pwrite_in_parallel(fd, values, offset)
    os.fdatasync(fd)


def _pwrite_in_parallel(fd: int, values: torch.Tensor, offset: int) -> None:
    """``values`` (contiguous, in host memory) written at ``offset``, in IO_THREADS pieces at once."""
    _in_parallel(_pwrite_from, fd, memoryview(values.view(torch.uint8).reshape(-1).numpy()), offset)


# One thread copies page cache <-> memory at a few GB/s, several in parallel at several times that (and take the
# page faults of fresh memory in parallel): a micro-batch is read or written in this many pieces at once.
IO_THREADS = 4
_IO_POOL = ThreadPoolExecutor(IO_THREADS, thread_name_prefix="streamq-io")


def _in_parallel(op: Callable[[int, memoryview, int], None], fd: int, view: memoryview, offset: int) -> None:
    step = -(-len(view) // IO_THREADS)
    pieces = [(view[i : i + step], offset + i) for i in range(0, len(view), step)]
    for future in [_IO_POOL.submit(op, fd, piece, at) for piece, at in pieces]:
        future.result()


def _pread_into(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise OSError(0, "unexpected end of file")
        done += n


def _pwrite_from(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def microbatches(samples: int, per_batch: int) -> list[tuple[int, int]]:
    per_batch = max(1, per_batch)
    return [(i, min(i + per_batch, samples)) for i in range(0, samples, per_batch)]


def samples_per_batch(spec: ActivationSpec, token_budget: int) -> int:
    """Whole sequences (attention needs them whole) up to ``token_budget`` tokens."""
    return max(1, min(spec.samples, token_budget // max(spec.seq_len, 1)))


def disk_bytes_needed(spec: ActivationSpec) -> int:
    """Two activation files exist at once: a block's input and its output."""
    return 2 * spec.nbytes + math.ceil(0.01 * spec.nbytes)
