"""Progress of a quantization run.

The pipeline calls a ``Reporter`` as it goes through the blocks. Every event goes to three places:

* the event log (``OUT/streamq_events.jsonl``): one JSON object per line with ``event``, ``time`` (Unix seconds)
  and the event's fields, appended and flushed per event, so a crashed run keeps its history and a resumed run
  continues the same file after a new ``run_start``;
* on a terminal, a Rich live panel: blocks done with a bar, ETA, current block and stage (with the expert pass),
  experts solved, tokens per expert, fallbacks, the text of the last warnings, throughput, peak GPU memory and
  host RSS; when the run ends, a summary that replaces the panel and stays on the screen;
* otherwise (a pipe, a log file, a batch job), timestamped log lines for run start and end, stage changes, blocks
  done or skipped, warnings and errors, and nothing for the high-frequency events.

Events and their fields (see the methods for the meaning):

==============  ===================================================================================================
run_start       model, out, total_blocks, experts_per_block, calib_tokens, recipe (one line), settings (the
                recipe's fields), moe_blocks
block_skipped   block (already in OUT from an earlier run)
stage           block, stage (load / calibrate / solve / write / propagate), step and steps (calibration pass
                ``step`` of ``steps``; absent outside the passes)
experts         block, solved, total, rank
expert_tokens   block, tokens_min, tokens_median, tokens_max, experts_without_tokens
fallback        block, name, reason
block_done      block, seconds, rel_error, fallbacks, tokens_min, tokens_median
warning         message
error           message
run_end         status (ok / failed / interrupted), blocks_done, blocks_skipped, seconds, fallbacks,
                rel_error_mean, rel_error_max, warnings, errors
==============  ===================================================================================================

Non-finite floats are written as the strings "nan", "inf" and "-inf" so that every line stays valid JSON.

Display problems do not stop a run: a renderer error shows in the panel and once on the real stderr (not the
stream Rich redirects), a failing terminal (closed pipe) drops the display with one note there, and a failing
event log (full disk) stops the log the same way. In strict mode (``strict=True``, or ``STREAMQ_DISPLAY_STRICT=1``
in the environment, which the tests set) any display error raises ``DisplayError`` in the run instead.

Several ranks: only rank 0 displays. Other ranks' progress reaches rank 0's reporter through
``experts(block, solved, total, rank=r)``, which the panel sums and, with more than one rank, lists per rank.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Literal, Protocol

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.segment import Segments
from rich.table import Table
from rich.text import Text

Stage = Literal["load", "calibrate", "solve", "write", "propagate"]
DisplayMode = Literal["auto", "rich", "plain", "none"]
RunStatus = Literal["ok", "failed", "interrupted"]
BlockKind = Literal["dense", "moe"]

EVENTS_FILENAME = "streamq_events.jsonl"
STRICT_ENV = "STREAMQ_DISPLAY_STRICT"
# The ETA averages the last few blocks of each kind: DeepSeek's first blocks are dense and much faster than the
# MoE blocks that follow, so one average over all blocks would promise too early a finish for a long time.
ETA_RECENT_BLOCKS = 5
RECENT_WARNINGS = 3  # warnings whose text the panel keeps on screen
_WARNING_CHARS = 300  # a warning longer than this is cut in the panel (the scrolled line and the log keep it whole)
_REFRESH_PER_SECOND = 2
# Lines that scroll above the live panel; stage changes and skipped blocks only update the panel.
_SCROLLED_EVENTS = frozenset({"run_start", "block_done", "warning", "error", "run_end"})
_EVENT_STYLES = {"warning": "yellow", "error": "bold red"}


class DisplayError(RuntimeError):
    """The progress display failed, in strict mode (where that must fail the run)."""


# --------------------------------------------------------------------------------------------------------------------
# State: what the panel and the log lines show, updated by the Reporter's events


@dataclass(frozen=True)
class TokenStats:
    min: int
    median: float
    max: int
    zero: int  # experts that received no calibration token


@dataclass
class BlockProgress:
    block: int
    started: float  # monotonic clock
    stage: str = "load"
    solved: dict[int, int] = field(default_factory=dict)  # rank -> experts solved
    totals: dict[int, int] = field(default_factory=dict)  # rank -> experts assigned
    tokens: TokenStats | None = None
    fallbacks: int = 0

    @property
    def experts_solved(self) -> int:
        return sum(self.solved.values())

    @property
    def experts_total(self) -> int:
        return sum(self.totals.values())


@dataclass(frozen=True)
class RunEnd:
    status: RunStatus
    seconds: float
    rel_error_mean: float | None
    rel_error_max: float | None


@dataclass
class RunState:
    model: str = ""
    out: str = ""
    total_blocks: int = 0
    experts_per_block: int = 0
    calib_tokens: int = 0
    recipe: str = ""
    plan: str = ""  # the device-memory plan, one line
    moe_blocks: frozenset[int] = frozenset()
    started: float | None = None  # monotonic clock
    blocks_done: int = 0
    blocks_skipped: int = 0
    times: list[tuple[BlockKind, float]] = field(default_factory=list)  # blocks solved in this run, in order
    rel_errors: list[float] = field(default_factory=list)
    fallbacks: int = 0
    warnings: int = 0
    recent_warnings: deque[str] = field(default_factory=lambda: deque(maxlen=RECENT_WARNINGS))
    errors: int = 0
    current: BlockProgress | None = None
    last_block: int | None = None
    last_rel_error: float | None = None
    last_tokens: tuple[int, TokenStats] | None = None  # of the last block that had routed experts
    end: RunEnd | None = None

    @property
    def blocks_finished(self) -> int:
        return self.blocks_done + self.blocks_skipped

    @property
    def blocks_remaining(self) -> int:
        return max(self.total_blocks - self.blocks_finished, 0)

    @property
    def durations(self) -> list[float]:
        return [seconds for _, seconds in self.times]

    def kind(self, block: int) -> BlockKind:
        return "moe" if block in self.moe_blocks else "dense"

    def remaining_kinds(self) -> list[BlockKind]:
        """Kinds of the blocks still to do, the one in progress first (blocks are done in order)."""
        return [self.kind(b) for b in range(self.total_blocks - self.blocks_remaining, self.total_blocks)]

    def eta(self, now: float) -> float | None:
        elapsed = now - self.current.started if self.current is not None else 0.0
        return estimate_eta(self.times, self.remaining_kinds(), elapsed)


# --------------------------------------------------------------------------------------------------------------------
# Pure helpers


def token_stats(counts: Sequence[int]) -> TokenStats | None:
    """Min, median and max calibration tokens over the experts of a block; None for a dense block."""
    if not counts:
        return None
    return TokenStats(min(counts), float(statistics.median(counts)), max(counts), sum(1 for c in counts if c == 0))


def estimate_eta(
    times: Sequence[tuple[str, float]], remaining: Sequence[str], current_elapsed: float = 0.0
) -> float | None:
    """Seconds until the last block is done. ``times``: (kind, seconds) of the blocks measured so far;
    ``remaining``: the kind of each block still to do, the one in progress first, of which ``current_elapsed``
    seconds have passed. Each remaining block costs the mean of the last ``ETA_RECENT_BLOCKS`` measured blocks of
    its kind, so dense and MoE blocks are priced apart. The elapsed time counts as at most the current block's
    estimate: the ETA runs down steadily between events and never goes below the blocks after the current one.
    None while a kind that remains has not been measured yet (no honest number exists then)."""
    if not remaining:
        return 0.0
    per_kind: dict[str, float] = {}
    for kind in set(remaining):
        recent = [seconds for k, seconds in times if k == kind][-ETA_RECENT_BLOCKS:]
        if not recent:
            return None
        per_kind[kind] = sum(recent) / len(recent)
    total = sum(per_kind[kind] for kind in remaining)
    return total - min(max(current_elapsed, 0.0), per_kind[remaining[0]])


def throughput(durations: Sequence[float], calib_tokens: int) -> tuple[float, float] | None:
    """(blocks per minute, tokens per second) over the recent blocks: every block sees all calibration tokens."""
    recent = durations[-ETA_RECENT_BLOCKS:]
    per_block = sum(recent) / len(recent) if recent else 0.0
    if per_block <= 0:
        return None
    return 60.0 / per_block, calib_tokens / per_block


def stage_label(stage: str, step: int | None, steps: int | None) -> str:
    """``calibrate pass 2/5``; a stage outside the passes, or the only pass, is just its name. ``steps`` None: the
    number of passes is not known yet (hybrid calibration plans them after its first pass)."""
    if step is None or (steps is not None and steps <= 1):
        return stage
    return f"{stage} pass {step}" + (f"/{steps}" if steps is not None else "")


def format_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "—"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def format_bytes(size: int | None) -> str:
    if size is None:
        return "—"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def format_error(value: float | None) -> str:
    return "—" if value is None else f"{value:.3g}"


def rss_from_statm(text: str, page_size: int) -> int:
    """Resident set size from /proc/self/statm, whose second field counts resident pages."""
    return int(text.split()[1]) * page_size


def rss_bytes() -> int | None:
    """This process's resident memory: psutil when installed, else /proc (Linux), else None."""
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        pass
    try:
        return rss_from_statm(Path("/proc/self/statm").read_text(), os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError, IndexError):
        return None


def peak_rss_bytes() -> int | None:
    """The most resident memory this process has had (Linux and macOS count ru_maxrss differently)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def gpu_peak_bytes() -> int | None:
    """Peak allocated CUDA memory of the current device, or None without CUDA.

    Only asked when the run has already imported torch and initialised CUDA: the panel must not pull torch in or
    create a CUDA context (hundreds of MB of device memory) for a CPU run.
    """
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    try:
        if not torch.cuda.is_initialized():
            return None
        return int(torch.cuda.max_memory_allocated())
    except Exception:  # a broken driver must not break the display
        return None


def _nan_max(values: Sequence[float]) -> float | None:
    """The largest value, NaN when any is NaN (``max`` would depend on where the NaN is)."""
    if not values:
        return None
    return math.nan if any(math.isnan(v) for v in values) else max(values)


def json_safe(value: Any) -> Any:
    """``value`` with non-finite floats as strings: json.dumps would write NaN, which strict parsers reject."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Path):
        return str(value)
    return value


def _clock_text(wall_time: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(wall_time))


def _block_position(state: RunState) -> str:
    return f"{state.blocks_finished}/{state.total_blocks}"


def _short(message: str) -> str:
    return message if len(message) <= _WARNING_CHARS else message[: _WARNING_CHARS - 1] + "…"


# --------------------------------------------------------------------------------------------------------------------
# Plain log lines


def plain_line(event: str, fields: dict[str, Any], state: RunState, eta: float | None) -> str | None:
    """The log line (without timestamp) that plain mode prints for an event, or None for events it leaves to
    the JSONL log (per-expert progress and fallbacks: a block done line carries their totals)."""
    match event:
        case "run_start":
            return (
                f"streamq: {state.model} -> {state.out} | {state.total_blocks} blocks, "
                f"{state.experts_per_block} experts per block, {state.calib_tokens:,} calibration tokens | "
                f"{state.recipe}" + (f" | {state.plan}" if state.plan else "")
            )
        case "block_skipped":
            return f"block {fields['block']} already done, skipped ({_block_position(state)})"
        case "stage":
            return f"block {fields['block']}: {stage_label(fields['stage'], fields.get('step'), fields.get('steps'))}"
        case "block_done":
            parts = [
                f"block {fields['block']} done in {format_duration(fields['seconds'])} ({_block_position(state)})",
                f"rel err {format_error(fields['rel_error'])}",
            ]
            if fields.get("tokens_min") is not None:
                parts.append(f"tokens/expert min {fields['tokens_min']:,} median {fields['tokens_median']:,.0f}")
            parts += [f"fallbacks {fields['fallbacks']}", f"ETA {format_duration(eta)}"]
            return " | ".join(parts)
        case "warning":
            return f"WARNING {fields['message']}"
        case "error":
            return f"ERROR {fields['message']}"
        case "run_end":
            return (
                f"run {fields['status']}: {fields['blocks_done']} blocks done, {fields['blocks_skipped']} "
                f"skipped, in {format_duration(fields['seconds'])} | fallbacks {fields['fallbacks']} | "
                f"warnings {fields['warnings']} | rel err mean {format_error(fields['rel_error_mean'])} "
                f"max {format_error(fields['rel_error_max'])}"
            )
    return None


# --------------------------------------------------------------------------------------------------------------------
# Rich panel


@dataclass(frozen=True)
class SystemStats:
    rss: int | None
    gpu_peak: int | None

    @classmethod
    def read(cls) -> SystemStats:
        return cls(rss=rss_bytes(), gpu_peak=gpu_peak_bytes())


def render_panel(state: RunState, now: float, system: SystemStats) -> Panel:
    """The live panel for ``state`` at monotonic time ``now``; once the run has ended, its summary."""
    if state.end is not None:
        return render_summary(state, state.end, system)
    current = state.current
    block_elapsed = now - current.started if current else 0.0
    run_elapsed = now - state.started if state.started is not None else 0.0
    # Speed of the MoE blocks once there is one: the few dense blocks at the start are no guide to the rest.
    speed = throughput([s for k, s in state.times if k == "moe"] or state.durations, state.calib_tokens)
    grid = _grid()
    grid.add_row("blocks", _progress_row(state, f"ETA {format_duration(state.eta(now))}"))
    grid.add_row("block", _current_block_text(state, block_elapsed))
    grid.add_row("experts", _experts_text(current))
    grid.add_row("tokens/expert", _tokens_text(state))
    grid.add_row("quality", f"last rel err {format_error(state.last_rel_error)}   fallbacks {state.fallbacks}")
    grid.add_row("warnings", _warnings_text(state))
    grid.add_row("speed", f"{speed[0]:.2f} blocks/min   {speed[1]:,.0f} tok/s" if speed else "—")
    grid.add_row(
        "memory",
        f"GPU peak {format_bytes(system.gpu_peak)}   RSS {format_bytes(system.rss)}   "
        f"elapsed {format_duration(run_elapsed)}" + (f"\n{state.plan}" if state.plan else ""),
    )
    return Panel(grid, title=_title(state), subtitle=Text(state.recipe) if state.recipe else None, expand=False)


def render_summary(state: RunState, end: RunEnd, system: SystemStats) -> Panel:
    """What stays on screen after the run: how it ended, and the totals."""
    style = {"ok": "green", "failed": "bold red", "interrupted": "yellow"}[end.status]
    grid = _grid()
    grid.add_row("status", Text(f"run {end.status} in {format_duration(end.seconds)}", style=style))
    grid.add_row("blocks", _progress_row(state, f"{state.blocks_done} quantized in this run"))
    grid.add_row(
        "quality",
        f"rel err mean {format_error(end.rel_error_mean)}   max {format_error(end.rel_error_max)}   "
        f"fallbacks {state.fallbacks}",
    )
    grid.add_row("warnings", _warnings_text(state))
    grid.add_row("memory", f"GPU peak {format_bytes(system.gpu_peak)}   RSS peak {format_bytes(peak_rss_bytes())}")
    if end.status == "interrupted":
        grid.add_row("resume", "rerun the same command: finished blocks are kept")
    return Panel(grid, title=_title(state), subtitle=Text(state.recipe) if state.recipe else None, expand=False)


def _grid() -> Table:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()
    return grid


def _title(state: RunState) -> str:
    return f"streamq · {state.model} → {state.out}" if state.model else "streamq"


def _progress_row(state: RunState, tail: str) -> Table:
    resumed = f" ({state.blocks_skipped} resumed)" if state.blocks_skipped else ""
    row = Table.grid(padding=(0, 1))
    row.add_row(
        ProgressBar(total=max(state.total_blocks, 1), completed=state.blocks_finished, width=40),
        Text(_block_position(state) + resumed),
        Text(tail, style="cyan"),
    )
    return row


def _current_block_text(state: RunState, elapsed: float) -> Text:
    current = state.current
    if current is None:
        return Text("—")
    kind = "MoE" if state.kind(current.block) == "moe" else "dense"
    return Text(f"{current.block} ({kind})  {current.stage}  ({format_duration(elapsed)})")


def _experts_text(current: BlockProgress | None) -> Text:
    if current is None or not current.totals:
        return Text("—")
    text = f"{current.experts_solved}/{current.experts_total}"
    if len(current.totals) > 1:
        per_rank = "  ".join(f"r{r} {current.solved.get(r, 0)}/{t}" for r, t in sorted(current.totals.items()))
        text += f"   ({per_rank})"
    return Text(text)


def _tokens_text(state: RunState) -> Text:
    """The current block's routed tokens per expert, known once it is calibrated; until then the last block's."""
    current = state.current
    if current is not None and current.tokens is not None:
        block, stats = current.block, current.tokens
    elif state.last_tokens is not None:
        block, stats = state.last_tokens
    else:
        return Text("—")
    return Text(
        f"min {stats.min:,}   median {stats.median:,.0f}   max {stats.max:,}   without tokens {stats.zero}"
        f"   (block {block})"
    )


def _warnings_text(state: RunState) -> Text:
    text = Text(str(state.warnings))
    if state.warnings > len(state.recent_warnings):
        text.append(f"   (last {len(state.recent_warnings)} below; all in the event log)")
    for message in state.recent_warnings:
        text.append("\n! " + _short(message), style="yellow")
    return text


# --------------------------------------------------------------------------------------------------------------------
# Outputs


class _Notes:
    """Problems of the reporter itself, one line each, on the stderr the process had when the reporter was made:
    while the live panel runs, ``sys.stderr`` is Rich's redirect into the very display that may be failing."""

    def __init__(self) -> None:
        self._stream = sys.stderr
        self._said: set[str] = set()

    def once(self, key: str, message: str) -> None:
        if key not in self._said:
            self._said.add(key)
            self.write(message)

    def write(self, message: str) -> None:
        with suppress(Exception):
            self._stream.write(message + "\n")
            self._stream.flush()


class EventLog:
    """Appends one JSON object per line and flushes it at once, so the file survives a crash of the run."""

    def __init__(self, path: Path | None, notes: _Notes) -> None:
        self.path = path
        self._notes = notes
        self._file: IO[str] | None = None
        if path is not None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                self._file = path.open("a", encoding="utf-8")
            except OSError as exc:
                notes.write(f"streamq: cannot write the event log {path} ({exc}); continuing without it")

    def write(self, record: dict[str, Any]) -> None:
        if self._file is None:
            return
        try:
            self._file.write(json.dumps({k: json_safe(v) for k, v in record.items()}, default=str) + "\n")
            self._file.flush()
        except (OSError, ValueError) as exc:  # full disk, or the file was closed under us
            self._notes.write(f"streamq: the event log {self.path} stopped ({exc}); the run continues")
            self.close()

    def close(self) -> None:
        if self._file is not None:
            with suppress(OSError):
                self._file.close()
            self._file = None


class _Display(Protocol):
    def start(self) -> None: ...

    def show(self, event: str, line: str | None, wall_time: float) -> None: ...

    def stop(self) -> None: ...


class _PlainDisplay:
    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream

    def start(self) -> None:
        pass

    def show(self, event: str, line: str | None, wall_time: float) -> None:
        if line is not None:
            self._stream.write(f"{_clock_text(wall_time)} {line}\n")
            self._stream.flush()

    def stop(self) -> None:
        pass


class _RichDisplay:
    """The live panel; notable lines (blocks done, warnings) scroll above it so the history stays visible."""

    def __init__(self, console: Console, render: Callable[[], RenderableType]) -> None:
        self._console = console
        self._live = Live(
            get_renderable=render, console=console, refresh_per_second=_REFRESH_PER_SECOND, transient=False
        )

    def start(self) -> None:
        self._live.start()

    def show(self, event: str, line: str | None, wall_time: float) -> None:
        if event != "experts":
            # The panel follows each stage and block at once (and a scrolled line comes with the new panel, not
            # the last one drawn); the thousands of per-expert events of a block wait for Live's own thread,
            # which redraws a few times a second.
            self._live.refresh()
        if line is not None and event in _SCROLLED_EVENTS:
            style = _EVENT_STYLES.get(event)
            self._console.print(f"{_clock_text(wall_time)} {line}", style=style, markup=False, highlight=False)

    def stop(self) -> None:
        self._live.stop()


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty() and os.environ.get("TERM") != "dumb"
    except Exception:  # closed or exotic streams
        return False


def strict_from_environment() -> bool:
    return os.environ.get(STRICT_ENV, "") not in ("", "0")


# --------------------------------------------------------------------------------------------------------------------
# Reporter


class Reporter:
    """Receives the pipeline's progress events; see the module docstring for the outputs.

    ``display``: ``auto`` picks the live panel when ``stream`` is a terminal (or a ``console`` is given) and log
    lines otherwise; ``none`` writes the event log only. Ranks other than 0 never display. ``strict`` (default:
    the ``STREAMQ_DISPLAY_STRICT`` environment variable) makes any display error raise ``DisplayError``.
    """

    def __init__(
        self,
        events_path: Path | None,
        *,
        display: DisplayMode = "auto",
        rank: int = 0,
        console: Console | None = None,
        stream: IO[str] | None = None,
        wall_clock: Callable[[], float] = time.time,
        clock: Callable[[], float] = time.monotonic,
        strict: bool | None = None,
    ) -> None:
        self.state = RunState()
        self._notes = _Notes()
        self._log = EventLog(events_path, self._notes)
        self._wall_clock = wall_clock
        self._clock = clock
        self._strict = strict_from_environment() if strict is None else strict
        self._render_error: BaseException | None = None
        self._lock = threading.Lock()  # the panel renders from Rich's refresh thread
        self._ended = False
        stream = stream if stream is not None else sys.stdout
        mode = resolve_display(display, rank, stream, console is not None)
        self._display: _Display | None = None
        self._console: Console | None = None
        if mode == "plain":
            self._display = _PlainDisplay(stream)
        elif mode == "rich":
            self._console = console or Console(file=stream)
            self._display = _RichDisplay(self._console, self._render)

    # -- context manager --------------------------------------------------------------------------------------------

    def __enter__(self) -> Reporter:
        with self._guard_display():
            if self._display is not None:
                self._display.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self._ended:
            if exc_type is None:
                self.run_end("ok")
            elif issubclass(exc_type, KeyboardInterrupt):
                self.run_end("interrupted")
            else:
                # Logged, not displayed: the exception goes on to whoever prints it (the CLI, in one line), and
                # the same message twice on one screen reads as two errors.
                self._record_error(f"{exc_type.__name__}: {exc}", show=False)
                self.run_end("failed")
        self.close()

    def close(self) -> None:
        with self._guard_display():
            if self._display is not None:
                self._display.stop()
        self._display = None
        self._log.close()
        self._raise_if_display_failed()

    # -- events -----------------------------------------------------------------------------------------------------

    def run_start(
        self,
        *,
        model: str,
        out: str,
        total_blocks: int,
        experts_per_block: int,
        calib_tokens: int,
        recipe: str,
        settings: Mapping[str, Any] | None = None,
        moe_blocks: Collection[int] = (),
        plan: str = "",
    ) -> None:
        """The run begins: ``total_blocks`` counts every block of the model, including those a resumed run skips.
        ``recipe``: one line for people (see ``streamq.recipe.describe``); ``settings``: the full recipe for the
        event log; ``moe_blocks``: which blocks have routed experts (the ETA prices them apart); ``plan``: how
        device memory is shared out (shown with the memory figures)."""
        if not isinstance(recipe, str):
            raise TypeError(f"run_start: recipe must be the one-line description (str), not {type(recipe).__name__}")
        with self._lock:
            state = self.state
            state.model, state.out, state.recipe = str(model), str(out), recipe
            state.total_blocks, state.experts_per_block = total_blocks, experts_per_block
            state.calib_tokens, state.moe_blocks = calib_tokens, frozenset(moe_blocks)
            state.plan = plan
            state.started = self._clock()
        fields: dict[str, Any] = dict(
            model=str(model),
            out=str(out),
            total_blocks=total_blocks,
            experts_per_block=experts_per_block,
            calib_tokens=calib_tokens,
            recipe=recipe,
            plan=plan,
        )
        if settings is not None:
            fields["settings"] = dict(settings)
        self._emit("run_start", **fields, moe_blocks=sorted(state.moe_blocks))

    def block_skipped(self, block: int) -> None:
        """``block`` is already complete in OUT (resume) and is not quantized again."""
        with self._lock:
            self.state.blocks_skipped += 1
        self._emit("block_skipped", block=block)

    def stage(self, block: int, stage: Stage | str, *, step: int | None = None, steps: int | None = None) -> None:
        """``block`` enters ``stage``; inside the calibration passes, pass ``step`` (1-based) of ``steps``."""
        with self._lock:
            self._block(block).stage = stage_label(stage, step, steps)
        passes = {} if step is None else {"step": step, "steps": steps}
        self._emit("stage", block=block, stage=stage, **passes)

    def experts(self, block: int, solved: int, total: int, *, rank: int = 0) -> None:
        """``solved`` of the ``total`` experts that ``rank`` owns in ``block`` are done. Rank 0 calls this for
        every rank's numbers once it gathers them; the panel shows the sum."""
        with self._lock:
            progress = self._block(block)
            progress.solved[rank], progress.totals[rank] = solved, total
        self._emit("experts", block=block, solved=solved, total=total, rank=rank)

    def expert_tokens(self, block: int, counts: Sequence[int]) -> None:
        """Calibration tokens routed to each routed expert of ``block``."""
        stats = token_stats(counts)
        if stats is None:
            return
        with self._lock:
            self._block(block).tokens = stats
        self._emit(
            "expert_tokens",
            block=block,
            tokens_min=stats.min,
            tokens_median=stats.median,
            tokens_max=stats.max,
            experts_without_tokens=stats.zero,
        )

    def fallback(self, block: int, name: str, reason: str) -> None:
        """Tensor ``name`` was not solved by GPTQ but by the fallback (e.g. round-to-nearest), because ``reason``."""
        with self._lock:
            self._block(block).fallbacks += 1
            self.state.fallbacks += 1
        self._emit("fallback", block=block, name=name, reason=reason)

    def block_done(self, block: int, *, rel_error: float | None, seconds: float | None = None) -> None:
        """``block`` is written. ``rel_error``: its relative output error; ``seconds`` defaults to the time since
        the block's first event."""
        with self._lock:
            progress = self._block(block)
            elapsed = seconds if seconds is not None else self._clock() - progress.started
            state = self.state
            state.blocks_done += 1
            state.times.append((state.kind(block), elapsed))
            if rel_error is not None:
                state.rel_errors.append(rel_error)
            if progress.tokens is not None:
                state.last_tokens = (block, progress.tokens)
            state.last_block, state.last_rel_error, state.current = block, rel_error, None
        tokens = progress.tokens
        self._emit(
            "block_done",
            block=block,
            seconds=round(elapsed, 3),
            rel_error=rel_error,
            fallbacks=progress.fallbacks,
            tokens_min=tokens.min if tokens else None,
            tokens_median=tokens.median if tokens else None,
        )

    def warning(self, message: str) -> None:
        with self._lock:
            self.state.warnings += 1
            self.state.recent_warnings.append(message)
        self._emit("warning", message=message)

    def error(self, message: str) -> None:
        self._record_error(message, show=True)

    def run_end(self, status: RunStatus = "ok") -> None:
        with self._lock:
            state = self.state
            seconds = self._clock() - state.started if state.started is not None else 0.0
            # A NaN block error (a run with --allow-nonfinite) makes the mean and max NaN: never hidden.
            errors = list(state.rel_errors)
            mean = sum(errors) / len(errors) if errors else None
            state.end = RunEnd(status, seconds, mean, _nan_max(errors))
            self._ended = True
        self._emit(
            "run_end",
            status=status,
            blocks_done=state.blocks_done,
            blocks_skipped=state.blocks_skipped,
            seconds=round(seconds, 3),
            fallbacks=state.fallbacks,
            rel_error_mean=mean,
            rel_error_max=state.end.rel_error_max,
            warnings=state.warnings,
            errors=state.errors,
        )

    # -- internals --------------------------------------------------------------------------------------------------

    def _record_error(self, message: str, *, show: bool) -> None:
        with self._lock:
            self.state.errors += 1
        self._emit("error", show=show, message=message)

    def _block(self, block: int) -> BlockProgress:
        """The progress of ``block``; its first event starts it (the caller holds the lock)."""
        if self.state.current is None or self.state.current.block != block:
            self.state.current = BlockProgress(block=block, started=self._clock())
        return self.state.current

    def _emit(self, event: str, *, show: bool = True, **fields: Any) -> None:
        wall_time = self._wall_clock()
        self._log.write({"event": event, "time": round(wall_time, 3), **fields})
        self._raise_if_display_failed()
        if self._display is None or not show:
            return
        with self._lock:
            line = plain_line(event, fields, self.state, self.state.eta(self._clock()))
        # Displayed outside the lock: Rich's refresh thread holds its own lock while it calls _render.
        with self._guard_display():
            self._display.show(event, line, wall_time)
        self._raise_if_display_failed()

    def _render(self) -> RenderableType:
        """The panel, rendered to segments here rather than by Live: an exception inside Rich's rendering would
        kill its refresh thread and freeze the panel without a word. Runs in Rich's refresh thread too."""
        try:
            system = SystemStats.read()
            with self._lock:
                panel = render_panel(self.state, self._clock(), system)
            assert self._console is not None
            return Segments(list(self._console.render(panel, self._console.options)))
        except Exception as exc:
            self._display_failed(exc)
            return Group(
                Text(f"progress display error: {type(exc).__name__}: {exc}", style="bold red"),
                Text("the run goes on; its progress is in the event log"),
            )

    def _display_failed(self, exc: Exception) -> None:
        if self._strict:
            with self._lock:
                self._render_error = self._render_error or exc
            return
        where = f"; progress goes on in {self._log.path}" if self._log.path else ""
        self._notes.once("render", f"streamq: the progress panel failed ({type(exc).__name__}: {exc}){where}")

    def _raise_if_display_failed(self) -> None:
        error, self._render_error = self._render_error, None
        if error is not None:
            raise DisplayError(f"the progress display failed: {type(error).__name__}: {error}") from error

    @contextmanager
    def _guard_display(self) -> Iterator[None]:
        """A failing terminal (closed pipe) costs the display, with one note, not the run; in strict mode it
        raises instead."""
        try:
            yield
        except Exception as exc:
            if self._strict:
                raise DisplayError(f"the progress display failed: {type(exc).__name__}: {exc}") from exc
            self._notes.write(f"streamq: progress display disabled ({type(exc).__name__}: {exc}); see the event log")
            display, self._display = self._display, None
            if display is not None:
                with suppress(Exception):
                    display.stop()


def resolve_display(display: DisplayMode, rank: int, stream: IO[str], has_console: bool) -> DisplayMode:
    """The display actually used: ranks other than 0 stay silent, and ``auto`` follows the terminal."""
    if rank != 0:
        return "none"
    if display != "auto":
        return display
    return "rich" if has_console or _is_terminal(stream) else "plain"
