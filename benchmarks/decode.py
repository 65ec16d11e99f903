"""Time of one decoding step after a long prompt, as a ratio to the unpatched model's step at the same n.

    python benchmarks/decode.py                                   # n = 16k, 32k; retrieval, dca; 2 layers
    python benchmarks/decode.py --lengths 8192,16384 --specs retrieval,rerope --layers 4 --steps 16

The model of `attention.py` (shaped like SmolLM2-135M's attention, trained length 8k, built from a config). Per
spec and n: a prompt of n tokens is written into a fresh `DynamicCache` under the patch, then `--steps` single
tokens are fed through the cache; the figure is the mean step, the step the prefill's time does not include.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import DynamicCache

import ctxpatch
from attention import model_for
from ctxpatch.spec import split_top_level


def step_time(model, n: int, steps: int) -> float:
    """Mean seconds of one cached decoding step after an n-token prompt."""
    ids = torch.randint(0, 1024, (1, n))
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        model(ids, use_cache=True, past_key_values=cache, logits_to_keep=1)
        token = torch.randint(0, 1024, (1, 1))
        model(token, use_cache=True, past_key_values=cache, logits_to_keep=1)  # warm-up
        began = time.perf_counter()
        for _ in range(steps):
            model(token, use_cache=True, past_key_values=cache, logits_to_keep=1)
    return (time.perf_counter() - began) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="16384,32768")
    parser.add_argument("--specs", default="retrieval,dca")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    lengths = [int(n) for n in args.lengths.split(",")]
    model = model_for(args.layers)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.layers} layers, 9x64 heads (3 kv), fp32")
    print(f"mean decoding step after an n-token prompt ({args.steps} steps); ratios to the unpatched step\n")
    base = {n: step_time(model, n, args.steps) for n in lengths}
    print("| spec | " + " | ".join(f"n={n}" for n in lengths) + " |")
    print("|---|" + "---|" * len(lengths))
    print("| unpatched | " + " | ".join(f"{base[n] * 1000:.1f} ms" for n in lengths) + " |")
    for spec in split_top_level(args.specs, ","):  # brackets may hold commas: retrieval[a=1,b=2]
        cells = []
        for n in lengths:
            with ctxpatch.apply(model, spec):
                cells.append(f"{step_time(model, n, args.steps) / base[n]:.2f}x")
        print(f"| {spec} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
