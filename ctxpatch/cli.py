"""The `ctxpatch` command line. Each verb lives in its own module and adds its own parser."""

from __future__ import annotations

import argparse
import importlib
import sys

# modules defining `add_parser(subparsers)`; each sets `func` on its parser
VERBS = ["ctxpatch.cli_core", "ctxpatch.chatglm", "ctxpatch.eval.cli", "ctxpatch.finetune.cli", "ctxpatch.tune.cli"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ctxpatch", description="length-extrapolation patches for HF causal LMs")
    sub = parser.add_subparsers(dest="verb", required=True)
    for name in VERBS:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, FileNotFoundError, KeyError) as error:
        print(f"ctxpatch {args.verb}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
