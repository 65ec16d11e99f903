"""The leaderboard's retrieval cells: prompts found, prompts, and a 95% Wilson interval, in leaderboard.md and .json."""

from __future__ import annotations

import math

import pytest
import torch

from ctxpatch.eval.report import Leaderboard, Record, count_cell, wilson_interval


def wilson_by_the_quadratic(found: int, n: int, z: float) -> tuple[float, float]:
    """The interval's ends as the roots of (p - x)^2 = z^2 x (1 - x) / n, solved in float64 (not ctxpatch's form)."""
    p = found / n
    a, b, c = 1 + z * z / n, -(2 * p + z * z / n), p * p
    root = math.sqrt(b * b - 4 * a * c)
    return (-b - root) / (2 * a), (-b + root) / (2 * a)


@pytest.mark.parametrize("found,n", [(0, 1), (1, 1), (0, 3), (1, 3), (2, 3), (3, 3), (1, 5), (3, 5), (4, 5),
                                     (8, 15), (0, 100), (37, 100)])
def test_wilson_interval_is_the_root_pair_of_its_quadratic(found, n):
    z = 1.959963984540054
    expected = torch.tensor(wilson_by_the_quadratic(found, n, z), dtype=torch.float64).clamp(0, 1)
    torch.testing.assert_close(torch.tensor(wilson_interval(found, n), dtype=torch.float64), expected)


def test_wilson_interval_known_values_and_edges():
    torch.testing.assert_close(torch.tensor(wilson_interval(3, 5)), torch.tensor((0.2307, 0.8824)), atol=1e-4, rtol=0)
    assert wilson_interval(0, 5)[0] == 0.0 and wilson_interval(5, 5)[1] == 1.0
    assert wilson_interval(0, 0) == (0.0, 1.0)
    assert count_cell(3, 5) == "3/5 [23–88%]"


def board() -> Leaderboard:
    records = [Record("reference", "ppl", 64, 10.0), Record("a", "ppl", 64, 11.0)]
    records += [Record("a", "passkey", 64, v, depth=d) for d, v in ((0.0, 1.0), (0.5, 0.0), (1.0, 1.0))]
    return Leaderboard("tiny", 32, {"samples": 1, "depths": [0.0, 0.5, 1.0], "tail": 8}, records=records,
                       seconds={"a": 1.0})


def test_leaderboard_writes_counts_and_intervals():
    md = board().markdown()
    assert "| `a` | 2/3 [21–94%] |" in md and "95% Wilson interval" in md
    cell = board().to_json()["summary"]["a"]["passkey_interval"][64]
    low, high = wilson_interval(2, 3)
    assert cell == {"found": 2, "n": 3, "low": low, "high": high}
