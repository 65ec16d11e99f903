"""Forward time of the multi-view rules against the blockwise backend's block scale and row pieces for them,
as ratios to the unpatched model in one run (`blockwise.MULTI_VIEW_SCALE`: chunk rows and key blocks of a rule
with several views are that many times `blockwise.BLOCK`; `lse_views.EXACT_PIECES`: the row pieces its masked
pairs are attended in).

    python benchmarks/multiview_blocks.py --lengths 16384,32768 --specs dca,selfextend,rerope,string --scales 1,2,4
    python benchmarks/multiview_blocks.py --lengths 16384 --specs string,selfextend,rerope --scales 2 --pieces 1,2,4,8

Same model and timing as `attention.py` (2 layers shaped like SmolLM2-135M's attention, best of 2 after a warm-up).
"""

from __future__ import annotations

import argparse

import torch
from attention import measure, model_for

import ctxpatch
from ctxpatch.backends import blockwise, lse_views


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="16384,32768")
    parser.add_argument("--specs", default="dca,selfextend,rerope,string")
    parser.add_argument("--scales", default="1,2,4")
    parser.add_argument("--pieces", default="4")
    args = parser.parse_args()
    model = model_for(2)
    settings = [(int(s), int(p)) for s in args.scales.split(",") for p in args.pieces.split(",")]
    print(torch.get_num_threads(), "threads", flush=True)
    for n in [int(x) for x in args.lengths.split(",")]:
        ids = torch.randint(0, 1024, (1, n))
        base = measure(model, ids, 2)[0]
        print(f"n={n} unpatched {base:.2f}s", flush=True)
        for spec in args.specs.split(","):
            cells = []
            for scale, pieces in settings:
                blockwise.MULTI_VIEW_SCALE, lse_views.EXACT_PIECES = scale, pieces
                with ctxpatch.apply(model, spec, backend="blockwise"):
                    cells.append(f"x{scale} p{pieces}: {measure(model, ids, 2)[0] / base:.3f}")
            print(f"  {spec:12s} " + "  ".join(cells), flush=True)


if __name__ == "__main__":
    main()
