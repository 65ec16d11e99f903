"""The successive-halving schedule, fixed before the first forward and counted in forward passes.

A *measurement* is (kind, length, index): `ppl` (perplexity of window `index`'s tail at `length` tokens),
`passkey` / `niah` (found or not, depth number `index`), and for the unpatched baseline `native` (the same
tail with only the trained length L of context). At length n the measurements come in a fixed order, step s = 0, 1, ...: ppl(n, s), the short-context check
ppl(L, s), then each retrieval task at (n, s). Round r measures its candidates on the first `prefix` items of
that order at its length (what earlier rounds measured is not repeated), ranks them and keeps
`ceil(keep * size)`; rounds run until two candidates are left, and the last round picks the winner. Each
round gets an equal share of what is left of the budget and takes as long a prefix as fits (at most
`max_steps` steps, and no more windows than the text holds), at the longest length that fits the share: the
target if it can, else T/2, T/4, ... (> L), never shorter than the round before. Cheap means fewer and shorter
forwards: round 0 may be one perplexity window at T/2. A round that cannot pay for one more measurement ranks
again on what its candidates have (a cut without new evidence: the report shows it). The baseline (each ppl
window's native reference, the short windows and the retrieval ceiling, all unpatched at L) is measured once.

A forward of n tokens costs a*n + b*n^2 seconds (`CostModel`): from the config's FLOPs at a measured matmul
rate, then scaled by one timed short forward of the real model; a patched forward is charged `patched` times
that. Everything here is pure arithmetic on these numbers, so the same inputs give the same schedule.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from ..preflight import config_value
from .errors import BudgetError, TuneError

RETRIEVAL = ("passkey", "niah")
TASKS = ("ppl", *RETRIEVAL)


@dataclass(frozen=True, order=True)
class Item:
    kind: str  # ppl | passkey | niah | native (baseline only)
    length: int
    index: int


def depth(index: int) -> float:
    """Depth of retrieval measurement `index`: 0.5, 0.25, 0.75, 0.125, 0.625, ... (van der Corput, base 2),
    so any prefix spreads over the context."""
    n, value, scale = index + 1, 0.0, 0.5
    while n:
        value += scale * (n & 1)
        n, scale = n >> 1, scale / 2
    return value


@dataclass(frozen=True)
class CostModel:
    """Seconds of one forward of n tokens: a*n + b*n^2 (unpatched); a patched one costs `patched` times that."""

    a: float
    b: float
    patched: float = 1.3  # benchmarks/README.md's attention table: patched layers cost 1.0-1.35x the unpatched ones

    def seconds(self, n: int, patched: bool = True) -> float:
        return (self.a * n + self.b * n * n) * (self.patched if patched else 1.0)

    def scaled(self, factor: float) -> "CostModel":
        return CostModel(self.a * factor, self.b * factor, self.patched)

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def config_flops(config: Any) -> tuple[float, float]:
    """(FLOPs per token, FLOPs per token^2) of one forward, from a transformers (or ChatGLM) config."""
    def get(*names: str, default: Any = None) -> Any:
        return config_value(config, *names, default=default)

    hidden = get("hidden_size")
    layers = get("num_hidden_layers", "num_layers")
    heads = get("num_attention_heads")
    kv_heads = get("num_key_value_heads", "multi_query_group_num", default=heads)
    head_dim = get("head_dim", "kv_channels", default=hidden // heads)
    inner = get("intermediate_size", "ffn_hidden_size", default=4 * hidden)
    per_layer = hidden * head_dim * (2 * heads + 2 * kv_heads) + 3 * hidden * inner  # q, o, k, v; gated MLP
    linear = 2.0 * layers * per_layer
    quadratic = 2.0 * layers * heads * head_dim  # causal q.k and attention x v: 2 * (n^2/2) * d * 2 per head
    return linear, quadratic


def matmul_rate(device: Any = "cpu", seconds: float = 0.3) -> float:
    """Best FLOP/s of float32 1024 x 1024 matrix products on `device` over `seconds` (after a warm-up): the
    best rather than the mean, so a machine busy for a moment does not make every estimate pessimistic."""
    import torch

    n = 1024
    x = torch.randn(n, n, device=device)
    y = torch.randn(n, n, device=device)
    x @ y
    best, began = 0.0, time.perf_counter()
    while time.perf_counter() - began < seconds:
        started = time.perf_counter()
        x @ y
        if str(device).startswith("cuda"):
            torch.cuda.synchronize()
        best = max(best, 2.0 * n**3 / max(time.perf_counter() - started, 1e-9))
    return best


def cost_from_config(config: Any, rate: float) -> CostModel:
    """An optimistic cost model (the whole forward at the matmul probe's rate): before the model loads it can
    only refuse a budget that is surely too small; one timed forward of the loaded model then scales it."""
    linear, quadratic = config_flops(config)
    return CostModel(linear / rate, quadratic / rate)


def calibrated(cost: CostModel, n: int, measured_s: float) -> CostModel:
    """The model scaled so a forward of n tokens costs what one took (two significant digits: stable)."""
    factor = measured_s / max(cost.seconds(n, patched=False), 1e-12)
    return cost.scaled(float(f"{factor:.2g}"))


# ---- rounds ---------------------------------------------------------------------------------------------------


@dataclass
class Round:
    index: int
    size: int  # candidates measured in this round
    length: int
    prefix: int  # cumulative: the first `prefix` items of `length`'s order are measured after this round
    items: list[Item]  # what each candidate measures in this round (new ones only)
    keep: int  # survivors

    def to_dict(self) -> dict[str, Any]:
        return {**{k: v for k, v in asdict(self).items() if k != "items"}, "items": [asdict(i) for i in self.items]}


@dataclass
class Schedule:
    rounds: list[Round]
    baseline: list[Item]
    train_len: int
    target_len: int
    tasks: list[str]
    budget_s: float
    estimated_s: float
    cost: CostModel
    notes: list[str] = field(default_factory=list)

    @property
    def measurements(self) -> int:
        return len(self.baseline) + sum(r.size * len(r.items) for r in self.rounds)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rounds": [r.to_dict() for r in self.rounds], "baseline": [asdict(i) for i in self.baseline],
            "train_len": self.train_len, "target_len": self.target_len, "tasks": self.tasks,
            "budget_s": self.budget_s, "estimated_s": self.estimated_s, "cost": self.cost.to_dict(),
            "measurements": self.measurements, "notes": self.notes,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Schedule":
        rounds = [Round(**{**r, "items": [Item(**i) for i in r["items"]]}) for r in d["rounds"]]
        return cls(rounds, [Item(**i) for i in d["baseline"]], d["train_len"], d["target_len"], list(d["tasks"]),
                   d["budget_s"], d["estimated_s"], CostModel(**d["cost"]), list(d.get("notes", [])))


def round_sizes(count: int, keep: float) -> list[int]:
    """Candidates per round: count, then ceil(keep * previous), until two are left (one candidate: one round)."""
    sizes = [count]
    while sizes[-1] > 2:
        sizes.append(max(2, min(sizes[-1] - 1, math.ceil(keep * sizes[-1]))))
    return sizes


def order_at(length: int, count: int, train_len: int, tasks: list[str]) -> list[Item]:
    """The first `count` measurements at `length`, in the order rounds take them."""
    out: list[Item] = []
    step = 0
    while len(out) < count:
        out.append(Item("ppl", length, step))
        out.append(Item("ppl", train_len, step))  # the short-context check
        out += [Item(t, length, step) for t in tasks if t in RETRIEVAL]
        step += 1
    return out[:count]


def per_step(tasks: list[str]) -> int:
    return 2 + sum(t in RETRIEVAL for t in tasks)


def baseline_of(item: Item, train_len: int) -> Item:
    """What the unpatched model measures once for `item`: the native reference of a ppl window, the
    retrieval ceiling (the same depth at the trained length)."""
    if item.kind == "ppl":
        return Item("native", item.length, item.index)
    return Item(item.kind, train_len, item.index)


def baseline_seconds(item: Item, cost: CostModel, train_len: int) -> float:
    return cost.seconds(min(item.length, train_len), patched=False)


def minimum_baseline(train_len: int, target_len: int, tasks: list[str], cost: CostModel) -> float:
    """Seconds of the smallest baseline: the unpatched model once per measurement kind, at the trained length."""
    items = {baseline_of(i, train_len) for i in order_at(target_len, per_step(tasks), train_len, tasks)}
    return sum(baseline_seconds(i, cost, train_len) for i in items)


def round0_lengths(train_len: int, target_len: int) -> list[int]:
    """T, T/2, T/4, ... while above L: where round 0 may run."""
    out, n = [], target_len
    while n > train_len:
        out.append(n)
        n //= 2
    return out or [target_len]


def plan(count: int, train_len: int, target_len: int, tasks: list[str], cost: CostModel, budget_s: float, *,
         keep: float = 0.5, max_steps: int = 16, windows: Callable[[int], int] | None = None) -> Schedule:
    """The schedule for `count` candidates; `BudgetError` (with the seconds needed) if the budget cannot pay for
    one cheap measurement of each. `windows(n)`: how many ppl windows of n tokens the text holds."""
    if not 0 < keep < 1:
        raise TuneError(f"keep={keep} must be a fraction in (0, 1), e.g. 0.5")
    if "ppl" not in tasks:
        raise TuneError("the objective needs the perplexity ratio: tasks must include ppl")
    sizes = round_sizes(count, keep)
    lengths = round0_lengths(train_len, target_len)  # longest first
    known: set[Item] = set()  # measured by every candidate still alive
    baseline: set[Item] = set()
    prefix_at: dict[int, int] = {}
    rounds: list[Round] = []
    spent, notes = 0.0, []
    reserve = _final_reserve(sizes, lengths, train_len, target_len, tasks, cost, budget_s)
    for r, size in enumerate(sizes):
        last = r == len(sizes) - 1
        left = budget_s - spent - (0.0 if last else reserve)
        share = left / (len(sizes) - r - (0 if last or not reserve else 1))
        floor = rounds[-1].length if rounds else 0
        options = [n for n in lengths if n >= floor]

        def limit(n: int) -> int:
            steps = max_steps if windows is None else min(max_steps, windows(n))
            return steps * per_step(tasks)

        def priced(n: int, prefix: int, size: int = size) -> tuple[float, list[Item], set[Item]]:
            return _items_cost(order_at(n, prefix, train_len, tasks), size, known, baseline, cost, train_len)

        growable = [n for n in options if prefix_at.get(n, 0) < limit(n)]
        fits = [n for n in growable if priced(n, prefix_at.get(n, 0) + 1)[0] <= share]
        affordable = [n for n in growable if priced(n, prefix_at.get(n, 0) + 1)[0] <= left]
        if fits:
            length = fits[0]
        elif affordable:
            length = affordable[-1]  # the cheapest, over its share: the minimum this round can do
        elif rounds:
            length = rounds[-1].length  # nothing more to pay for: rank again on what is known
        else:
            cheapest = min(priced(n, 1)[0] for n in lengths) + 0.0
            raise BudgetError(cheapest, (
                f"the budget ({format_seconds(budget_s)}) is too small to measure {count} candidate(s) once: one "
                f"perplexity window each and the baseline need about {format_seconds(cheapest)} (estimated); "
                "raise --budget or narrow --candidates"))
        prefix = prefix_at.get(length, 0)
        seconds, new, extra = 0.0, [], set()
        while prefix < limit(length):
            more = priced(length, prefix + 1)
            if more[0] > max(share, 0.0) and prefix > prefix_at.get(length, 0):
                break
            if more[0] > left:
                break
            prefix, (seconds, new, extra) = prefix + 1, more
        keep_count = sizes[r + 1] if r + 1 < len(sizes) else 1
        rounds.append(Round(r, size, length, prefix, new, keep_count))
        if not new and r > 0:
            notes.append(f"round {r} measures nothing new (the budget, the text or --max-steps is spent): it ranks again")
        known |= set(new)
        baseline |= extra
        prefix_at[length] = prefix
        spent += seconds
    if rounds[0].length != target_len:
        notes.insert(0, f"round 0 runs at {rounds[0].length} tokens: the target {target_len} does not fit a fair "
                        f"share of the budget for {count} candidates")
    order = sorted(baseline, key=lambda i: (i.kind, i.length, i.index))
    return Schedule(rounds, order, train_len, target_len, list(tasks), budget_s, spent, cost, notes)


def _final_reserve(sizes, lengths, train_len, target_len, tasks, cost, budget_s) -> float:
    """Seconds kept back for the last round to measure its finalists at the target (one full step), when the
    budget can spare it: at most half of it, and not at the price of measuring every candidate once."""
    if len(sizes) < 2:
        return 0.0
    step = order_at(target_len, per_step(tasks), train_len, tasks)
    reserve = _items_cost(step, sizes[-1], set(), set(), cost, train_len)[0]
    first = min(_items_cost(order_at(n, 1, train_len, tasks), sizes[0], set(), set(), cost, train_len)[0]
                for n in lengths)
    return reserve if reserve <= budget_s / 2 and first + reserve <= budget_s else 0.0


def _items_cost(items: list[Item], size: int, known: set[Item], baseline: set[Item], cost: CostModel,
                train_len: int) -> tuple[float, list[Item], set[Item]]:
    new = [i for i in items if i not in known]
    extra = {baseline_of(i, train_len) for i in new} - baseline
    seconds = size * sum(cost.seconds(i.length) for i in new)
    seconds += sum(baseline_seconds(i, cost, train_len) for i in extra)
    return seconds, new, extra


# ---- budgets as people write them ---------------------------------------------------------------------------

UNITS = {"s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}
BUDGET = __import__("re").compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|min|h|d)?\s*$")


def parse_budget(text: str | float | int) -> float:
    """"3h" -> 10800, "45m" -> 2700, "2700" (seconds) -> 2700."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        match = BUDGET.match(str(text))
        if not match:
            raise TuneError(f"budget {text!r} is not a duration: write e.g. 3h, 45m or 2700 (seconds)")
        seconds = float(match.group(1)) * UNITS[match.group(2) or "s"]
    if not seconds > 0:
        raise TuneError(f"budget {text!r} must be more than zero seconds")
    return seconds


def format_seconds(seconds: float) -> str:
    if seconds == math.inf:
        return "unbounded"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
