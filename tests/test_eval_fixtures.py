"""Shared builders for the evaluation tests: a byte-level BPE tokenizer trained here on generated text, a tiny
random Llama sized to it, and both saved as a model folder. No downloads."""

from __future__ import annotations

import functools
import random

import pytest
import torch

from conftest import tiny_model

WORDS = (
    "the of and to a in that is was he for it with as his on be at by had not are but from or have an they "
    "which one you were her all she there would their we him been has when who will more no if out so said "
    "what up its about into than them can only other new some could time these two may then do first any my "
    "now such like our over man me even most made after also did many before must through back years where "
    "much your way well down should because each just those people how too little state good very make world "
    "still own see men work long get here between both life being under never day same another know while "
    "last might us great old year off come since against go came right used take three grass green sky blue "
    "sun yellow pass key remember important info hidden irrelevant text find memorize quiz special magic number"
).split()
TRAIN_LEN = 192


def generated_text(words: int = 30000, seed: int = 0) -> str:
    """Sentences of random common words, lines of a few sentences: English-shaped, deterministic."""
    rng = random.Random(seed)
    lines, line, count = [], [], 0
    while count < words:
        sentence = [rng.choice(WORDS) for _ in range(rng.randint(4, 12))]
        count += len(sentence)
        line.append(" ".join(sentence).capitalize() + rng.choice([".", ".", ",", "?", "!"]))
        if rng.random() < 0.3:
            lines.append(" ".join(line))
            line = []
    digits = " ".join(str(rng.randint(0, 99999)) for _ in range(300))
    return "\n".join(lines) + "\n" + digits + "\n"


@functools.lru_cache(maxsize=1)
def tiny_tokenizer():
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([generated_text(8000, seed=1)], vocab_size=400, min_frequency=2,
                            special_tokens=["<|endoftext|>"], show_progress=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
                                        pad_token="<|endoftext|>", bos_token="<|endoftext|>")
    return tokenizer


def tiny_lm(seed: int = 0):
    """(model, tokenizer): a 3-layer random Llama trained length 192, vocabulary of the tiny tokenizer."""
    tokenizer = tiny_tokenizer()
    model = tiny_model("llama", seed=seed, vocab_size=len(tokenizer), max_position_embeddings=TRAIN_LEN,
                       pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return model, tokenizer


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on one thread: on a loaded 2-core machine, 2 threads make them 50x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(generated_text(), encoding="utf-8")
    return path


@pytest.fixture
def model_folder(tmp_path):
    model, tokenizer = tiny_lm()
    folder = tmp_path / "tiny-llama"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_tiny_tokenizer_round_trips_generated_text():
    tokenizer = tiny_tokenizer()
    text = generated_text(200, seed=5)
    assert tokenizer.decode(tokenizer(text).input_ids) == text
    assert torch.tensor(tokenizer(text).input_ids).max() < len(tokenizer)
