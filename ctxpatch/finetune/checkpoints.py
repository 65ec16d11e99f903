"""The run folder: refusing to clobber it, checkpoints that are never half-written, resuming.

A checkpoint is written into `checkpoint-N.tmp` and renamed to `checkpoint-N` only once every
process has finished writing it, so a folder named `checkpoint-N` is always complete; a kill
mid-write leaves only a `.tmp` folder, which is ignored and removed on the next save. The latest
complete checkpoint is the one `resume=true` continues from.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from .recipe import RecipeError

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
RECIPE_FILE = "recipe.yaml"
STATE_FILE = "trainer_state.json"
# files that mark a folder as a ctxpatch run (so overwrite=true may delete it)
RUN_MARKERS = (RECIPE_FILE, "ctxpatch.json", "metrics.jsonl")


class OutputDirExistsError(RecipeError, FileExistsError):
    """output_dir holds a run and neither resume nor overwrite was asked for."""


def checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first."""
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if p.is_dir() and (m := CHECKPOINT.match(p.name))]
    return sorted(found)


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = checkpoints(output_dir)
    return found[-1][1] if found else None


def is_run_folder(path: Path) -> bool:
    return any((path / marker).exists() for marker in RUN_MARKERS) or bool(checkpoints(path))


def check_output_dir(output_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse a non-empty output_dir unless resume or overwrite says what to do with it."""
    if not output_dir.exists():
        return
    if not output_dir.is_dir():
        raise OutputDirExistsError(f"output_dir {str(output_dir)!r} is a file; name a folder")
    if not any(output_dir.iterdir()) or resume:
        return
    if not overwrite:
        raise OutputDirExistsError(
            f"output_dir {str(output_dir)!r} already exists and is not empty: pass resume=true to continue its "
            "run from the last checkpoint, overwrite=true to delete it and start again, or another output_dir"
        )
    if not is_run_folder(output_dir):
        raise OutputDirExistsError(
            f"output_dir {str(output_dir)!r} holds files that are not a ctxpatch run; overwrite=true only deletes "
            "run folders. Choose another output_dir"
        )


def clear_output_dir(output_dir: Path) -> None:
    """Delete a previous run's contents (checked by `check_output_dir` first)."""
    for child in output_dir.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def temporary_path(output_dir: Path, step: int) -> Path:
    return output_dir / f"checkpoint-{step}.tmp"


def final_path(output_dir: Path, step: int) -> Path:
    return output_dir / f"checkpoint-{step}"


def publish(tmp: Path, final: Path) -> None:
    """Make a fully written checkpoint visible under its final name (a rename)."""
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


def prune(output_dir: Path, keep: int) -> None:
    """Delete all but the `keep` latest complete checkpoints, and stale `.tmp` folders."""
    for _, path in checkpoints(output_dir)[:-keep]:
        shutil.rmtree(path)
    for stale in output_dir.glob("checkpoint-*.tmp"):  # left by a kill mid-write; none is being written now
        shutil.rmtree(stale, ignore_errors=True)
