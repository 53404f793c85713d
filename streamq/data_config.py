"""What calibration or evaluation text to use and how much of it: the recipe's data section.

Kept apart from data.py (tokenizers, the hub, file readers) so that a recipe can be read without them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from streamq.errors import StreamqError

Split = Literal["calib", "eval"]
ChatTemplateMode = Literal["auto", "on", "off"]
BUILTIN = "builtin"


@dataclass(frozen=True)
class DataConfig:
    """What to tokenize and how much. ``source``: ``builtin``, a name in ``HUB_DATASETS`` or a file path.

    ``chat_template``: ``auto`` applies the tokenizer's template to conversational rows when it has one and
    otherwise joins their contents as plain text (with a warning); ``on`` makes a missing template an error;
    ``off`` always joins contents as plain text. Plain-text documents never go through the template.
    """

    source: str = BUILTIN
    num_samples: int = 128
    seq_len: int = 2048
    seed: int = 0
    split: Split = "calib"
    chat_template: ChatTemplateMode = "auto"
    eval_fraction: float = 0.1

    def __post_init__(self) -> None:
        if self.num_samples < 1 or self.seq_len < 1:
            raise StreamqError(f"num_samples and seq_len must be >= 1, not {self.num_samples} and {self.seq_len}")
        if self.split not in ("calib", "eval"):
            raise StreamqError(f"data split must be 'calib' or 'eval', not {self.split!r}")
        if self.chat_template not in ("auto", "on", "off"):
            raise StreamqError(f"chat_template must be 'auto', 'on' or 'off', not {self.chat_template!r}")
        if not 0.0 < self.eval_fraction < 1.0:
            raise StreamqError(f"eval_fraction must be between 0 and 1 (exclusive), not {self.eval_fraction}")

    @property
    def num_tokens(self) -> int:
        return self.num_samples * self.seq_len
