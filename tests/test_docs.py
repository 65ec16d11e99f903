"""The method tables of README.md and docs/DESIGN.md are the ones `ctxpatch.methods()` generates."""

from __future__ import annotations

from pathlib import Path

import pytest

import ctxpatch
from ctxpatch.docs import END, START, table_in, with_table
from ctxpatch.registry import methods_table

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", ["README.md", "docs/DESIGN.md"])
def test_method_table_is_the_generated_one(name):
    table = table_in((ROOT / name).read_text(encoding="utf-8"))
    if table is None:
        pytest.skip(f"{name} has no {START} / {END} markers yet")
    assert table == methods_table(), f"{name}'s method table is stale: run `python -m ctxpatch.docs {name}`"


def test_the_table_has_one_row_per_method_with_its_defaults():
    rows = methods_table().splitlines()[2:]
    assert [row.split("|")[1].strip() for row in rows] == [f"`{m.name}`" for m in ctxpatch.methods()]
    window = next(row for row in rows if row.startswith("| `window` "))
    assert window == "| `window` | mask | yes | visible iff 0 ≤ Δ < W | `window` (L) |"
    for name in ("alibi", "kerple_log", "kerple_power", "sandwich", "xpos"):  # `training_free = False` in their files
        assert next(row for row in rows if row.startswith(f"| `{name}` ")).split("|")[3].strip().startswith("no")
    sinks = next(row for row in rows if row.startswith("| `sinks` "))
    assert "`global_tokens` (4), `window` (L - S)" in sinks
    assert "combines with any other" in next(row for row in rows if row.startswith("| `xpos` "))
    assert all(row.count("|") == 6 for row in rows)  # no cell breaks the table


def test_with_table_replaces_only_between_the_markers():
    text = f"intro\n{START}\nold\n{END}\noutro\n"
    assert with_table(text, "new\n") == f"intro\n{START}\nnew\n{END}\noutro\n"
    assert table_in(with_table(text, "new\n")) == "new\n"
    with pytest.raises(ValueError):
        with_table("no markers", "new\n")


def test_changelog_sections_each_appear_once_per_release():
    release, seen = None, set()
    for line in (ROOT / "CHANGELOG.md").read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            release, seen = line, set()
        elif line.startswith("### "):
            assert line not in seen, f"CHANGELOG.md: {release} has two '{line}' sections; merge them"
            seen.add(line)
