"""Files that appear only when complete: written under a temporary name, fsynced, renamed, then the directory
fsynced. A process killed at any point leaves either the old file or the new one, never a partial one; the
temporary names (``.NAME.tmp-PID``) are what a resumed run sweeps away."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import torch

from streamq.errors import StreamqError


def temporary_name(path: Path, token: int | None = None) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid() if token is None else token}")


@contextmanager
def atomic_file(path: Path, mode: str = "wb") -> Iterator[IO]:
    """Open ``path`` for writing so that it appears only once the block exits without error. An OSError becomes
    a StreamqError naming the file (disk full, permissions)."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        with tmp.open(mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise write_error(path, exc) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: Path, text: str) -> None:
    with atomic_file(path, "w") as f:
        f.write(text)


def write_error(path: Path, exc: OSError) -> StreamqError:
    if exc.errno == errno.ENOSPC:
        return StreamqError(f"{path}: disk full while writing; free space on {path.parent} and rerun to resume")
    return StreamqError(f"{path}: cannot write ({exc.strerror}); check {path.parent} is writable and rerun")


def fsync_dir(directory: Path) -> None:
    """Make a rename durable: the directory entry must reach the disk too."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def pwrite_tensor(fd: int, tensor: torch.Tensor, offset: int) -> int:
    """Write ``tensor``'s bytes at ``offset`` of the open file ``fd`` (retrying short writes); the bytes written."""
    data = memoryview(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)
    return done
