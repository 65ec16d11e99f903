"""The committed benchmark results as the docs show them: every table is made here from raw run folders.

`benchmarks/runs.json` indexes the runs: each entry names its folders under `benchmarks/` (each holding the
`leaderboard.json` that `ctxpatch compare` / `eval` wrote beside its `scores.jsonl`), the date, the command that
produced it, the machine, what it showed, and its kind:

* `training-free` — untrained specs on the held-out text; the "Which method?" table and docs/results.md use them;
* `fine-tuned` — a fine-tune run folder evaluated after its recipe (its `labels` name the carried spec);
* `ceiling` — the unpatched model at its trained length: the retrieval a patch must keep;
* `other` — kept and indexed (older protocols, controls, cost benchmarks), shown only in benchmarks/README.md.

A run may name in `supersedes` earlier folders whose prompts it re-ran with more beside them (`--resume` from
their scores): where both measure the same task of the same spec at the same length, its count stands instead.

A retrieval cell is "found/prompts [95% Wilson interval]" (`ctxpatch.eval.report.count_cell`); a perplexity cell
is the ratio full / native context with the perplexity in brackets. `ctxpatch.docs` writes these tables between
marker comments; tests/test_docs.py fails when what is written differs from what the raw results give.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .eval.report import Leaderboard, Record, count_cell, wilson_interval

KINDS = ("training-free", "fine-tuned", "ceiling", "other")
TASKS = {"passkey": "passkey", "niah": "needle"}  # leaderboard task -> column name
TARGETS = (2, 4, 8, 16)  # the "Which method?" table's rows: multiples of the trained length


@dataclass(frozen=True)
class Run:
    """One entry of benchmarks/runs.json."""

    paths: tuple[str, ...]
    date: str
    command: str
    machine: str
    showed: str
    kind: str = "other"
    labels: dict[str, str] = field(default_factory=dict)  # spec as recorded -> as the tables name it
    supersedes: tuple[str, ...] = ()  # folders whose measurements of the same cell and task this run's replace


@dataclass
class Cell:
    """What the runs of one kind measured for one spec at one length."""

    label: str
    length: int
    ratio: float | None = None
    perplexity: float | None = None
    found: dict[str, tuple[int, int]] = field(default_factory=dict)  # task -> (found, prompts)
    params: str = ""  # the resolved parameters, as "local_window=1024, chunk_len=5120"
    sources: list[str] = field(default_factory=list)
    machines: list[str] = field(default_factory=list)
    origins: dict[str, str] = field(default_factory=dict)  # "ppl" or task -> the folder its number came from

    def retrieval(self) -> tuple[int, int]:
        """Passkey and needle prompts pooled: (found, prompts)."""
        return sum(f for f, _ in self.found.values()), sum(n for _, n in self.found.values())


@dataclass(frozen=True)
class Index:
    model: str
    machines: dict[str, str]
    runs: tuple[Run, ...]
    root: Path  # the benchmarks/ folder

    def boards(self, run: Run) -> list[tuple[str, Leaderboard]]:
        """(path, leaderboard) of each of the run's folders that holds a leaderboard.json."""
        out = []
        for path in run.paths:
            file = self.root / path / "leaderboard.json"
            if file.is_file():
                out.append((path, leaderboard_from_json(json.loads(file.read_text(encoding="utf-8")))))
        return out


def read_index(root: Path) -> Index:
    """benchmarks/runs.json under `root` (the benchmarks folder); ValueError naming what is wrong."""
    data = json.loads((root / "runs.json").read_text(encoding="utf-8"))
    runs = tuple(Run(paths=tuple(r.pop("paths")), supersedes=tuple(r.pop("supersedes", ())), **r)
                 for r in data["runs"])
    indexed = {path for run in runs for path in run.paths}
    for run in runs:
        if run.kind not in KINDS:
            raise ValueError(f"benchmarks/runs.json: {run.paths[0]}: kind {run.kind!r} is not one of {KINDS}")
        if run.machine not in data["machines"]:
            raise ValueError(f"benchmarks/runs.json: {run.paths[0]}: machine {run.machine!r} is not in 'machines'")
        for path in set(run.supersedes) - indexed:
            raise ValueError(f"benchmarks/runs.json: {run.paths[0]}: supersedes {path!r}, which no run indexes")
    return Index(data["model"], data["machines"], runs, root)


def leaderboard_from_json(data: dict[str, Any]) -> Leaderboard:
    """The Leaderboard a leaderboard.json was written from: its records, refusals and patches."""
    refused = {spec: {int(n): why for n, why in by_length.items()}
               for spec, by_length in data.get("refused", {}).items()}
    return Leaderboard(
        data["model"], data["train_len"], data["config"], data.get("reference", "none"),
        records=[Record(**r) for r in data["records"]], seconds=data.get("seconds", {}),
        refused=refused, patches=data.get("patches", {}),
    )


def resolved_params(board: Leaderboard, spec: str, length: int) -> str:
    """The parameters the spec ran with at `length` (the target-length rule's choices), or ""."""
    by_target = board.patches.get(spec, {})
    saved = by_target.get(str(length)) or by_target.get(length) or next(iter(by_target.values()), None)
    if not saved:
        return ""
    parts = [", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in m["params"].items()
                       if v is not None) for m in saved.get("methods", [])]
    return "; ".join(p for p in parts if p)


def cells(index: Index, kind: str) -> list[Cell]:
    """Every (spec, length) the runs of `kind` measured, their tasks merged; a task measured twice is an error
    unless one run supersedes the other's folder."""
    out: dict[tuple[str, int], Cell] = {}
    superseded = {path: set(run.supersedes) for run in index.runs for path in run.paths}
    machine = {path: run.machine for run in index.runs for path in run.paths}

    def replaces(new: str, old: str) -> bool:
        return old in superseded[new]

    for run in (r for r in index.runs if r.kind == kind):
        for path, board in index.boards(run):
            for spec in board.specs:
                label = run.labels.get(spec, spec)
                for length in board.lengths:
                    cell = out.setdefault((label, length), Cell(label, length))
                    if _merge(cell, board, spec, length, path, replaces):
                        cell.params = cell.params or resolved_params(board, spec, length)
    for cell in out.values():
        cell.sources = list(dict.fromkeys(cell.origins.values()))
        cell.machines = list(dict.fromkeys(machine[path] for path in cell.sources))
    return [c for c in out.values() if c.sources]


def _merge(cell: Cell, board: Leaderboard, spec: str, length: int, path: str = "",
           replaces=lambda new, old: False) -> bool:
    """Adds what `board` measured of `spec` at `length` to `cell`; whether it measured anything."""
    measured: dict[str, Any] = {}
    if board.perplexity(spec, length) is not None:
        measured["ppl"] = (board.perplexity(spec, length), board.ratio(spec, length))
    for task in TASKS:
        found, n = board.found(spec, task, length)
        if n:
            measured[task] = (found, n)
    for what, value in measured.items():
        old = cell.origins.get(what)
        if old is not None and not replaces(path, old):
            if replaces(old, path):
                continue
            task = "the perplexity" if what == "ppl" else what
            raise ValueError(f"two runs measure {task} of {cell.label} at {length}: mark one kind 'other', "
                             "or name the older folder in the newer run's 'supersedes'")
        if what == "ppl":
            cell.perplexity, cell.ratio = value
        else:
            cell.found[what] = value
        cell.origins[what] = path
    return bool(measured)


# ---- cells as text ---------------------------------------------------------------------------------------


def number(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.3g}" if value < 1000 else f"{value:,.0f}"


def ratio_number(value: float | None) -> str:
    """A perplexity ratio to 3 decimals (1.005 is not 1), large ones as `number` does."""
    return number(value) if value is None or value >= 10 else f"{value:.3f}"


def ratio_cell(cell: Cell) -> str:
    if cell.perplexity is None:
        return "–"
    if cell.ratio is None:
        return number(cell.perplexity)
    return f"{ratio_number(cell.ratio)} ({number(cell.perplexity)})"


def task_cell(cell: Cell, task: str) -> str:
    return count_cell(*cell.found[task]) if task in cell.found else "–"


def tokens(length: int) -> str:
    return f"{length // 1024}k" if length % 1024 == 0 else f"{length:,}"


def overlap(a: tuple[int, int], b: tuple[int, int]) -> bool:
    """Whether the 95% Wilson intervals of two counts overlap (their difference is not shown by these prompts)."""
    (low_a, high_a), (low_b, high_b) = wilson_interval(*a), wilson_interval(*b)
    return low_a <= high_b and low_b <= high_a


# ---- tables --------------------------------------------------------------------------------------------------


def train_len(index: Index) -> int:
    lengths = {board.train_len for run in index.runs for _, board in index.boards(run)}
    if len(lengths) != 1:
        raise ValueError(f"benchmarks/runs.json: the runs' models have trained lengths {sorted(lengths)}; one expected")
    return lengths.pop()


def results_table(index: Index, kind: str) -> str:
    """Every cell of one kind: length, spec, ratio (ppl), passkey, needle, parameters, raw folders."""
    lines = ["| length | spec | ratio (ppl) | passkey | needle | parameters | machine | raw (benchmarks/) |",
             "|---|---|---:|---:|---:|---|---|---|"]
    for cell in sorted(cells(index, kind), key=lambda c: c.length):
        raw = ", ".join(f"`{s}`" for s in cell.sources)
        lines.append(f"| {tokens(cell.length)} | `{cell.label}` | {ratio_cell(cell)} | {task_cell(cell, 'passkey')} "
                     f"| {task_cell(cell, 'niah')} | {cell.params or '—'} | {', '.join(cell.machines)} | {raw} |")
    return "\n".join(lines) + "\n"


def _describe(cell: Cell) -> str:
    found = "; ".join(f"{TASKS[t]} {count_cell(*cell.found[t])}" for t in TASKS if t in cell.found)
    return f"`{cell.label}`: ratio {ratio_number(cell.ratio)}" + (f"; {found}" if found else "")


def _best_ratio(candidates: list[Cell]) -> Cell | None:
    rated = [c for c in candidates if c.ratio is not None]
    return min(rated, key=lambda c: c.ratio) if rated else None


def _best_retrieval(candidates: list[Cell]) -> Cell | None:
    """The highest share of prompts found that its prompts support: the lower end of the 95% Wilson interval (12
    of 16 outranks 3 of 3); ties go to the higher share, then to the lower ratio."""
    measured = [c for c in candidates if c.retrieval()[1]]
    if not measured:
        return None
    return max(measured, key=lambda c: (wilson_interval(*c.retrieval())[0], c.retrieval()[0] / c.retrieval()[1],
                                        -(c.ratio or float("inf"))))


def pick(candidates: list[Cell]) -> str:
    """One cell of the "Which method?" table: the best ratio, and the best retrieval when another spec; says so
    when the retrieval pick's lead over the runner-up rests on overlapping 95% intervals, or when one spec was
    measured at all."""
    by_ratio, by_retrieval = _best_ratio(candidates), _best_retrieval(candidates)
    if by_ratio is None and by_retrieval is None:
        return "not measured"
    if by_ratio is None:  # no perplexity measured at this length: the pick is for retrieval only
        text = "for retrieval " + _describe(by_retrieval)
    elif by_retrieval is None:
        text = "for perplexity " + _describe(by_ratio)
    elif by_retrieval is by_ratio:
        text = "for perplexity and retrieval " + _describe(by_ratio)
    else:
        text = f"for perplexity {_describe(by_ratio)}<br>for retrieval {_describe(by_retrieval)}"
    if len({c.label for c in candidates}) == 1:
        text += "<br>(the only spec measured at this length: nothing to beat)"
    runner_up = _best_retrieval([c for c in candidates if c is not by_retrieval])
    if by_retrieval is not None and runner_up is not None and overlap(by_retrieval.retrieval(), runner_up.retrieval()):
        found, n = runner_up.retrieval()
        text += f"<br>(retrieval: the 95% intervals overlap `{runner_up.label}`'s, {found}/{n}: not told apart)"
    return text


def which_table(index: Index) -> str:
    """The "Which method?" table: per target (2x..16x the trained length), the measured pick without training
    and after a recipe. Best perplexity = lowest ratio; best retrieval = the highest lower end of the 95% interval
    of the share of passkey and needle prompts found (pooled), ties to the higher share, then the lower ratio;
    `none` (unpatched) is never a pick."""
    length = train_len(index)
    free = [c for c in cells(index, "training-free") if c.label != "none"]
    tuned = cells(index, "fine-tuned")
    lines = ["| target | training-free | after a fine-tune recipe |", "|---|---|---|"]
    for factor in TARGETS:
        n = factor * length
        at = [c for c in free if c.length == n]
        after = [c for c in tuned if c.length == n]
        lines.append(f"| {factor}× ({tokens(n)}) | {pick(at)} | {pick(after)} |")
    return "\n".join(lines) + "\n"


def evidence_note(index: Index) -> str:
    """Where the figures come from: the model, the machines, the text, the prompts."""
    used = {r.machine for r in index.runs if r.kind != "other"}
    machines = "; ".join(index.machines[m] for m in sorted(used))
    return (f"Model: {index.model}. Machine: {machines}. Text: the held-out plays (never trained or tuned on), one "
            "window per length (a ratio has no interval) and one prompt per depth unless a cell's count says more "
            "(passkey 15 prompts: three per depth); retrieval cells are prompts found / "
            "prompts with a 95% Wilson interval; a pick's retrieval pools its passkey and needle prompts.\n")


def runs_index(index: Index) -> str:
    """benchmarks/README.md's index: one row per run, with the command that produced it."""
    lines = ["| date | kind | command | machine | what it showed | raw |", "|---|---|---|---|---|---|"]
    for run in index.runs:
        raw = ", ".join(f"[`{p}`]({p})" for p in run.paths)
        command = run.command.replace("|", "\\|")
        lines.append(f"| {run.date} | {run.kind} | `{command}` | {run.machine} | {run.showed} | {raw} |")
    machines = "\n".join(f"* `{name}`: {text}" for name, text in index.machines.items())
    return "\n".join(lines) + f"\n\nMachines:\n\n{machines}\n"


def runs_detail(index: Index) -> str:
    """Every indexed run's own cells (each folder as it was measured, nothing merged)."""
    parts = []
    for run in index.runs:
        boards = index.boards(run)
        if not boards:
            continue
        lines = [f"**{run.date}** `{run.command}`", "",
                 "| folder | length | spec | ratio (ppl) | passkey | needle |", "|---|---|---|---:|---:|---:|"]
        for path, board in boards:
            for spec in board.specs:
                for length in board.lengths:
                    cell = Cell(run.labels.get(spec, spec), length)
                    if _merge(cell, board, spec, length):
                        lines.append(f"| `{path}` | {tokens(length)} | `{cell.label}` | {ratio_cell(cell)} | "
                                     f"{task_cell(cell, 'passkey')} | {task_cell(cell, 'niah')} |")
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)
