"""The errors `ctxpatch tune` raises on purpose: mistakes in what the user gave."""

from __future__ import annotations

from ..errors import UserInputError


class TuneError(UserInputError, ValueError):
    """Bad input to `ctxpatch tune` (one sentence saying what to do)."""


class BudgetError(TuneError):
    """A budget that cannot pay for the search; `needed` is about what it would take."""

    def __init__(self, needed: float, message: str):
        super().__init__(message)
        self.needed = needed
