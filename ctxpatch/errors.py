"""Exceptions raised by ctxpatch. Each message says what was wrong and what to do."""


class CtxpatchError(Exception):
    """Base class of every error ctxpatch raises on purpose."""


class UnsupportedModelError(CtxpatchError, TypeError):
    """The model's attention layout is not one ctxpatch knows how to patch."""


class UnknownMethodError(CtxpatchError, ValueError):
    """A spec names a method that is not registered."""


class CompositionError(CtxpatchError, ValueError):
    """Methods that cannot share a layer (two masks, two position rules, ...)."""


class AlreadyPatchedError(CtxpatchError, RuntimeError):
    """`apply` was called on a model that already carries a patch."""
