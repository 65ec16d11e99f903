"""Exceptions of the evaluation layer. Each message says what was wrong and what to do."""

from __future__ import annotations

from ..errors import UserInputError


class EvalError(UserInputError, ValueError):
    """Bad evaluation input: an unknown task, a length that is not a number, a text too short, ..."""


class TruncationError(UserInputError, RuntimeError):
    """lm-eval would have cut a prompt to fit `max_length`: ctxpatch refuses to score a shorter context silently."""
