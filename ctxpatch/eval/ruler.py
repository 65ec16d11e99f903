"""lm-eval's own RULER tasks (those that synthesise their data), run offline through ctxpatch.

Measured pitfalls this module handles:
  * RULER loads its tokenizer by name from the task metadata (`tokenizer`): an in-memory or GGUF tokenizer is
    first saved to a folder, and that folder is the name.
  * Its modules import `wonderwords` and `nltk`, and on import try to download nltk's `punkt_tab` (used only by
    the essay haystacks, which download essays too and are refused): the download is turned into a no-op.
  * It sizes a prompt to `length - tokens_to_generate`, then adds the answer prefix: `max_length` needs a margin
    over the largest length (`LENGTH_MARGIN`) or `CtxpatchLM` refuses the prompt.
  * `-1` in its per-length metrics means "no sample at that length"; it is never a score.
  * lm-eval's `limit=N` takes the first N docs, all of the first length: `sample_indices` picks N per length.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import importlib.util
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator

from .errors import EvalError

log = logging.getLogger(__name__)

TASKS_DIR = Path(importlib.util.find_spec("lm_eval").origin).parent / "tasks" / "ruler"
LENGTH_MARGIN = 256  # tokens past the largest length: RULER's answer prefix, ctxpatch's generation budget
REQUIRED = {"wonderwords": "wonderwords", "nltk": "nltk", "scipy": "scipy"}


def check_installed() -> None:
    missing = [pip for module, pip in REQUIRED.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise EvalError(
            f"lm-eval's RULER tasks need {', '.join(missing)}: pip install 'ctxpatch[ruler]' (or {' '.join(missing)})"
        )


@contextlib.contextmanager
def offline_nltk() -> Iterator[None]:
    """nltk.download becomes a no-op that says so (RULER calls it on import for `punkt_tab`)."""
    import nltk

    original = nltk.download

    def refuse(resource: str = "", *args: Any, **kwargs: Any) -> bool:
        log.info("ctxpatch: skipped nltk.download(%r) (offline; only RULER's essay tasks use it)", resource)
        return False

    nltk.download = refuse
    try:
        yield
    finally:
        nltk.download = original


def import_offline(tasks: list[str]) -> None:
    """Import RULER's needle module (when a niah task needs it) with nltk's download disabled, so later imports
    find it loaded."""
    check_installed()
    if not any(t.startswith("niah_") for t in tasks):
        return
    with offline_nltk(), contextlib.redirect_stdout(io.StringIO()):  # it prints "Downloaded punkt_tab" regardless
        importlib.import_module("lm_eval.tasks.ruler.prepare_niah")


def save_tokenizer(tokenizer: Any, folder: Path) -> str:
    """Save `tokenizer` where RULER's `AutoTokenizer.from_pretrained(name)` finds it; return the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(folder))
    return str(folder)


def sample_indices(docs: Any, per_length: int) -> list[int]:
    """The first `per_length` docs of each length (docs carry `max_length`), in document order."""
    taken: dict[int, int] = defaultdict(int)
    indices = []
    for index, length in enumerate(docs["max_length"]):
        if taken[length] < per_length:
            taken[length] += 1
            indices.append(index)
    return indices


def sample_score(sample: dict) -> tuple[int, float] | None:
    """(length, score) of a logged RULER sample; None when its metric is RULER's -1 ("no sample here")."""
    length = int(sample["doc"]["max_length"])
    value = sample.get(str(length), -1)
    return None if value == -1 else (length, float(value))
