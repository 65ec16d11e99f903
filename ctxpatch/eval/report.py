"""The leaderboard: per-sample records summarised by spec, task and length, as markdown, JSON and PNG plots.

Perplexity is summarised as the ratio full / native: the perplexity of a window's last `tail` tokens with the
whole window as context, over the perplexity of the same tokens given only the last train_len tokens, scored
by the model as given (the reference). Below 1 the extra context helped; above 1 it hurt. Inside the trained
length the two contexts are the same tokens, so the ratio is the patch's cost against the model as given.
Retrieval tasks are summarised as accuracy over depths and samples, with the number of prompts and a 95%
Wilson score interval (`wilson_interval`): one prompt per depth makes "1/5 vs 3/5" a tie. A spec that refused
its target at a length (`--target-len auto`) has a "refused: <reason>" cell there.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REFERENCE = "reference"


@dataclass(frozen=True)
class Record:
    """One scored sample: a perplexity (task "ppl") or a score in [0, 1]."""

    spec: str
    task: str
    length: int
    value: float
    sample: int = 0
    depth: float | None = None


def geometric_mean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


Z95 = 1.959963984540054  # the standard normal's 97.5% quantile: a two-sided 95% interval


def wilson_interval(found: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion `found / n` (Wilson 1927), (0, 1) for n = 0.

    Unlike the normal approximation it stays inside [0, 1] and is not empty at 0/n or n/n, which is
    where a few retrieval prompts per cell usually land.
    """
    if n == 0:
        return 0.0, 1.0
    p, z2 = found / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def count_cell(found: int, n: int) -> str:
    """A retrieval cell as the docs and leaderboard.md show it: "found/n [low–high%]" (95% Wilson)."""
    low, high = wilson_interval(found, n)
    return f"{found}/{n} [{100 * low:.0f}–{100 * high:.0f}%]"


@dataclass
class Leaderboard:
    model_name: str
    train_len: int
    config: dict[str, Any]
    reference: str = "none"
    records: list[Record] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    forwards: int = 0
    unscored: int = 0  # a report of a run in progress: forwards still to run (their cells are "–")
    refused: dict[str, dict[int, str]] = field(default_factory=dict)  # spec -> length -> why it refused that target
    patches: dict[str, dict[str, Any]] = field(default_factory=dict)  # spec -> target_len -> Patch.to_dict()

    # ---- summaries -----------------------------------------------------------------------------------------------

    @property
    def specs(self) -> list[str]:
        measured = (r.spec for r in self.records if r.spec != REFERENCE)
        return list(dict.fromkeys([*self.seconds, *self.refused, *measured]))

    @property
    def lengths(self) -> list[int]:
        return sorted({r.length for r in self.records} | {n for by_length in self.refused.values() for n in by_length})

    def refusal(self, spec: str, length: int) -> str | None:
        return self.refused.get(spec, {}).get(length)

    @property
    def retrieval_tasks(self) -> list[str]:
        return list(dict.fromkeys(r.task for r in self.records if r.task != "ppl"))

    def _values(self, spec: str, task: str, length: int) -> list[float]:
        return [r.value for r in self.records if r.spec == spec and r.task == task and r.length == length]

    def perplexity(self, spec: str, length: int) -> float | None:
        values = self._values(spec, "ppl", length)
        return geometric_mean(values) if values else None

    def native_perplexity(self, length: int) -> float | None:
        return self.perplexity(REFERENCE, length)

    def ratio(self, spec: str, length: int) -> float | None:
        full, native = self.perplexity(spec, length), self.native_perplexity(length)
        return None if full is None or native is None else full / native

    def accuracy(self, spec: str, task: str, length: int, depth: float | None = None) -> float | None:
        values = [r.value for r in self.records if r.spec == spec and r.task == task and r.length == length
                  and (depth is None or r.depth == depth)]
        return mean(values) if values else None

    def found(self, spec: str, task: str, length: int) -> tuple[int, int]:
        """(prompts answered, prompts) of a retrieval cell; scores are 0 or 1, a fraction counts as found at >= 0.5."""
        values = self._values(spec, task, length)
        return sum(v >= 0.5 for v in values), len(values)

    def interval(self, spec: str, task: str, length: int) -> dict[str, float | int] | None:
        """The cell's count and 95% Wilson interval, as leaderboard.json holds it (None when unscored)."""
        found, n = self.found(spec, task, length)
        if n == 0:
            return None
        low, high = wilson_interval(found, n)
        return {"found": found, "n": n, "low": low, "high": high}

    def depths(self, task: str) -> list[float]:
        return sorted({r.depth for r in self.records if r.task == task and r.depth is not None})

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"native_perplexity": {n: self.native_perplexity(n) for n in self.lengths}}
        for spec in self.specs:
            row: dict[str, Any] = {"seconds": self.seconds.get(spec)}
            row["perplexity"] = {n: self.perplexity(spec, n) for n in self.lengths}
            row["ratio"] = {n: self.ratio(spec, n) for n in self.lengths}
            for task in self.retrieval_tasks:
                row[task] = {n: self.accuracy(spec, task, n) for n in self.lengths}
                row[f"{task}_interval"] = {n: self.interval(spec, task, n) for n in self.lengths}
            if spec in self.refused:
                row["refused"] = dict(self.refused[spec])
            out[spec] = row
        return out

    # ---- markdown ------------------------------------------------------------------------------------------------

    def markdown(self) -> str:
        lengths = self.lengths
        head = "| spec | " + " | ".join(f"{n:,}" for n in lengths) + " |\n|---|" + "---:|" * len(lengths) + "\n"
        parts = [
            f"Model `{self.model_name}`, trained length {self.train_len:,}; reference: {self.reference}. "
            f"Lengths in tokens; {self.config.get('samples', 1)} sample(s) per length"
            + (f", depths {', '.join(f'{d:g}' for d in self.config.get('depths', []))}" if self.retrieval_tasks else "")
            + "."
        ]
        if self.unscored:
            parts.append(f"**A run in progress:** {self.unscored} forward(s) not scored yet; their cells are –.")
        if any(r.task == "ppl" for r in self.records):
            parts.append(
                f"**Perplexity ratio** full / native context, same tokens (last {self.config.get('tail')} of each "
                "window; < 1: the extra context helped; inside the trained length: the patch's cost), "
                "perplexity in brackets\n\n" + head
                + "".join(f"| `{spec}` | " + " | ".join(self._ratio_cell(spec, n) for n in lengths) + " |\n"
                          for spec in self.specs)
                + "| native reference | " + " | ".join(_number(self.native_perplexity(n)) for n in lengths) + " |\n"
            )
        for task in self.retrieval_tasks:
            parts.append(
                f"**{task}** prompts found / prompts over depths and samples [95% Wilson interval]\n\n" + head
                + "".join(f"| `{spec}` | " + " | ".join(self._accuracy_cell(spec, task, n) for n in lengths)
                          + " |\n" for spec in self.specs)
            )
        return "\n\n".join(parts) + "\n"

    def _ratio_cell(self, spec: str, length: int) -> str:
        if self.refusal(spec, length):
            return _refused(self.refusal(spec, length))
        ratio, ppl = self.ratio(spec, length), self.perplexity(spec, length)
        if ppl is None:
            return "–"
        return f"{_number(ratio)} ({_number(ppl)})" if ratio is not None else _number(ppl)

    def _accuracy_cell(self, spec: str, task: str, length: int) -> str:
        if self.refusal(spec, length):
            return _refused(self.refusal(spec, length))
        found, n = self.found(spec, task, length)
        return count_cell(found, n) if n else "–"

    # ---- files -------------------------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model_name, "train_len": self.train_len, "reference": self.reference,
            "config": self.config, "seconds": self.seconds, "forwards": self.forwards,
            "unscored": self.unscored,
            "summary": self.summary(), "refused": self.refused, "patches": self.patches,
            "records": [asdict(r) for r in self.records],
        }

    def write(self, folder: Path) -> list[Path]:
        """leaderboard.md, leaderboard.json and the plots, in `folder`; returns the paths written."""
        from .plots import write_plots

        folder.mkdir(parents=True, exist_ok=True)
        written = [folder / "leaderboard.md", folder / "leaderboard.json"]
        written[0].write_text(self.markdown(), encoding="utf-8")
        written[1].write_text(json.dumps(self.to_json(), indent=1), encoding="utf-8")
        return written + write_plots(self, folder)


def _number(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.3g}" if value < 1000 else f"{value:,.0f}"


def _refused(reason: str) -> str:
    return "refused: " + reason.replace("|", "\\|").replace("\n", " ")

