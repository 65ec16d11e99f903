"""Task data, generated locally and deterministically from a seed, at exact token lengths.

* perplexity windows (`ppl_docs`): n-token windows of a text whose last `tail` tokens are scored, each
  with its native window — the last `train_len` tokens, ending at the same token;
* passkey prompts (`passkey_docs`): a random 5-digit key hidden at a depth in repeated filler;
* needle-in-a-haystack prompts (`niah_docs`): a 7-digit "special magic number" hidden at a depth in real text.

A doc is a (context, continuation) pair, and its length n is the number of tokens lm-eval gives the model for
it: the pair encoded as lm-eval's `_encode_pair` encodes it (special tokens the tokenizer adds included). Every
generator checks that the length is exactly what was asked, and raises `EvalError` when it cannot be.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Callable

from tqdm.auto import tqdm

from .errors import EvalError

PASSKEY_INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there."
)
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_LINE = "The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "What is the pass key? The pass key is"

NIAH_INTRO = (
    "A special magic number is hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the number afterwards."
)
NIAH_NEEDLE = "The special magic number is {value}."
NIAH_QUESTION = "What is the special magic number mentioned in the text above? The special magic number is"

MAX_SHIFT = 64  # tokens a window may move forward to find boundaries that survive decode/encode
SEPARATORS = ("\n", " ", "\n\n")  # before the question; a second or third try when the first misses by a gap


class Encoder:
    """A tokenizer seen the way lm-eval's HFLM sees it (default special tokens, the context/continuation split)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.special = len(self.encode("a")) - len(self.encode_plain("a"))

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, verbose=False).input_ids

    def encode_plain(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False, verbose=False).input_ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, clean_up_tokenization_spaces=False)

    def pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context tokens, continuation tokens) exactly as lm-eval's `_encode_pair` makes them (causal LM)."""
        spaces = len(context) - len(context.rstrip())
        if spaces:  # lm-eval moves the context's trailing whitespace into the continuation
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.encode(context + continuation)
        context_ids = self.encode(context)
        return context_ids, whole[len(context_ids):]

    def pair_length(self, context: str, continuation: str) -> int:
        context_ids, continuation_ids = self.pair(context, continuation)
        return len(context_ids) + len(continuation_ids)


class Corpus:
    """A text's token ids, tokenized lazily from its start as far as a request needs."""

    def __init__(self, encoder: Encoder, text: str, name: str = "text"):
        if not text.strip():
            raise EvalError(f"the {name} is empty: pass a text file with enough words")
        self.encoder, self.text, self.name = encoder, text, name
        self._ids: list[int] = []
        self._chars = 0

    def ids(self, need: int) -> list[int]:
        """At least `need` token ids from the start of the text (`EvalError` if the whole text has fewer)."""
        while len(self._ids) < need and self._chars < len(self.text):
            self._chars = min(len(self.text), max(2 * self._chars, need * 8, 4096))
            ids = self.encoder.encode_plain(self.text[: self._chars])
            # a cut mid-word tokenizes differently: keep only tokens well before the cut
            self._ids = ids if self._chars == len(self.text) else ids[:-8]
        if len(self._ids) < need:
            raise EvalError(
                f"the {self.name} has {len(self._ids)} tokens but this request needs {need} (the longest length "
                "times the number of samples, plus a margin): pass a longer text (--text FILE ...) or fewer samples"
            )
        return self._ids

    def count(self, need: int) -> int:
        """The text's tokens counted up to `need` (all of them when it has fewer), with no error."""
        try:
            return len(self.ids(need))
        except EvalError:
            return len(self._ids)


def rng_for(*parts: object) -> random.Random:
    """A random generator seeded by its purpose (string seeds are stable across runs and machines)."""
    return random.Random(":".join(str(p) for p in parts))


def window_starts(seed: int, length: int, samples: int) -> list[int]:
    """Where sample i's window starts: back to back from a seed-chosen offset, so samples share no token."""
    offset = rng_for("ctxpatch-offset", seed).randrange(0, 1024)
    return [offset + i * (length + MAX_SHIFT) for i in range(samples)]


def windows_apart(corpus: Corpus, seed: int, length: int, most: int) -> int:
    """How many of the first `most` windows of `window_starts` (`length` tokens) the text holds."""
    starts = window_starts(seed, length, most)
    have = corpus.count(starts[-1] + length + MAX_SHIFT)
    return sum(start + length + MAX_SHIFT <= have for start in starts)


def sample_windows(corpus: Corpus, request) -> tuple[dict[int, list[int]], list[int]]:
    """Per length of the request, its samples' window starts (`sample_starts`), and the text's ids they need."""
    starts = {n: sample_starts(corpus, request.seed, n, request.samples) for n in request.lengths}
    return starts, corpus.ids(max(max(s) + n for n, s in starts.items()) + MAX_SHIFT)


def sample_starts(corpus: Corpus, seed: int, length: int, samples: int) -> list[int]:
    """`window_starts` while the text holds them; past that, sample m + t (m the windows that fit, t < m - 1)
    starts halfway between windows t and t + 1: its window overlaps their halves, but its needle goes in half a
    window away from theirs and its scored tail is text no other window scores (the four held-out plays hold two
    64k windows apart, three this way). The samples that fit never move: a score recorded for one stays its own."""
    apart, fit = window_starts(seed, length, samples), windows_apart(corpus, seed, length, samples)
    if fit == samples:
        return apart
    if samples > 2 * fit - 1:
        need = apart[-1] + length + MAX_SHIFT
        raise EvalError(
            f"the {corpus.name} has {corpus.count(need)} tokens but this request needs {need} "
            f"({samples} samples of {length} tokens; it holds {max(0, 2 * fit - 1)}: {fit} apart and "
            f"{max(0, fit - 1)} overlapping them): pass a longer text (--text FILE ...) or fewer samples"
        )
    stride = length + MAX_SHIFT
    return apart[:fit] + [apart[t] + stride // 2 for t in range(samples - fit)]


def fit_exact(count: Callable[[int], int], target: int, guess: int, low: int = 0) -> int | None:
    """The p >= low with count(p) == target, for count non-decreasing in p; None when target falls in a gap."""
    seen: dict[int, int] = {}

    def at(p: int) -> int:
        if p not in seen:
            seen[p] = count(p)
        return seen[p]

    lo, hi, step = max(low, guess - 16), max(low, guess + 16), 32
    while lo > low and at(lo) > target:
        lo, step = max(low, lo - step), step * 2
    while at(hi) < target:
        if hi > 64 * (target + 16):
            return None
        hi, step = hi + step, step * 2
    if at(lo) > target:
        return None
    while hi - lo > 1:  # invariant: count(lo) <= target <= count(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if at(mid) <= target else (lo, mid)
    for p in (lo, hi):
        if at(p) == target:
            return p
    return None


# ---- perplexity windows ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PplRequest:
    lengths: tuple[int, ...]
    tail: int
    train_len: int
    samples: int
    seed: int


def ppl_docs(encoder: Encoder, corpus: Corpus, request: PplRequest) -> list[dict]:
    """For each length and sample: the n-token window (context, continuation = its last `tail` tokens) and the
    native context (the window's last min(n, train_len) tokens minus the tail), as a pair of docs that share
    `window` (an id) and differ in `context_kind` ("full" / "native")."""
    check_tail(request)
    starts, ids = sample_windows(corpus, request)
    docs = []
    for length in tqdm(request.lengths, desc="perplexity windows", leave=False):
        for sample, start in enumerate(starts[length]):
            docs.extend(ppl_window(encoder, ids, start, length, request, sample))
    return docs


def check_tail(request: PplRequest) -> None:
    shortest = min(request.lengths)
    if request.tail <= 0:
        raise EvalError(f"tail={request.tail}: score at least one token (pass a positive --tail)")
    if request.tail >= min(shortest, request.train_len):
        raise EvalError(
            f"tail={request.tail} tokens must be shorter than the shortest length ({shortest}) and the trained "
            f"length ({request.train_len}): pass a smaller --tail or longer --lengths"
        )


def ppl_window(encoder: Encoder, ids: list[int], start: int, length: int, request: PplRequest, sample: int):
    body = length - encoder.special  # plain tokens in the window (the tokenizer adds the special ones)
    native_body = min(length, request.train_len) - encoder.special
    split = body - request.tail
    for shift in range(MAX_SHIFT):
        window = ids[start + shift : start + shift + body]
        texts = window_texts(encoder, window, split, body - native_body)
        if texts is not None:
            context, native, continuation = texts
            common = {
                "task": "ppl", "length": length, "sample": sample, "tail": request.tail,
                "train_len": request.train_len, "continuation": continuation, "start_token": start + shift,
                "window": f"{length}/{sample}",
            }
            return [
                {**common, "context_kind": "full", "context": context, "context_tokens": length - request.tail},
                {**common, "context_kind": "native", "context": native,
                 "context_tokens": min(length, request.train_len) - request.tail},
            ]
    raise EvalError(
        f"found no {length}-token window near token {start} of the text whose text re-encodes to the same tokens; "
        "the tokenizer does not round-trip this text: try another --text or --seed"
    )


def window_texts(encoder: Encoder, window: list[int], split: int, native_start: int) -> tuple[str, str, str] | None:
    """(full context, native context, continuation) texts, or None unless each re-encodes to exactly its tokens."""
    continuation = encoder.decode(window[split:])
    texts = []
    for begin in (0, native_start):
        context = encoder.decode(window[begin:split])
        context_ids, continuation_ids = encoder.pair(context, continuation)
        if continuation_ids != window[split:] or context_ids[encoder.special:] != window[begin:split]:
            return None
        texts.append(context)
    return texts[0], texts[1], continuation


# ---- passkey --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetrievalRequest:
    lengths: tuple[int, ...]
    depths: tuple[float, ...]
    samples: int
    seed: int


def filler_words(count: int) -> list[str]:
    words = PASSKEY_FILLER.split()
    return [words[i % len(words)] for i in range(count)]


def sentence_cut(words: list[str], depth: float) -> int:
    """The sentence boundary (a word index) nearest to `depth` of the way through `words`."""
    bounds = [0] + [i + 1 for i, w in enumerate(words) if w.endswith(".")] + [len(words)]
    return min(bounds, key=lambda b: (abs(b - depth * len(words)), b))


def passkey_prompt(key: str, depth: float, words: int, separator: str) -> tuple[str, float]:
    """(context, the fraction of filler words before the key) for a haystack of `words` filler words."""
    haystack = filler_words(words)
    cut = sentence_cut(haystack, depth)
    parts = [" ".join(haystack[:cut]), PASSKEY_LINE.format(key=key), " ".join(haystack[cut:])]
    body = " ".join(p for p in parts if p)
    return f"{PASSKEY_INTRO}\n{body}{separator}{PASSKEY_QUESTION}", cut / max(1, words)


def passkey_docs(encoder: Encoder, request: RetrievalRequest) -> list[dict]:
    docs = []
    grid = [(n, d, s) for n in request.lengths for d in request.depths for s in range(request.samples)]
    guesses: dict[int, int] = {}
    for length, depth, sample in tqdm(grid, desc="passkey prompts", leave=False):
        key = str(rng_for("passkey", request.seed, length, depth, sample).randint(10000, 99999))
        doc, guesses[length] = passkey_doc(encoder, key, length, depth, guesses.get(length, length * 3 // 4))
        docs.append({**doc, "sample": sample})
    return docs


def passkey_doc(encoder: Encoder, key: str, length: int, depth: float, guess: int) -> tuple[dict, int]:
    continuation = " " + key
    for separator in SEPARATORS:
        def count(words: int) -> int:
            return encoder.pair_length(passkey_prompt(key, depth, words, separator)[0], continuation)

        if count(0) > length:
            raise EvalError(f"length {length} is too short for a passkey prompt: it needs more than {count(0)} tokens")
        words = fit_exact(count, length, guess)
        if words is not None:
            context, key_depth = passkey_prompt(key, depth, words, separator)
            doc = {
                "task": "passkey", "length": length, "depth": depth, "key_depth": key_depth, "answer": key,
                "context": context, "continuation": continuation,
                "key_position": token_position(encoder, context, PASSKEY_LINE.format(key=key)),
            }
            return doc, words
    raise EvalError(f"could not build a passkey prompt of exactly {length} tokens with this tokenizer")


def token_position(encoder: Encoder, context: str, needle: str) -> int:
    """Index of the token where `needle` starts in the encoded context (spaces before it belong to it)."""
    before = context[: context.index(needle)].rstrip(" ")
    return len(encoder.encode(before)) if before else encoder.special


# ---- needle in a haystack -------------------------------------------------------------------------------------


SENTENCE_END = re.compile(r"\n|[.!?](?=\s)")


def needle_cut(haystack: str, depth: float) -> int:
    """Where the needle goes: the first line or sentence end at or after `depth` of the haystack's characters."""
    if depth <= 0.0:
        return 0
    match = SENTENCE_END.search(haystack, int(depth * len(haystack))) if depth < 1.0 else None
    if match is None:
        return len(haystack)
    return match.start() + (0 if match.group(0) == "\n" else 1)


def niah_prompt(haystack: str, value: str, depth: float, separator: str) -> str:
    cut = needle_cut(haystack, depth)
    needle = NIAH_NEEDLE.format(value=value)
    body = f"{haystack[:cut]}\n{needle}{haystack[cut:]}" if cut else f"{needle}\n{haystack}"
    return f"{NIAH_INTRO}\n{body}\n{separator}{NIAH_QUESTION}"


def niah_docs(encoder: Encoder, corpus: Corpus, request: RetrievalRequest) -> list[dict]:
    starts, ids = sample_windows(corpus, request)
    docs = []
    grid = [(n, d, s) for n in request.lengths for d in request.depths for s in range(request.samples)]
    guesses: dict[int, int] = {}
    for length, depth, sample in tqdm(grid, desc="needle prompts", leave=False):
        start = starts[length][sample]
        value = str(rng_for("niah", request.seed, length, depth, sample).randint(1000000, 9999999))
        doc, guesses[length] = niah_doc(encoder, ids, start, value, length, depth, guesses.get(length, length * 9 // 10))
        docs.append({**doc, "sample": sample})
    return docs


def niah_doc(encoder, ids, start, value, length, depth, guess) -> tuple[dict, int]:
    """A needle prompt of exactly `length` tokens from the haystack at `start`; when every separator's count jumps
    over the length (a token that re-encodes as several), the haystack starts a few tokens later, as a perplexity
    window does (within MAX_SHIFT)."""
    continuation = " " + value
    for shift in range(MAX_SHIFT):
        first = start + shift
        for separator in SEPARATORS:
            def count(tokens: int) -> int:
                haystack = encoder.decode(ids[first:first + tokens])
                return encoder.pair_length(niah_prompt(haystack, value, depth, separator), continuation)

            tokens = fit_exact(count, length, guess)
            if tokens is not None:
                haystack = encoder.decode(ids[first:first + tokens])
                context = niah_prompt(haystack, value, depth, separator)
                doc = {
                    "task": "niah", "length": length, "depth": depth, "answer": value,
                    "key_depth": needle_cut(haystack, depth) / max(1, len(haystack)),
                    "context": context, "continuation": continuation, "start_token": first,
                    "key_position": token_position(encoder, context, NIAH_NEEDLE.format(value=value)),
                }
                return doc, tokens
    raise EvalError(f"could not build a needle prompt of exactly {length} tokens with this tokenizer and text")
