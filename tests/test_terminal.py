"""`streamq run` as a user sees it: the real command in a pseudo-terminal of 120×40, its output read back through
a terminal emulator (pyte), screen by screen."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pexpect
import pyte
from conftest import streamq_env

ROOT = Path(__file__).resolve().parents[1]
COLUMNS, LINES = 120, 40


def run_in_terminal(model: Path, out: Path, *args: str) -> tuple[list[str], str, int]:
    """Every distinct screen the run drew (as text), the last one, and the exit status."""
    # STREAMQ_DISPLAY_STRICT: a renderer error fails the run (and this test) instead of a note.
    env = streamq_env(TERM="xterm-256color", STREAMQ_DISPLAY_STRICT="1")
    for name in ("COLUMNS", "LINES", "NO_COLOR"):
        env.pop(name, None)
    command = [
        "-m",
        "streamq",
        "run",
        str(model),
        str(out),
        "--num-samples",
        "4",
        "--seq-len",
        "32",
        "--device",
        "cpu",
        "--dtype",
        "float32",
        *args,
    ]
    child = pexpect.spawn(
        sys.executable, command, env=env, dimensions=(LINES, COLUMNS), encoding="utf-8", timeout=300, cwd=ROOT
    )
    screen = pyte.Screen(COLUMNS, LINES)
    stream = pyte.Stream(screen)
    screens: list[str] = []
    while True:
        try:
            stream.feed(child.read_nonblocking(size=1 << 16, timeout=300))
        except pexpect.EOF:
            break
        text = "\n".join(screen.display)
        if not screens or screens[-1] != text:
            screens.append(text)
    child.close()
    return screens, screens[-1] if screens else "", child.exitstatus


def panel_row(screen: str, label: str) -> str | None:
    """The text of the live panel's row ``label`` (``│ block   2 (MoE) ...│``), or None when not on screen."""
    match = re.search(rf"^│ {re.escape(label)}\s+(.*?)\s*│$", screen, re.MULTILINE)
    return match[1] if match else None


def test_the_live_panel_follows_the_run_and_leaves_a_summary(tiny_checkpoint: Path, tmp_path: Path) -> None:
    # A small Hessian budget splits each MoE block into 4 expert passes (16 experts of 512 KiB): stages to follow.
    screens, last, status = run_in_terminal(tiny_checkpoint, tmp_path / "out", "--hessian-budget-gb", "0.002")
    assert status == 0, last

    blocks = [row for s in screens if (row := panel_row(s, "block")) is not None]
    current = {int(row.split()[0]) for row in blocks if row != "—"}
    assert {2, 3} <= current, blocks  # the block number advances (dense blocks 0-1 may pass between two reads)
    moe_stages = {re.sub(r"\s+\([0-9.ms]+\)$", "", row) for row in blocks if "(MoE)" in row}
    assert any("calibrate pass" in s for s in moe_stages) and any("solve pass" in s for s in moe_stages), moe_stages
    assert len(moe_stages) >= 4, moe_stages  # the stage text changes within a block
    progress = {row.split("ETA")[0].split()[-1] for s in screens if (row := panel_row(s, "blocks")) and "ETA" in row}
    assert {"2/4", "3/4"} <= progress, progress
    assert any(re.search(r"ETA \d+\.\ds", panel_row(s, "blocks") or "") for s in screens)  # measured, not "—"

    # The warning's text (the synthetic model has no tokenizer) is on screen in the panel, not only in the log.
    assert any("│ warnings" in s and "! " in s and "has no tokenizer files" in s for s in screens)
    # The end: the summary panel stays, with the totals, and nothing reports a display error.
    assert panel_row(last, "status") is not None and panel_row(last, "status").startswith("run ok in")
    assert "4/4" in panel_row(last, "blocks")
    assert "rel err mean" in panel_row(last, "quality")
    recipe = "GPTQ W4 g128 sym, act-order, MSE scales, down projections refined, output Fisher, routed experts, 4×32"
    assert recipe in last
    assert f"wrote {tmp_path / 'out'}" in last
    assert not any("display error" in s for s in screens)
