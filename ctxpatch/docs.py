"""The method table of README.md and docs/DESIGN.md, generated from `ctxpatch.methods()`.

    python -m ctxpatch.docs                       # print the table
    python -m ctxpatch.docs README.md docs/DESIGN.md   # rewrite it between the marker comments

Each file holds the table between `<!-- methods:start -->` and `<!-- methods:end -->`;
tests/test_docs.py fails when what is there differs from what this generates.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .registry import methods_table

START, END = "<!-- methods:start -->", "<!-- methods:end -->"


def table_in(text: str) -> str | None:
    """The text between the markers (None when a marker is missing)."""
    if START not in text or END not in text:
        return None
    return text.split(START, 1)[1].split(END, 1)[0].strip("\n") + "\n"


def with_table(text: str, table: str) -> str:
    """`text` with the markers' contents replaced by `table` (ValueError when a marker is missing)."""
    if table_in(text) is None:
        raise ValueError(f"no {START} ... {END} markers")
    head, rest = text.split(START, 1)
    return f"{head}{START}\n{table}{END}{rest.split(END, 1)[1]}"


def main(argv: list[str] | None = None) -> int:
    paths = sys.argv[1:] if argv is None else argv
    table = methods_table()
    if not paths:
        print(table, end="")
        return 0
    for path in map(Path, paths):
        try:
            path.write_text(with_table(path.read_text(encoding="utf-8"), table), encoding="utf-8")
        except (OSError, ValueError) as error:
            print(f"ctxpatch.docs: {path}: {error}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
