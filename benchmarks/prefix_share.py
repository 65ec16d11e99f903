"""What share of a retrieval grid's tokens a comparison computes when each prompt starts from the one before's KV
cache (`ctxpatch.eval.prefix`): the prompts of `ctxpatch compare --tasks passkey,niah` built as the tasks build
them, in the order they are scored, no forward run (a few minutes, mostly fitting prompts to exact lengths).

    python benchmarks/prefix_share.py --lengths 32768,65536 --out benchmarks/prefix-share-2026-12-04.txt
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ctxpatch.eval import data, sources
from ctxpatch.eval.prefix import PIECE, piece_starts, reused_start
from ctxpatch.loading import load_base_tokenizer


def computed_share(encoder: data.Encoder, docs: list[dict], piece: int) -> float:
    """Tokens computed / tokens of all the docs' sequences, scored in token order."""
    sequences = []
    for doc in docs:
        context, continuation = encoder.pair(doc["context"], doc["continuation"])
        sequences.append(((context + continuation)[:-1], len(continuation)))
    sequences.sort(key=lambda s: s[0])
    total = computed = 0
    last, last_starts = [], []
    for ids, keep in sequences:
        starts = piece_starts(len(ids), keep, piece)
        total += len(ids)
        computed += len(ids) - reused_start(last, last_starts, ids, starts)
        last, last_starts = ids, starts
    return computed / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="32768,65536")
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--piece", type=int, default=PIECE)
    parser.add_argument("--out")
    args = parser.parse_args()
    encoder = data.Encoder(load_base_tokenizer("default"))
    corpus = sources.corpus_from_metadata(encoder, {"text_files": ["held-out"]})
    lines = [f"piece {args.piece} tokens, {args.samples} prompts a depth, held-out plays, the default model's tokenizer"]
    for n in (int(v) for v in args.lengths.split(",")):
        passkey = data.passkey_docs(encoder, data.RetrievalRequest((n,), (0, 0.25, 0.5, 0.75, 1), args.samples, 0))
        niah = data.niah_docs(encoder, corpus, data.RetrievalRequest((n,), (0.25, 0.5, 0.75), args.samples, 0))
        lines.append(f"{n}: passkey (5 depths) computes {computed_share(encoder, passkey, args.piece):.3f} of its "
                     f"tokens; niah (3 depths) {computed_share(encoder, niah, args.piece):.3f}")
        print(lines[-1], flush=True)
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
