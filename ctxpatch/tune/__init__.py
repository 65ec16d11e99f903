"""`ctxpatch tune`: measure the registry's training-free specs on a model, a target length and your text, and
pick the best within a time budget (successive halving).

    result = ctxpatch.tune(model, tokenizer, target_len=32768, texts=[...], budget_s=2700, out_dir="runs/tune")
    patch = ctxpatch.apply(model, result.spec)

`ctxpatch.tune` is this module, callable as the function (`ctxpatch.tune(...)` = `ctxpatch.tune.tune(...)`):
a package and a function cannot share the name otherwise. Names are imported on first use.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

_LAZY = {
    "tune": "api",
    "TuneResult": "api",
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


class _CallableModule(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from .api import tune

        return tune(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
