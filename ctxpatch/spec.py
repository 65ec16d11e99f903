"""The one spec grammar: what `apply`, every CLI verb and every recipe accept as "which patch".

A spec is one of:

  * text: method terms joined by "+", each a registered name with an optional bracket of its own
    parameters, values read as Python literals (a bare word is a string):
        "logn+window"   "yarn[factor=4]"   "hybrid[window=8192]+rerope[window=4096]"
        "window[window=64,layers=[0,1]]"
    A bracket's values belong to its method only; keyword parameters of `apply` go to every method
    that takes them (a bracket value wins).
  * "none" (or an empty list): no method at all, the model as it is;
  * a path ending in ".json": a recorded or tuned spec, i.e. a JSON file holding what `as_dict` reads;
  * a dict: `Patch.to_dict()` ({"spec", "backend", "methods": [{"name", "params", "layers"}]}), plus
    metadata such as "target_len"; a fine-tune record (ctxpatch.json, {"patch": {...}, "training": ...}) too;
  * a method object (`ctxpatch.method("window", window=64)`), or a list of names, terms and method objects.

`parse_spec` returns a `ParsedSpec`: the method objects (fresh, unresolved), the target length a
.json/dict spec carries (None otherwise) and its other metadata. Mistakes are `SpecError`
(a `ValueError`) or `ParameterTypeError` (a `TypeError`), each saying what to write instead.
"""

from __future__ import annotations

import ast
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CompositionError, ParameterTypeError, SpecError
from .registry import Method, method, method_class

NONE = "none"
EXAMPLES = "e.g. 'logn+window', 'yarn[factor=4]', 'hybrid[window=8192]+rerope[window=4096]', 'none' or 'tuned.json'"
NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")
TERM = re.compile(r"^(?P<name>[^\[\]]*?)\s*(?:\[(?P<params>.*)\])?$", re.DOTALL)
NON_FINITE = {"nan", "inf", "-inf", "+inf", "infinity", "-infinity", "+infinity"}


@dataclass
class ParsedSpec:
    """What a spec names: its methods (empty for "none"), and what a recorded spec carries besides."""

    methods: list[Method]
    target_len: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def is_none(self) -> bool:
        return not self.methods

    @property
    def names(self) -> str:
        return "+".join(m.name for m in self.methods) or NONE


def parse_spec(spec: Any) -> ParsedSpec:
    """Read any spec form (see the module docstring); `ParsedSpec.methods` are fresh method objects."""
    if isinstance(spec, ParsedSpec):
        return ParsedSpec(list(spec.methods), spec.target_len, dict(spec.meta))
    if spec is None:
        raise ParameterTypeError(f"no spec given (None): pass a spec, {EXAMPLES}, a list of method objects, or a dict")
    if isinstance(spec, Method):
        return ParsedSpec([spec])
    if isinstance(spec, dict):
        return from_dict(spec, "the spec dict")
    if isinstance(spec, Path) or (isinstance(spec, str) and spec.strip().lower().endswith(".json")):
        return from_file(spec)
    if isinstance(spec, str):
        return ParsedSpec(unique(parse_text(spec)))
    if isinstance(spec, (list, tuple)):
        methods: list[Method] = []
        for item in spec:
            if isinstance(item, Method):
                methods.append(item)
            elif isinstance(item, str):
                methods.extend(parse_text(item, allow_none=False))
            else:
                raise ParameterTypeError(
                    f"a spec list holds method names and method objects, not {type(item).__name__} ({item!r})"
                )
        return ParsedSpec(unique(methods))
    raise ParameterTypeError(f"a spec is text, a list, a dict or a method object, not {type(spec).__name__}: {EXAMPLES}")


# ---- text ------------------------------------------------------------------------------------------------


def split_top_level(text: str, separator: str) -> list[str]:
    """Split on `separator` outside brackets and quotes: "a[x=[1,2]],b" on "," -> ["a[x=[1,2]]", "b"]."""
    parts, current, depth, quote = [], [], 0, None
    for char in text:
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[(":
            depth += 1
        elif char in "])":
            depth -= 1
            if depth < 0:
                raise SpecError(f"unbalanced '{char}' in {text!r}: {EXAMPLES}")
        if char == separator and depth == 0 and not quote:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    if quote:
        raise SpecError(f"unclosed quote {quote} in {text!r}")
    if depth:
        raise SpecError(f"unbalanced '[' in {text!r}: close every bracket, {EXAMPLES}")
    parts.append("".join(current))
    return [p.strip() for p in parts]


def parse_text(text: str, *, allow_none: bool = True) -> list[Method]:
    """"hybrid[window=8192]+rerope" -> [hybrid(window=8192), rerope()]; "none" -> []."""
    if allow_none and text.strip().lower() == NONE:
        return []
    terms = split_top_level(text, "+")
    if not text.strip() or any(not t for t in terms):
        raise SpecError(f"bad spec {text!r}: write method names joined by '+', {EXAMPLES}")
    return [parse_term(term) for term in terms]


def parse_term(term: str) -> Method:
    """"yarn[factor=4]" -> the yarn method with factor=4."""
    match = TERM.match(term)
    name = match.group("name").strip() if match else ""
    if not match or not NAME.match(name):
        raise SpecError(f"{term!r} is not a method term: write name or name[key=value,...], {EXAMPLES}")
    if name.lower() == NONE:
        raise SpecError("'none' (no patch) cannot be combined with methods or take parameters; give it alone")
    cls = method_class(name)
    params = parse_params(match.group("params") or "", where=name)
    layers = params.pop("layers", None)
    return cls(layers=layers, **params)


def parse_params(text: str, *, where: str) -> dict[str, Any]:
    """"factor=4,layers=[0,1]" -> {"factor": 4, "layers": [0, 1]}; a key given twice is refused."""
    params: dict[str, Any] = {}
    for item in split_top_level(text, ","):
        if not item:
            continue
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not NAME.match(key):
            raise SpecError(f"{where}[{text}]: {item!r} is not key=value, e.g. {where}[window=4096]")
        if key in params:
            raise SpecError(f"{where}[{text}]: {key} is given twice; give it once")
        params[key] = parse_value(raw.strip(), key=key)
    return params


def parse_value(text: str, *, key: str = "value") -> Any:
    """A parameter value: a Python literal (4, 0.5, True, None, [0, 1], 'x') or, failing that, the bare word.

    nan and inf are refused: no method takes a non-finite number."""
    if text.lower() in NON_FINITE:
        raise SpecError(f"{key}={text}: non-finite numbers are refused; give a finite number")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        if re.fullmatch(r"[A-Za-z_][\w.\-/]*", text):
            return text
        raise SpecError(f"{key}={text!r} is not a value: write a number, a list like [0, 1], or a word") from None
    if not is_finite(value):
        raise SpecError(f"{key}={text}: non-finite numbers are refused; give a finite number")
    return value


def is_finite(value: Any) -> bool:
    """False when a float in `value` (a number, or inside a list/tuple/dict) is nan or inf."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, complex):
        return False
    if isinstance(value, (list, tuple, set)):
        return all(is_finite(v) for v in value)
    if isinstance(value, dict):
        return all(is_finite(v) for v in value.values())
    return True


def unique(methods: list[Method]) -> list[Method]:
    seen: set[str] = set()
    for m in methods:
        if m.name in seen:
            raise CompositionError(f"{m.name!r} appears twice in the spec; give it once")
        seen.add(m.name)
    return methods


# ---- recorded specs: dicts and .json files ----------------------------------------------------------------


def from_file(path: str | Path) -> ParsedSpec:
    """A .json spec file: `Patch.to_dict()` plus metadata, or a fine-tune run's ctxpatch.json."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise SpecError(f"spec file {str(path)!r} does not exist: give a .json file holding a Patch.to_dict(), or a spec")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise SpecError(f"spec file {str(path)!r} is not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise SpecError(f"spec file {str(path)!r} must hold a JSON object (a Patch.to_dict()), not {type(data).__name__}")
    return from_dict(data, f"spec file {str(path)!r}")


def from_dict(data: dict[str, Any], where: str) -> ParsedSpec:
    """{"methods": [{"name", "params", "layers"}], ...} (or {"spec": "text"}, or a record {"patch": {...}})."""
    meta = {k: v for k, v in data.items() if k not in ("methods", "patch")}
    target_len = data.get("target_len")
    if "methods" not in data and isinstance(data.get("patch"), dict):  # a fine-tune record (ctxpatch.json)
        inner = from_dict(data["patch"], where)
        training = data.get("training") if isinstance(data.get("training"), dict) else {}
        target_len = target_len if target_len is not None else training.get("target_len", inner.target_len)
        return ParsedSpec(inner.methods, check_target_len(target_len, where), {**meta, **inner.meta})
    if "methods" in data:
        methods = methods_from_dict(data, where)
    elif isinstance(data.get("spec"), str):
        methods = parse_text(data["spec"])
    else:
        raise SpecError(
            f"{where} has no 'methods' list (nor a 'spec' text): give a Patch.to_dict(), "
            "{'methods': [{'name': 'yarn', 'params': {'factor': 4}, 'layers': None}]}"
        )
    return ParsedSpec(unique(methods), check_target_len(target_len, where), meta)


def spec_from_dict(record: dict[str, Any]) -> list[Method]:
    """Method objects from `Patch.to_dict()` (e.g. a saved `ctxpatch.json`): `apply(model, spec_from_dict(d))`."""
    return [method(m["name"], layers=m.get("layers"), **m.get("params", {})) for m in record["methods"]]


def methods_from_dict(data: dict[str, Any], where: str) -> list[Method]:
    """Method objects from a dict's "methods" list, through `spec_from_dict`, shape checked first."""
    entries = data["methods"]
    if not isinstance(entries, list):
        raise SpecError(f"{where}: 'methods' must be a list of {{'name', 'params', 'layers'}} objects")
    for n, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise SpecError(f"{where}: methods[{n}] must be an object with a 'name' (and 'params', 'layers')")
        if not isinstance(entry.get("params", {}), dict):
            raise SpecError(f"{where}: methods[{n}].params must map parameter names to values")
        if not is_finite(entry.get("params", {})):
            raise SpecError(f"{where}: methods[{n}].params holds a non-finite number; give finite numbers")
    return spec_from_dict({"methods": entries})


def check_target_len(value: Any, where: str) -> int | None:
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        return value
    raise SpecError(f"{where}: target_len={value!r} must be a positive number of tokens")


def describe(methods: list[Method], shared: dict[str, Any] | None = None) -> str:
    """The spec as text, each method with the parameters it gets: "window[window=48]+logn" ("none": none).

    `shared` are keyword parameters (`--param`): shown on each method taking them unless its bracket set them."""
    shared = shared or {}
    terms = []
    for m in methods:
        taken = {p.name for p in m.params}
        values = {**m.values, **{k: v for k, v in shared.items() if k in taken and k not in m.values}}
        if m.layers is not None:
            values["layers"] = m.layers
        elif "layers" in shared:
            values["layers"] = shared["layers"]
        inner = ",".join(f"{k}={format_value(v)}" for k, v in values.items())
        terms.append(f"{m.name}[{inner}]" if inner else m.name)
    taken_by_any = {p.name for m in methods for p in m.params} | {"layers"}
    rest = ",".join(f"{k}={format_value(v)}" for k, v in shared.items() if k not in taken_by_any)
    return ("+".join(terms) or NONE) + (f" ({rest})" if rest else "")


def format_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    return str(value)
