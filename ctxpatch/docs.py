"""The generated tables of the docs: methods (from `ctxpatch.methods()`) and supported families (from
`ctxpatch.adapters.families`).

    python -m ctxpatch.docs                       # print the method table
    python -m ctxpatch.docs README.md docs/DESIGN.md docs/families.md   # rewrite every table a file marks

A file holds a table between `<!-- NAME:start -->` and `<!-- NAME:end -->` (NAME: methods, families);
tests/test_docs.py and tests/test_families.py fail when what is there differs from what this generates.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

from .adapters.families import table as families_table
from .registry import methods_table

TABLES: dict[str, Callable[[], str]] = {"methods": methods_table, "families": lambda: families_table() + "\n"}
START, END = "<!-- methods:start -->", "<!-- methods:end -->"


def markers(name: str = "methods") -> tuple[str, str]:
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def table_in(text: str, name: str = "methods") -> str | None:
    """The text between the markers of table `name` (None when a marker is missing)."""
    start, end = markers(name)
    if start not in text or end not in text:
        return None
    return text.split(start, 1)[1].split(end, 1)[0].strip("\n") + "\n"


def with_table(text: str, table: str, name: str = "methods") -> str:
    """`text` with table `name`'s markers' contents replaced by `table` (ValueError when a marker is missing)."""
    start, end = markers(name)
    if table_in(text, name) is None:
        raise ValueError(f"no {start} ... {end} markers")
    head, rest = text.split(start, 1)
    return f"{head}{start}\n{table}{end}{rest.split(end, 1)[1]}"


def with_tables(text: str) -> str:
    """`text` with every table it marks regenerated (ValueError when it marks none)."""
    names = [name for name in TABLES if table_in(text, name) is not None]
    if not names:
        raise ValueError(f"no table markers ({', '.join(markers(name)[0] for name in TABLES)})")
    for name in names:
        text = with_table(text, TABLES[name](), name)
    return text


def main(argv: list[str] | None = None) -> int:
    paths = sys.argv[1:] if argv is None else argv
    if not paths:
        print(methods_table(), end="")
        return 0
    for path in map(Path, paths):
        try:
            path.write_text(with_tables(path.read_text(encoding="utf-8")), encoding="utf-8")
        except (OSError, ValueError) as error:
            print(f"ctxpatch.docs: {path}: {error}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
