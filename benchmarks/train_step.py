"""Fine-tune step time (forward + backward) of the multi-view rules, as ratios to the unpatched model.

    python benchmarks/train_step.py                                  # dca, selfextend, rerope; pose and stretched
    python benchmarks/train_step.py --specs dca --schemes stretched --seq-len 2048 --target-len 131072

What the CPU recipes run per micro-batch: `--seq-len` real tokens at position ids drawn by the recipe's
schemes up to `--target-len` (PoSE: two chunks, the second shifted; stretched: evenly spread, fractional),
through a small random Llama-architecture model shaped like SmolLM2-135M's attention (9 query / 3 key-value
heads of 64 dims, trained length 8k), loss on every token, then backward. Time is the best of `--repeat`
steps after a warm-up, each with fresh positions; the unpatched model runs at contiguous positions.
"""

from __future__ import annotations

import argparse
import time

import torch

import ctxpatch
from ctxpatch.finetune.positions import SCHEMES

from attention import model_for


def step_seconds(model, ids: torch.Tensor, positions, repeat: int) -> float:
    """Best of `repeat` forward + backward passes after a warm-up; `positions()` gives each its position ids."""
    best = float("inf")
    for attempt in range(repeat + 1):
        pos = positions()
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        model(ids, position_ids=pos, labels=ids).loss.backward()
        if attempt:
            best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--specs", default="dca,selfextend,rerope")
    parser.add_argument("--schemes", default="pose,stretched")
    parser.add_argument("--backends", default="blockwise,dense")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--target-len", type=int, default=65536)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    model = model_for(args.layers).train()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, args.seq_len), generator=generator)
    native = step_seconds(model, ids, lambda: None, args.repeat)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.layers} layers, "
          f"{args.seq_len} tokens, positions up to {args.target_len}")
    print(f"{'spec':<12} {'scheme':<10} {'backend':<10} {'seconds':>8} {'x unpatched':>12}")
    print(f"{'none':<12} {'contiguous':<10} {'sdpa':<10} {native:8.3f} {1.0:12.2f}")
    for spec in args.specs.split(","):
        for scheme in args.schemes.split(","):
            draw = SCHEMES[scheme]
            for backend in args.backends.split(","):
                with ctxpatch.apply(model, spec, backend=backend, target_len=args.target_len):
                    seconds = step_seconds(
                        model, ids, lambda: draw(args.seq_len, args.target_len, generator)[None], args.repeat
                    )
                print(f"{spec:<12} {scheme:<10} {backend:<10} {seconds:8.3f} {seconds / native:12.2f}", flush=True)


if __name__ == "__main__":
    main()
