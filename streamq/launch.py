"""``streamq run ... --gpus N``: N worker processes of the same command on this machine.

The launcher is what torchrun's ``--standalone`` mode would be, less its weight: it imports no torch, which would
hold half a GB of host memory for nothing while the workers run. Each worker gets what torch.distributed's
``env://`` rendezvous reads (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) and one
OpenMP thread unless OMP_NUM_THREADS is set (torchrun's default too; CPU sums split by thread, so the thread count
is part of what makes runs bitwise comparable). SIGTERM is passed on to every worker (Ctrl-C reaches them from
the terminal). When a worker fails the others are stopped, first with SIGTERM, then, if a collective keeps them
waiting, with SIGKILL: the run then resumes from its last finished block, as after any crash.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from streamq.errors import StreamqError

# Seconds a worker gets to stop after SIGTERM once another has failed, before SIGKILL.
GRACE_SECONDS = 10.0
_POLL_SECONDS = 0.2


def launch(nproc: int, argv: Sequence[str]) -> int:
    """Run ``python -m streamq *argv`` as ``nproc`` workers; the exit status of the first that failed, else 0."""
    if nproc < 1:
        raise StreamqError(f"--gpus {nproc}: needs at least 1")
    gpus = visible_gpus()
    if gpus and nproc > gpus:
        raise StreamqError(f"--gpus {nproc}: this machine has {gpus} GPUs")
    base = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    base.setdefault("OMP_NUM_THREADS", "1")
    sizes = {"WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc)}
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "streamq", *argv], env={**base, **sizes, "RANK": str(r), "LOCAL_RANK": str(r)}
        )
        for r in range(nproc)
    ]
    previous = signal.signal(signal.SIGTERM, lambda *_: _signal_all(workers, signal.SIGTERM))
    try:
        return _wait(workers)
    finally:
        signal.signal(signal.SIGTERM, previous)


def visible_gpus() -> int:
    """The GPUs a worker may use, without initialising CUDA here: CUDA_VISIBLE_DEVICES when set, else the NVIDIA
    driver's list; 0 when neither says (the workers then find out themselves)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and not d.strip().startswith("-")])
    driver = Path("/proc/driver/nvidia/gpus")
    return len(list(driver.iterdir())) if driver.is_dir() else 0


def _wait(workers: list[subprocess.Popen[bytes]]) -> int:
    while True:
        codes = [w.poll() for w in workers]
        failed = [c for c in codes if c not in (None, 0)]
        if failed:
            _stop(workers)
            return _status(failed[0])
        if all(c == 0 for c in codes):
            return 0
        time.sleep(_POLL_SECONDS)


def _stop(workers: list[subprocess.Popen[bytes]]) -> None:
    _signal_all(workers, signal.SIGTERM)
    deadline = time.monotonic() + GRACE_SECONDS
    while any(w.poll() is None for w in workers) and time.monotonic() < deadline:
        time.sleep(_POLL_SECONDS)
    _signal_all(workers, signal.SIGKILL)
    for w in workers:
        w.wait()


def _signal_all(workers: list[subprocess.Popen[bytes]], sig: int) -> None:
    for w in workers:
        if w.poll() is None:
            w.send_signal(sig)


def _status(code: int) -> int:
    """A worker killed by a signal (negative code) as a shell reports it."""
    return 128 - code if code < 0 else code


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
