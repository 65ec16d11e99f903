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
    "load_chatglm",
    "method",
    "methods",
    "register",
    "remove",
    "spec_from_dict",
]
