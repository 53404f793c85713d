"""Tokenizers shipped as a tiktoken BPE file plus Python code, read without running that code.

Kimi-K2 ships ``tiktoken.model`` (one ``base64(token bytes) rank`` line per mergeable token),
``tokenizer_config.json`` (special tokens in ``added_tokens_decoder``, ``bos_token``, the chat template, and
``auto_map`` naming the tokenizer's Python file) and that Python file, ``tokenization_kimi.py``, which holds the
pre-tokenizer's split pattern as a class attribute ``pat_str``. Loading it through transformers needs
``trust_remote_code``; here the pieces are read as data instead:

* the BPE ranks from ``tiktoken.model`` (parsed here: tiktoken's own loader caches files by path under the
  temporary directory, so an edited file at the same path would be read stale);
* the split pattern from the Python file's syntax tree: ``pat_str`` must be a string literal, a concatenation of
  literals, or ``"sep".join([literals])``; nothing in the file is executed;
* the special tokens (id -> text) from ``added_tokens_decoder``, which must lie above the BPE ranks.

Text is encoded by ``tiktoken.Encoding`` with special tokens recognised (``allowed_special="all"``, as the
model's own tokenizer does), so a chat template's ``<|im_user|>`` becomes its one id. Runs of more than
``MAX_RUN`` characters without (or of only) whitespace are cut before encoding: tiktoken's regex engine is slow
and can overflow its stack on them (the model's own tokenizer cuts them too). BOS is prepended only when
``tokenizer_config.json`` says ``add_bos_token: true`` (the model's tokenizer adds none by default).

The chat template comes from ``tokenizer_config.json`` (``chat_template``, or ``chat_template.jinja`` beside it)
and is rendered by transformers' own renderer, with the tokenizer's special tokens as variables and no
generation prompt (calibration conversations end with the answer).
"""

from __future__ import annotations

import ast
import base64
import binascii
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streamq.errors import StreamqError

TIKTOKEN_FILE = "tiktoken.model"
CONFIG_FILE = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"
TIKTOKEN_CLASS = "TikTokenTokenizer"
MAX_RUN = 25_000
_LONG_RUN = re.compile(rf"\s{{{MAX_RUN}}}|\S{{{MAX_RUN}}}")


def is_tiktoken_dir(model_dir: Path) -> bool:
    """Whether ``model_dir``'s tokenizer is a tiktoken BPE (and not a tokenizer.json that transformers reads)."""
    if (model_dir / "tokenizer.json").is_file():
        return False
    config = _read_config(model_dir) if (model_dir / CONFIG_FILE).is_file() else {}
    return (model_dir / TIKTOKEN_FILE).is_file() or config.get("tokenizer_class") == TIKTOKEN_CLASS


@dataclass(frozen=True)
class TiktokenTokenizer:
    """A tiktoken encoding with the model's special tokens, BOS and chat template (data.TextTokenizer)."""

    name: str
    encoding: Any  # tiktoken.Encoding
    bos_id: int | None
    bos_text: str | None
    chat_template: str | None
    template_vars: dict[str, str]

    @property
    def has_chat_template(self) -> bool:
        return bool(self.chat_template)

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        out = []
        for text in texts:
            pieces = self.encoding.encode_batch(split_long_runs(text), allowed_special="all")
            out.append([token for piece in pieces for token in piece])
        return out

    def render_chat(self, conversation: Sequence[Any]) -> str:
        try:
            from transformers.utils.chat_template_utils import render_jinja_template
        except ImportError as exc:
            raise StreamqError(f"rendering {self.name}'s chat template needs transformers and jinja2 ({exc})") from None
        messages = [{"role": m.role, "content": m.content} for m in conversation]
        rendered, _ = render_jinja_template([messages], chat_template=self.chat_template, **self.template_vars)
        return rendered[0]


def split_long_runs(text: str) -> list[str]:
    """``text`` cut so that no piece holds more than ``MAX_RUN`` consecutive (non-)whitespace characters."""
    pieces, start = [], 0
    for match in _LONG_RUN.finditer(text):
        pieces.append(text[start : match.end()])
        start = match.end()
    pieces.append(text[start:])
    return [p for p in pieces if p] or [""]


def load_tiktoken_tokenizer(model_dir: Path) -> TiktokenTokenizer:
    """The tokenizer in ``model_dir`` (see the module docstring); StreamqError names any missing piece."""
    try:
        import tiktoken
    except ImportError:
        raise StreamqError(
            f"{model_dir}: the tokenizer is a tiktoken BPE ({TIKTOKEN_FILE}); reading it needs the tiktoken package: "
            "pip install 'streamq[tiktoken]'"
        ) from None
    config = _read_config(model_dir)
    ranks = read_bpe_ranks(model_dir / TIKTOKEN_FILE, config)
    special = special_tokens(model_dir / CONFIG_FILE, config, max(ranks.values()) + 1)
    pattern = split_pattern(model_dir, config)
    try:
        encoding = tiktoken.Encoding(
            name=str(model_dir), pat_str=pattern, mergeable_ranks=ranks, special_tokens=special
        )
    except ValueError as exc:  # the Rust regex compiler's message
        raise StreamqError(f"{model_dir}: tiktoken cannot compile the split pattern pat_str ({exc})") from None
    vars_ = _template_vars(config)
    bos_text = vars_.get("bos_token")
    bos_id = special.get(bos_text) if bos_text is not None else None
    if bos_text is not None and bos_id is None:
        raise StreamqError(
            f"{model_dir / CONFIG_FILE}: bos_token {bos_text!r} is not one of the special tokens in "
            "added_tokens_decoder; download tokenizer_config.json again"
        )
    add_bos = config.get("add_bos_token") is True
    template = chat_template(model_dir, config)
    return TiktokenTokenizer(str(model_dir), encoding, bos_id if add_bos else None, bos_text, template, vars_)


def _read_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / CONFIG_FILE
    if not path.is_file():
        raise StreamqError(
            f"{path} not found; a tiktoken tokenizer needs it for its special tokens (added_tokens_decoder): "
            "download it with the model"
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise StreamqError(f"{path}: not valid JSON ({exc}); download it again") from None
    if not isinstance(config, dict):
        raise StreamqError(f"{path}: not a JSON object; download it again")
    return config


def read_bpe_ranks(path: Path, config: dict[str, Any]) -> dict[bytes, int]:
    """The mergeable ranks of a tiktoken BPE file: ``base64(token) rank`` per line."""
    if not path.is_file():
        named = f" (tokenizer_config.json names {TIKTOKEN_CLASS})" if config.get("tokenizer_class") else ""
        raise StreamqError(f"{path} not found; the tokenizer's BPE ranks are in it{named}: download it with the model")
    ranks: dict[bytes, int] = {}
    for number, line in enumerate(path.read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise StreamqError(
                f"{path} line {number}: not 'base64-token rank'; is this a tiktoken BPE file? download it again"
            ) from None
    if not ranks:
        raise StreamqError(f"{path}: no BPE ranks; download it again")
    if len(set(ranks.values())) != len(ranks):
        raise StreamqError(f"{path}: two tokens share a rank; download it again")
    return ranks


def special_tokens(path: Path, config: dict[str, Any], num_ranks: int) -> dict[str, int]:
    """Special token text -> id from ``added_tokens_decoder``, above the BPE's ids 0 .. ``num_ranks`` - 1."""
    decoder = config.get("added_tokens_decoder")
    if not isinstance(decoder, dict) or not decoder:
        raise StreamqError(
            f"{path}: no added_tokens_decoder; the tiktoken tokenizer's special tokens (BOS, chat roles) are "
            "defined there: download tokenizer_config.json again"
        )
    special: dict[str, int] = {}
    for key, entry in decoder.items():
        content = entry.get("content") if isinstance(entry, dict) else None
        if not str(key).isdigit() or not isinstance(content, str):
            raise StreamqError(f"{path}: added_tokens_decoder entry {key!r} needs a numeric id and a 'content' string")
        if int(key) < num_ranks:
            raise StreamqError(
                f"{path}: special token {content!r} has id {key}, among the BPE's ids 0-{num_ranks - 1} in "
                f"{TIKTOKEN_FILE}; the two files do not belong together: download both again"
            )
        if special.setdefault(content, int(key)) != int(key):
            raise StreamqError(f"{path}: special token {content!r} has two ids ({special[content]} and {key})")
    return special


def split_pattern(model_dir: Path, config: dict[str, Any]) -> str:
    """``pat_str`` of the tokenizer's Python file (named by ``auto_map``), read from its syntax tree."""
    path = model_dir / (_tokenizer_module(model_dir, config) + ".py")
    if not path.is_file():
        raise StreamqError(
            f"{path} not found; it holds the tokenizer's split pattern (pat_str), which {TIKTOKEN_FILE} lacks: "
            "download it with the model"
        )
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (SyntaxError, UnicodeDecodeError, ValueError) as exc:
        raise StreamqError(f"{path}: not readable Python ({exc}); download it again") from None
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "pat_str" for t in node.targets):
            pattern = _literal_string(node.value)
            if pattern is not None:
                return pattern
    raise StreamqError(
        f"{path}: no pat_str assigned a string literal (or a join of literals); streamq reads the split pattern "
        "from there without running the file"
    )


def _tokenizer_module(model_dir: Path, config: dict[str, Any]) -> str:
    auto = (config.get("auto_map") or {}).get("AutoTokenizer")
    reference = auto[0] if isinstance(auto, list) and auto else auto
    if not isinstance(reference, str) or "." not in reference:
        raise StreamqError(
            f"{model_dir / CONFIG_FILE}: no auto_map.AutoTokenizer naming the tokenizer's Python file (which holds "
            "its split pattern pat_str); download tokenizer_config.json again"
        )
    return reference.split("--")[-1].rsplit(".", 1)[0]


def _literal_string(node: ast.expr) -> str | None:
    """The value of a string literal, ``a + b`` of such, or ``"sep".join([...])`` of such; None otherwise."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _literal_string(node.left), _literal_string(node.right)
        return None if left is None or right is None else left + right
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "join"
        and len(node.args) == 1
        and isinstance(node.args[0], ast.List | ast.Tuple)
    ):
        sep = _literal_string(node.func.value)
        parts = [_literal_string(element) for element in node.args[0].elts]
        return None if sep is None or any(p is None for p in parts) else sep.join(parts)  # type: ignore[arg-type]
    return None


def _template_vars(config: dict[str, Any]) -> dict[str, str]:
    """The special tokens a chat template may use (``bos_token`` ...), as text."""
    out = {}
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        value = config.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            out[key] = value
    return out


def chat_template(model_dir: Path, config: dict[str, Any]) -> str | None:
    """tokenizer_config.json's ``chat_template`` (its default when it is a list of named ones), else the
    ``chat_template.jinja`` file beside it; None when there is none."""
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if isinstance(template, str) and template:
        return template
    path = model_dir / TEMPLATE_FILE
    return path.read_text(encoding="utf-8") if path.is_file() else None
