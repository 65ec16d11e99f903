"""A long sequence in one forward against the same sequence fed in pieces through the KV cache (how `ctxpatch eval`
scores it: `ctxpatch.eval.prefix`), on a model shaped like SmolLM2-135M's attention: time of each, and the largest
difference of the last position's logits.

    python benchmarks/pieces.py --length 32768 --specs none,dca,retrieval --layers 2
"""

from __future__ import annotations

import argparse
import time

import torch
from attention import model_for

import ctxpatch
from ctxpatch._compat import transformers as hf
from ctxpatch.eval.prefix import PIECE


def timed(forward) -> tuple[float, torch.Tensor]:
    began = time.perf_counter()
    with torch.no_grad():
        logits = forward()
    return time.perf_counter() - began, logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=32768)
    parser.add_argument("--specs", default="none,dca,retrieval")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--piece", type=int, default=PIECE)
    args = parser.parse_args()
    model, n = model_for(args.layers), args.length
    ids = torch.randint(0, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(0))  # (1, n)
    keyword = hf.model_cache_keyword(model)

    def whole() -> torch.Tensor:
        return model(ids, logits_to_keep=1).logits[0, -1]

    def pieces() -> torch.Tensor:
        cache = None
        for start in range(0, n, args.piece):
            output = model(ids[:, start : start + args.piece], logits_to_keep=1, use_cache=True, **{keyword: cache})
            cache = hf.output_cache(output)
        return output.logits[0, -1]

    print(f"n = {n}, {args.layers} layers, pieces of {args.piece}: seconds of one forward (twice, around the pieces)")
    for spec in args.specs.split(","):
        with ctxpatch.apply(model, spec, target_len=n if spec != "none" else None):
            timed(whole)  # warm-up
            first, a = timed(whole)
            split, b = timed(pieces)
            second, _ = timed(whole)
        ratio = split / min(first, second)
        print(f"{spec}: one forward {first:.2f} / {second:.2f} s, pieces {split:.2f} s ({ratio:.2f}x), "
              f"largest logit difference {float((a - b).abs().max()):.1e}", flush=True)


if __name__ == "__main__":
    main()
