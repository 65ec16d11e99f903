"""Successive halving over the candidates, behind a `Scorer`; resumable, spread over processes.

**Objective** (what "best" means, in this order):
  1. a candidate whose short-context ratio (perplexity inside the trained length ÷ the unpatched model's on
     the same windows) is above `SHORT_LIMIT` (1.02) ranks after every candidate that is not;
  2. retrieval: the mean passkey / needle accuracy at the round's length (higher first);
  3. the perplexity ratio: perplexity of the windows' tails with the full context ÷ with only the last L
     tokens on the unpatched model (the same tokens; geometric mean over windows; lower first);
  4. cost: the estimated cost of a forward under the candidate (`candidates.forward_cost`; lower first);
  5. the label, so ties break the same way every time.

**Nothing lost:** each measurement is appended to `measurements.jsonl` under `out_dir` as it completes;
`resume=True` reads it (and the schedule saved in `state.json`) and measures only what is missing, so a
resumed run does the same work and ends with the same result as an uninterrupted one.

**Processes:** under torch.distributed (torchrun, accelerate launch), rank r measures candidates r, r+W, ...
of each round (and baseline items r, r+W, ...); the scores are all-gathered after each round, so every rank
ranks the same numbers and the result is the one-process result. Only rank 0 writes.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ..jsonlog import JsonLog
from .candidates import BASELINE, Candidate, CandidateSet
from .schedule import RETRIEVAL, Item, Schedule, baseline_seconds, format_seconds

SHORT_LIMIT = 1.02
MEASUREMENTS = "measurements.jsonl"
STATE = "state.json"
OBJECTIVE = (
    "rank after every other candidate when the short-context ratio (inside the trained length) is above 1.02; "
    "then retrieval (passkey / needle accuracy at the round's length, higher first); then the perplexity ratio "
    "(full context / the unpatched model's native context, same tokens, geometric mean; lower first); then the "
    "estimated cost of a forward; then the label"
)

Key = tuple[str, str, int, int]  # (candidate label, kind, length, index)


class Scorer(Protocol):
    """What the search needs measured: one number per (candidate, kind, length, index).

    kind "ppl": perplexity of window `index`'s tail at `length` tokens under the candidate; "native": the same
    tail with only the trained length of context (asked of the unpatched BASELINE only); "passkey" / "niah":
    1.0 when retrieval number `index` (depth `schedule.depth(index)`) at `length` tokens is found, else 0.0."""

    def measure(self, candidate: Candidate, kind: str, length: int, index: int) -> float: ...


# ---- processes ------------------------------------------------------------------------------------------------


class Comm:
    """One process."""

    rank, world = 0, 1

    def all_gather(self, obj: Any) -> list[Any]:
        return [obj]


class TorchComm(Comm):
    """torch.distributed's default group (gloo on CPU, nccl on GPUs)."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self.dist = dist
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    def all_gather(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world
        self.dist.all_gather_object(out, obj)
        return out


def current_comm() -> Comm:
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch without distributed
        return Comm()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return TorchComm()
    return Comm()


# ---- the log ----------------------------------------------------------------------------------------------------


class MeasurementLog:
    """The measurements as they complete (`JsonLog`), keyed by (candidate, kind, length, index)."""

    def __init__(self, folder: Path | None, write: bool):
        self.log = JsonLog(None if folder is None else Path(folder) / MEASUREMENTS, write)

    def read(self) -> dict[Key, dict[str, Any]]:
        return {(row["candidate"], row["kind"], row["length"], row["index"]): row for row in self.log.rows()}

    def append(self, rows: Iterable[dict[str, Any]]) -> None:
        self.log.append(rows)


# ---- scores -----------------------------------------------------------------------------------------------------


@dataclass
class Score:
    label: str
    retrieval: float | None
    ratio: float
    short: float | None
    cost: float

    @property
    def penalised(self) -> bool:
        return self.short is not None and self.short > SHORT_LIMIT

    def key(self) -> tuple:
        ratio = self.ratio if math.isfinite(self.ratio) else math.inf
        return (self.penalised, -(self.retrieval or 0.0), ratio, self.cost, self.label)

    def to_dict(self) -> dict[str, Any]:
        return {"candidate": self.label, "retrieval": self.retrieval, "ratio": self.ratio, "short_ratio": self.short,
                "penalised": self.penalised, "cost": self.cost}


def geometric_mean(values: list[float]) -> float:
    if not values:
        return math.nan
    if any(not math.isfinite(v) or v <= 0 for v in values):
        return math.inf
    return math.exp(sum(math.log(v) for v in values) / len(values))


def score(label: str, results: dict[Key, dict], known: set[Item], length: int, train_len: int, cost: float) -> Score:
    """The candidate's aggregate over the `known` items (those every candidate still in the race has): the
    perplexity ratio and retrieval at `length`, the short-context ratio at the trained length."""
    def value(who: str, item: Item, kind: str | None = None) -> float:
        return float(results[(who, kind or item.kind, item.length, item.index)]["value"])

    base = BASELINE.label
    mine = sorted(known)
    ratios = [value(label, i) / value(base, i, "native") for i in mine if i.kind == "ppl" and i.length == length]
    found = [value(label, i) for i in mine if i.kind in RETRIEVAL and i.length == length]
    shorts = [value(label, i) / value(base, i, "native") for i in mine if i.kind == "ppl" and i.length == train_len]
    return Score(label, sum(found) / len(found) if found else None, geometric_mean(ratios),
                 geometric_mean(shorts) if shorts else None, cost)


# ---- the search -------------------------------------------------------------------------------------------------


@dataclass
class SearchResult:
    winner: Candidate
    ranking: list[Score]  # the last round's, best first
    rounds: list[dict[str, Any]]  # per round: length, measurements ranked on, every candidate's score, who was kept
    eliminated: dict[str, int]  # label -> the round it was eliminated in
    results: dict[Key, dict[str, Any]]
    measured_s: float  # seconds spent measuring, summed over processes (this session and any resumed from the log)
    wall_s: float


def search(cands: CandidateSet, schedule: Schedule, scorer: Scorer, *, out_dir: str | Path | None = None,
           comm: Comm | None = None, progress: bool = True) -> SearchResult:
    """Run `schedule` over `cands` with `scorer`; `out_dir` holds the measurement log (read first: a resume)."""
    comm = comm or current_comm()
    started = time.perf_counter()
    log = MeasurementLog(None if out_dir is None else Path(out_dir), write=comm.rank == 0)
    results = log.read() if comm.rank == 0 else {}
    if comm.world > 1:  # rank 0's reading is everyone's (and comes after it wrote the state: no stale log)
        results = comm.all_gather(results)[0]
    if len(cands.candidates) != schedule.rounds[0].size:
        raise ValueError(f"the schedule is for {schedule.rounds[0].size} candidates, not {len(cands.candidates)}")
    bar = Progress(schedule, results, cands, enabled=progress and comm.rank == 0)
    by_label = {c.label: c for c in cands.candidates}

    todo = [(BASELINE, item) for item in schedule.baseline]
    measure_share(todo, results, scorer, comm, log, bar, round_index=-1)

    alive = [c.label for c in cands.candidates]
    rounds, eliminated = [], {}
    known: set[Item] = set()
    final: list[Score] = []
    for spec in schedule.rounds:
        todo = [(by_label[label], item) for label in alive for item in spec.items]
        bar.provisional = leader_so_far(alive, known | set(spec.items), spec.length, results, schedule.train_len,
                                        cands.cost)
        measure_share(todo, results, scorer, comm, log, bar, round_index=spec.index, owner=alive)
        known |= set(spec.items)
        scores = sorted((score(label, results, known, spec.length, schedule.train_len, cands.cost[label])
                         for label in alive), key=Score.key)
        kept = [s.label for s in scores[: spec.keep]]
        for s in scores[spec.keep:]:
            eliminated[s.label] = spec.index
        rounds.append({"round": spec.index, "length": spec.length, "measured": len(known),
                       "scores": [s.to_dict() for s in scores], "kept": kept})
        alive = [label for label in alive if label in kept]  # candidate order: the same split over ranks
        final = scores
        bar.leader = scores[0].label
    bar.close()
    measured = sum(float(row.get("seconds", 0.0)) for row in results.values())
    return SearchResult(by_label[final[0].label], final, rounds, eliminated, results, measured,
                        time.perf_counter() - started)


def leader_so_far(alive: list[str], items: set[Item], length: int, results: dict[Key, dict], train_len: int,
                  costs: dict[str, float]):
    """The best of the candidates that have every one of `items` so far: the progress bar's leader mid-round."""
    def leader() -> str | None:
        done = [label for label in alive if all((label, i.kind, i.length, i.index) in results for i in items)]
        if not done:
            return None
        return min((score(label, results, items, length, train_len, costs[label]) for label in done),
                   key=Score.key).label

    return leader


def measure_share(todo: list[tuple[Candidate, Item]], results: dict[Key, dict], scorer: Scorer, comm: Comm,
                  log: MeasurementLog, bar: Progress, round_index: int, owner: list[str] | None = None) -> None:
    """Measure what is missing of `todo`: this rank's share (by candidate position in `owner`, or by item),
    then gather every rank's rows so all ranks hold the same results."""
    missing = [(c, item) for c, item in todo if (c.label, item.kind, item.length, item.index) not in results]
    if owner is not None:
        position = {label: n for n, label in enumerate(owner)}
        mine = [(c, item) for c, item in missing if position[c.label] % comm.world == comm.rank]
    else:
        mine = [pair for n, pair in enumerate(missing) if n % comm.world == comm.rank]
    rows = []
    for candidate, item in mine:
        bar.start(candidate.label)
        began = time.perf_counter()
        value = float(scorer.measure(candidate, item.kind, item.length, item.index))
        row = {"candidate": candidate.label, "kind": item.kind, "length": item.length, "index": item.index,
               "value": value, "seconds": round(time.perf_counter() - began, 4), "round": round_index}
        rows.append(row)
        results[(row["candidate"], item.kind, item.length, item.index)] = row
        log.append([row])  # rank 0's own rows, as they complete
        bar.done(item, row["seconds"], candidate.label == BASELINE.label)
    if comm.world > 1:
        for rank, gathered in enumerate(comm.all_gather(rows)):
            if rank == comm.rank:
                continue
            for row in gathered:
                results[(row["candidate"], row["kind"], row["length"], row["index"])] = row
                bar.done(Item(row["kind"], row["length"], row["index"]), row["seconds"],
                         row["candidate"] == BASELINE.label)
            log.append(gathered)


class Progress:
    """tqdm over the schedule's measurements: the candidate measured, the leader, the time left (estimated)."""

    def __init__(self, schedule: Schedule, results: dict, cands: CandidateSet, enabled: bool):
        from tqdm.auto import tqdm

        self.schedule, self.leader, self.enabled = schedule, "-", enabled
        self.provisional = lambda: None  # the round's best so far, while it runs
        self.estimated_done_s = self.took_s = 0.0
        done = len(results)
        self.left_s = max(0.0, schedule.estimated_s - sum(
            self.estimate(Item(r["kind"], r["length"], r["index"]), r["candidate"] == BASELINE.label)
            for r in results.values()))
        self.bar = tqdm(total=schedule.measurements, initial=min(done, schedule.measurements), desc="tune",
                        disable=not enabled, unit="fwd")

    def start(self, label: str) -> None:
        if self.enabled:
            # the estimate's error so far corrects what is left (per-measurement overheads, a busy machine)
            pace = self.took_s / self.estimated_done_s if self.estimated_done_s > 0 else 1.0
            left = format_seconds(self.left_s * pace)
            leader = self.provisional() or self.leader
            self.bar.set_postfix_str(f"{label} | leader {leader} | ~{left} left")

    def estimate(self, item: Item, baseline: bool) -> float:
        """What the schedule charged for a measurement (a baseline one runs at most the trained length, unpatched)."""
        if baseline:
            return baseline_seconds(item, self.schedule.cost, self.schedule.train_len)
        return self.schedule.cost.seconds(item.length)

    def done(self, item: Item, seconds: float, baseline: bool) -> None:
        estimate = self.estimate(item, baseline)
        self.left_s = max(0.0, self.left_s - estimate)
        self.estimated_done_s += estimate
        self.took_s += seconds
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


# ---- state: what a resumed run must agree with ----------------------------------------------------------------


def write_state(folder: Path, state: dict[str, Any]) -> None:
    from ..loading import write_json

    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / STATE, state)


def read_state(folder: Path) -> dict[str, Any] | None:
    path = Path(folder) / STATE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
