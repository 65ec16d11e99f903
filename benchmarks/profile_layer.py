"""Where a patched forward's time goes: cProfile of one forward of the one-layer model of `attention.py`, beside
the unpatched forward's time in the same run.

    python benchmarks/profile_layer.py --length 32768 --spec retrieval --top 25
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch

import ctxpatch
from attention import model_for


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--length", type=int, default=32768)
    p.add_argument("--spec", default="retrieval")
    p.add_argument("--backend", default="blockwise")
    p.add_argument("--top", type=int, default=25, help="functions listed, by own time")
    args = p.parse_args()
    model, ids = model_for(1), torch.randint(0, 1024, (1, args.length))
    with torch.no_grad():
        began = time.perf_counter()
        model(ids, logits_to_keep=1)
        unpatched = time.perf_counter() - began
        with ctxpatch.apply(model, args.spec, backend=args.backend):
            model(ids[:, : args.length // 8], logits_to_keep=1)  # warm-up
            profile = cProfile.Profile()
            began = time.perf_counter()
            profile.runcall(model, ids, logits_to_keep=1)
            patched = time.perf_counter() - began
    print(f"n={args.length}: unpatched {unpatched:.2f}s, {args.spec} ({args.backend}) {patched:.2f}s under cProfile "
          f"({patched / unpatched:.2f}x)\n")
    pstats.Stats(profile).sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
