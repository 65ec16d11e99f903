"""ChatGLM2 / ChatGLM3 without their remote code: the checkpoint as transformers' `GlmForCausalLM` (`convert`),
the tokenizer as a fast tokenizer (`tokenizer`), the trained length read off config.json (`config`). The
`ctxpatch convert-chatglm` verb's parser is `ctxpatch.cli_chatglm`. Names that need torch are imported on first
use, so the trained-length rule and the errors stay light (`ctxpatch --help` imports no torch)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .config import train_len
from .errors import ChatGLMConversionError

if TYPE_CHECKING:  # what `_LAZY` gives, for type checkers and the API reference
    from .convert import ROPE_RATIO_AS, convert_chatglm, load_chatglm, resolve_dtype, rope_ratio_rule  # noqa: F401

_LAZY = {"convert_chatglm": "convert", "load_chatglm": "convert", "rope_ratio_rule": "convert",
         "ROPE_RATIO_AS": "convert", "resolve_dtype": "convert"}

__all__ = ["ChatGLMConversionError", "ROPE_RATIO_AS", "convert_chatglm", "load_chatglm", "rope_ratio_rule", "train_len"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
