"""`ctxpatch finetune RECIPE [key=value ...]` and `ctxpatch merge RUN DST`."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "finetune",
        help="LoRA fine-tune a patched model from a YAML recipe (recipes/*.yaml)",
        description="Run a fine-tune recipe. Overrides are key=value with dotted keys, e.g. lora.r=16 max_steps=50. "
        "For several processes: torchrun --nproc_per_node N -m ctxpatch.finetune RECIPE ...",
    )
    p.add_argument("recipe", help="a recipe YAML file, e.g. recipes/smollm2-135m-32k.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides (dotted keys for sections)")
    p.set_defaults(func=run_finetune)
    p = sub.add_parser("merge", help="merge a fine-tune run's adapter into a standalone model that carries its patch")
    p.add_argument("run", help="a fine-tune output_dir (or one of its checkpoint-N folders)")
    p.add_argument("dst", help="folder to write (safetensors; config.json carries the patch spec)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: the run's model_dtype)")
    p.add_argument("--overwrite", action="store_true", help="replace dst if it exists")
    p.set_defaults(func=run_merge)


def run_finetune(args: argparse.Namespace) -> int:
    from .loop import train
    from .recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    check_before_loading(recipe)
    train(recipe)
    return 0


def check_before_loading(recipe) -> None:
    """What the recipe and the model's config settle before anything loads: the model and tokenizer paths,
    and the patch planned on the model's layers at target_len, as training applies it."""
    from ..errors import UserInputError
    from ..loading import check_model, check_tokenizer
    from ..preflight import check_plan, info_from_config, warn_if_not_longer
    from .recipe import RecipeError, patch_arguments

    ref = check_model(recipe.model)
    check_tokenizer(recipe.tokenizer)
    methods, apply_kwargs = patch_arguments(recipe)
    info = info_from_config(ref.config())
    if info is not None and recipe.positions.scheme == "contiguous":  # the other schemes refuse it (load_data)
        warn_if_not_longer(recipe.target_len, info.train_len, "target_len")
    try:
        check_plan(methods, apply_kwargs, info, recipe.target_len)
    except UserInputError as error:
        raise RecipeError(f"the patch {recipe.patch!r} (patch_params {recipe.patch_params}) is refused: {error}") from None


def run_merge(args: argparse.Namespace) -> int:
    from ..loading import merge

    dst = merge(args.run, args.dst, dtype=args.dtype, overwrite=args.overwrite)
    print(f"merged model written to {dst}; load it with ctxpatch.load({str(dst)!r})")
    return 0
