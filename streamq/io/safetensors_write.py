"""Write safetensors files tensor by tensor, atomically.

The header is computed from the tensors' specs up front, so the data can be produced and written in chunks:
a 2 GB embedding never needs to exist in RAM at once. The file appears under its name only once complete
(written to a temporary name, fsynced, renamed), so a killed process never leaves a file that looks whole.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from streamq.distributed import Dist
from streamq.io.atomic import atomic_file, fsync_dir, pwrite_tensor, temporary_name, write_error
from streamq.io.safetensors_stream import DTYPE_NAMES


class Digest(Protocol):
    """What is used of a hashlib object."""

    def update(self, data: bytes | memoryview, /) -> None: ...

    def hexdigest(self) -> str: ...


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def header_bytes(specs: Sequence[TensorSpec], metadata: Mapping[str, str] | None = None) -> bytes:
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for spec in specs:
        header[spec.name] = {
            "dtype": DTYPE_NAMES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keeps every tensor's data 8-byte aligned
    return len(raw).to_bytes(8, "little") + raw


def write_safetensors(
    path: Path,
    specs: Sequence[TensorSpec],
    produce: Callable[[TensorSpec], Iterable[torch.Tensor]],
    metadata: Mapping[str, str] | None = None,
    digest: Digest | None = None,
) -> int:
    """Write ``specs`` in order; ``produce(spec)`` yields the tensor's data as one or more row chunks. ``digest``
    (a hashlib object) is fed the file's bytes as they are written, so the file need not be read back to hash it.

    Returns the file size. Raises StreamqError (naming the file) when the disk is full or unwritable."""
    path = Path(path)
    with atomic_file(path) as f:
        header = header_bytes(specs, metadata)
        f.write(header)
        if digest is not None:
            digest.update(header)
        for spec in specs:
            _write_tensor(f, spec, produce(spec), digest)
    return path.stat().st_size


def write_safetensors_together(
    path: Path,
    specs: Sequence[TensorSpec],
    produce: Callable[[TensorSpec], Iterable[torch.Tensor]],
    owns: Callable[[TensorSpec], bool],
    dist: Dist,
    metadata: Mapping[str, str] | None = None,
    digest: Digest | None = None,
) -> None:
    """Several processes write one file, each the tensors it ``owns``, at offsets fixed by the header: nothing is
    gathered on one rank, and the bytes are those ``write_safetensors`` would write in one process. Each rank
    writes its own byte ranges; the only synchronisation is one barrier before (the file exists) and one after
    (every range is written). Rank 0 hashes the finished file into ``digest`` (the others ignore it)."""
    path = Path(path)
    if dist.world == 1:
        write_safetensors(path, specs, produce, metadata, digest)
        return
    tmp = temporary_name(path, dist.broadcast_object(os.getpid()))
    header = header_bytes(specs, metadata)
    try:
        if dist.main:
            with tmp.open("wb") as f:
                f.write(header)
                f.truncate(len(header) + sum(spec.nbytes for spec in specs))
        dist.barrier()
        fd = os.open(tmp, os.O_WRONLY)
        try:
            offset = len(header)
            for spec in specs:
                if owns(spec):
                    at = offset
                    for chunk in produce(spec):
                        at += pwrite_tensor(fd, chunk, at)
                offset += spec.nbytes
            os.fsync(fd)
        finally:
            os.close(fd)
        dist.barrier()
        if dist.main:
            os.replace(tmp, path)
            fsync_dir(path.parent)
            if digest is not None:
                hash_file(path, digest)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise write_error(path, exc) from None
    dist.barrier()


def hash_file(path: Path, digest: Digest, chunk: int = 1 << 24) -> None:
    buffer = memoryview(bytearray(chunk))  # one buffer: no fresh 16 MB object (and its page faults) per read
    with Path(path).open("rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(buffer[:n])


def _write_tensor(f, spec: TensorSpec, chunks: Iterable[torch.Tensor], digest: Digest | None) -> None:
    written = 0
    for chunk in chunks:
        if chunk.dtype != spec.dtype:
            raise ValueError(f"{spec.name}: chunk dtype {chunk.dtype} differs from the declared {spec.dtype}")
        data = chunk.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().data
        f.write(data)
        if digest is not None:
            digest.update(data)
        written += len(data)
    if written != spec.nbytes:
        raise ValueError(f"{spec.name}: produced {written} bytes, the declared shape {spec.shape} needs {spec.nbytes}")
