"""Long-context evaluation on lm-eval: ctxpatch's tasks, a strict HFLM around the in-memory model, comparisons.

    from ctxpatch.eval import compare
    board = compare(model, tokenizer, ["none", "dynamic", "logn+window"], lengths=["8k", "16k"],
                    tasks=["ppl", "passkey"], out_dir="runs/compare")
    print(board.markdown())

The task configs live in `TASKS_DIR` (`lm_eval --include_path <TASKS_DIR> --tasks ctxpatch_passkey ...`), and
`ctxpatch.eval.lm` registers lm-eval's model type "ctxpatch" (`python -m ctxpatch.eval.harness --model ctxpatch
--model_args pretrained=...,patch=...,target_len=...`).
Names are imported on first use: importing lm-eval takes seconds, and `ctxpatch methods` should not pay for it.
"""

from __future__ import annotations

import importlib
from typing import Any

from .errors import EvalError, TruncationError
from .tasks import TASKS_DIR

_LAZY = {
    "CtxpatchLM": "lm",
    "EvalConfig": "runner",
    "Leaderboard": "report",
    "Record": "report",
    "Spec": "options",
    "compare": "runner",
    "evaluate": "runner",
}

__all__ = ["TASKS_DIR", "EvalError", "TruncationError", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
