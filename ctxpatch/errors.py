"""Exceptions raised by ctxpatch. Each message says what was wrong and what to do.

`UserInputError` is a mistake in what the user gave (a spec, a parameter, a model path, a recipe
value): the CLI prints its message as one line and exits with status 2. Any other exception on
the CLI is a bug in ctxpatch and keeps its traceback. Each subclass also derives from the builtin
a Python caller would expect (`ValueError`, `TypeError`, `FileNotFoundError`).
"""


class CtxpatchError(Exception):
    """Base class of every error ctxpatch raises on purpose."""


class UserInputError(CtxpatchError):
    """A mistake in what the user gave; the message is one sentence saying what to do."""


class UnsupportedModelError(UserInputError, TypeError):
    """The model's attention layout is not one ctxpatch knows how to patch."""


class UnknownMethodError(UserInputError, ValueError):
    """A spec names a method that is not registered."""


class CompositionError(UserInputError, ValueError):
    """Methods that cannot share a layer (two masks, two position rules, ...)."""


class SpecError(UserInputError, ValueError):
    """A spec that cannot be read: bad syntax, a bad value, a spec file that is missing or malformed."""


class ParameterTypeError(UserInputError, TypeError):
    """A parameter no method of the spec takes, or a value of the wrong kind (`layers="abc"`), or no spec."""


class ParameterValueError(UserInputError, ValueError):
    """A parameter value out of range (`window=0`, `factor=nan`, a layer index past the model's layers)."""


class ModelPathError(UserInputError, FileNotFoundError):
    """A model name or path that does not name a loadable model (missing folder, no config.json)."""


class UnknownTrainedLengthError(UserInputError, ValueError):
    """The model's config does not say how long a context it was trained on."""


class UnknownBackendError(UserInputError, ValueError):
    """An attention backend name that is not one of ctxpatch's (`dense`, `blockwise`, `flex`)."""


class DeviceError(UserInputError, ValueError):
    """A device that is not one, or one this machine does not have (`cuda` without a GPU)."""


class AlreadyPatchedError(UserInputError, RuntimeError):
    """`apply` was called on a model that already carries a patch."""
