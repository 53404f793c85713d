"""The installed ``streamq`` command: help texts, synth, and one-line errors instead of tracebacks."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TOKENIZER_DIR, needs_shared

from streamq.cli import main
from streamq.io.safetensors_stream import CheckpointReader
from streamq.synth import PRESETS


def streamq(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("streamq") or str(Path(sys.executable).with_name("streamq"))
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_help_lists_the_commands() -> None:
    out = streamq("--help")
    assert out.returncode == 0 and "synth" in out.stdout
    out = streamq("synth", "--help")
    assert out.returncode == 0 and "--preset" in out.stdout and "--tokenizer" in out.stdout


@pytest.mark.slow
def test_synth_writes_a_readable_sharded_checkpoint(tmp_path: Path) -> None:
    out = streamq("synth", str(tmp_path / "m"), "--shards", "3", "--layers", "3", "--dense-layers", "1")
    assert out.returncode == 0, out.stderr
    reader = CheckpointReader(tmp_path / "m")
    assert len(reader.shard_files) == 3
    assert reader.config.num_hidden_layers == 3 and reader.config.first_k_dense_replace == 1
    assert "model.layers.3.eh_proj.weight" in reader  # the MTP layer follows the decoder layers
    assert reader.config.fp8_block == (128, 128)


@needs_shared(TOKENIZER_DIR)
def test_synth_copies_the_tokenizer_and_sizes_the_vocabulary(tmp_path: Path) -> None:
    out = streamq("synth", str(tmp_path / "m"), "--tokenizer", str(TOKENIZER_DIR), "--no-mtp")
    assert out.returncode == 0, out.stderr
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    tok = json.loads((TOKENIZER_DIR / "tokenizer.json").read_text())
    assert cfg["vocab_size"] > max(tok["model"]["vocab"].values())
    assert (tmp_path / "m" / "tokenizer_config.json").is_file()
    assert cfg["num_nextn_predict_layers"] == 0


def cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """``streamq ARGS`` in this process, as the console script runs it: exit status and stderr."""
    monkeypatch.setattr(sys, "argv", ["streamq", *args])
    with pytest.raises(SystemExit) as exited:
        main()
    return exited.value.code, capsys.readouterr().err


def test_user_errors_are_one_line_without_traceback(tmp_path: Path, monkeypatch, capsys) -> None:
    code, err = cli(monkeypatch, capsys, "synth", str(tmp_path / "m"), "--preset", "huge")
    assert code == 2
    assert err.strip() == f"error: --preset huge: unknown; choose one of {', '.join(PRESETS)}"
    assert {"tiny", "v3", "v32", "v2-lite", "kimi-k2"} <= set(PRESETS)


def test_an_unreachable_hub_model_is_a_clear_error(tmp_path: Path, monkeypatch, capsys) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    code, err = cli(monkeypatch, capsys, "run", "nobody/no-such-model", str(tmp_path / "out"))
    assert code == 2
    assert "nobody/no-such-model: not in the local Hugging Face cache and the Hub is unreachable" in err
    assert "Traceback" not in err


def test_a_missing_model_directory_is_a_clear_error(tmp_path: Path, monkeypatch, capsys) -> None:
    code, err = cli(monkeypatch, capsys, "run", str(tmp_path / "nowhere"), str(tmp_path / "out"))
    assert code == 2 and "no such directory, and not a Hugging Face repo id" in err


def test_help_is_wrapped_not_cut_when_piped() -> None:
    # Piped (as into `less` or a CI log), every help text must be there whole, not cut with "…" at 80 columns.
    import typer.main

    from streamq.cli import app

    group = typer.main.get_command(app)
    assert set(group.commands) == {"synth", "run", "eval"}
    for name in [None, *group.commands]:
        out = streamq(*([name] if name else []), "--help")
        assert out.returncode == 0 and "…" not in out.stdout, out.stdout
        text = " ".join(out.stdout.split())
        command = group.commands[name] if name else group
        if name is None:  # each command's one-line help, whole in the list of commands
            assert all(c.get_short_help_str(limit=10**6) in text for c in group.commands.values()), text
        for param in command.params:
            if getattr(param, "help", None):
                assert " ".join(param.help.split()) in text, (name, param.name)


def test_an_error_inside_the_run_is_printed_once(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = streamq("run", str(tiny_checkpoint), str(out), "--method", "rtn", "--num-samples", "2", "--seq-len", "8")
    assert first.returncode == 0, first.stderr
    # The same OUT with another recipe is refused from inside the run (its progress display is already up).
    again = streamq("run", str(tiny_checkpoint), str(out), "--num-samples", "2", "--seq-len", "8", "--display", "plain")
    assert again.returncode == 2
    assert (again.stdout + again.stderr).count("holds a run with a different recipe") == 1
    assert "run failed" in again.stdout
    assert again.stderr.startswith("error: ")
