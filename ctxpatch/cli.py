"""The `ctxpatch` command line (also `python -m ctxpatch`). Each verb lives in its own module and adds its parser.

One error policy for every verb: a mistake in what the user gave (a `UserInputError`, any other error
ctxpatch raises on purpose, or a path that does not exist) is one line, `ctxpatch VERB: error: ...`,
and exit status 2, like argparse's own usage errors. A traceback means a bug in ctxpatch.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from pathlib import Path

from ._version import __version__
from .errors import CtxpatchError

# modules defining `add_parser(subparsers)`; each sets `func` on its parser
VERBS = ["ctxpatch.cli_methods", "ctxpatch.cli_chatglm", "ctxpatch.eval.cli", "ctxpatch.finetune.cli", "ctxpatch.tune.cli"]

# what is reported as the user's mistake: ctxpatch's own errors, and files the user named that are not there
USER_ERRORS: tuple[type[BaseException], ...] = (CtxpatchError, FileNotFoundError, FileExistsError, NotADirectoryError)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every default, except None, False and [] (the help text says what an unset option means)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False, []) or "%(default)" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose help shows defaults; every verb's parser is one (`parser_class`)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="ctxpatch", description="length-extrapolation patches for HF causal LMs")
    parser.add_argument("--version", action="version", version=f"ctxpatch {__version__}")
    sub = parser.add_subparsers(dest="verb", required=True, parser_class=Parser)
    for name in VERBS:
        importlib.import_module(name).add_parser(sub)
    return parser


def report(verb: str, error: BaseException) -> int:
    """Print a user's mistake as one line and return exit status 2."""
    message = " ".join(str(error).split()) or type(error).__name__
    print(f"ctxpatch {verb}: error: {message}", file=sys.stderr)
    return 2


def one_line_warnings(verb: str):
    """showwarning that prints ctxpatch's own warnings as `ctxpatch VERB: warning: ...` (a library's keep theirs)."""
    shown = warnings.showwarning
    package = str(Path(__file__).resolve().parent)

    def show(message, category, filename, lineno, file=None, line=None):
        if str(Path(filename).resolve()).startswith(package):
            print(f"ctxpatch {verb}: warning: {message}", file=sys.stderr)
        else:
            shown(message, category, filename, lineno, file, line)

    return show


def run_verb(verb: str, func, args) -> int:
    with warnings.catch_warnings():
        warnings.showwarning = one_line_warnings(verb)  # a user's warning is one line too, like an error
        try:
            return int(func(args) or 0)
        except USER_ERRORS as error:
            return report(verb, error)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_verb(args.verb, args.func, args)


if __name__ == "__main__":
    sys.exit(main())
