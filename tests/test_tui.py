from __future__ import annotations

import io
import json
import re
import sys
from pathlib import Path

import pytest
from rich.console import Console

from streamq.tui import (
    BlockProgress,
    Reporter,
    RunState,
    SystemStats,
    TokenStats,
    estimate_eta,
    format_bytes,
    format_duration,
    gpu_peak_bytes,
    json_safe,
    render_panel,
    resolve_display,
    rss_bytes,
    rss_from_statm,
    throughput,
    token_stats,
)

TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ")


class FakeClock:
    """Both clocks of a Reporter: tests move time forward by hand."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


def _reporter(events: Path | None, clock: FakeClock, **kwargs: object) -> Reporter:
    return Reporter(events, wall_clock=clock, clock=clock, **kwargs)


def _run(reporter: Reporter, clock: FakeClock) -> None:
    """A short run: block 0 resumed, blocks 1 and 2 quantized (10 s and 20 s), one fallback and one warning."""
    reporter.run_start(
        model="tiny", out="out", total_blocks=3, experts_per_block=4, calib_tokens=4096, recipe="W4A16 g128"
    )
    reporter.block_skipped(0)
    for block, seconds in ((1, 10.0), (2, 20.0)):
        reporter.stage(block, "load")
        reporter.stage(block, "calibrate")
        reporter.expert_tokens(block, [0, 10, 30, 50])
        reporter.stage(block, "solve")
        for solved in range(1, 5):
            reporter.experts(block, solved, 4)
        if block == 2:
            reporter.fallback(block, "mlp.experts.0.down_proj", "no calibration tokens")
            reporter.warning("expert 0 of block 2 got no tokens")
        reporter.stage(block, "write")
        clock.now += seconds
        reporter.block_done(block, rel_error=0.01 * block)


def _events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------------------------------------------------------------
# Event log


def test_event_log_has_every_event_in_order_with_its_fields(tmp_path: Path) -> None:
    path = tmp_path / "out" / "streamq_events.jsonl"  # the directory does not exist yet
    clock = FakeClock()
    with _reporter(path, clock, display="none") as reporter:
        _run(reporter, clock)

    events = _events(path)
    names = [e["event"] for e in events]
    block = ["stage", "stage", "expert_tokens", "stage", "experts", "experts", "experts", "experts"]
    assert names == [
        "run_start",
        "block_skipped",
        *block,
        "stage",
        "block_done",
        *block,
        "fallback",
        "warning",
        "stage",
        "block_done",
        "run_end",
    ]
    assert events[0] == {
        "event": "run_start",
        "time": 1_700_000_000.0,
        "model": "tiny",
        "out": "out",
        "total_blocks": 3,
        "experts_per_block": 4,
        "calib_tokens": 4096,
        "recipe": "W4A16 g128",
    }
    assert events[2] == {"event": "stage", "time": 1_700_000_000.0, "block": 1, "stage": "load"}
    assert events[4] == {
        "event": "expert_tokens",
        "time": 1_700_000_000.0,
        "block": 1,
        "tokens_min": 0,
        "tokens_median": 20.0,
        "tokens_max": 50,
        "experts_without_tokens": 1,
    }
    done = [e for e in events if e["event"] == "block_done"]
    assert done[1] == {
        "event": "block_done",
        "time": 1_700_000_030.0,
        "block": 2,
        "seconds": 20.0,
        "rel_error": 0.02,
        "fallbacks": 1,
        "tokens_min": 0,
        "tokens_median": 20.0,
    }
    assert events[-1] == {
        "event": "run_end",
        "time": 1_700_000_030.0,
        "status": "ok",
        "blocks_done": 2,
        "blocks_skipped": 1,
        "seconds": 30.0,
        "fallbacks": 1,
        "rel_error_mean": pytest.approx(0.015),
        "rel_error_max": 0.02,
        "warnings": 1,
        "errors": 0,
    }


def test_event_log_is_flushed_per_event_and_appended_by_a_resumed_run(tmp_path: Path) -> None:
    path = tmp_path / "streamq_events.jsonl"
    clock = FakeClock()
    first = _reporter(path, clock, display="none")
    first.run_start(model="m", out="o", total_blocks=2, experts_per_block=0, calib_tokens=1, recipe="r")
    first.stage(0, "load")
    # Readable before the reporter is closed: a crash at this point keeps both lines.
    assert [e["event"] for e in _events(path)] == ["run_start", "stage"]
    first.close()

    with _reporter(path, clock, display="none") as second:
        second.run_start(model="m", out="o", total_blocks=2, experts_per_block=0, calib_tokens=1, recipe="r")
        second.block_skipped(0)
    assert [e["event"] for e in _events(path)] == ["run_start", "stage", "run_start", "block_skipped", "run_end"]


def test_non_finite_errors_stay_valid_json(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    with _reporter(path, FakeClock(), display="none") as reporter:
        reporter.block_done(5, rel_error=float("nan"), seconds=1.0)

    def reject(constant: str) -> None:
        raise AssertionError(f"{constant} is not JSON")

    records = [json.loads(line, parse_constant=reject) for line in path.read_text().splitlines()]
    assert records[0]["rel_error"] == "nan"
    # A NaN block (a run with --allow-nonfinite) shows as NaN in the summary, never dropped from it.
    assert records[1]["rel_error_mean"] == "nan" and records[1]["rel_error_max"] == "nan"
    assert json_safe(float("-inf")) == "-inf" and json_safe(Path("a/b")) == "a/b" and json_safe(1.5) == 1.5


def test_context_manager_records_failures_and_reraises(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    with pytest.raises(RuntimeError, match="solver diverged"), _reporter(path, FakeClock(), display="none"):
        raise RuntimeError("solver diverged")
    with pytest.raises(KeyboardInterrupt), _reporter(path, FakeClock(), display="none"):
        raise KeyboardInterrupt

    events = _events(path)
    assert [e["event"] for e in events] == ["error", "run_end", "run_end"]
    assert events[0]["message"] == "RuntimeError: solver diverged"
    assert [events[1]["status"], events[2]["status"]] == ["failed", "interrupted"]


def test_unwritable_event_log_does_not_stop_the_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with _reporter(blocker / "events.jsonl", FakeClock(), display="none") as reporter:
        reporter.stage(0, "load")
    assert "cannot write the event log" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------------
# Plain mode


def test_plain_lines_without_a_terminal(tmp_path: Path) -> None:
    stream = io.StringIO()  # isatty() is False, as for a pipe or a batch job's log
    clock = FakeClock()
    with _reporter(tmp_path / "events.jsonl", clock, stream=stream) as reporter:
        _run(reporter, clock)

    lines = stream.getvalue().splitlines()
    assert all(TIMESTAMP.match(line) for line in lines)
    messages = [TIMESTAMP.sub("", line) for line in lines]
    assert messages[0] == "streamq: tiny -> out | 3 blocks, 4 experts per block, 4,096 calibration tokens | W4A16 g128"
    assert messages[1] == "block 0 already done, skipped (1/3)"
    assert messages[2:6] == ["block 1: load", "block 1: calibrate", "block 1: solve", "block 1: write"]
    assert messages[6] == (
        "block 1 done in 10.0s (2/3) | rel err 0.01 | tokens/expert min 0 median 20 | fallbacks 0 | ETA 10.0s"
    )
    assert "WARNING expert 0 of block 2 got no tokens" in messages
    assert messages[-2].startswith("block 2 done in 20.0s (3/3) | rel err 0.02") and messages[-2].endswith("ETA 0.0s")
    assert messages[-1] == "run ok: 2 blocks done, 1 skipped, in 30.0s | fallbacks 1 | rel err mean 0.015 max 0.02"
    # Per-expert progress and fallbacks stay in the event log: 8 experts events would be a flood.
    assert len(lines) == 1 + 1 + 2 * 5 + 1 + 1


def test_broken_output_stream_never_breaks_the_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    class BrokenPipe(io.StringIO):
        def write(self, text: str) -> int:
            raise BrokenPipeError("stdout closed")

    path = tmp_path / "events.jsonl"
    clock = FakeClock()
    with _reporter(path, clock, stream=BrokenPipe()) as reporter:
        _run(reporter, clock)
    assert "progress display disabled (BrokenPipeError" in capsys.readouterr().err
    assert _events(path)[-1]["status"] == "ok"


def test_display_resolution() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    class Exotic(io.StringIO):
        def isatty(self) -> bool:
            raise ValueError("I/O operation on closed file")

    assert resolve_display("auto", 0, io.StringIO(), has_console=False) == "plain"
    assert resolve_display("auto", 0, Exotic(), has_console=False) == "plain"
    assert resolve_display("auto", 0, io.StringIO(), has_console=True) == "rich"
    assert resolve_display("plain", 0, Terminal(), has_console=False) == "plain"
    assert resolve_display("auto", 1, Terminal(), has_console=True) == "none"


def test_terminal_with_term_dumb_gets_plain_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setenv("TERM", "xterm-256color")
    assert resolve_display("auto", 0, Terminal(), has_console=False) == "rich"
    monkeypatch.setenv("TERM", "dumb")
    assert resolve_display("auto", 0, Terminal(), has_console=False) == "plain"


def test_other_ranks_print_nothing(tmp_path: Path) -> None:
    stream = io.StringIO()
    clock = FakeClock()
    with _reporter(None, clock, stream=stream, display="plain", rank=1) as reporter:
        _run(reporter, clock)
    assert stream.getvalue() == ""


# ---------------------------------------------------------------------------------------------------------------------
# Rich mode


def test_rich_live_panel_renders_to_a_terminal_console(tmp_path: Path) -> None:
    console = Console(file=io.StringIO(), force_terminal=True, width=110, color_system=None)
    clock = FakeClock()
    with _reporter(tmp_path / "events.jsonl", clock, console=console) as reporter:
        _run(reporter, clock)

    output = console.file.getvalue()
    assert "streamq · tiny → out" in output
    assert "3/3 (1 resumed)" in output
    assert "block 1 done in 10.0s" in output and "WARNING expert 0 of block 2 got no tokens" in output
    assert "block 1: load" not in output  # stage changes update the panel instead of scrolling
    assert "run ok: 2 blocks done" in output
    assert _events(tmp_path / "events.jsonl")[-1]["event"] == "run_end"


def test_render_panel_shows_progress_eta_and_ranks() -> None:
    state = RunState(
        model="deepseek-v3",
        out="/out",
        total_blocks=61,
        experts_per_block=256,
        calib_tokens=65536,
        recipe="W4A16",
        started=0.0,
        blocks_done=10,
        blocks_skipped=3,
        durations=[60.0] * 10,
        fallbacks=2,
        last_rel_error=0.0123,
    )
    state.current = BlockProgress(
        block=13,
        started=100.0,
        stage="solve",
        solved={0: 50, 1: 40},
        totals={0: 128, 1: 128},
        tokens=TokenStats(min=3, median=120.0, max=900, zero=1),
    )
    console = Console(file=io.StringIO(), width=120, color_system=None)
    console.print(render_panel(state, now=130.0, system=SystemStats(rss=12 * 2**30, gpu_peak=40 * 2**30)))
    text = console.file.getvalue()

    assert "13/61 (3 resumed)" in text
    assert "ETA 47m30s" in text  # 48 blocks left at 60 s, 30 s into the current one
    assert "13  solve  (30.0s)" in text
    assert "90/256   (r0 50/128  r1 40/128)" in text
    assert "min 3   median 120   max 900" in text
    assert "fallbacks 2" in text and "last rel err 0.0123" in text
    assert "1.00 blocks/min   1,092 tok/s" in text
    assert "GPU peak 40.0 GiB   RSS 12.0 GiB" in text


def test_render_panel_before_any_block_is_done() -> None:
    console = Console(file=io.StringIO(), width=120, color_system=None)
    for state in (RunState(), RunState(model="m", out="o", total_blocks=5, started=0.0)):
        console.print(render_panel(state, now=3.0, system=SystemStats(rss=None, gpu_peak=None)))
    first, second = console.file.getvalue().split("╯\n")[:2]
    assert "streamq ─" in first and "0/0" in first
    assert "streamq · m → o" in second and "0/5" in second and "ETA —" in second
    assert "GPU peak —   RSS —   elapsed 3.0s" in second


# ---------------------------------------------------------------------------------------------------------------------
# Pure helpers


def test_eta_uses_recent_blocks_and_the_current_one() -> None:
    assert estimate_eta([], remaining=10) is None
    assert estimate_eta([5.0], remaining=0) == 0.0
    assert estimate_eta([10.0, 20.0], remaining=4) == 60.0
    assert estimate_eta([10.0, 20.0], remaining=4, current_elapsed=5.0) == 55.0
    # A block that runs long counts as at most one block done: the ETA never goes below the blocks after it.
    assert estimate_eta([10.0], remaining=3, current_elapsed=50.0) == 20.0
    # Early dense blocks (1 s) no longer count once five MoE blocks (100 s) are done.
    assert estimate_eta([1.0, 1.0, 1.0] + [100.0] * 5, remaining=2) == 200.0


def test_throughput_counts_every_calibration_token_per_block() -> None:
    assert throughput([], 1000) is None
    assert throughput([30.0, 30.0], 6000) == (2.0, 200.0)


def test_token_stats() -> None:
    assert token_stats([]) is None
    assert token_stats([4, 0, 10, 7]) == TokenStats(min=0, median=5.5, max=10, zero=1)


def test_formats() -> None:
    assert format_duration(None) == "—"
    assert format_duration(12.34) == "12.3s"
    assert format_duration(125) == "2m05s"
    assert format_duration(3 * 3600 + 7 * 60 + 20) == "3h07m"
    assert format_bytes(None) == "—"
    assert format_bytes(512) == "512 B"
    assert format_bytes(3 * 2**30 + 2**29) == "3.5 GiB"


def test_rss_from_statm() -> None:
    assert rss_from_statm("2000 300 100 10 0 500 0\n", page_size=4096) == 300 * 4096


def test_rss_bytes_reads_this_process(monkeypatch: pytest.MonkeyPatch) -> None:
    first = rss_bytes()
    assert first is not None and 1 << 20 < first < 1 << 40
    if not Path("/proc/self/statm").exists():
        pytest.skip("no /proc: the fallback without psutil is Linux-only")
    monkeypatch.setitem(sys.modules, "psutil", None)  # as if psutil were not installed
    without_psutil = rss_bytes()
    assert without_psutil is not None and abs(without_psutil - first) < first // 2


def test_gpu_peak_is_none_without_cuda() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        pytest.skip("CUDA is in use in this process")
    assert gpu_peak_bytes() is None
