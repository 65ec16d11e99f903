"""Shared pieces of the fine-tune tests: a tiny random Llama saved as a folder, a tokenizer built
locally (BPE trained on generated text, 97 tokens: the tiny model's vocabulary), text files, and
recipes pointing at them. No downloads."""

from __future__ import annotations

import random
from pathlib import Path

from accelerate.state import AcceleratorState
from conftest import tiny_model

WORDS = [
    "the",
    "a",
    "king",
    "queen",
    "crown",
    "sword",
    "night",
    "day",
    "love",
    "death",
    "speak",
    "hear",
    "my",
    "lord",
    "lady",
    "fool",
    "rose",
    "thorn",
]
VOCAB = 97
TRAIN_LEN = 32  # the tiny model's max_position_embeddings


def generated_text(words: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    lines, line = [], []
    for _ in range(words):
        line.append(rng.choice(WORDS))
        if len(line) == 8:
            lines.append(" ".join(line))
            line = []
    return "\n".join(lines + [" ".join(line)])


def build_tokenizer(text: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Metaspace()
    core.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "<eos>", "<unk>"], show_progress=False)
    core.train_from_iterator([text], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def make_model_dir(folder: Path, tied: bool = False, seed: int = 0) -> Path:
    """A tiny random Llama (3 layers, trained length 32) and its tokenizer, saved in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    model = tiny_model("llama", seed=seed, tie_word_embeddings=tied)
    model.save_pretrained(str(folder))
    build_tokenizer(generated_text(4000, seed=99)).save_pretrained(str(folder))
    return folder


def write_text(path: Path, words: int, seed: int = 0) -> Path:
    path.write_text(generated_text(words, seed), encoding="utf-8")
    return path


def tiny_overrides(model_dir: Path, text: Path, output_dir: Path, **extra) -> list[str]:
    """Overrides for a fast run on the tiny model: 16-token samples, positions up to 128."""
    values = {
        "model": str(model_dir),
        "data.files": f"[{text}]",
        "output_dir": str(output_dir),
        "seq_len": 16,
        "target_len": 128,
        "data.val_sequences": 2,
        "max_steps": 4,
        "global_batch": 2,
        "micro_batch": 1,
        "lora.r": 4,
        "optim.lr": 1e-2,
        "optim.warmup_steps": 0,
        "checkpoint_every": 2,
        "eval_every": 2,
        "progress": "false",
        "device": "cpu",
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def reset_accelerate() -> None:
    """accelerate keeps process-wide singletons; a fresh state per in-process run."""
    AcceleratorState._reset_state(reset_partial_state=True)
