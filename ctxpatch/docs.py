"""The generated parts of README.md, docs/ and benchmarks/README.md: every table is written by this command.

    python -m ctxpatch.docs                  # print the method table
    python -m ctxpatch.docs --write          # rewrite every generated block of the repository's docs
    python -m ctxpatch.docs --check          # exit 1, naming the stale files, when a block differs
    python -m ctxpatch.docs FILE...          # rewrite the blocks of these files

A block is the text between `<!-- NAME:start -->` and `<!-- NAME:end -->`; `BLOCKS` says what each NAME holds
(the method table from `ctxpatch.methods()`, the result tables from the committed runs `benchmarks/runs.json`
indexes, see `ctxpatch.results`; the supported families from `ctxpatch.adapters.families`). tests/test_docs.py fails when a block differs from what this generates.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

from . import results
from .adapters.families import table as families_table
from .registry import methods_table

ROOT = Path(__file__).resolve().parent.parent  # the repository (a source checkout)
START, END = "<!-- methods:start -->", "<!-- methods:end -->"
BLOCK = re.compile(r"<!-- ([a-z0-9-]+):start -->")


def _index(root: Path) -> results.Index:
    return results.read_index(root / "benchmarks")


def _which(root: Path) -> str:
    index = _index(root)
    return results.which_table(index) + "\n" + results.evidence_note(index)


def _results(kind: str, root: Path) -> str:
    return results.results_table(_index(root), kind)


BLOCKS: dict[str, Callable[[Path], str]] = {
    "methods": lambda root: methods_table(),
    "which": _which,
    "results-training-free": partial(_results, "training-free"),
    "results-fine-tuned": partial(_results, "fine-tuned"),
    "results-ceiling": partial(_results, "ceiling"),
    "evidence": lambda root: results.evidence_note(_index(root)),
    "runs": lambda root: results.runs_index(_index(root)),
    "runs-detail": lambda root: results.runs_detail(_index(root)),
    "families": lambda root: families_table() + "\n",
}


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def block_in(text: str, name: str) -> str | None:
    """The text between a block's markers (None when a marker is missing)."""
    start, end = markers(name)
    if start not in text or end not in text:
        return None
    return text.split(start, 1)[1].split(end, 1)[0].strip("\n") + "\n"


def with_block(text: str, name: str, content: str) -> str:
    """`text` with the block's contents replaced by `content` (ValueError when a marker is missing)."""
    start, end = markers(name)
    if block_in(text, name) is None:
        raise ValueError(f"no {start} ... {end} markers")
    head, rest = text.split(start, 1)
    return f"{head}{start}\n{content}{end}{rest.split(end, 1)[1]}"


def table_in(text: str) -> str | None:
    """The method table's block (None when a marker is missing)."""
    return block_in(text, "methods")


def with_table(text: str, table: str) -> str:
    return with_block(text, "methods", table)


def known_blocks(text: str) -> list[str]:
    """The names of the generated blocks a text holds, in order (unknown names skipped)."""
    return [name for name in dict.fromkeys(BLOCK.findall(text)) if name in BLOCKS]


def generated(text: str, root: Path = ROOT) -> str:
    """`text` with every known block regenerated."""
    for name in known_blocks(text):
        text = with_block(text, name, BLOCKS[name](root))
    return text


def doc_files(root: Path = ROOT) -> list[Path]:
    """The files whose blocks `--write` and `--check` keep: README.md, docs/**/*.md, benchmarks/README.md."""
    files = [root / "README.md", *sorted((root / "docs").rglob("*.md")), root / "benchmarks" / "README.md"]
    return [f for f in files if f.is_file()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ctxpatch.docs", description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", type=Path, help="files whose blocks to rewrite")
    parser.add_argument("--write", action="store_true", help="rewrite every doc file's blocks")
    parser.add_argument("--check", action="store_true", help="exit 1 when a doc file's block is stale")
    args = parser.parse_args(argv)
    if not (args.files or args.write or args.check):
        print(methods_table(), end="")
        return 0
    stale = []
    for path in args.files or doc_files():
        try:
            text = path.read_text(encoding="utf-8")
            if args.files and not known_blocks(text):
                raise ValueError("no generated blocks (<!-- NAME:start --> ... <!-- NAME:end -->)")
            new = generated(text)
        except (OSError, ValueError) as error:
            print(f"ctxpatch.docs: {path}: {error}", file=sys.stderr)
            return 2
        if new != text:
            stale.append(path)
            if not args.check:
                path.write_text(new, encoding="utf-8")
    if args.check and stale:
        print("stale generated blocks: " + ", ".join(map(str, stale)) + "; run `python -m ctxpatch.docs --write`",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
