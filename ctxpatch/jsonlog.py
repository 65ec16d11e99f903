"""An append-only JSON-lines file that survives a kill: what long measurements write as they complete.

A row is written (and fsynced) as soon as it exists, so a run killed after hours loses at most the forward in
flight; reading ignores a last line the kill cut short. Several processes may append to the same file: each row
is one `write` of one line, which POSIX appends whole.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


class JsonLog:
    def __init__(self, path: str | Path | None, write: bool = True, read: bool = True):
        self.path = None if path is None else Path(path)
        self.write = write and self.path is not None
        self.read = read  # False: what is in the file is not this run's (it starts again)

    def rows(self) -> Iterator[dict[str, Any]]:
        if not self.read or self.path is None or not self.path.is_file():
            return
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue  # the line a kill cut short: measured again

    def append(self, rows: Iterable[dict[str, Any]]) -> None:
        if not self.write:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
            f.flush()
            os.fsync(f.fileno())

    def __bool__(self) -> bool:
        return self.path is not None and self.path.is_file() and self.path.stat().st_size > 0
