"""MODEL as a local directory or a Hugging Face repo id."""

from __future__ import annotations

import re
from pathlib import Path

from streamq.errors import StreamqError

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model(model: str) -> Path:
    """A local checkpoint directory, or the local snapshot of a Hugging Face repo (downloaded when online)."""
    path = Path(model).expanduser()
    if path.exists():
        return path
    if not _REPO_ID.match(model):
        raise StreamqError(f"{model}: no such directory, and not a Hugging Face repo id (org/name)")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

        patterns = ["*.json", "*.safetensors", "tokenizer*", "*.jinja"]
        return Path(snapshot_download(model, allow_patterns=patterns))
    except LocalEntryNotFoundError:
        raise StreamqError(
            f"{model}: not in the local Hugging Face cache and the Hub is unreachable; download it where you are "
            "online (huggingface-cli download) and pass the directory"
        ) from None
    except (HfHubHTTPError, OSError) as exc:
        raise StreamqError(
            f"{model}: download failed ({str(exc).splitlines()[0]}); check the repo id and access"
        ) from None
