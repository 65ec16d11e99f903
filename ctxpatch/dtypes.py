"""Model dtypes by name: one reader for every verb, recipe and loader ("auto" = the checkpoint's own)."""

from __future__ import annotations

from typing import Any

import torch

from .errors import UserInputError


class InvalidDtypeError(UserInputError, ValueError):
    """A dtype name ctxpatch does not load models in."""


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")  # what a user picks; float64 is for tests


def checkpoint_dtype(config: Any) -> str | None:
    """The dtype a checkpoint's config names (a config.json dict or a transformers config), if any."""
    if isinstance(config, dict):
        value = config.get("dtype") or config.get("torch_dtype")
    else:
        value = getattr(config, "dtype", None)  # transformers 5 reads an old config.json's torch_dtype into it
    return None if value is None else str(value).replace("torch.", "")


def resolve_dtype(dtype: str | torch.dtype | None, checkpoint: Any = None) -> torch.dtype:
    """`dtype` as a torch dtype. "auto" (or None) is the dtype `checkpoint` (its config) names, float32 if none."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).replace("torch.", "") if dtype is not None else "auto"
    if name == "auto":
        name = checkpoint_dtype(checkpoint) if checkpoint is not None else None
        name = name if name in DTYPES else "float32"
    if name not in DTYPES:
        raise InvalidDtypeError(f"dtype={dtype!r} must be 'auto' or a floating dtype: {', '.join(DTYPES)}")
    return DTYPES[name]
