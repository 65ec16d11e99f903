"""`ctxpatch methods`: every registered method with its kind, parameters and defaults."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("methods", help="list every method: kind, training-free or not, parameters and defaults")
    p.set_defaults(func=run_methods)


def run_methods(args: argparse.Namespace) -> int:
    from .registry import methods  # importing ctxpatch.* ran ctxpatch/__init__, which registered every method

    print(f"{'name':<14} {'kind':<9} {'training-free':<13} {'parameters (defaults; L = trained length)':<60} summary")
    for row in methods():
        print(row)
    return 0
