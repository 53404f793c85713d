"""Several processes (streamq's launcher, gloo on the CPU): expert + data parallelism give the single-process bytes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from streamq.distributed import Dist
from streamq.report import REPORT_NAME
from streamq.tui import EVENTS_FILENAME

ARGS = ["--num-samples", "8", "--seq-len", "32", "--dtype", "float32", "--device", "cpu", "--token-budget", "64"]
TIMING = {EVENTS_FILENAME, REPORT_NAME}


def streamq_run(
    model: Path, out: Path, gpus: int, crash: str = "", extra: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    # One thread per process: CPU matrix products split their sums by thread, so the thread count is part of
    # what makes two runs bitwise comparable (the launcher, like torchrun, gives each worker one thread).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "STREAMQ_CRASH_AT": crash}
    cmd = [sys.executable, "-m", "streamq", "run", str(model), str(out), *ARGS, *extra, "--display", "plain"]
    if gpus > 1:
        cmd += ["--gpus", str(gpus)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def model_files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file() and p.name not in TIMING}


def report(out: Path) -> list[dict]:
    """The report less what depends on timing and on the order of the ranks' partial sums."""
    blocks = json.loads((out / REPORT_NAME).read_text())["blocks"]
    return [{k: v for k, v in b.items() if k not in ("seconds", "wall_seconds", "rel_error")} for b in blocks]


@pytest.fixture(scope="module")
def single(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("single") / "out"
    done = streamq_run(tiny_checkpoint, out, 1)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_experts_are_shared_out_contiguously_and_completely() -> None:
    for world in (1, 2, 3, 8):
        ranks = [Dist(r, world) for r in range(world)]
        owned = [e for d in ranks for e in d.experts(256)]
        assert owned == list(range(256))
        assert all(ranks[0].owner(e, 256) == r for r, d in enumerate(ranks) for e in d.experts(256))


@pytest.mark.slow
def test_two_processes_write_the_bytes_of_one(tiny_checkpoint: Path, single: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = streamq_run(tiny_checkpoint, out, 2)
    assert done.returncode == 0, done.stderr[-3000:]
    assert model_files(out) == model_files(single)
    assert report(out) == report(single)
    # Rank 0 alone displays, and it shows both ranks' experts.
    assert "block 3 done" in done.stdout
    events = [json.loads(line) for line in (out / EVENTS_FILENAME).read_text().splitlines()]
    assert {e["rank"] for e in events if e["event"] == "experts"} == {0, 1}


@pytest.mark.slow
def test_two_processes_keeping_their_activations_write_the_bytes_of_one(
    tiny_checkpoint: Path, single: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    done = streamq_run(tiny_checkpoint, out, 2, extra=("--activations", "device"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "activations kept" in done.stdout.splitlines()[0]
    assert model_files(out) == model_files(single)  # single: one process, activations on disk
    assert report(out) == report(single)


@pytest.mark.slow
def test_a_killed_rank_resumes_to_the_same_bytes(tiny_checkpoint: Path, single: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    killed = streamq_run(tiny_checkpoint, out, 2, crash="solve:2@1")  # rank 1, in the first MoE block
    assert killed.returncode != 0
    assert json.loads((out / "streamq_manifest.json").read_text())["next_layer"] == 2
    refused = streamq_run(tiny_checkpoint, out, 1)
    assert refused.returncode == 2 and "resume with --gpus 2" in refused.stderr
    resumed = streamq_run(tiny_checkpoint, out, 2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert model_files(out) == model_files(single)


@pytest.mark.slow
def test_awq_with_every_linear_in_scope_is_the_same_on_two_processes(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """AWQ's shared MoE-input scale sums losses and weight statistics over ranks, in an order that does not
    depend on them; the non-expert folds are broadcast from rank 0."""
    extra = ("--method", "awq", "--scope", "all")
    one, two = streamq_run(tiny_checkpoint, tmp_path / "one", 1, extra=extra), None
    assert one.returncode == 0, one.stderr[-3000:]
    two = streamq_run(tiny_checkpoint, tmp_path / "two", 2, extra=extra)
    assert two.returncode == 0, two.stderr[-3000:]
    assert model_files(tmp_path / "two") == model_files(tmp_path / "one")


# Four processes: the micro-batch must hold a multiple of 4 sequences for every process count compared (it decides
# which sequences meet in a sum), so these runs use a token budget of 4 sequences.
FOUR = ("--token-budget", "128")


@pytest.fixture(scope="module")
def single_four(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("single4") / "out"
    done = streamq_run(tiny_checkpoint, out, 1, extra=FOUR)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.mark.slow
def test_four_processes_write_the_bytes_of_one(tiny_checkpoint: Path, single_four: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = streamq_run(tiny_checkpoint, out, 4, extra=FOUR)
    assert done.returncode == 0, done.stderr[-3000:]
    assert model_files(out) == model_files(single_four)
    assert report(out) == report(single_four)
    events = [json.loads(line) for line in (out / EVENTS_FILENAME).read_text().splitlines()]
    assert {e["rank"] for e in events if e["event"] == "experts"} == {0, 1, 2, 3}


@pytest.mark.slow
def test_a_killed_last_rank_of_four_resumes_to_the_same_bytes(
    tiny_checkpoint: Path, single_four: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    killed = streamq_run(tiny_checkpoint, out, 4, crash="write:3@3", extra=FOUR)  # rank 3, writing a MoE shard
    assert killed.returncode != 0
    assert not (out / "config.json").exists()
    resumed = streamq_run(tiny_checkpoint, out, 4, extra=FOUR)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert model_files(out) == model_files(single_four)


@pytest.mark.slow
def test_sigterm_to_the_launcher_stops_every_worker_and_the_run_resumes(
    tiny_checkpoint: Path, single: Path, tmp_path: Path
) -> None:
    """A batch scheduler's stop reaches the launcher only: it passes SIGTERM on, each worker stops cleanly, and
    the run resumes to the bytes of one process."""
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "STREAMQ_CRASH_AT": ""}
    cmd = [sys.executable, "-m", "streamq", "run", str(tiny_checkpoint), str(out), *ARGS, "--display", "plain"]
    with subprocess.Popen(
        [*cmd, "--gpus", "2"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            if "block 2: calibrate" in line:
                proc.send_signal(signal.SIGTERM)
                break
        _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "Traceback" not in err
    assert err.count("streamq: terminated (SIGTERM)") == 1, err[-2000:]  # rank 0 speaks for the run
    manifest = json.loads((out / "streamq_manifest.json").read_text())
    assert not manifest["complete"] and manifest["next_layer"] <= 2
    resumed = streamq_run(tiny_checkpoint, out, 2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert model_files(out) == model_files(single)


def test_more_workers_than_visible_gpus_are_refused_before_anything_is_written(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "0,1"}
    cmd = [sys.executable, "-m", "streamq", "run", str(tiny_checkpoint), str(tmp_path / "out"), "--gpus", "3"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--gpus 3: this machine has 2 GPUs" in done.stderr, done.stderr[-2000:]
    assert not (tmp_path / "out").exists()
