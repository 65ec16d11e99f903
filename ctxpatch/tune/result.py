"""What `ctxpatch.tune` returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .candidates import CandidateSet
from .schedule import Schedule
from .search import SearchResult


@dataclass
class TuneResult:
    """What a search found: `spec` for `ctxpatch.apply`, `tuned` (tuned.json's content), `table` (every
    candidate with every measurement, eliminated and skipped ones included)."""

    spec: list[Any]
    tuned: dict[str, Any]
    table: list[dict[str, Any]]
    schedule: Schedule
    candidates: CandidateSet
    search: SearchResult
    files: list[Path] = field(default_factory=list)

    @property
    def winner(self) -> str:
        return self.tuned["candidate"]
