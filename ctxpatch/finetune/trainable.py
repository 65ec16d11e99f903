"""What trains: peft LoRA on the patched model, plus the extra parts a recipe chooses.

  * LoRA (`lora.r`, `lora.alpha`, `lora.dropout`, `lora.target_modules`) through peft.
  * `trainable.embeddings` / `trainable.norms`: peft's `modules_to_save` (LongLoRA found that
    training embeddings and norms matters for long context); with tied input/output embeddings
    peft's `ensure_weight_tying` keeps the output head tied to the trained copy.
  * `trainable.patch_params`: the patch's own tensors (KERPLE's r1, r2), which live in a submodule
    named `ctxpatch` of each attention module; peft freezes them with the rest of the base model,
    so they are switched back on here and saved beside the adapter (`ctxpatch_parameters.safetensors`).

Everything else stays frozen.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .recipe import RecipeError


def linear_module_names(model: nn.Module) -> list[str]:
    """The last name part of every linear layer (what `lora.target_modules` may name)."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})


def norm_module_names(model: nn.Module) -> list[str]:
    """The last name part of every normalisation layer (RMSNorm, LayerNorm, ...)."""
    names = set()
    for name, module in model.named_modules():
        if name and (isinstance(module, nn.LayerNorm) or type(module).__name__.endswith(("Norm", "RMSNorm"))):
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def embedding_module_name(model: nn.Module) -> str:
    embeddings = model.get_input_embeddings()
    for name, module in model.named_modules():
        if module is embeddings:
            return name.rsplit(".", 1)[-1]
    raise RecipeError("trainable.embeddings=true, but the model's input embeddings were not found")


def check_targets(model: nn.Module, targets: list[str]) -> None:
    available = linear_module_names(model)
    missing = [t for t in targets if t not in available]
    if missing:
        raise RecipeError(
            f"lora.target_modules names {', '.join(missing)}, which this model does not have; "
            f"its linear layers are: {', '.join(available)}"
        )


def lora_config(model: nn.Module, recipe: Any):
    """peft's LoraConfig for the recipe's `lora` and `trainable` sections."""
    from peft import LoraConfig

    check_targets(model, recipe.lora.target_modules)
    modules_to_save = []
    if recipe.trainable.embeddings:
        modules_to_save.append(embedding_module_name(model))
    if recipe.trainable.norms:
        modules_to_save.extend(norm_module_names(model))
    tied = bool(getattr(model.config, "tie_word_embeddings", False)) and recipe.trainable.embeddings
    return LoraConfig(
        r=recipe.lora.r,
        lora_alpha=recipe.lora.alpha,
        lora_dropout=recipe.lora.dropout,
        target_modules=list(recipe.lora.target_modules),
        modules_to_save=modules_to_save or None,
        task_type="CAUSAL_LM",
        **({"ensure_weight_tying": True} if tied else {}),  # the output head follows the trained embeddings
    )


def make_trainable(model: nn.Module, patch: Any, recipe: Any):
    """Wrap the patched model with peft and switch on exactly the parts the recipe trains."""
    from peft import get_peft_model

    peft_model = get_peft_model(model, lora_config(model, recipe))
    for parameter in patch.parameters():
        parameter.requires_grad_(bool(recipe.trainable.patch_params))
    return peft_model


def trainable_parameter_names(model: nn.Module) -> list[str]:
    return [name for name, p in model.named_parameters() if p.requires_grad]
