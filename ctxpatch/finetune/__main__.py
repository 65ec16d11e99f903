"""`python -m ctxpatch.finetune RECIPE [key=value ...]` (what torchrun and accelerate launch run)."""

from __future__ import annotations

import sys

from ..errors import CtxpatchError


def main(argv: list[str] | None = None) -> int:
    import argparse

    from .cli import run_finetune

    parser = argparse.ArgumentParser(prog="python -m ctxpatch.finetune", description="LoRA fine-tune a patched model")
    parser.add_argument("recipe", help="a recipe YAML file, e.g. recipes/smollm2-135m-32k.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides, e.g. lora.r=16")
    args = parser.parse_args(argv)
    try:
        return run_finetune(args)
    except (CtxpatchError, ValueError, TypeError, FileNotFoundError, FileExistsError) as error:
        print(f"ctxpatch finetune: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
