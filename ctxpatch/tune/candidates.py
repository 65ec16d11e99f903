"""The specs `ctxpatch tune` measures, read from the method registry.

By default: every training-free position rule and selection (`Method.training_free`, kinds "position" and
"selection"), each point of its `candidate_grid` (its target rule and a few neighbours), alone and with each
training-free scale (`logn`).
A method registered later joins without a change here. `--candidates` narrows or widens the set:

    "dca,selfextend[group=16],yarn"       only these; a name without brackets expands to its grid
    "default,logn+window,sinks"           the registry's set plus these
    "selfextend+logn[train_len=4096]"     a part with brackets is that one point, the others their grid

Brackets are parsed here by a small helper (`parse_candidates`) until the core spec grammar lands.
Every candidate is resolved for the target length before anything is measured: one its methods refuse
(`ValueError`, a composition error) is skipped with the reason, two grid points that resolve to the same
parameters are measured once.
"""

from __future__ import annotations

import itertools
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from ..compose import build_plan
from ..errors import CompositionError, UnknownMethodError
from ..registry import Method, ModelInfo, method, method_class, registered
from ..spec import parse_params, split_top_level
from .errors import TuneError

PRIMARY_KINDS = ("position", "selection")  # measured alone
COMPANION_KINDS = ("scale",)  # measured on top of each primary
DEFAULT = "default"  # in --candidates: the registry's set


Part = tuple[str, tuple[tuple[str, Any], ...]]  # (method name, sorted (parameter, value) pairs)


@dataclass(frozen=True)
class Candidate:
    """One spec to measure: methods with the parameters the grid (or the user) gave; the rest from the rule."""

    parts: tuple[Part, ...]

    @classmethod
    def of(cls, *parts: tuple[str, dict[str, Any]]) -> "Candidate":
        return cls(tuple((name, tuple(sorted(params.items()))) for name, params in parts))

    @property
    def label(self) -> str:
        if not self.parts:
            return "none"
        out = []
        for name, params in self.parts:
            inner = ",".join(f"{k}={_short(v)}" for k, v in params)
            out.append(f"{name}[{inner}]" if inner else name)
        return "+".join(out)

    def methods(self) -> list[Method]:
        return [method(name, **dict(params)) for name, params in self.parts]

    def __str__(self) -> str:
        return self.label


BASELINE = Candidate(())  # the unpatched model


def _short(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


@dataclass
class Skipped:
    label: str
    reason: str


@dataclass
class CandidateSet:
    candidates: list[Candidate]
    skipped: list[Skipped] = field(default_factory=list)
    resolved: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # label -> resolved methods
    notes: dict[str, str] = field(default_factory=dict)  # label -> a warning its methods gave
    cost: dict[str, float] = field(default_factory=dict)  # label -> estimated relative cost of a forward


# ---- parsing --candidates ---------------------------------------------------------------------------------------


PART = re.compile(r"^(?P<name>[A-Za-z0-9_]+)\s*(?:\[(?P<params>[^\[\]]*)\])?$")


def parse_part(text: str) -> tuple[str, dict[str, Any] | None]:
    """"yarn[factor=4]" -> ("yarn", {"factor": 4}); "yarn" -> ("yarn", None) (None: expand the grid).
    Brackets are read by the core spec grammar (`ctxpatch.spec`)."""
    match = PART.match(text)
    if not match:
        raise TuneError(f"candidate part {text!r} is not of the form name or name[key=value,...]")
    name, inner = match.group("name"), match.group("params")
    return name, None if inner is None else parse_params(inner, where=name)


def parse_candidates(text: str | Iterable[str] | None) -> list[str | list[tuple[str, dict[str, Any] | None]]]:
    """Requests: DEFAULT, or a spec as parts. Unknown method names fail here, with a suggestion."""
    items = split_top_level(text, ",") if isinstance(text, str) else list(text or [DEFAULT])
    requests: list[str | list[tuple[str, dict[str, Any] | None]]] = []
    for item in items:
        if isinstance(item, Candidate):
            requests.append([(name, dict(params)) for name, params in item.parts])
            continue
        item = str(item).strip()
        if not item:
            continue
        if item == DEFAULT:
            requests.append(DEFAULT)
            continue
        parts = [parse_part(p) for p in split_top_level(item, "+")]
        for name, _ in parts:
            if name == "none":
                raise TuneError("'none' (the unpatched model) is measured anyway as the baseline; it is not a candidate")
            method_class(name)  # UnknownMethodError: "Did you mean ...?"
        requests.append(parts)
    if not requests:
        raise TuneError('no candidate given: pass e.g. --candidates "default" or "dca,selfextend,yarn"')
    return requests


# ---- building the set -----------------------------------------------------------------------------------------


def registry_specs(info: ModelInfo, target_len: int, skipped: list[Skipped]) -> list[Candidate]:
    """Every training-free position rule at each grid point, alone and with each training-free scale."""
    table = registered()
    primaries = [c for n, c in sorted(table.items()) if c.kind in PRIMARY_KINDS and c.training_free]
    companions = [c for n, c in sorted(table.items()) if c.kind in COMPANION_KINDS and c.training_free]
    out = []
    for cls in primaries:
        grid = _grid(cls, info, target_len, skipped)
        for params in grid:
            out.append(Candidate.of((cls.name, params)))
            for companion in companions:
                for extra in _grid(companion, info, target_len, skipped):
                    out.append(Candidate.of((cls.name, params), (companion.name, extra)))
    return out


def _grid(cls: type[Method], info: ModelInfo, target_len: int, skipped: list[Skipped]) -> list[dict[str, Any]]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return list(cls.candidate_grid(info, target_len))
    except (ValueError, TypeError) as error:
        if not any(s.label == cls.name for s in skipped):
            skipped.append(Skipped(cls.name, str(error)))
        return []


def requested_specs(parts: list[tuple[str, dict[str, Any] | None]], info: ModelInfo, target_len: int,
                    skipped: list[Skipped]) -> list[Candidate]:
    """A user's spec: parts with brackets as given, the others over their grid (the product)."""
    grids = [[params] if params is not None else _grid(method_class(name), info, target_len, skipped)
             for name, params in parts]
    names = [name for name, _ in parts]
    return [Candidate.of(*zip(names, point)) for point in itertools.product(*grids)]


def build_candidates(requests: Sequence[Any] | str | None, info: ModelInfo, target_len: int) -> CandidateSet:
    """The candidates, resolved for `target_len`; refused and duplicate ones left out (refusals noted)."""
    skipped: list[Skipped] = []
    specs: list[Candidate] = []
    for request in parse_candidates(requests):
        if request == DEFAULT:
            specs += registry_specs(info, target_len, skipped)
        else:
            specs += requested_specs(request, info, target_len, skipped)
    out = CandidateSet([], skipped)
    seen: dict[str, str] = {}
    for candidate in specs:
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                methods, _ = build_plan(candidate.methods(), {}, info, target_len)
        except (ValueError, TypeError, CompositionError) as error:
            if isinstance(error, UnknownMethodError):
                raise
            out.skipped.append(Skipped(candidate.label, str(error)))
            continue
        resolved = [{"name": m.name, "params": dict(m.values), "layers": m.layers} for m in methods]
        identity = repr(resolved)
        if identity in seen:
            continue
        seen[identity] = candidate.label
        out.candidates.append(candidate)
        out.resolved[candidate.label] = resolved
        out.cost[candidate.label] = forward_cost(methods)
        if caught:
            out.notes[candidate.label] = "; ".join(str(w.message) for w in caught)
    if not out.candidates:
        reasons = "; ".join(f"{s.label}: {s.reason}" for s in out.skipped[:4])
        raise TuneError(f"no candidate can reach target_len={target_len} ({reasons}): pass other --candidates")
    return out


def forward_cost(methods: list[Method]) -> float:
    """A forward's estimated cost relative to the unpatched model (the objective's last tie-break): each extra
    rotary view of a position rule ~ +35% (benchmarks/README.md's attention table), each other method +5%."""
    cost = 1.0
    for m in methods:
        views = len(m.views()) if hasattr(m, "views") else 1
        cost += 0.35 * (views - 1) + 0.05
    return round(cost, 4)
