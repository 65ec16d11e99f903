"""ctxpatch: make a pretrained Hugging Face causal LM read past its trained length.

    patch = ctxpatch.apply(model, "logn+window")
    ...
    patch.remove()
"""

from . import adapters, biases, caches, masks, positions, scales  # noqa: F401  (registers every method)
from .chatglm import load_chatglm
from .errors import (
    AlreadyPatchedError,
    CompositionError,
    CtxpatchError,
    UnknownMethodError,
    UnsupportedModelError,
)
from .loading import load, merge
from .patch import Patch, apply, current_patch, remove, spec_from_dict
from .registry import Method, MethodInfo, method, methods, register

__version__ = "0.1.0"


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
    "Patch",
    "UnknownMethodError",
    "UnsupportedModelError",
    "apply",
    "compare",
    "current_patch",
    "evaluate",
    "load",
    "load_chatglm",
    "merge",
    "method",
    "methods",
    "register",
    "remove",
    "spec_from_dict",
    "tune",
]
