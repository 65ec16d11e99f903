"""ctxpatch: make a pretrained Hugging Face causal LM read past its trained length.

    patch = ctxpatch.apply(model, "logn+window")
    ...
    patch.remove()
"""

from . import registry
from ._version import __version__
from .chatglm import load_chatglm
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
from .loading import load, load_model, merge
from .patch import Patch, apply, current_patch, remove, spec_from_dict
from .registry import Method, MethodInfo, method, methods, register
from .spec import ParsedSpec, parse_spec

from . import tune as _tune_package  # noqa: F401  (loaded now: see below)

registry.discover()  # every method file registers its methods

# `ctxpatch.tune` is the function (ctxpatch.tune.api.tune), given by __getattr__. The package of the same name is
# loaded above, so that importing one of its modules later (ctxpatch.tune.cli) does not bind the package over
# the function; its binding made by that import is dropped here.
del tune


def __getattr__(name: str):
    """`ctxpatch.evaluate` / `ctxpatch.compare` (ctxpatch.eval), `ctxpatch.tune`: imported on first use, as lm-eval is slow to import."""
    if name in ("evaluate", "compare"):
        from . import eval as evaluation

        return getattr(evaluation, name)
    if name == "tune":  # the function; the package is ctxpatch.tune in sys.modules (python -m ctxpatch.tune)
        from .tune.api import tune

        globals()["tune"] = tune
        return tune
    raise AttributeError(f"module 'ctxpatch' has no attribute {name!r}")


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
