"""A tiktoken tokenizer shipped as Kimi-K2 ships its own (tiktoken.model + tokenizer_config.json + a Python file
holding the split pattern), loaded without running that file; built here from a small BPE the test writes."""

from __future__ import annotations

import base64
import json
import re
import sys
from pathlib import Path

import pytest
from test_formats_end_to_end import streamq_run

from streamq.data import load_token_batches, load_tokenizer
from streamq.data_config import DataConfig
from streamq.errors import StreamqError
from streamq.synth import SynthOptions, write_synthetic_checkpoint
from streamq.tiktoken_tokenizer import MAX_RUN, TiktokenTokenizer, split_long_runs
from streamq.tui import EVENTS_FILENAME

# Merges on top of the 256 single bytes, each made of two tokens ranked before it.
MERGES = [b"th", b"the", b" t", b" the", b"in", b"ing", b" a", b"an", b" an", b"and", b" and", b"ca", b"cat"]
SPECIAL = ["[BOS]", "[EOS]", "<|im_end|>", "<|im_user|>", "<|im_assistant|>", "<|im_system|>", "<|im_middle|>"]
# A split pattern in the style of Kimi-K2's (Han runs apart; class intersection, which tiktoken's regex supports).
PATTERN_FILE = '''
class TikTokenTokenizer:
    """Never imported by streamq: only pat_str is read, from the syntax tree."""

    pat_str = "|".join(
        [
            r"""[\\p{Han}]+""",
            r""" ?[\\p{L}&&[^\\p{Han}]]+""",
            r"""\\p{N}{1,3}""",
            r""" ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*""",
            r"""\\s+(?!\\S)""",
            r"""\\s+""",
        ]
    )

    def __init__(self):
        raise RuntimeError("streamq must not run the model's tokenizer code")
'''
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|im_{{ m.role }}|>{{ m.role }}<|im_middle|>{{ m.content }}<|im_end|>"
    "{% endfor %}"
)


def write_tokenizer(directory: Path, **config_changes: object) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    tokens = [bytes([b]) for b in range(256)] + MERGES
    lines = [f"{base64.b64encode(t).decode()} {rank}" for rank, t in enumerate(tokens)]
    (directory / "tiktoken.model").write_text("\n".join(lines) + "\n")
    (directory / "tokenization_test.py").write_text(PATTERN_FILE)
    first = len(tokens) + 3  # special ids above the BPE, with a gap as Kimi's reserved range has
    config = {
        "tokenizer_class": "TikTokenTokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_test.TikTokenTokenizer", None]},
        "bos_token": "[BOS]",
        "eos_token": {"content": "[EOS]", "special": True},
        "added_tokens_decoder": {str(first + i): {"content": t, "special": True} for i, t in enumerate(SPECIAL)},
        "chat_template": TEMPLATE,
    }
    config.update(config_changes)
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    (directory / "config.json").write_text(json.dumps({"vocab_size": 512}))
    return directory


def ids_of(directory: Path) -> dict[str, int]:
    config = json.loads((directory / "tokenizer_config.json").read_text())
    return {entry["content"]: int(i) for i, entry in config["added_tokens_decoder"].items()}


def load(directory: Path) -> TiktokenTokenizer:
    tokenizer = load_tokenizer(directory, warn=pytest.fail)
    assert isinstance(tokenizer, TiktokenTokenizer)
    return tokenizer


def test_text_is_split_by_the_model_pattern_and_merged_by_its_ranks(tmp_path: Path) -> None:
    directory = write_tokenizer(tmp_path / "tok")
    tokenizer = load(directory)
    rank = {t: 256 + i for i, t in enumerate(MERGES)}
    [ids] = tokenizer.encode(["the cat and 12345"])
    # "the" | " cat" | " and" | " " "12345" split as 123 and 45 (digits in threes), bytes where nothing merges.
    assert ids == [rank[b"the"], ord(" "), rank[b"cat"], rank[b" and"], ord(" "), *b"123", *b"45"]
    [han] = tokenizer.encode(["猫the"])
    assert han == [*"猫".encode(), rank[b"the"]]  # a Han run is its own piece: "the" merges apart from it
    assert tokenizer.encoding.decode(ids) == "the cat and 12345"


def test_special_tokens_in_text_become_their_ids(tmp_path: Path) -> None:
    directory = write_tokenizer(tmp_path / "tok")
    special = ids_of(directory)
    [ids] = load(directory).encode(["<|im_user|>the<|im_end|>"])
    assert ids == [special["<|im_user|>"], 256 + MERGES.index(b"the"), special["<|im_end|>"]]


def test_conversations_go_through_the_config_chat_template(tmp_path: Path) -> None:
    directory = write_tokenizer(tmp_path / "tok", add_bos_token=True)
    special = ids_of(directory)
    rows = [{"messages": [{"role": "user", "content": "the cat"}, {"role": "assistant", "content": "and"}]}] * 8
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    tokenizer = load(directory)
    rendered = tokenizer.render_chat(())
    assert rendered == "[BOS]"  # bos_token reaches the template as a variable
    batch = load_token_batches(DataConfig(source=str(data), num_samples=1, seq_len=20), directory)
    first = batch[0].tolist()
    # The template starts with BOS itself, so none is added in front of it.
    assert first[:6] == [special["[BOS]"], special["<|im_user|>"], *tokenizer.encode(["user"])[0]]
    assert special["<|im_middle|>"] in first and special["<|im_assistant|>"] in first
    assert first.count(special["[BOS]"]) == first.count(special["<|im_user|>"])


def test_bos_is_added_only_when_the_config_asks(tmp_path: Path) -> None:
    text = tmp_path / "t.txt"
    text.write_text("the cat and the cat " * 20)
    cfg = DataConfig(source=str(text), num_samples=1, seq_len=8, split="eval")  # the text's first window
    without = load_token_batches(cfg, write_tokenizer(tmp_path / "a"))
    with_bos = load_token_batches(cfg, write_tokenizer(tmp_path / "b", add_bos_token=True))
    bos = ids_of(tmp_path / "b")["[BOS]"]
    assert bos not in without.tolist()[0] and with_bos.tolist()[0][0] == bos


def test_long_runs_are_cut_and_their_bytes_kept() -> None:
    text = "a" * (2 * MAX_RUN + 5) + " b" + " " * (MAX_RUN + 1)
    pieces = split_long_runs(text)
    assert "".join(pieces) == text and len(pieces) == 4
    runs = [len(run) for piece in pieces for run in re.findall(r"\s+|\S+", piece)]
    assert max(runs) == MAX_RUN


@pytest.mark.parametrize(
    ("remove", "change", "message"),
    [
        ("tiktoken.model", {}, "tiktoken.model not found; the tokenizer's BPE ranks are in it"),
        ("tokenization_test.py", {}, "tokenization_test.py not found; it holds the tokenizer's split pattern"),
        (None, {"added_tokens_decoder": {}}, "no added_tokens_decoder"),
        (None, {"auto_map": {}}, "no auto_map.AutoTokenizer naming the tokenizer's Python file"),
        (None, {"added_tokens_decoder": {"5": {"content": "[BOS]"}}}, "has id 5, among the BPE's ids 0-268"),
        (None, {"bos_token": "<s>"}, "bos_token '<s>' is not one of the special tokens"),
    ],
)
def test_a_missing_or_broken_piece_is_named(
    tmp_path: Path, remove: str | None, change: dict[str, object], message: str
) -> None:
    directory = write_tokenizer(tmp_path / "tok", **change)
    if remove:
        (directory / remove).unlink()
    with pytest.raises(StreamqError) as error:
        load_tokenizer(directory, warn=pytest.fail)
    assert message in str(error.value)


def test_a_pattern_that_is_not_a_literal_is_refused_without_running_the_file(tmp_path: Path) -> None:
    directory = write_tokenizer(tmp_path / "tok")
    (directory / "tokenization_test.py").write_text("import os\npat_str = os.environ['PATTERN']\n")
    with pytest.raises(StreamqError, match="no pat_str assigned a string literal"):
        load_tokenizer(directory, warn=pytest.fail)


def test_without_the_tiktoken_package_the_fix_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = write_tokenizer(tmp_path / "tok")
    monkeypatch.setitem(sys.modules, "tiktoken", None)
    with pytest.raises(StreamqError, match=r"needs the tiktoken package: pip install 'streamq\[tiktoken\]'"):
        load_tokenizer(directory, warn=pytest.fail)


def test_the_vocabulary_check_still_applies(tmp_path: Path) -> None:
    directory = write_tokenizer(tmp_path / "tok")
    (directory / "config.json").write_text(json.dumps({"vocab_size": 260}))
    text = tmp_path / "t.txt"
    text.write_text("the cat and the cat " * 20)
    with pytest.raises(StreamqError, match="has vocab_size 260"):
        load_token_batches(DataConfig(source=str(text), num_samples=1, seq_len=8), directory)


@pytest.mark.slow
def test_run_calibrates_on_chat_data_through_the_tiktoken_tokenizer(tmp_path: Path) -> None:
    """`python -m streamq run` on a model that ships a tiktoken tokenizer: no fallback, the files carried to OUT."""
    tokenizer = write_tokenizer(tmp_path / "tok")
    opts = SynthOptions(preset="tiny", num_layers=3, experts=8, shards=2, source_format="bf16", tokenizer_dir=tokenizer)
    model = write_synthetic_checkpoint(tmp_path / "model", opts)
    turns = [[{"role": "user", "content": f"the cat {i}"}, {"role": "assistant", "content": "and"}] for i in range(200)]
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(json.dumps({"messages": t}) for t in turns) + "\n")
    out = tmp_path / "out"
    done = streamq_run(model, out, "--dataset", str(data), "--chat-template", "on")
    assert done.returncode == 0, done.stderr[-2000:]
    events = (out / EVENTS_FILENAME).read_text()
    assert "fallback tokenizer" not in events and "joined as plain text" not in events
    for name in ("tiktoken.model", "tokenization_test.py", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (tokenizer / name).read_bytes(), name
