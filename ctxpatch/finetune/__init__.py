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

from .data import TextTooShortError
from .loop import TrainResult, train
from .recipe import Recipe, RecipeError, RecipeNotFoundError, load_recipe

__all__ = ["Recipe", "RecipeError", "RecipeNotFoundError", "TextTooShortError", "TrainResult", "load_recipe", "train"]
