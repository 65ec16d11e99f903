"""What ChatGLM's config.json (read as a dict) says without the model: its trained length."""

from __future__ import annotations

from typing import Any

from ..errors import UnknownTrainedLengthError


def train_len(config: dict[str, Any], name: str = "the model") -> int:
    """ChatGLM's L, the one rule: `seq_length` (ChatGLM2/3), else `max_sequence_length` (the first ChatGLM's)."""
    length = config.get("seq_length") or config.get("max_sequence_length")
    if not length:
        raise UnknownTrainedLengthError(
            f"the config.json of {name!r} names neither seq_length nor max_sequence_length: add the length the "
            "model was trained on to it as seq_length"
        )
    return int(length)
