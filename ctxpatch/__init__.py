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

registry.discover()  # every method file registers its methods


def __getattr__(name: str):
    """`ctxpatch.evaluate` / `ctxpatch.compare` (ctxpatch.eval), `ctxpatch.tune`: imported on first use, as lm-eval is slow to import."""
    if name in ("evaluate", "compare"):
        from . import eval as evaluation

        return getattr(evaluation, name)
    if name == "tune":  # the package ctxpatch.tune, callable as the function
        from . import tune

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
