"""Parsing what a user asks for: lengths ("8k,16k"), depths, task names, patch specs with parameters.

Every parser raises `EvalError` with a message that says what is accepted.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from typing import Any, Iterable

from .. import lengths
from .. import spec as core_spec
from ..errors import ParameterValueError
from .errors import EvalError

# short name -> lm-eval task name(s) shipped in ctxpatch/eval/tasks
CTXPATCH_TASKS = {
    "ppl": "ctxpatch_ppl",
    "passkey": "ctxpatch_passkey",
    "passkey_gen": "ctxpatch_passkey_gen",
    "niah": "ctxpatch_niah",
    "niah_gen": "ctxpatch_niah_gen",
}
# lm-eval's own RULER tasks whose data is synthesised locally (no essays, no QA sets to download)
RULER_OFFLINE = ("niah_single_1", "niah_multikey_2", "niah_multikey_3", "ruler_vt", "ruler_cwe", "ruler_fwe")
# RULER tasks that download a data set (Paul Graham essays, SQuAD, HotpotQA) when they build their data
RULER_ONLINE = (
    "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multivalue", "niah_multiquery",
    "ruler_qa_squad", "ruler_qa_hotpot",
)

def parse_length(text: str | int) -> int:
    """"8k" -> 8192, "12288" -> 12288, "1.5k" -> 1536; anything else is an `EvalError`."""
    try:
        return lengths.parse_length(text)
    except ParameterValueError as error:
        raise EvalError(str(error)) from None


def parse_lengths(text: str | Iterable[str | int]) -> list[int]:
    """"8k,16k" (or a list) -> [8192, 16384], sorted, duplicates dropped."""
    items = text.split(",") if isinstance(text, str) else list(text)
    items = [i for i in items if str(i).strip()]
    if not items:
        raise EvalError("no length given: pass e.g. --lengths 8k,16k")
    return sorted({parse_length(i) for i in items})


def parse_depths(text: str | Iterable[float | str]) -> list[float]:
    """Depths as fractions in [0, 1]: "0,0.5,1" or a count "5" (evenly spaced, ends included)."""
    if isinstance(text, str) and re.fullmatch(r"\s*\d+\s*", text) and int(text) > 1:
        count = int(text)
        return [round(i / (count - 1), 4) for i in range(count)]
    items = text.split(",") if isinstance(text, str) else list(text)
    depths = []
    for item in items:
        try:
            value = float(item)
        except (TypeError, ValueError):
            raise EvalError(f"depth {item!r} is not a number: give fractions in [0, 1], e.g. 0,0.5,1, or a count") from None
        if not 0.0 <= value <= 1.0:
            raise EvalError(f"depth {value} is outside [0, 1]: 0 = the start of the haystack, 1 = its end")
        depths.append(value)
    if not depths:
        raise EvalError("no depth given: pass e.g. --depths 0,0.5,1 or --depths 5")
    return sorted(set(depths))


def resolve_task(name: str) -> str:
    """A user's task name ("ppl", "ctxpatch_passkey", "ruler_vt") -> the lm-eval task name."""
    name = name.strip()
    if name in CTXPATCH_TASKS:
        return CTXPATCH_TASKS[name]
    if name in CTXPATCH_TASKS.values() or name in RULER_OFFLINE:
        return name
    if name in RULER_ONLINE:
        raise EvalError(
            f"the RULER task {name!r} downloads a data set (essays or QA) to build its data, and ctxpatch runs "
            f"offline; use one of {', '.join(RULER_OFFLINE)}"
        )
    known = [*CTXPATCH_TASKS, *RULER_OFFLINE]
    close = difflib.get_close_matches(name, known + list(CTXPATCH_TASKS.values()), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise EvalError(f"unknown task {name!r}.{hint} Known tasks: {', '.join(known)}.")


def parse_tasks(text: str | Iterable[str]) -> list[str]:
    items = text.split(",") if isinstance(text, str) else list(text)
    tasks = [resolve_task(i) for i in items if i.strip()]
    if not tasks:
        raise EvalError("no task given: pass e.g. --tasks ppl,passkey")
    return list(dict.fromkeys(tasks))


def parse_params(items: Iterable[str]) -> dict[str, Any]:
    """["window=4096", "factor=4.0"] -> {"window": 4096, "factor": 4.0}, values as in a spec's brackets."""
    params = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise EvalError(f"parameter {item!r} is not key=value, e.g. --param window=4096")
        params[key.strip()] = core_spec.parse_value(value.strip(), key=key.strip())
    return params


@dataclass(frozen=True)
class Spec:
    """One patch to evaluate: a spec in the core grammar ("none" = unpatched) and keyword parameters for
    every method taking them (--param). `ctxpatch.apply(model, spec.spec, **spec.params)` applies it."""

    spec: str
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def parsed(self) -> core_spec.ParsedSpec:
        return core_spec.parse_spec(self.spec)

    @property
    def label(self) -> str:
        """The spec as a leaderboard shows it: each method with the parameters it gets ("yarn[factor=4]")."""
        if self.spec.strip().lower().endswith(".json"):
            return self.spec.strip()
        return core_spec.describe(self.parsed.methods, self.params)

    @property
    def is_none(self) -> bool:
        return self.spec.strip().lower() == core_spec.NONE


def split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets: "none,yarn[factor=4,x=[1,2]]" -> ["none", "yarn[factor=4,x=[1,2]]"]."""
    return [p for p in core_spec.split_top_level(text, ",") if p]


def eval_spec(text: str, shared: dict[str, Any] | None = None) -> Spec:
    """A spec in the core grammar (`ctxpatch.parse_spec`), checked now: names, brackets, values, and that every
    `shared` parameter (--param) is taken by some method of it. 'none' takes no parameters."""
    text = text.strip()
    parsed = core_spec.parse_spec(text)
    shared = dict(shared or {})
    if parsed.is_none:  # shared --param values go to the patches only
        return Spec(core_spec.NONE)
    from ..compose import distribute

    distribute(parsed.methods, dict(shared))  # a --param no method takes is an error now
    return Spec(text, shared)


def eval_specs(text: str, shared: dict[str, Any] | None = None) -> list[Spec]:
    """"none,yarn[factor=4],logn+window" -> three `Spec`s, in order, labels unique."""
    specs = [eval_spec(part, shared) for part in split_top_level(text)]
    if not specs:
        raise EvalError('no patch given: pass e.g. --patches "none,dynamic,logn+window"')
    if shared and all(s.is_none for s in specs):
        raise EvalError(f"--param {', '.join(shared)} is given but no patch takes it: add --patch/--patches")
    labels = [s.label for s in specs]
    duplicated = sorted({x for x in labels if labels.count(x) > 1})
    if duplicated:
        raise EvalError(f"patch spec(s) listed twice: {', '.join(duplicated)}")
    return specs
