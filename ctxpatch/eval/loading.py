"""Loading the model to evaluate: "default", a .gguf file, a folder, a hub name — or a ctxpatch run folder.

A run folder of the fine-tune (`ctxpatch.json` beside the weights, or a merged model whose config has a
`ctxpatch` entry) is loaded with `ctxpatch.load`, and the model comes back carrying its patch: it is evaluated
as loaded, and asking for another patch on top is refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..loading import load, read_record


def carries_patch(name: str) -> bool:
    """True for a folder holding `ctxpatch.json` or a config.json with a `ctxpatch` entry."""
    if not Path(name).is_dir():
        return False
    try:
        return read_record(name) is not None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False  # not ours to judge: loading it as a plain model says what is wrong


def held_apart_text(name: str) -> list[str] | None:
    """The text files a fine-tune run held apart (`eval_text` in its ctxpatch.json), or None: the default."""
    if not carries_patch(name):
        return None
    return read_record(name).get("eval_text") or None


def check_exists(name: str) -> None:
    """A name that looks like a path (./x, /x, x/y that is not a hub id, x.gguf) must exist."""
    if name == "default":
        return
    looks_local = name.startswith((".", "/", "~")) or name.endswith(".gguf") or name.count("/") > 1
    if looks_local and not Path(name).expanduser().exists():
        raise FileNotFoundError(f"model {name!r} does not exist: give 'default', a model folder, a .gguf file or a hub name")


def load_for_eval(name: str, dtype: torch.dtype | None = None) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer); a run folder comes back carrying its patch (and its peft adapter).
    `dtype` None: float32 for a plain model, the dtype a run was trained in for a run folder."""
    check_exists(name)
    if carries_patch(name):
        model, tokenizer = load(name, dtype=dtype)
        return model.eval(), tokenizer
    from ..models import load_model

    return load_model(name, dtype=dtype or torch.float32)
