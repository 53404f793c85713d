"""Calibration and evaluation token batches.

``load_token_batches`` turns a text source into an int64 tensor ``[num_samples, seq_len]``. Every row is exactly
``seq_len`` real tokens: documents are tokenized, each preceded by BOS when the tokenizer config asks for it,
concatenated and cut, so no padding and no attention mask are needed downstream.

Sources
    * ``builtin``: a few KB of public-domain English shipped in ``streamq/assets/builtin.txt`` (the first chapter
      of Jane Austen's *Pride and Prejudice* (1813), the opening sentence of Dickens' *A Tale of Two Cities* (1859)
      and Lincoln's Gettysburg Address (1863)). It exists so that the demo and a fresh clone work without network
      or dataset; it is far too small for a real calibration.
    * a ``.txt`` file: plain text, one continuous document.
    * a ``.jsonl`` or ``.parquet`` file: one document per row, from the first of these that the row has:
      ``messages`` or ``conversations`` (lists of ``{role, content}`` or ``{from, value}``; a ``system`` column
      becomes the first message), ``text``, or ``instruction``/``input``/``output`` (Alpaca style).
    * ``open-thoughts``, ``open-platypus``, ``fineweb-edu``: one file of the public Hugging Face dataset (see
      ``HUB_DATASETS``), downloaded into the Hugging Face cache.

Held-out split
    The first ``1 - eval_fraction`` of a source (characters of a text file, rows of a record file) is the
    calibration split and the rest the evaluation split, so perplexity is never measured on calibration text.
    Calibration samples depend on the seed; evaluation samples are always the first windows of the held-out
    part, so that perplexities of different runs are comparable.

Too little text
    Fewer tokens than one sample is an error that says how many were found. Enough for at least one sample but
    fewer than ``num_samples`` windows: the windows are repeated to fill the batch and a warning says so. A
    demo on the built-in text needs this; a real run should see the warning and pass more text.

Tokenizer
    The model directory's tokenizer (``AutoTokenizer``; conversations through its chat template), or, for a
    tiktoken BPE shipped with Python code (Kimi-K2's ``tiktoken.model``), the ``tiktoken`` package with the
    model's ranks, split pattern, special tokens and chat template, read as data (streamq/tiktoken_tokenizer.py).
    When the directory has no tokenizer files at all (a synthetic checkpoint), a byte-level fallback is used and
    a warning says so: token id = UTF-8 byte + ``BYTE_OFFSET``, with ids 0, 1, 2 reserved for BOS, EOS and padding
    (DeepSeek's own BOS/EOS ids). It needs a vocabulary of at least 259 ids and its activations look nothing like
    those of real text, so it is only good for exercising the pipeline.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
import random
import re
import socket
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

import torch

from streamq.data_config import BUILTIN, ChatTemplateMode, DataConfig, Split
from streamq.errors import StreamqError
from streamq.tiktoken_tokenizer import is_tiktoken_dir, load_tiktoken_tokenizer

WarnFn = Callable[[str], None]

BUILTIN_PATH = Path(__file__).resolve().parent / "assets" / "builtin.txt"
SUPPORTED_SUFFIXES = (".txt", ".jsonl", ".parquet")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tiktoken.model", "tokenizer_config.json")

BYTE_OFFSET = 3
BYTE_BOS_ID = 0

# Text files are tokenized in pieces cut at line ends: one multi-megabyte string would use a single core, and the
# pieces go through the fast tokenizer's batch encoder in parallel.
_TEXT_PIECE_CHARS = 1 << 16
# Rows of a .jsonl file visited together; for .parquet the unit is the file's row group.
_JSONL_BLOCK_ROWS = 1024
_ENCODE_BATCH_DOCS = 64
_RECORD_COLUMNS = ("messages", "conversations", "system", "text", "instruction", "input", "output")
_ROLE_ALIASES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant"}
_WHITESPACE = re.compile(r"\s")
_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


class DataWarning(UserWarning):
    """Something about the data that the user should know but that does not stop the run."""


@dataclass(frozen=True)
class HubDataset:
    repo_id: str
    filename: str  # one file of the dataset: enough text for calibration without fetching the whole repository


HUB_DATASETS: dict[str, HubDataset] = {
    # Reasoning traces: {system, conversations: [{from, value}]}, ~250 MB.
    "open-thoughts": HubDataset("open-thoughts/OpenThoughts-114k", "data/train-00000-of-00006.parquet"),
    # STEM and logic instructions: {instruction, input, output}, ~16 MB.
    "open-platypus": HubDataset("garage-bAInd/Open-Platypus", "data/train-00000-of-00001-4fe2df04669d1669.parquet"),
    # Educational web pages: {text}, ~2 GB.
    "fineweb-edu": HubDataset("HuggingFaceFW/fineweb-edu", "sample/10BT/000_00000.parquet"),
}


@dataclass(frozen=True)
class Message:
    role: str
    content: str


Conversation = tuple[Message, ...]
Document = str | Conversation


class TextTokenizer(Protocol):
    """The little that packing needs from a tokenizer."""

    @property
    def name(self) -> str: ...

    @property
    def bos_id(self) -> int | None:
        """Prepended to every document; None when the tokenizer config does not ask for BOS."""

    @property
    def bos_text(self) -> str | None:
        """BOS as text, to see whether a rendered chat template already starts with it."""

    @property
    def has_chat_template(self) -> bool: ...

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, without special tokens added."""

    def render_chat(self, conversation: Conversation) -> str: ...


@dataclass(frozen=True)
class ByteTokenizer:
    """The fallback for model directories without tokenizer files (see the module docstring)."""

    name: str = "byte-level fallback"
    bos_id: int | None = BYTE_BOS_ID
    bos_text: str | None = None
    has_chat_template: bool = False

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        return [[b + BYTE_OFFSET for b in text.encode("utf-8")] for text in texts]

    def render_chat(self, conversation: Conversation) -> str:
        raise NotImplementedError("the byte-level fallback has no chat template")

    @staticmethod
    def decode(ids: Sequence[int]) -> str:
        return bytes(i - BYTE_OFFSET for i in ids if i >= BYTE_OFFSET).decode("utf-8", errors="replace")


@dataclass(frozen=True)
class HFTokenizer:
    """A transformers tokenizer with BOS taken from tokenizer_config.json.

    transformers 5 loads DeepSeek's ``LlamaTokenizerFast`` config as a plain tokenizers backend that no longer
    adds BOS although the config says ``add_bos_token: true``; the config file is the model's own statement of
    what it was trained on, so it decides.
    """

    name: str
    tokenizer: Any  # transformers.PreTrainedTokenizerBase; Any keeps transformers out of import time
    bos_id: int | None
    bos_text: str | None

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:
            # The backend encoder has no model_max_length warning and batches across threads.
            return [enc.ids for enc in backend.encode_batch(list(texts), add_special_tokens=False)]
        return list(self.tokenizer(list(texts), add_special_tokens=False)["input_ids"])

    def render_chat(self, conversation: Conversation) -> str:
        messages = [{"role": m.role, "content": m.content} for m in conversation]
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False)
        except ImportError as exc:
            raise StreamqError(f"chat templates need jinja2 ({exc}); run `pip install jinja2`") from None


# --------------------------------------------------------------------------------------------------------------------
# Entry point


def load_token_batches(cfg: DataConfig, tokenizer_dir: Path, *, warn: WarnFn | None = None) -> torch.Tensor:
    """Token ids ``[cfg.num_samples, cfg.seq_len]`` (int64) of ``cfg.source``, tokenized by the model in
    ``tokenizer_dir``; the same config gives the same tensor. ``warn`` receives one-line warnings (fallback
    tokenizer, repeated samples, ...); by default they go to ``warnings.warn`` as ``DataWarning``."""
    warn = warn or _default_warn
    tokenizer = load_tokenizer(Path(tokenizer_dir), warn)
    path = resolve_source(cfg.source)
    if path.suffix == ".txt":
        batch = _text_batches(path, cfg, tokenizer, warn)
    else:
        batch = _record_batches(path, cfg, tokenizer, warn)
    _check_vocab(batch, Path(tokenizer_dir), tokenizer.name)
    return batch


def _default_warn(message: str) -> None:
    warnings.warn(message, DataWarning, stacklevel=3)


# --------------------------------------------------------------------------------------------------------------------
# Tokenizer


def load_tokenizer(model_dir: Path, warn: WarnFn) -> TextTokenizer:
    """The model's tokenizer, or the byte-level fallback (announced through ``warn``) when it has none."""
    if not model_dir.is_dir():
        raise StreamqError(f"model directory {model_dir} not found; pass the directory with config.json")
    if is_tiktoken_dir(model_dir):
        return _load_tiktoken(model_dir.resolve())
    if any((model_dir / name).is_file() for name in TOKENIZER_FILES):
        return _load_hf_tokenizer(model_dir.resolve())
    vocab_size = _model_vocab_size(model_dir)
    if vocab_size is not None and vocab_size < 256 + BYTE_OFFSET:
        raise StreamqError(
            f"{model_dir} has no tokenizer files and its vocab_size {vocab_size} is too small for the byte-level "
            f"fallback ({256 + BYTE_OFFSET} ids); add tokenizer.json and tokenizer_config.json to {model_dir}"
        )
    warn(
        f"{model_dir} has no tokenizer files ({', '.join(TOKENIZER_FILES)}): using the byte-level fallback "
        f"tokenizer (id = byte + {BYTE_OFFSET}, BOS = {BYTE_BOS_ID}); fine for a synthetic model, meaningless for "
        "a real one"
    )
    return ByteTokenizer()


@functools.lru_cache(maxsize=4)
def _load_tiktoken(model_dir: Path) -> TextTokenizer:
    # Cached like the transformers tokenizer: building the BPE of a 160 k-token vocabulary takes a second.
    return load_tiktoken_tokenizer(model_dir)


@functools.lru_cache(maxsize=4)
def _load_hf_tokenizer(model_dir: Path) -> HFTokenizer:
    # Cached: calibration and evaluation load the same tokenizer, and loading DeepSeek's takes a second.
    try:
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging
    except ImportError as exc:
        raise StreamqError(f"reading the tokenizer in {model_dir} needs transformers ({exc})") from None
    # transformers warns that DeepSeek's config names LlamaTokenizerFast while tokenizer.json is byte-level; the
    # tokenizer it loads is the right one, so the warning would only confuse users.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except Exception as exc:  # transformers raises many types (OSError, ValueError, JSONDecodeError, ...)
        raise StreamqError(f"cannot load the tokenizer in {model_dir}: {_first_line(exc)}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    bos_text = tokenizer.bos_token
    bos_id = tokenizer.bos_token_id
    add_bos = _config_add_bos(model_dir)
    if add_bos is None:
        add_bos = bos_id is not None and tokenizer.encode("a")[:1] == [bos_id]
    if not add_bos:
        bos_id = None
    return HFTokenizer(name=str(model_dir), tokenizer=tokenizer, bos_id=bos_id, bos_text=bos_text)


def _config_add_bos(model_dir: Path) -> bool | None:
    config = _read_json_object(model_dir / "tokenizer_config.json")
    value = config.get("add_bos_token") if config else None
    return value if isinstance(value, bool) else None


def _model_vocab_size(model_dir: Path) -> int | None:
    config = _read_json_object(model_dir / "config.json")
    value = config.get("vocab_size") if config else None
    return value if isinstance(value, int) else None


def _read_json_object(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # the model loader reports broken configs; here a missing value only skips a check
    return value if isinstance(value, dict) else None


def _check_vocab(batch: torch.Tensor, model_dir: Path, tokenizer_name: str) -> None:
    vocab_size = _model_vocab_size(model_dir)
    if vocab_size is not None and batch.numel() and int(batch.max()) >= vocab_size:
        raise StreamqError(
            f"the tokenizer ({tokenizer_name}) produced id {int(batch.max())} but {model_dir / 'config.json'} "
            f"has vocab_size {vocab_size}; use the tokenizer that belongs to this model"
        )


# --------------------------------------------------------------------------------------------------------------------
# Sources


def resolve_source(source: str) -> Path:
    """The local file behind ``source``: the built-in text, a downloaded hub file or the given path."""
    if source == BUILTIN:
        if not BUILTIN_PATH.is_file():
            raise StreamqError(f"the built-in text {BUILTIN_PATH} is missing from this installation; reinstall streamq")
        return BUILTIN_PATH
    if source in HUB_DATASETS:
        return _download_hub_dataset(source, HUB_DATASETS[source])
    path = Path(source).expanduser()
    names = ", ".join([BUILTIN, *HUB_DATASETS])
    if path.suffix not in SUPPORTED_SUFFIXES:
        raise StreamqError(
            f"dataset {source}: unsupported file type {path.suffix or '(no extension)'!r}; "
            f"pass a {', '.join(SUPPORTED_SUFFIXES)} file or one of the names {names}"
        )
    if not path.is_file():
        raise StreamqError(f"dataset file {path} not found; pass an existing file or one of the names {names}")
    if path.stat().st_size == 0:
        raise StreamqError(f"dataset file {path} is empty; pass a file with text in it")
    return path


def _download_hub_dataset(name: str, spec: HubDataset) -> Path:
    from huggingface_hub import constants, hf_hub_download

    where = f"dataset '{name}' ({spec.repo_id}, {spec.filename})"
    fix = "pass a local .txt, .jsonl or .parquet file instead"
    try:
        return Path(hf_hub_download(spec.repo_id, spec.filename, repo_type="dataset", local_files_only=True))
    except Exception:  # not cached yet (the error type differs between huggingface_hub versions)
        pass
    reason = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else _hub_unreachable_reason(constants.ENDPOINT)
    if reason is not None:
        raise StreamqError(f"{where} is not cached and cannot be downloaded: {reason}; {fix}")
    try:
        return Path(hf_hub_download(spec.repo_id, spec.filename, repo_type="dataset"))
    except Exception as exc:  # requests/httpx errors, HfHubHTTPError, OSError: all mean the same to the user
        raise StreamqError(f"{where} could not be downloaded: {_first_line(exc)}; {fix}") from None


def _hub_unreachable_reason(endpoint: str) -> str | None:
    """Why the hub surely cannot be reached, or None when it might be.

    huggingface_hub retries a failed connection for about 20 s with a message per attempt; a failed DNS look-up
    settles the question at once. With a proxy the local look-up proves nothing, so it is skipped.
    """
    if any(os.environ.get(var) for var in _PROXY_VARS):
        return None
    host = urlparse(endpoint).hostname
    if not host:
        return None
    try:
        socket.getaddrinfo(host, 443)
    except OSError as exc:
        return f"cannot resolve {host} ({exc.strerror or exc}), no network?"
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


# --------------------------------------------------------------------------------------------------------------------
# Plain text: one document, split by characters


def _text_batches(path: Path, cfg: DataConfig, tokenizer: TextTokenizer, warn: WarnFn) -> torch.Tensor:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise StreamqError(f"dataset file {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not text.strip():
        raise StreamqError(f"dataset file {path} has no text (only whitespace); pass a file with text in it")
    part = split_text(text, cfg.split, cfg.eval_fraction)
    stream = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    for ids in tokenizer.encode(chunk_text(part, _TEXT_PIECE_CHARS)):
        stream.extend(ids)
    rng = random.Random(cfg.seed) if cfg.split == "calib" else None
    return take_windows(torch.tensor(stream, dtype=torch.int64), cfg, f"{path} ({cfg.split} split)", rng, warn)


def split_text(text: str, split: Split, eval_fraction: float) -> str:
    """The calibration head or the held-out tail of ``text``, cut at the first whitespace after the split point
    so that no word is shared."""
    cut = len(text) - math.floor(len(text) * eval_fraction)
    space = _WHITESPACE.search(text, cut)
    if space is not None:
        cut = space.end()
    return text[:cut] if split == "calib" else text[cut:]


def chunk_text(text: str, max_chars: int) -> list[str]:
    """``text`` in pieces of at most about ``max_chars`` characters, cut after line ends where there are any;
    the pieces concatenate to ``text``."""
    pieces = []
    start = 0
    while start < len(text):
        end = min(start + max_chars, len(text))
        if end < len(text):
            newline = text.rfind("\n", start, end)
            end = newline + 1 if newline >= start else end
        pieces.append(text[start:end])
        start = end
    return pieces


# --------------------------------------------------------------------------------------------------------------------
# Records: .jsonl and .parquet, one document per row, split by rows


class RowReader(Protocol):
    """Rows of a record file, read one block at a time so that a multi-GB parquet file is never read whole."""

    @property
    def path(self) -> Path: ...

    @property
    def unit(self) -> str:
        """What a row number counts in messages: "line" or "row"."""

    @property
    def blocks(self) -> list[range]:
        """Consecutive row ranges covering the file."""

    def read(self, block: int) -> list[tuple[int, Any]]:
        """(row number for messages, row) of every row of a block."""


def _record_batches(path: Path, cfg: DataConfig, tokenizer: TextTokenizer, warn: WarnFn) -> torch.Tensor:
    reader = _JsonlReader.open(path) if path.suffix == ".jsonl" else _open_parquet(path)
    num_rows = reader.blocks[-1].stop if reader.blocks else 0
    if num_rows == 0:
        raise StreamqError(f"dataset file {path} has no rows; pass a file with at least one row")
    rows = split_rows(num_rows, cfg.split, cfg.eval_fraction)
    rng = random.Random(cfg.seed) if cfg.split == "calib" else None
    documents = _documents(reader, rows, rng)
    stream, flattened = _pack(documents, tokenizer, cfg.chat_template, cfg.num_tokens)
    if flattened:
        warn(
            f"{path}: {flattened} conversation(s) joined as plain text because the tokenizer "
            f"({tokenizer.name}) has no chat template; set chat_template to 'off' to silence this"
        )
    return take_windows(torch.tensor(stream, dtype=torch.int64), cfg, f"{path} ({cfg.split} split)", None, warn)


def split_rows(num_rows: int, split: Split, eval_fraction: float) -> range:
    cut = num_rows - math.floor(num_rows * eval_fraction)
    return range(0, cut) if split == "calib" else range(cut, num_rows)


def block_order(blocks: list[range], rows: range, rng: random.Random | None) -> list[tuple[int, range]]:
    """(block index, the block's rows inside ``rows``), in file order or, with ``rng``, in a seeded random order."""
    parts = [(i, range(max(b.start, rows.start), min(b.stop, rows.stop))) for i, b in enumerate(blocks)]
    parts = [(i, part) for i, part in parts if len(part)]
    if rng is not None:
        rng.shuffle(parts)
    return parts


def _documents(reader: RowReader, rows: range, rng: random.Random | None) -> Iterator[tuple[str, Document]]:
    """(where, document) of the rows in ``rows``: for calibration, blocks in a seeded order and rows shuffled
    within each block (a full shuffle would need the whole file in memory); file order for evaluation. Rows
    whose text is empty are skipped."""
    for block, part in block_order(reader.blocks, rows, rng):
        offset = reader.blocks[block].start
        selected = reader.read(block)[part.start - offset : part.stop - offset]
        if rng is not None:
            rng.shuffle(selected)
        for row_number, row in selected:
            where = f"{reader.path} {reader.unit} {row_number}"
            document = row_to_document(row, where)
            if document:
                yield where, document


def row_to_document(row: Any, where: str) -> Document:
    """The document in one record row (see the module docstring for the accepted shapes)."""
    if not isinstance(row, dict):
        raise StreamqError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for key in ("messages", "conversations"):
        if row.get(key) is not None:
            system = row.get("system")
            prefix = (Message("system", system),) if isinstance(system, str) and system.strip() else ()
            return prefix + _conversation(row[key], f"{where}, {key}")
    if row.get("text") is not None:
        if not isinstance(row["text"], str):
            raise StreamqError(f"{where}: 'text' must be a string, not {type(row['text']).__name__}")
        return row["text"]
    if isinstance(row.get("instruction"), str) and isinstance(row.get("output"), str):
        prompt = "\n\n".join(p for p in (row["instruction"], row.get("input")) if isinstance(p, str) and p.strip())
        return (Message("user", prompt), Message("assistant", row["output"]))
    raise StreamqError(
        f"{where}: no 'text', 'messages', 'conversations' or 'instruction'+'output' field "
        f"(found: {', '.join(sorted(map(str, row))) or 'nothing'}); convert the file to one of these shapes"
    )


def _conversation(messages: Any, where: str) -> Conversation:
    if not isinstance(messages, list):
        raise StreamqError(f"{where}: expected a list of messages, got {type(messages).__name__}")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise StreamqError(f"{where}[{i}]: expected an object with role/content or from/value")
        role = message.get("role", message.get("from"))
        content = message.get("content", message.get("value"))
        if not isinstance(role, str) or not isinstance(content, str | None):
            raise StreamqError(f"{where}[{i}]: needs a string 'role' (or 'from') and a string 'content' (or 'value')")
        out.append(Message(_ROLE_ALIASES.get(role, role), content or ""))
    return tuple(out)


@dataclass(frozen=True)
class _JsonlReader:
    path: Path
    lines: list[tuple[int, str]]  # (1-based line number, text) of the non-blank lines
    unit: str = "line"

    @classmethod
    def open(cls, path: Path) -> _JsonlReader:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise StreamqError(f"dataset file {path} is not UTF-8 ({exc.reason} at byte {exc.start})") from None
        lines = [(n, line) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
        if not lines:
            raise StreamqError(f"dataset file {path} has no rows (only blank lines); pass a file with JSON rows")
        return cls(path, lines)

    @property
    def blocks(self) -> list[range]:
        return [
            range(s, min(s + _JSONL_BLOCK_ROWS, len(self.lines))) for s in range(0, len(self.lines), _JSONL_BLOCK_ROWS)
        ]

    def read(self, block: int) -> list[tuple[int, Any]]:
        rows = []
        for number, line in self.lines[self.blocks[block].start : self.blocks[block].stop]:
            try:
                rows.append((number, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise StreamqError(
                    f"{self.path} line {number}: invalid JSON ({exc.msg}); fix or remove the line"
                ) from None
        return rows


def _open_parquet(path: Path) -> RowReader:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise StreamqError(f"reading {path} needs pyarrow; run `pip install pyarrow` or pass a .jsonl file") from None
    try:
        file = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid/OSError for files that are not parquet
        raise StreamqError(f"dataset file {path} is not a readable parquet file: {_first_line(exc)}") from None
    columns = [name for name in file.schema_arrow.names if name in _RECORD_COLUMNS]
    if not columns:
        raise StreamqError(
            f"{path}: no 'text', 'messages', 'conversations' or 'instruction'+'output' column "
            f"(found: {', '.join(file.schema_arrow.names)}); convert the file to one of these shapes"
        )
    sizes = [file.metadata.row_group(i).num_rows for i in range(file.num_row_groups)]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return _ParquetReader(path, file, columns, [range(s, s + n) for s, n in zip(starts, sizes, strict=True)])


@dataclass(frozen=True)
class _ParquetReader:
    path: Path
    file: Any  # pyarrow.parquet.ParquetFile
    columns: list[str]
    blocks: list[range]
    unit: str = "row"

    def read(self, block: int) -> list[tuple[int, Any]]:
        rows = self.file.read_row_group(block, columns=self.columns).to_pylist()
        return list(zip(self.blocks[block], rows, strict=True))


# --------------------------------------------------------------------------------------------------------------------
# Packing and cutting


def _pack(
    documents: Iterator[tuple[str, Document]], tokenizer: TextTokenizer, mode: ChatTemplateMode, need: int
) -> tuple[list[int], int]:
    """Token ids of whole documents, each with BOS, until at least ``need`` tokens or the documents run out;
    also how many conversations had to be joined as plain text."""
    stream: list[int] = []
    flattened = 0
    while len(stream) < need:
        batch = list(itertools.islice(documents, _ENCODE_BATCH_DOCS))
        if not batch:
            break
        texts = []
        for where, document in batch:
            text, was_flattened = render_document(document, tokenizer, mode, where)
            texts.append(text)
            flattened += was_flattened
        for text, ids in zip(texts, tokenizer.encode(texts), strict=True):
            starts_with_bos = tokenizer.bos_text is not None and text.startswith(tokenizer.bos_text)
            if tokenizer.bos_id is not None and not starts_with_bos:
                stream.append(tokenizer.bos_id)
            stream.extend(ids)
    return stream, flattened


def render_document(
    document: Document, tokenizer: TextTokenizer, mode: ChatTemplateMode, where: str
) -> tuple[str, bool]:
    """The text to tokenize, and whether a conversation was joined as plain text for lack of a template."""
    if isinstance(document, str):
        return document, False
    if mode != "off" and tokenizer.has_chat_template:
        try:
            return tokenizer.render_chat(document), False
        except StreamqError:
            raise
        except Exception as exc:  # jinja2 TemplateError and the template's own raise_exception calls
            raise StreamqError(f"{where}: the chat template rejected this conversation: {_first_line(exc)}") from None
    if mode == "on":
        raise StreamqError(
            f"{where} is a conversation, chat_template is 'on', but the tokenizer ({tokenizer.name}) has no chat "
            "template; add one to tokenizer_config.json or use chat_template 'auto' or 'off'"
        )
    return "\n\n".join(m.content for m in document if m.content), mode == "auto"


def take_windows(
    stream: torch.Tensor, cfg: DataConfig, label: str, rng: random.Random | None, warn: WarnFn
) -> torch.Tensor:
    """``cfg.num_samples`` non-overlapping windows of ``cfg.seq_len`` tokens of ``stream``: the first ones, or a
    seeded random choice with ``rng``; repeated, with a warning, when the stream has fewer windows."""
    available = stream.numel() // cfg.seq_len
    if available == 0:
        raise StreamqError(
            f"{label}: found {stream.numel():,} tokens but one sample needs {cfg.seq_len:,}; "
            "pass more text or a smaller sequence length"
        )
    order = list(range(available))
    if rng is not None:
        rng.shuffle(order)
    if available < cfg.num_samples:
        warn(
            f"{label}: {stream.numel():,} tokens make only {available} sample(s) of {cfg.seq_len:,} tokens, "
            f"repeating them to fill {cfg.num_samples}; pass more text or fewer samples for a meaningful result"
        )
        order = order * math.ceil(cfg.num_samples / available)
    windows = stream[: available * cfg.seq_len].view(available, cfg.seq_len)
    return windows[torch.tensor(order[: cfg.num_samples])].contiguous()
