"""LoRA fine-tuning of a patched model, so it gets used to its new positions (DESIGN.md layer 6).

    python -m ctxpatch.finetune recipes/smollm2-135m-32k.yaml lora.r=16 max_steps=50
    ctxpatch finetune recipes/smollm2-135m-32k.yaml patch=selfextend output_dir=runs/se
    torchrun --nproc_per_node 2 -m ctxpatch.finetune recipes/smollm2-135m-32k.yaml

    from ctxpatch.finetune import load_recipe, train
    result = train(load_recipe("recipes/smollm2-135m-32k.yaml", ["max_steps=3"]))

Modules: `recipe` (schema, overrides, validation), `positions` (contiguous / pose / randomized /
stretched position ids), `data` (split by file, tokenize, pack, validation split), `trainable` (peft LoRA + extra
trainable parts), `checkpoints` (run folder, atomic checkpoints), `metrics` (JSONL, PNG,
progress bar), `loop` (`train`, the loop). `ctxpatch.load` / `ctxpatch.merge` read what a run leaves.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {  # imported on first use: `ctxpatch finetune --help` must not import torch
    "Recipe": "recipe",
    "RecipeError": "recipe",
    "RecipeNotFoundError": "recipe",
    "TextTooShortError": "data",
    "TrainResult": "loop",
    "load_recipe": "recipe",
    "train": "loop",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
