"""Activations kept on the device between blocks, and written to disk behind the compute.

When this rank's activations fit the memory plan (memory.py), a block's output stays on the device as the next
block's input: the next block's calibration passes and its propagation read it there instead of bringing 30 GB
(DeepSeek-V3, 2 M tokens) back through host memory, and propagation overwrites it in place, a micro-batch at a
time (each micro-batch's input is read before its output is written). The disk file that resume needs is still
written, from a thread that copies the values out in small pieces while the next block computes; the pipeline
records the block as done only once that file is complete (see pipeline._record_block), and overwrites the values
only after that, so a crash at any point resumes from a complete file, as without this.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from streamq.io.activations import ActivationSpec, ActivationWriter

# Bytes copied out per piece (at least one sample): the host side is two pieces of pinned memory, so this is what
# keeping the activations on the device costs in host memory; a piece is written by several threads at once.
PIECE_BYTES = 64 << 20


class ResidentActivations:
    """This rank's activations [samples, seq_len, hidden] at one block boundary, on ``device``."""

    def __init__(self, spec: ActivationSpec, device: torch.device) -> None:
        self.spec, self.device = spec, device
        self.values = torch.empty((spec.samples, spec.seq_len, spec.hidden), dtype=spec.torch_dtype, device=device)
        self.layer: int | None = None  # the block whose input the values are (None: nothing held yet)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="streamq-spill")

    def holds(self, layer: int) -> bool:
        return self.layer == layer

    def read(self, first: int, stop: int) -> torch.Tensor:
        """Samples [first, stop): a view, valid until they are overwritten."""
        return self.values[first:stop]

    def write(self, first: int, values: torch.Tensor) -> None:
        self.values[first : first + values.shape[0]].copy_(values)

    def close(self) -> None:
        """Nothing to release per block (the interface of ActivationReader, which a block's input may also be)."""

    def spill(self, path: Path, layer: int) -> Future[None]:
        """The values, now ``layer``'s input, written to ``path`` (complete under its name when the future is done)
        while the caller goes on; the caller must not overwrite them before then."""
        self.layer = layer
        ready = torch.cuda.Event() if self.device.type == "cuda" else None
        if ready is not None:
            ready.record()  # after the writes queued so far on this thread's stream
        return self._pool.submit(_write_out, self.values, path, self.spec, ready)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)


def _write_out(values: torch.Tensor, path: Path, spec: ActivationSpec, ready: torch.cuda.Event | None) -> None:
    writer = ActivationWriter(path, spec, pin=False, behind=False)
    per_piece = max(1, PIECE_BYTES // spec.sample_bytes)
    try:
        if ready is None:
            for first in range(0, spec.samples, per_piece):
                writer.write(first, values[first : first + per_piece])
        else:
            _copy_out(values, writer, per_piece, ready)
        writer.commit()
    except BaseException:
        writer.abort()
        raise


def _copy_out(values: torch.Tensor, writer: ActivationWriter, per_piece: int, ready: torch.cuda.Event) -> None:
    """Device → pinned piece → disk, on a stream of its own so that the copies do not wait behind the next block's
    kernels; two pieces alternate, so one is copied while the other is written."""
    stream = torch.cuda.Stream(values.device)
    stream.wait_event(ready)
    shape = (per_piece, *values.shape[1:])
    pieces = [torch.empty(shape, dtype=values.dtype, pin_memory=True) for _ in range(2)]
    copied: list[torch.cuda.Event] = [torch.cuda.Event(), torch.cuda.Event()]
    starts = list(range(0, values.shape[0], per_piece))

    def start_copy(i: int) -> None:
        first = starts[i]
        n = min(per_piece, values.shape[0] - first)
        with torch.cuda.stream(stream):
            pieces[i % 2][:n].copy_(values[first : first + n], non_blocking=True)
            copied[i % 2].record(stream)

    start_copy(0)
    for i, first in enumerate(starts):
        copied[i % 2].synchronize()
        if i + 1 < len(starts):
            start_copy(i + 1)
        n = min(per_piece, values.shape[0] - first)
        writer.write(first, pieces[i % 2][:n])
