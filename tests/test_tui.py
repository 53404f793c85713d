from __future__ import annotations

import io
import json
import re
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console

from streamq.memory import plan_memory
from streamq.recipe import Recipe, describe
from streamq.tui import (
    BlockProgress,
    DisplayError,
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
    stage_label,
    throughput,
    token_stats,
)

TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ")
# What the pipeline passes to run_start: the one-line description and the fields of a real Recipe.
RECIPE = Recipe()
RECIPE_LINE = (
    "GPTQ W4 g128 sym, act-order, MSE scales, down projections refined, output Fisher, routed experts, 128×2048 tokens"
)
# What the pipeline passes as plan: a real memory plan, described (see memory.py).
PLAN = plan_memory(torch.device("cpu"), 2**20, None, None, None).describe()


class FakeClock:
    """Both clocks of a Reporter: tests move time forward by hand."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


def _reporter(events: Path | None, clock: FakeClock, **kwargs: object) -> Reporter:
    return Reporter(events, wall_clock=clock, clock=clock, **kwargs)


def _start(reporter: Reporter, total_blocks: int = 3, moe_blocks: list[int] | None = None) -> None:
    """run_start with the types and values the pipeline passes (see pipeline.run)."""
    reporter.run_start(
        model="tiny",
        out="out",
        total_blocks=total_blocks,
        experts_per_block=4,
        calib_tokens=4096,
        recipe=describe(RECIPE),
        settings=RECIPE.to_dict(),
        moe_blocks=list(range(1, total_blocks)) if moe_blocks is None else moe_blocks,
        plan=PLAN,
    )


def _run(reporter: Reporter, clock: FakeClock) -> None:
    """A short run: block 0 resumed, MoE blocks 1 and 2 quantized (10 s and 20 s) in two expert passes each, one
    fallback and one warning."""
    _start(reporter)
    reporter.block_skipped(0)
    for block, seconds in ((1, 10.0), (2, 20.0)):
        reporter.stage(block, "load")
        for step in (1, 2):
            reporter.stage(block, "calibrate", step=step, steps=2)
            if step == 1:
                reporter.expert_tokens(block, [0, 10, 30, 50])
            reporter.stage(block, "solve", step=step, steps=2)
            for solved in (2 * step - 1, 2 * step):
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
    passes = ["stage", "expert_tokens", "stage", "experts", "experts", "stage", "stage", "experts", "experts"]
    block = ["stage", *passes]
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
        "recipe": RECIPE_LINE,
        "settings": json.loads(json.dumps(RECIPE.to_dict())),
        "moe_blocks": [1, 2],
        "plan": PLAN,
    }
    assert events[2] == {"event": "stage", "time": 1_700_000_000.0, "block": 1, "stage": "load"}
    assert events[3] == {
        "event": "stage",
        "time": 1_700_000_000.0,
        "block": 1,
        "stage": "calibrate",
        "step": 1,
        "steps": 2,
    }
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
    _start(first, total_blocks=2)
    first.stage(0, "load")
    # Readable before the reporter is closed: a crash at this point keeps both lines.
    assert [e["event"] for e in _events(path)] == ["run_start", "stage"]
    first.close()

    with _reporter(path, clock, display="none") as second:
        _start(second, total_blocks=2)
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
    stream = io.StringIO()
    with pytest.raises(RuntimeError, match="solver diverged"), _reporter(path, FakeClock(), stream=stream):
        raise RuntimeError("solver diverged")
    # The exception goes on to be printed by whoever catches it (the CLI: one line); the display says the run
    # failed but does not print the message a second time.
    assert "solver diverged" not in stream.getvalue() and "run failed" in stream.getvalue()
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
    assert messages[0] == (
        f"streamq: tiny -> out | 3 blocks, 4 experts per block, 4,096 calibration tokens | {RECIPE_LINE} | {PLAN}"
    )
    assert messages[1] == "block 0 already done, skipped (1/3)"
    passes = ["calibrate pass 1/2", "solve pass 1/2", "calibrate pass 2/2", "solve pass 2/2"]
    assert messages[2:8] == [f"block 1: {stage}" for stage in ["load", *passes, "write"]]
    assert messages[8] == (
        "block 1 done in 10.0s (2/3) | rel err 0.01 | tokens/expert min 0 median 20 | fallbacks 0 | ETA 10.0s"
    )
    assert "WARNING expert 0 of block 2 got no tokens" in messages
    assert messages[-2].startswith("block 2 done in 20.0s (3/3) | rel err 0.02") and messages[-2].endswith("ETA 0.0s")
    assert messages[-1] == (
        "run ok: 2 blocks done, 1 skipped, in 30.0s | fallbacks 1 | warnings 1 | rel err mean 0.015 max 0.02"
    )
    # Per-expert progress and fallbacks stay in the event log: 8 experts events would be a flood.
    assert len(lines) == 1 + 1 + 2 * 7 + 1 + 1


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
    console = Console(file=io.StringIO(), force_terminal=True, width=120, color_system=None)
    clock = FakeClock()
    with _reporter(tmp_path / "events.jsonl", clock, console=console) as reporter:
        _run(reporter, clock)

    output = console.file.getvalue()
    assert "streamq · tiny → out" in output
    assert "3/3 (1 resumed)" in output
    assert "block 1 done in 10.0s" in output and "WARNING expert 0 of block 2 got no tokens" in output
    assert "block 1: load" not in output  # stage changes update the panel instead of scrolling
    assert "2 (MoE)  calibrate pass 2/2" in output  # each stage is drawn when it starts
    assert RECIPE_LINE in output
    assert "run ok: 2 blocks done" in output
    assert _events(tmp_path / "events.jsonl")[-1]["event"] == "run_end"
    # The last thing drawn is the summary, which stays on the screen.
    summary = output[output.rindex("╭") :]
    assert "run ok in 30.0s" in summary and "rel err mean 0.015   max 0.02   fallbacks 1" in summary
    assert "! expert 0 of block 2 got no tokens" in summary


def test_run_start_refuses_the_recipe_dict_that_froze_the_panel(tmp_path: Path) -> None:
    # The audit's frozen panel: a dict passed where the one-line description belongs killed Rich's refresh thread.
    reporter = _reporter(None, FakeClock(), display="none")
    with pytest.raises(TypeError, match="one-line description"):
        reporter.run_start(
            model="m", out="o", total_blocks=1, experts_per_block=0, calib_tokens=1, recipe=RECIPE.to_dict()
        )


def _broken_panel(*args: object) -> None:
    raise AttributeError("'dict' object has no attribute 'end'")


def test_a_render_error_fails_the_run_in_strict_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import streamq.tui as tui

    monkeypatch.setattr(tui, "render_panel", _broken_panel)
    console = Console(file=io.StringIO(), force_terminal=True, width=110, color_system=None)
    clock = FakeClock()
    with pytest.raises(DisplayError, match="no attribute 'end'"):  # noqa: SIM117 (the run is inside the reporter)
        with _reporter(tmp_path / "events.jsonl", clock, console=console, strict=True) as reporter:
            _run(reporter, clock)


def test_strict_mode_comes_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import streamq.tui as tui

    monkeypatch.setattr(tui, "render_panel", _broken_panel)
    monkeypatch.setenv("STREAMQ_DISPLAY_STRICT", "1")
    console = Console(file=io.StringIO(), force_terminal=True, width=110, color_system=None)
    with pytest.raises(DisplayError):  # noqa: SIM117
        with _reporter(None, FakeClock(), console=console) as reporter:
            _start(reporter)


def test_a_render_error_is_shown_on_the_real_stderr_and_the_panel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import streamq.tui as tui

    monkeypatch.setattr(tui, "render_panel", _broken_panel)
    console = Console(file=io.StringIO(), force_terminal=True, width=110, color_system=None)
    clock = FakeClock()
    # While the panel runs, Rich redirects sys.stderr into the display; the note must bypass that.
    with _reporter(tmp_path / "events.jsonl", clock, console=console, strict=False) as reporter:
        _run(reporter, clock)
    err = capsys.readouterr().err
    assert err.count("the progress panel failed (AttributeError: 'dict' object has no attribute 'end')") == 1
    assert "progress display error: AttributeError" in console.file.getvalue()
    assert _events(tmp_path / "events.jsonl")[-1]["status"] == "ok"


def test_render_panel_shows_progress_eta_and_ranks() -> None:
    state = RunState(
        model="deepseek-v3",
        out="/out",
        total_blocks=61,
        experts_per_block=256,
        calib_tokens=65536,
        recipe=RECIPE_LINE,
        moe_blocks=frozenset(range(3, 61)),
        started=0.0,
        blocks_done=10,
        blocks_skipped=3,
        times=[("moe", 60.0)] * 10,
        fallbacks=2,
        last_rel_error=0.0123,
    )
    for message in ("first warning", "second warning", "third warning", "fourth warning"):
        state.warnings += 1
        state.recent_warnings.append(message)
    state.current = BlockProgress(
        block=13,
        started=100.0,
        stage=stage_label("solve", 3, 4),
        solved={0: 50, 1: 40},
        totals={0: 128, 1: 128},
        tokens=TokenStats(min=3, median=120.0, max=900, zero=1),
    )
    console = Console(file=io.StringIO(), width=120, color_system=None)
    console.print(render_panel(state, now=130.0, system=SystemStats(rss=12 * 2**30, gpu_peak=40 * 2**30)))
    text = console.file.getvalue()

    assert "13/61 (3 resumed)" in text
    assert "ETA 47m30s" in text  # 48 blocks left at 60 s, 30 s into the current one
    assert "13 (MoE)  solve pass 3/4  (30.0s)" in text
    assert "90/256   (r0 50/128  r1 40/128)" in text
    assert "min 3   median 120   max 900   without tokens 1   (block 13)" in text
    # The text of the last warnings, not only their number.
    assert "4   (last 3 below; all in the event log)" in text
    assert "first warning" not in text and all(f"! {w} warning" in text for w in ("second", "third", "fourth"))
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


def test_eta_prices_each_kind_of_block_from_its_recent_times() -> None:
    dense, moe = [("dense", 1.0)] * 3, [("moe", 100.0)]
    assert estimate_eta([], remaining=["moe"] * 10) is None
    assert estimate_eta(moe, remaining=[]) == 0.0
    assert estimate_eta([("moe", 10.0), ("moe", 20.0)], remaining=["moe"] * 4) == 60.0
    assert estimate_eta([("moe", 10.0), ("moe", 20.0)], remaining=["moe"] * 4, current_elapsed=5.0) == 55.0
    # A block that runs long counts as at most one block done: the ETA never goes below the blocks after it.
    assert estimate_eta([("moe", 10.0)], remaining=["moe"] * 3, current_elapsed=50.0) == 20.0
    # Three fast dense blocks do not make the MoE blocks look cheap...
    assert estimate_eta(dense + moe, remaining=["moe"] * 2) == 200.0
    # ...and a dense block still to come costs a dense block's time.
    assert estimate_eta(dense + moe, remaining=["dense", "moe"]) == 101.0
    # No MoE block timed yet: no number, rather than one that is wrong by the dense/MoE ratio.
    assert estimate_eta(dense, remaining=["dense", "moe"]) is None
    # Only the last ETA_RECENT_BLOCKS of a kind count.
    assert estimate_eta([("moe", 1000.0)] + [("moe", 100.0)] * 5, remaining=["moe"]) == 100.0


def test_eta_runs_down_steadily_between_events_and_does_not_jump_at_the_first_moe_blocks() -> None:
    clock = FakeClock(0.0)
    reporter = _reporter(None, clock, display="none")
    _start(reporter, total_blocks=8, moe_blocks=list(range(3, 8)))  # DeepSeek's shape: dense blocks first
    for block in range(3):
        reporter.stage(block, "load")
        clock.now += 1.0
        reporter.block_done(block, rel_error=0.0)
    for block in (3, 4):
        reporter.stage(block, "load")
        clock.now += 100.0
        reporter.block_done(block, rel_error=0.0)
    # Three MoE blocks left at 100 s each; averaging all blocks (dense too) would say 3 × 40.6 s.
    assert reporter.state.eta(clock.now) == pytest.approx(300.0)
    reporter.stage(5, "calibrate", step=1, steps=2)
    start = clock.now
    etas = [reporter.state.eta(start + t) for t in (0.0, 10.0, 60.0, 99.0, 150.0)]
    # Between events it only counts down with the clock, and it stops at the blocks after the current one.
    assert etas == pytest.approx([300.0, 290.0, 240.0, 201.0, 200.0])


def test_stage_labels_name_the_pass() -> None:
    assert stage_label("calibrate", 2, 5) == "calibrate pass 2/5"
    assert stage_label("calibrate", 1, None) == "calibrate pass 1"  # hybrid: passes planned after the first
    assert stage_label("calibrate", 1, 1) == "calibrate"
    assert stage_label("write", None, None) == "write"


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


def test_the_recipe_line_is_derived_from_the_recipe() -> None:
    from dataclasses import replace

    assert describe(Recipe()) == RECIPE_LINE
    data = replace(RECIPE.data, source="open-platypus", num_samples=16, seq_len=512)
    assert describe(Recipe(method="rtn", scope="all", unquantized="fp8", data=data)) == (
        "RTN W4 g128 sym, MSE scales, all Linears, unquantized Linears in FP8, 16×512 tokens of open-platypus"
    )
    solver = replace(RECIPE.solver, scheme=replace(RECIPE.scheme, bits=3, group_size=0, symmetric=False))
    solver = replace(solver, actorder="none", observer="mse")
    assert describe(Recipe(solver=solver, calibration="hybrid", min_tokens=64)) == (
        "GPTQ W3 per-channel asym, MSE scales, down projections refined, output Fisher, routed experts, every token "
        "to experts under 64 tokens, 128×2048 tokens"
    )
