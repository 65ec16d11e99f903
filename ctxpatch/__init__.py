"""ctxpatch: make a pretrained Hugging Face causal LM read past its trained length.

    patch = ctxpatch.apply(model, "dca", target_len=32768)
    ...
    patch.remove()

Names are imported on first use (PEP 562), so `ctxpatch --help` and `import ctxpatch.errors` do not import torch
or transformers; `ctxpatch.methods()` and every lookup by name import the method files first (`registry.discover`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .errors import (
    AlreadyPatchedError,
    CompositionError,
    CtxpatchError,
    ModelPathError,
    ParameterTypeError,
    ParameterValueError,
    SpecError,
    UnknownMethodError,
    UnsupportedModelError,
    UserInputError,
)

_LAZY = {  # name -> the module (relative to ctxpatch) that defines it
    "load_chatglm": "chatglm",
    "load": "loading",
    "load_model": "loading",
    "merge": "loading",
    "Patch": "patch",
    "apply": "patch",
    "current_patch": "patch",
    "remove": "patch",
    "spec_from_dict": "patch",
    "Method": "registry",
    "MethodInfo": "registry",
    "method": "registry",
    "methods": "registry",
    "register": "registry",
    "ParsedSpec": "spec",
    "parse_spec": "spec",
    "evaluate": "eval",  # lm-eval is slow to import
    "compare": "eval",
}
from . import tune as _tune_package  # noqa: E402,F401  (loaded now, light: see below)

# `ctxpatch.tune` is the function (ctxpatch.tune.api.tune), given by __getattr__. The package of the same name is
# loaded above, so that importing one of its modules later (ctxpatch.tune.cli) does not bind the package over
# the function; its binding made by that import is dropped here.
del tune  # noqa: F821  (bound by the import above, not visible to the linter)


if TYPE_CHECKING:  # what `_LAZY` provides, for type checkers, IDEs and the API reference (tests/test_cli.py)
    from .chatglm import load_chatglm
    from .eval import compare, evaluate
    from .loading import load, load_model, merge
    from .patch import Patch, apply, current_patch, remove, spec_from_dict
    from .registry import Method, MethodInfo, method, methods, register
    from .spec import ParsedSpec, parse_spec


def __getattr__(name: str) -> Any:
    """Each public name from its module on first use; `ctxpatch.tune` is the function (ctxpatch.tune.api.tune)."""
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    elif name == "tune":
        value = importlib.import_module(".tune.api", __name__).tune
    elif name == "registry":
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'ctxpatch' has no attribute {name!r}")
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY, "tune", "registry"})


__all__ = [
    "AlreadyPatchedError",
    "CompositionError",
    "CtxpatchError",
    "Method",
    "MethodInfo",
    "ModelPathError",
    "ParameterTypeError",
    "ParameterValueError",
    "ParsedSpec",
    "Patch",
    "SpecError",
    "UnknownMethodError",
    "UnsupportedModelError",
    "UserInputError",
    "__version__",
    "apply",
    "compare",
    "current_patch",
    "evaluate",
    "load",
    "load_chatglm",
    "load_model",
    "merge",
    "method",
    "methods",
    "parse_spec",
    "register",
    "remove",
    "spec_from_dict",
    "tune",
]
