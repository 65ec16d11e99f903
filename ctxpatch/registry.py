"""The method registry: parameter specs, the `Method` base class and the name -> class table.

Every method file defines one small subclass of a kind base class (`Mask`, `Bias`, `Scale`,
`PositionRule`, `CachePolicy`, `Selection`) and decorates it with `@register`. A second registration under the
same name is refused, as peft refuses duplicate tuner types. Method files are found, not listed:
`discover()` imports every module of the kind packages (masks/, biases/, scales/, positions/,
caches/, selections/), so a new method is one new file there.
"""

from __future__ import annotations

import copy
import difflib
import importlib
import math
import pkgutil
import warnings
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

from .errors import ParameterTypeError, ParameterValueError, UnknownMethodError

KINDS = ("mask", "bias", "scale", "position", "cache", "selection")
KIND_PACKAGES = ("masks", "biases", "scales", "positions", "caches", "selections")  # where method files live
KIND_LABELS = {
    "mask": "mask", "bias": "bias", "scale": "scale", "position": "position rule", "cache": "cache policy",
    "selection": "selection",
}


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


def finite_number(value: Any) -> bool:
    """An int or a finite float (not a bool, not nan, not inf)."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def positive_number(value: Any) -> str | None:
    if not finite_number(value) or not value > 0:
        return "must be a finite number > 0"
    return None


def number_in(low: float, high: float, *, low_open: bool = True) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if not finite_number(value):
            return f"must be a number in {'(' if low_open else '['}{low}, {high}]"
        if (value <= low if low_open else value < low) or value > high:
            return f"must be in {'(' if low_open else '['}{low}, {high}]"
        return None

    return check


def at_least(minimum: float) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if not finite_number(value) or value < minimum:
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


def layer_list(name: str, layers: Any) -> list[int] | None:
    """`layers=` as a list of ints (None: all layers); anything else is a `ParameterTypeError`."""
    if layers is None:
        return None
    if isinstance(layers, int) and not isinstance(layers, bool):
        return [layers]
    if isinstance(layers, (list, tuple, range)) and all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
        return list(layers)
    raise ParameterTypeError(
        f"{name}: layers={layers!r} is not a layer index or a list of them; layers takes ints, e.g. layers=[0, 1] "
        "(negatives count from the last layer)"
    )


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
            raise ParameterTypeError(
                f"{self.name}() got unknown parameter(s) {', '.join(unknown)}; "
                f"it takes {', '.join(sorted(accepted)) or 'no parameters'} and layers"
            )
        self.values = dict(values)
        self.layers = layer_list(self.name, layers)
        self.resolved = False
        self.derived: tuple[str, ...] = ()  # parameters filled in from a target length

    def __getattr__(self, name: str) -> Any:
        values = self.__dict__.get("values", {})
        if name in values:
            return values[name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    training_free: ClassVar[bool] = True  # works without fine-tuning: `ctxpatch tune` may choose it

    def resolve(self, info: ModelInfo, target_len: int | None = None) -> "Method":
        """A copy with defaults filled in from `info`, every value checked (`ValueError` if wrong).

        With `target_len`, parameters the user did not give come from the method's own rule for that
        length (`target_values`); a given value that breaks the rule's bound is kept, with a warning.
        """
        out = self._filled(info, self.values)
        if target_len is None:
            return out
        try:
            reached = out.target_values(info, target_len)
        except ValueError as error:  # a rule that cannot reach the target: the user's choice of spec or length
            raise error if isinstance(error, ParameterValueError) else ParameterValueError(str(error)) from error
        derived = {k: v for k, v in reached.items() if k not in self.values}
        if derived:
            out = self._filled(info, {**self.values, **derived})
        out.derived = tuple(derived)
        problem = out.target_problem(info, target_len)
        if problem:
            warnings.warn(f"{self.name}: {problem} (the values you passed win)", UserWarning, stacklevel=4)
        return out

    def _filled(self, info: ModelInfo, given: dict[str, Any]) -> "Method":
        out = copy.copy(self)
        out.values = {}
        for p in self.params:  # in order: a default may read the (checked) values before it
            value = given[p.name] if p.name in given else p.default_for(info, out.values)
            problem = p.check(value)
            if problem:
                raise ParameterValueError(f"{self.name}: {p.name}={value!r} {problem}")
            out.values[p.name] = value
        try:
            out.check_together(info)
        except ValueError as error:  # check_together's ValueErrors are, by contract, about the user's values
            if isinstance(error, ParameterValueError):
                raise
            raise ParameterValueError(str(error)) from error
        out.resolved = True
        return out

    def target_values(self, info: ModelInfo, target_len: int) -> dict[str, Any]:
        """Parameter values that make the method reach `target_len`, by its paper's rule ({}: none needed).

        Called on a resolved copy (`self.values` complete); raise `ValueError` if no value can reach it.
        """
        return {}

    def target_problem(self, info: ModelInfo, target_len: int) -> str | None:
        """Why the resolved values do not reach `target_len` inside the trained length (None: they do)."""
        return None

    @classmethod
    def candidate_grid(cls, info: ModelInfo, target_len: int) -> list[dict[str, Any]]:
        """Parameter sets `ctxpatch tune` measures for this method at `target_len`: {} is the method's own
        target rule (`target_values`), the others a few neighbours around it. Parameters a set leaves out
        come from the rule; a set the method refuses (`resolve` raises ValueError) is skipped with a note."""
        return [{}]

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


def registered() -> dict[str, type[Method]]:
    """Name -> class of every registered method (what `ctxpatch tune` draws its candidates from)."""
    discover()
    return dict(_REGISTRY)


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
    training_free: bool = True  # False: a model must be fine-tuned under it (`Method.training_free`)

    def __str__(self) -> str:
        params = ", ".join(f"{k}={v}" for k, v in self.params.items()) or "-"
        free = "yes" if self.training_free else "no"
        return f"{self.name:<14} {self.kind:<9} {free:<13} {params:<60} {self.summary}"


def methods() -> list[MethodInfo]:
    """Every registered method: name, kind, parameters with defaults, a one-line summary."""
    discover()
    rows = []
    for name in sorted(_REGISTRY, key=lambda n: (KINDS.index(_REGISTRY[n].kind), n)):
        cls = _REGISTRY[name]
        summary = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        label = KIND_LABELS[cls.kind] + (" (combines with any other)" if getattr(cls, "modifier", False) else "")
        params = {p.name: p.describe_default() for p in cls.params}
        rows.append(MethodInfo(name, cls.kind, params, summary, cls.paper, cls.definition, label, cls.training_free))
    return rows


def methods_table() -> str:
    """The markdown table of every method (docs/methods.md and docs/DESIGN.md hold it between
    `<!-- methods:start -->` and `<!-- methods:end -->`; `python -m ctxpatch.docs` prints or writes it)."""
    lines = ["| name | kind | training-free | definition | parameters (default) |", "|---|---|---|---|---|"]
    for m in methods():
        params = ", ".join(f"`{name}` ({default})" for name, default in m.params.items()) or "—"
        free = "yes" if m.training_free else "no: fine-tune under it"
        lines.append(f"| `{m.name}` | {m.kind_label} | {free} | {m.definition or m.summary} | {params} |")
    return "\n".join(lines) + "\n"
