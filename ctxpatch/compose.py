"""From a spec ("logn+window", a list of method objects) to one plan per layer.

Composition rules (DESIGN.md): biases add, scales multiply, at most one mask, one position rule and one
selection per layer (a second is an error naming both; a rule marked `modifier`, like xpos, combines with
any other; a selection on a layer with no position rule brings its own: retrieval's is ReRoPE at W), `layers=` picks layers, and a spec holding both `logn` and `window` with no `layers=`
anywhere gets the article's hybrid layout: `window` on every layer but the last `full_layers`,
which get full causal attention with `logn`.
"""

from __future__ import annotations

from typing import Any

from .errors import CompositionError, ParameterTypeError, ParameterValueError
from .kinds import Bias, CachePolicy, Mask, PositionRule, Scale, Selection
from .plan import LayerPlan
from .spec import parse_spec
from .registry import Method, ModelInfo

LAYOUT_PARAMS = {"full_layers": 1}


def _layout_applies(methods: list[Method], layers: Any) -> bool:
    names = {m.name for m in methods}
    return {"logn", "window"} <= names and layers is None and all(m.layers is None for m in methods)


def distribute(methods: list[Method], params: dict[str, Any]) -> tuple[list[Method], dict[str, Any]]:
    """Hand every keyword parameter to each method taking it; return the layout's own ones.

    A parameter no chosen method takes is a `TypeError` naming those they do take.
    """
    layers = params.pop("layers", None)
    layout = {k: params.pop(k) for k in list(params) if k in LAYOUT_PARAMS and _layout_applies(methods, layers)}
    accepted = {p.name: m for m in methods for p in m.params}
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        takes = sorted(set(accepted) | {"layers"} | (set(LAYOUT_PARAMS) if _layout_applies(methods, layers) else set()))
        raise ParameterTypeError(
            f"parameter(s) {', '.join(unknown)} not taken by {'+'.join(m.name for m in methods) or 'none'}; "
            f"they take: {', '.join(takes)}"
        )
    out = []
    for m in methods:
        mine = {p.name: params[p.name] for p in m.params if p.name in params and p.name not in m.values}
        new = type(m)(layers=m.layers if m.layers is not None else layers, **{**m.values, **mine})
        out.append(new)
    return out, {**LAYOUT_PARAMS, **layout} if _layout_applies(methods, layers) else {}


def _normalise_layers(m: Method, num_layers: int) -> list[int]:
    if m.layers is None:
        return list(range(num_layers))
    out = []
    for index in m.layers:
        if isinstance(index, bool) or not isinstance(index, int) or not -num_layers <= index < num_layers:
            raise ParameterValueError(
                f"{m.name}: layer index {index!r} is out of range for a model with {num_layers} layers "
                f"(use 0..{num_layers - 1}, or negatives from -{num_layers})"
            )
        out.append(index % num_layers)
    return sorted(set(out))


def apply_layout(methods: list[Method], layout: dict[str, Any], num_layers: int) -> list[Method]:
    """The logn+window hybrid: window below the last `full_layers` layers, logn on them."""
    if not layout:
        return methods
    full = layout["full_layers"]
    if isinstance(full, bool) or not isinstance(full, int) or not 1 <= full <= num_layers:
        raise ParameterValueError(f"full_layers={full!r} must be an integer in 1..{num_layers} (the model's layer count)")
    split = num_layers - full
    for m in methods:
        if m.name == "window":
            m.layers = list(range(split))
        elif m.name == "logn":
            m.layers = list(range(split, num_layers))
    return methods


def _slots(m: Method) -> list[str]:
    """The plan slots a method fills (a cache policy may also be a mask and a position rule)."""
    slots = []
    if isinstance(m, Mask):
        slots.append("mask")
    if isinstance(m, Bias):
        slots.append("biases")
    if isinstance(m, Scale):
        slots.append("scales")
    if isinstance(m, PositionRule):
        slots.append("modifiers" if m.modifier else "position")
    if isinstance(m, CachePolicy):
        slots.append("cache")
    if isinstance(m, Selection):
        slots.append("selection")
    if not slots:
        raise TypeError(f"{m.name}: unknown method kind {m.kind!r}")
    return slots


_SINGLE = {"mask": "masks", "position": "position rules", "cache": "cache policies", "selection": "selections"}
_HINT = {
    "mask": "a layer takes one mask (pick one, or give them disjoint layers=)",
    "position": "a layer takes one (xpos is the exception: it combines with any other)",
    "cache": "a layer takes one",
    "selection": "a layer takes one",
}


def plan_layers(methods: list[Method], info: ModelInfo) -> list[LayerPlan]:
    """One `LayerPlan` per layer; refuses two masks, position rules or cache policies on one layer."""
    plans = [LayerPlan(index) for index in range(info.num_layers)]
    for m in methods:
        for index in _normalise_layers(m, info.num_layers):
            plan = plans[index]
            for slot in _slots(m):
                if slot in _SINGLE:
                    if getattr(plan, slot) is not None:
                        raise CompositionError(
                            f"layer {index} would get two {_SINGLE[slot]}, {getattr(plan, slot).name!r} and "
                            f"{m.name!r}; {_HINT[slot]}"
                        )
                    setattr(plan, slot, m)
                else:
                    setattr(plan, slot, getattr(plan, slot) + (m,))
            plan.methods.append(m)
    for plan in plans:  # a selection alone shows the keys it lets through at its own positions (retrieval: ReRoPE's)
        if plan.selection is not None and plan.position is None:
            plan.position = plan.selection.default_position(info)
    return plans


def build_plan(
    spec: Any, params: dict[str, Any], info: ModelInfo, target_len: int | None = None
) -> tuple[list[Method], list[LayerPlan]]:
    """Parse, distribute parameters, resolve defaults from the model (and the target length), lay
    out, plan every layer."""
    if target_len is not None and (isinstance(target_len, bool) or not isinstance(target_len, int) or target_len <= 0):
        raise ParameterValueError(f"target_len={target_len!r} must be a positive number of tokens, e.g. 32768")
    methods, layout = distribute(parse_spec(spec).methods, dict(params))
    methods = [m.resolve(info, target_len) for m in methods]
    for m in methods:
        m.layers = None if m.layers is None else _normalise_layers(m, info.num_layers)
    methods = apply_layout(methods, layout, info.num_layers)
    return methods, plan_layers(methods, info)
