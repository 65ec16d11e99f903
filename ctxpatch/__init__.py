"""ctxpatch: make a pretrained Hugging Face causal LM read past its trained length.

    patch = ctxpatch.apply(model, "logn+window")
    ...
    patch.remove()
"""

from . import adapters, biases, masks, positions, scales  # noqa: F401  (registers every method)
from .errors import (
    AlreadyPatchedError,
    CompositionError,
    CtxpatchError,
    UnknownMethodError,
    UnsupportedModelError,
)
from .patch import Patch, apply, current_patch, remove, spec_from_dict
from .registry import Method, MethodInfo, method, methods, register

__version__ = "0.1.0"

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
    "current_patch",
    "method",
    "methods",
    "register",
    "remove",
    "spec_from_dict",
]
