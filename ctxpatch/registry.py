"""The method registry: parameter specs, the `Method` base class and the name -> class table.

Every method file defines one small subclass of a kind base class (`Mask`, `Bias`, `Scale`,
`PositionRule`, `CachePolicy`) and decorates it with `@register`. A second registration under the
same name is refused, as peft refuses duplicate tuner types. Method files are found, not listed:
`discover()` imports every module of the kind packages (masks/, biases/, scales/, positions/,
caches/), so a new method is one new file there.
"""

from __future__ import annotations

import copy
import difflib
import importlib
import math
import pkgutil
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

from .errors import UnknownMethodError

KINDS = ("mask", "bias", "scale", "position", "cache")
KIND_PACKAGES = ("masks", "biases", "scales", "positions", "caches")  # where method files live
KIND_LABELS = {"mask": "mask", "bias": "bias", "scale": "scale", "position": "position rule", "cache": "cache policy"}


@dataclass(frozen=True)
class ModelInfo:
    """What a method may read from the model to fill in its defaults."""

    train_len: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rotary_dim: int


# ---- parameter checks: each returns what is wrong with a value, or None ------------------------


def positive_int(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        return "must be a positive integer"
    return None


def non_negative_int(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return "must be an integer >= 0"
    return None


def positive_number(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isinf(value):
        return "must be a finite number > 0"
    return None


def number_in(low: float, high: float, *, low_open: bool = True) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"must be a number in {'(' if low_open else '['}{low}, {high}]"
        if (value <= low if low_open else value < low) or value > high:
            return f"must be in {'(' if low_open else '['}{low}, {high}]"
        return None

    return check


def at_least(minimum: float) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < minimum:
            return f"must be a number >= {minimum}"
        return None

    return check


def optional(check: Callable[[Any], str | None]) -> Callable[[Any], str | None]:
    return lambda value: None if value is None else check(value)


@dataclass(frozen=True)
class Param:
    """One keyword parameter of a method: its default (a value, or a function of `ModelInfo`)."""

    name: str
    default: Any
    check: Callable[[Any], str | None]
    doc: str

    def default_for(self, info: ModelInfo | None, values: dict[str, Any] | None = None) -> Any:
        """The default; a function of the model (and, if it takes two arguments, of the other values)."""
        if not callable(self.default):
            return self.default
        if info is None:
            return None
        if self.default.__code__.co_argcount == 2:
            return self.default(info, values or {})
        return self.default(info)

    def describe_default(self) -> str:
        return getattr(self.default, "__doc__", None) or repr(self.default) if callable(self.default) else repr(self.default)


def from_model(text: str, fn: Callable[[ModelInfo], Any]) -> Callable[[ModelInfo], Any]:
    """A default computed from the model; `text` is how `methods()` shows it (e.g. "L // 2")."""
    fn.__doc__ = text
    return fn


# ---- the method base class ----------------------------------------------------------------------


class Method:
    """A named, parameterised length-extrapolation method of one kind.

    Construct with keyword parameters (unknown ones are a `TypeError`); `resolve(info)` returns a
    copy with every parameter filled in from the model and checked. `layers=None` means all layers.
    """

    name: ClassVar[str]
    kind: ClassVar[str]
    params: ClassVar[tuple[Param, ...]] = ()
    paper: ClassVar[str] = ""
    definition: ClassVar[str] = ""  # the formula, as DESIGN.md's method table shows it (i, j positions, Δ = i − j)

    def __init__(self, *, layers: int | list[int] | tuple[int, ...] | None = None, **values: Any):
        accepted = {p.name for p in self.params}
        unknown = sorted(set(values) - accepted)
        if unknown:
            raise TypeError(
                f"{self.name}() got unknown parameter(s) {', '.join(unknown)}; "
                f"it takes {', '.join(sorted(accepted)) or 'no parameters'} and layers"
            )
        self.values = dict(values)
        self.layers = [layers] if isinstance(layers, int) else (list(layers) if layers is not None else None)
        self.resolved = False

    def __getattr__(self, name: str) -> Any:
        values = self.__dict__.get("values", {})
        if name in values:
            return values[name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def resolve(self, info: ModelInfo) -> "Method":
        """A copy with defaults filled in from `info`, every value checked (`ValueError` if wrong)."""
        out = copy.copy(self)
        out.values = {}
        for p in self.params:  # in order: a default may read the (checked) values before it
            value = self.values[p.name] if p.name in self.values else p.default_for(info, out.values)
            problem = p.check(value)
            if problem:
                raise ValueError(f"{self.name}: {p.name}={value!r} {problem}")
            out.values[p.name] = value
        out.check_together(info)
        out.resolved = True
        return out

    def check_together(self, info: ModelInfo) -> None:
        """Checks that involve several parameters or the model; raise `ValueError`."""

    def describe(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self.values.items())
        return f"{self.name}({inner})"

    def __repr__(self) -> str:
        layers = "" if self.layers is None else f", layers={self.layers}"
        return f"{self.describe()[:-1]}{layers})" if self.values else f"{self.name}({layers[2:]})"


# ---- the registry ------------------------------------------------------------------------------

_REGISTRY: dict[str, type[Method]] = {}
_DISCOVERED: list[bool] = []  # [True] once every method file is imported


def discover() -> None:
    """Import every module of the kind packages, so each method file registers its methods (once)."""
    if _DISCOVERED:
        return
    for kind_package in KIND_PACKAGES:
        package = importlib.import_module(f"{__package__}.{kind_package}")
        for module in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"{package.__name__}.{module.name}")
    _DISCOVERED.append(True)


def register(cls: type[Method]) -> type[Method]:
    """Class decorator adding a method under `cls.name`; refuses a name that is taken."""
    if cls.kind not in KINDS:
        raise ValueError(f"{cls.__name__}.kind={cls.kind!r} is not one of {KINDS}")
    if cls.name in _REGISTRY:
        raise ValueError(
            f"a method named {cls.name!r} is already registered ({_REGISTRY[cls.name].__module__}); "
            "pick another name"
        )
    _REGISTRY[cls.name] = cls
    return cls


def method_class(name: str) -> type[Method]:
    """The class registered under `name`; `UnknownMethodError` lists the known ones otherwise."""
    discover()
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, _REGISTRY, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UnknownMethodError(
            f"unknown method {name!r}.{hint} Known methods: {', '.join(sorted(_REGISTRY))}."
        ) from None


def method(name: str, **params: Any) -> Method:
    """Build a method object by name, e.g. `ctxpatch.method("window", window=4096, layers=[0, 1])`."""
    return method_class(name)(**params)


@dataclass(frozen=True)
class MethodInfo:
    """One row of `ctxpatch.methods()`."""

    name: str
    kind: str
    params: dict[str, str]  # parameter name -> default, as text
    summary: str
    paper: str
    definition: str = ""
    kind_label: str = ""  # the kind as the method table says it ("position rule (combines with any other)")

    def __str__(self) -> str:
        params = ", ".join(f"{k}={v}" for k, v in self.params.items()) or "-"
        return f"{self.name:<14} {self.kind:<9} {params:<60} {self.summary}"


def methods() -> list[MethodInfo]:
    """Every registered method: name, kind, parameters with defaults, a one-line summary."""
    discover()
    rows = []
    for name in sorted(_REGISTRY, key=lambda n: (KINDS.index(_REGISTRY[n].kind), n)):
        cls = _REGISTRY[name]
        summary = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        label = KIND_LABELS[cls.kind] + (" (combines with any other)" if getattr(cls, "modifier", False) else "")
        params = {p.name: p.describe_default() for p in cls.params}
        rows.append(MethodInfo(name, cls.kind, params, summary, cls.paper, cls.definition, label))
    return rows


def methods_table() -> str:
    """The markdown table of every method (README.md and docs/DESIGN.md hold it between
    `<!-- methods:start -->` and `<!-- methods:end -->`; `python -m ctxpatch.docs` prints or writes it)."""
    lines = ["| name | kind | definition | parameters (default) |", "|---|---|---|---|"]
    for m in methods():
        params = ", ".join(f"`{name}` ({default})" for name, default in m.params.items()) or "—"
        lines.append(f"| `{m.name}` | {m.kind_label} | {m.definition or m.summary} | {params} |")
    return "\n".join(lines) + "\n"
