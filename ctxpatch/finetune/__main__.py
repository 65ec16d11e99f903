"""`python -m ctxpatch.finetune RECIPE [key=value ...]` (what torchrun and accelerate launch run)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from ..cli import Parser, run_verb
    from .cli import run_finetune

    parser = Parser(prog="python -m ctxpatch.finetune", description="LoRA fine-tune a patched model")
    parser.add_argument("recipe", help="a recipe YAML file, e.g. recipes/smollm2-135m-32k.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides, e.g. lora.r=16")
    args = parser.parse_args(argv)
    return run_verb("finetune", run_finetune, args)  # the CLI's error policy: a user's mistake is one line, exit 2


if __name__ == "__main__":
    sys.exit(main())
