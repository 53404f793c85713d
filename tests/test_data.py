from __future__ import annotations

import itertools
import json
import random
import sys
from pathlib import Path

import pytest
import torch

from streamq import data
from streamq.data import (
    BYTE_BOS_ID,
    BYTE_OFFSET,
    ByteTokenizer,
    DataConfig,
    DataWarning,
    chunk_text,
    load_token_batches,
    split_rows,
    split_text,
    take_windows,
)
from streamq.errors import StreamqError

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
DEEPSEEK_TOKENIZER = SHARED / "fixtures" / "tokenizers" / "deepseek-v3"
SHAKESPEARE = SHARED / "fixtures" / "text" / "tinyshakespeare.txt"

needs_tokenizer = pytest.mark.skipif(
    not DEEPSEEK_TOKENIZER.is_dir(), reason=f"{DEEPSEEK_TOKENIZER} is absent (a fresh clone has no ../shared)"
)
needs_shakespeare = pytest.mark.skipif(
    not SHAKESPEARE.is_file(), reason=f"{SHAKESPEARE} is absent (a fresh clone has no ../shared)"
)

CHAT_ROWS = [
    {"messages": [{"role": "user", "content": "What is two plus two?"}, {"role": "assistant", "content": "Four."}]},
    {"messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]},
]


@pytest.fixture
def byte_model(tmp_path: Path) -> Path:
    """A model directory without tokenizer files, as a synthetic checkpoint has."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"vocab_size": 512}))
    return model


@pytest.fixture(scope="module")
def deepseek():
    if not DEEPSEEK_TOKENIZER.is_dir():
        pytest.skip(f"{DEEPSEEK_TOKENIZER} is absent (a fresh clone has no ../shared)")
    return data.load_tokenizer(DEEPSEEK_TOKENIZER, warn=_fail_on_warning)


def _fail_on_warning(message: str) -> None:
    raise AssertionError(f"unexpected warning: {message}")


def _write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _load(cfg: DataConfig, model: Path) -> tuple[torch.Tensor, list[str]]:
    warned: list[str] = []
    return load_token_batches(cfg, model, warn=warned.append), warned


# ---------------------------------------------------------------------------------------------------------------------
# Plain text


@needs_tokenizer
@needs_shakespeare
def test_txt_with_deepseek_tokenizer_is_deterministic_per_seed(deepseek) -> None:
    cfg = DataConfig(source=str(SHAKESPEARE), num_samples=6, seq_len=256, seed=3)
    first, warned = _load(cfg, DEEPSEEK_TOKENIZER)
    again, _ = _load(cfg, DEEPSEEK_TOKENIZER)
    other_seed, _ = _load(DataConfig(source=str(SHAKESPEARE), num_samples=6, seq_len=256, seed=4), DEEPSEEK_TOKENIZER)

    assert first.shape == (6, 256) and first.dtype == torch.int64
    assert warned == []
    assert torch.equal(first, again)
    assert not torch.equal(first, other_seed)
    # Real Shakespeare tokens, not bytes: every window decodes to text of the calibration part.
    head = split_text(SHAKESPEARE.read_text(), "calib", 0.1)
    for row in first:
        assert deepseek.tokenizer.decode(row.tolist(), skip_special_tokens=True) in head


@needs_tokenizer
@needs_shakespeare
def test_txt_eval_windows_come_from_the_held_out_tail_in_order(deepseek) -> None:
    text = SHAKESPEARE.read_text()
    head, tail = split_text(text, "calib", 0.1), split_text(text, "eval", 0.1)
    batch, _ = _load(DataConfig(source=str(SHAKESPEARE), num_samples=4, seq_len=128, split="eval"), DEEPSEEK_TOKENIZER)

    assert batch[0, 0].item() == deepseek.bos_id  # the held-out part is a document of its own
    decoded = [deepseek.tokenizer.decode(row.tolist(), skip_special_tokens=True) for row in batch]
    assert tail.startswith(decoded[0].lstrip("\n")) or decoded[0] in tail
    positions = [tail.find(d) for d in decoded[1:]]
    assert all(p >= 0 for p in positions) and positions == sorted(positions)
    assert not any(d in head for d in decoded)


@needs_shakespeare
def test_calib_and_eval_splits_are_disjoint(byte_model: Path) -> None:
    text = SHAKESPEARE.read_text()
    head, tail = split_text(text, "calib", 0.1), split_text(text, "eval", 0.1)
    calib, _ = _load(DataConfig(source=str(SHAKESPEARE), num_samples=64, seq_len=200, seed=1), byte_model)
    evals, _ = _load(DataConfig(source=str(SHAKESPEARE), num_samples=64, seq_len=200, split="eval"), byte_model)

    assert head + tail == text
    assert len(tail) == pytest.approx(0.1 * len(text), abs=100)
    for row in calib:
        window = ByteTokenizer.decode(row.tolist())
        assert window in head and window not in tail
    for row in evals:
        window = ByteTokenizer.decode(row.tolist())
        assert window in tail and window not in head


def test_builtin_text_with_byte_fallback_warns_and_repeats(byte_model: Path) -> None:
    batch, warned = _load(DataConfig(source="builtin", num_samples=40, seq_len=256), byte_model)

    assert batch.shape == (40, 256)
    assert int(batch.max()) < 256 + BYTE_OFFSET
    assert batch[0].tolist() != batch[1].tolist()
    assert any("byte-level fallback" in w and str(byte_model) in w for w in warned)
    assert any("repeating them to fill 40" in w for w in warned)
    assert "Netherfield" in ByteTokenizer.decode(batch.flatten().tolist())


def test_byte_fallback_warns_through_warnings_by_default(byte_model: Path) -> None:
    with pytest.warns(DataWarning, match="byte-level fallback"):
        load_token_batches(DataConfig(num_samples=1, seq_len=64), byte_model)


# ---------------------------------------------------------------------------------------------------------------------
# Records


def test_jsonl_text_rows_are_packed_with_bos_per_document(tmp_path: Path, byte_model: Path) -> None:
    rows = [{"text": f"document {i} " + "x" * 20} for i in range(50)]
    path = _write_jsonl(tmp_path / "docs.jsonl", [*rows, {"text": ""}])
    batch, _ = _load(DataConfig(source=str(path), num_samples=4, seq_len=100, seed=0), byte_model)

    stream = batch.flatten().tolist()
    assert batch.shape == (4, 100)
    starts = [i for i, t in enumerate(stream) if t == BYTE_BOS_ID]
    # Documents are whole and back to back: each BOS is followed by one complete row of the file.
    assert len(starts) >= 10
    for a, b in itertools.pairwise(starts):
        assert {"text": ByteTokenizer.decode(stream[a + 1 : b])} in rows


def test_jsonl_calibration_order_depends_on_seed_and_excludes_held_out_rows(tmp_path: Path, byte_model: Path) -> None:
    rows = [{"text": f"row{i:03d};"} for i in range(100)]
    path = _write_jsonl(tmp_path / "docs.jsonl", rows)

    def first_sample(cfg: DataConfig) -> str:
        return ByteTokenizer.decode(_load(cfg, byte_model)[0][0].tolist())

    seen = {seed: first_sample(DataConfig(source=str(path), num_samples=1, seq_len=300, seed=seed)) for seed in (0, 1)}
    held_out = first_sample(DataConfig(source=str(path), num_samples=1, seq_len=60, split="eval"))

    assert seen[0] != seen[1]
    assert not any(f"row{i:03d}" in seen[0] + seen[1] for i in range(90, 100))
    assert held_out.startswith("row090;row091;")


@needs_tokenizer
def test_jsonl_chat_rows_go_through_the_deepseek_chat_template(tmp_path: Path, deepseek) -> None:
    path = _write_jsonl(tmp_path / "chat.jsonl", CHAT_ROWS * 100)
    batch, warned = _load(DataConfig(source=str(path), num_samples=2, seq_len=64, split="eval"), DEEPSEEK_TOKENIZER)

    ids = batch.flatten().tolist()
    user, assistant, eos = (
        deepseek.tokenizer.convert_tokens_to_ids(t) for t in ("<｜User｜>", "<｜Assistant｜>", "<｜end▁of▁sentence｜>")
    )
    assert warned == []
    assert user in ids and assistant in ids and eos in ids
    assert ids[0] == deepseek.bos_id
    # The template writes BOS itself; packing must not add a second one.
    assert all(not (a == b == deepseek.bos_id) for a, b in itertools.pairwise(ids))
    expected = deepseek.encode([deepseek.render_chat(data.row_to_document(CHAT_ROWS[0], "row"))])[0]
    assert ids[: len(expected)] == expected


@needs_tokenizer
def test_sharegpt_rows_with_system_column_match_role_content_rows(tmp_path: Path, deepseek) -> None:
    sharegpt = {
        "system": "Be brief.",
        "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}],
    }
    openai = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
        ]
    }
    cfg = {"num_samples": 1, "seq_len": 8, "split": "eval"}
    a, _ = _load(DataConfig(source=str(_write_jsonl(tmp_path / "a.jsonl", [sharegpt] * 30)), **cfg), DEEPSEEK_TOKENIZER)
    b, _ = _load(DataConfig(source=str(_write_jsonl(tmp_path / "b.jsonl", [openai] * 30)), **cfg), DEEPSEEK_TOKENIZER)
    assert torch.equal(a, b)
    assert "Be brief.<｜User｜>Hi<｜Assistant｜>Hello" in deepseek.tokenizer.decode(a[0].tolist())


@needs_tokenizer
def test_chat_template_off_joins_contents_as_text(tmp_path: Path, deepseek) -> None:
    path = _write_jsonl(tmp_path / "chat.jsonl", CHAT_ROWS * 20)
    batch, _ = _load(
        DataConfig(source=str(path), num_samples=1, seq_len=16, split="eval", chat_template="off"), DEEPSEEK_TOKENIZER
    )
    text = deepseek.tokenizer.decode(batch[0].tolist())
    assert "<｜User｜>" not in text
    assert "What is two plus two?\n\nFour." in text


def test_conversations_without_template_are_flattened_with_a_warning_or_refused(
    tmp_path: Path, byte_model: Path
) -> None:
    path = _write_jsonl(tmp_path / "chat.jsonl", CHAT_ROWS * 5)
    batch, warned = _load(DataConfig(source=str(path), num_samples=1, seq_len=40, split="calib"), byte_model)
    assert "\n\n" in ByteTokenizer.decode(batch[0].tolist())
    assert any("joined as plain text" in w and "no chat template" in w for w in warned)

    with pytest.raises(StreamqError, match=r"chat_template is 'on'.*no chat template"):
        _load(DataConfig(source=str(path), num_samples=1, seq_len=40, chat_template="on"), byte_model)


def test_instruction_output_rows_become_conversations() -> None:
    row = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5", "data_source": "x"}
    assert data.row_to_document(row, "row 1") == (
        data.Message("user", "Add the numbers.\n\n2 and 3"),
        data.Message("assistant", "5"),
    )


def test_parquet_rows(tmp_path: Path, byte_model: Path) -> None:
    pa = pytest.importorskip("pyarrow", reason="pyarrow is not installed (optional: pip install pyarrow)")
    import pyarrow.parquet as pq

    texts = [f"parquet row {i}." for i in range(40)]
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": texts, "id": list(range(40))}), path, row_group_size=7)
    batch, _ = _load(DataConfig(source=str(path), num_samples=2, seq_len=50, split="eval"), byte_model)

    decoded = ByteTokenizer.decode(batch.flatten().tolist())
    assert decoded.startswith("parquet row 36.")  # rows 36..39 are the held-out 10%
    assert "parquet row 35." not in decoded


def test_parquet_without_pyarrow_says_how_to_install_it(
    tmp_path: Path, byte_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    path = tmp_path / "docs.parquet"
    path.write_bytes(b"PAR1 not really")
    with pytest.raises(StreamqError, match=r"docs\.parquet needs pyarrow; run `pip install pyarrow`"):
        _load(DataConfig(source=str(path), num_samples=1, seq_len=8), byte_model)


# ---------------------------------------------------------------------------------------------------------------------
# Hub datasets


def _fake_hub(
    monkeypatch: pytest.MonkeyPatch, cached: Path | None = None, error: Exception | None = None
) -> list[dict]:
    import huggingface_hub
    from huggingface_hub import constants

    calls: list[dict] = []

    def fake_download(repo_id: str, filename: str, **kwargs: object) -> str:
        calls.append({"repo_id": repo_id, "filename": filename, **kwargs})
        if cached is not None and kwargs.get("local_files_only"):
            return str(cached)
        raise error or FileNotFoundError("not in the cache")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return calls


def test_hub_dataset_offline_is_one_clear_line(monkeypatch: pytest.MonkeyPatch, byte_model: Path) -> None:
    calls = _fake_hub(monkeypatch)
    monkeypatch.setattr(data, "_hub_unreachable_reason", lambda endpoint: "cannot resolve huggingface.co")
    with pytest.raises(StreamqError) as info:
        _load(DataConfig(source="open-platypus", num_samples=1, seq_len=8), byte_model)

    message = str(info.value)
    assert "\n" not in message
    assert "'open-platypus' (garage-bAInd/Open-Platypus" in message
    assert "cannot resolve huggingface.co" in message and "pass a local .txt, .jsonl or .parquet file" in message
    assert [c.get("local_files_only") for c in calls] == [True]  # no network attempt after a failed look-up


def test_hub_download_failure_names_the_dataset(monkeypatch: pytest.MonkeyPatch, byte_model: Path) -> None:
    calls = _fake_hub(monkeypatch, error=OSError("502 Bad Gateway\nlong body"))
    monkeypatch.setattr(data, "_hub_unreachable_reason", lambda endpoint: None)
    with pytest.raises(StreamqError, match=r"^dataset 'fineweb-edu' .*could not be downloaded: 502 Bad Gateway; pass"):
        _load(DataConfig(source="fineweb-edu", num_samples=1, seq_len=8), byte_model)
    assert calls[-1]["repo_id"] == "HuggingFaceFW/fineweb-edu" and calls[-1]["repo_type"] == "dataset"


def test_cached_hub_dataset_is_used_without_network(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, byte_model: Path
) -> None:
    cached = _write_jsonl(tmp_path / "cached.jsonl", [{"text": "cached row. " * 5}] * 10)
    _fake_hub(monkeypatch, cached=cached)
    monkeypatch.setattr(data, "_hub_unreachable_reason", lambda endpoint: pytest.fail("network was probed"))
    batch, _ = _load(DataConfig(source="open-thoughts", num_samples=1, seq_len=20, split="eval"), byte_model)
    assert ByteTokenizer.decode(batch[0].tolist()).startswith("cached row.")


def test_hub_probe_reports_unresolvable_hosts(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in data._PROXY_VARS:
        monkeypatch.delenv(var, raising=False)
    assert "cannot resolve no-such-host.invalid" in data._hub_unreachable_reason("https://no-such-host.invalid")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")
    assert data._hub_unreachable_reason("https://no-such-host.invalid") is None


# ---------------------------------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize(
    ("name", "content", "pattern"),
    [
        ("missing.txt", None, r"dataset file .*missing\.txt not found; pass an existing file or one of the names"),
        ("empty.txt", "", r"dataset file .*empty\.txt is empty"),
        ("blank.txt", " \n\n\t", r"blank\.txt has no text \(only whitespace\)"),
        ("blank.jsonl", "\n\n", r"blank\.jsonl has no rows \(only blank lines\)"),
        ("data.csv", "a,b\n", r"dataset .*data\.csv: unsupported file type '\.csv'; pass a \.txt, \.jsonl, \.parquet"),
        ("row.jsonl", '{"title": "x"}\n', r"row\.jsonl line 1: no 'text', 'messages'.*\(found: title\)"),
        ("bad.jsonl", '{"text": "ok"}\n{"text": \n', r"bad\.jsonl line 2: invalid JSON"),
        ("list.jsonl", "[1, 2]\n", r"list\.jsonl line 1: expected a JSON object, got list"),
        ("msg.jsonl", '{"messages": [{"role": "user"}, 3]}\n', r"msg\.jsonl line 1, messages\[1\]: expected an object"),
        ("small.txt", "only a few words here", r"small\.txt \(calib split\): found \d+ tokens but one sample needs 64"),
        ("latin1.txt", b"caf\xe9 " * 10, r"latin1\.txt is not UTF-8 text"),
    ],
)
def test_errors_name_the_file_and_the_fix(
    tmp_path: Path, byte_model: Path, name: str, content: str | bytes | None, pattern: str
) -> None:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(StreamqError, match=pattern) as info:
        _load(DataConfig(source=str(path), num_samples=2, seq_len=64), byte_model)
    assert "\n" not in str(info.value)


def test_too_little_text_counts_found_and_needed_tokens(tmp_path: Path, byte_model: Path) -> None:
    path = tmp_path / "short.txt"
    path.write_text("x" * 1000)  # 100 held-out bytes and BOS
    with pytest.raises(StreamqError, match=r"short\.txt \(eval split\): found 101 tokens but one sample needs 128"):
        _load(DataConfig(source=str(path), num_samples=1, seq_len=128, split="eval"), byte_model)


def test_model_directory_problems(tmp_path: Path) -> None:
    with pytest.raises(StreamqError, match=r"model directory .*nowhere not found"):
        load_token_batches(DataConfig(), tmp_path / "nowhere")
    small = tmp_path / "small"
    small.mkdir()
    (small / "config.json").write_text('{"vocab_size": 100}')
    with pytest.raises(StreamqError, match=r"vocab_size 100 is too small for the byte-level fallback"):
        load_token_batches(DataConfig(), small)


@needs_tokenizer
def test_tokenizer_larger_than_the_model_vocabulary_is_refused(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model / name).write_bytes((DEEPSEEK_TOKENIZER / name).read_bytes())
    (model / "config.json").write_text('{"vocab_size": 1000}')
    with pytest.raises(StreamqError, match=r"produced id \d+ but .*config\.json has vocab_size 1000"):
        load_token_batches(DataConfig(num_samples=2, seq_len=256), model)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"num_samples": 0}, "num_samples and seq_len must be >= 1"),
        ({"split": "test"}, "split must be 'calib' or 'eval'"),
        ({"chat_template": "yes"}, "chat_template must be 'auto', 'on' or 'off'"),
        ({"eval_fraction": 1.0}, "eval_fraction must be between 0 and 1"),
    ],
)
def test_data_config_validation(kwargs: dict, pattern: str) -> None:
    with pytest.raises(StreamqError, match=pattern):
        DataConfig(**kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# Pure helpers


def test_split_text_cuts_between_words() -> None:
    text = "alpha beta gamma delta epsilon zeta eta theta iota kappa"
    head, tail = split_text(text, "calib", 0.2), split_text(text, "eval", 0.2)
    assert head + tail == text
    assert head.endswith(" ") and not tail.startswith(" ")
    assert tail == "iota kappa"


def test_split_rows_keeps_at_least_one_calibration_row() -> None:
    assert split_rows(100, "calib", 0.1) == range(90)
    assert split_rows(100, "eval", 0.1) == range(90, 100)
    assert split_rows(1, "calib", 0.1) == range(1)
    assert len(split_rows(1, "eval", 0.1)) == 0


def test_chunk_text_cuts_after_line_ends_and_keeps_everything() -> None:
    lines = "".join(f"line {i}\n" for i in range(1000))
    pieces = chunk_text(lines, 100)
    assert "".join(pieces) == lines
    assert all(len(p) <= 100 and p.endswith("\n") for p in pieces)
    assert chunk_text("x" * 250, 100) == ["x" * 100, "x" * 100, "x" * 50]  # no line end: cut anyway


def test_take_windows_picks_distinct_windows_and_repeats_only_when_short() -> None:
    stream = torch.arange(100)
    cfg = DataConfig(num_samples=5, seq_len=10)
    picked = take_windows(stream, cfg, "s", random.Random(0), _fail_on_warning)
    assert picked.shape == (5, 10)
    assert len({int(row[0]) for row in picked}) == 5
    assert all(int(row[0]) % 10 == 0 and torch.equal(row, torch.arange(row[0], row[0] + 10)) for row in picked)
    assert torch.equal(take_windows(stream, cfg, "s", None, _fail_on_warning)[:, 0], torch.arange(0, 50, 10))

    warned: list[str] = []
    repeated = take_windows(torch.arange(25), cfg, "s", None, warned.append)
    assert repeated[:, 0].tolist() == [0, 10, 0, 10, 0]
    assert warned == [
        "s: 25 tokens make only 2 sample(s) of 10 tokens, repeating them to fill 5; "
        "pass more text or fewer samples for a meaningful result"
    ]
