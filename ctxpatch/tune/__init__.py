"""`ctxpatch tune`: measure the registry's training-free specs on a model, a target length and your text, and
pick the best within a time budget (successive halving).

    result = ctxpatch.tune(model, tokenizer, target_len=32768, texts=[...], budget_s=2700, out_dir="runs/tune")
    patch = ctxpatch.apply(model, result.spec)

The function is exported from the package root only: `ctxpatch.tune` is the function `ctxpatch.tune.api.tune`,
and this package is what `python -m ctxpatch.tune` runs (its modules: `from ctxpatch.tune import cli`, as the
attribute `ctxpatch.tune` is the function). Names are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "TuneResult": "result",
    "TuneError": "candidates",
    "Candidate": "candidates",
    "build_candidates": "candidates",
    "CostModel": "schedule",
    "plan": "schedule",
    "Scorer": "search",
    "search": "search",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

