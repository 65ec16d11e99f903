"""A fine-tune run's LoRA with its patch removed, against the unpatched base: what the adapter gives without the
rule it was trained under (at the trained length, the text's domain rather than positions).

    python benchmarks/adapter_alone.py benchmarks/finetuned/64k-pose --length 8192 \
        --out benchmarks/finetuned/64k-pose/control-8k-dca-removed

Perplexity ratio against the base's native perplexity on the same held-apart tokens (as `ctxpatch eval --model RUN
--reference base`), and the passkey at five depths. Resumable (`--out` keeps every score).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import ctxpatch
from ctxpatch.eval.runner import compare
from ctxpatch.loading import base_name, held_apart_text, load_base_for_eval


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a ctxpatch fine-tune run folder")
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    model, tokenizer = ctxpatch.load(args.run)
    patch = ctxpatch.current_patch(model)
    patch.remove()
    base, _ = load_base_for_eval(args.run)
    board = compare(
        model.eval(), tokenizer, ["none"], lengths=[args.length], tasks=["ppl", "passkey"],
        depths=[0, 0.25, 0.5, 0.75, 1], tail=1024, text_files=held_apart_text(args.run), reference_model=base,
        reference_name=base_name(args.run), name=f"{Path(args.run).name} LoRA, {patch.spec} removed",
        out_dir=args.out, resume=True,
    )
    print(board.markdown())


if __name__ == "__main__":
    main()
