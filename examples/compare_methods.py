"""Which method works for your model and your text: `ctxpatch compare`, from Python.

    python examples/compare_methods.py --text my_docs/*.txt                  # default model, 16k, four specs
    python examples/compare_methods.py --patches none dca "yarn[factor=4]" --lengths 8k,16k,32k --out runs/cmp
    python examples/compare_methods.py --model FOLDER --lengths 256 --tail 24 --patches none selfextend   # tiny

Every spec is measured on the same windows and prompts: perplexity of the last `tail` tokens beside the same
tokens with only the trained length as context (their ratio < 1: the extra context helped), and passkey
retrieval. Each spec costs a few forwards of the longest length: minutes each on a 2-core CPU, so start with
few specs and lengths there; on a GPU pass --device cuda.
"""

from __future__ import annotations

import argparse

import ctxpatch


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help='"default" (SmolLM2-135M-Instruct), a folder, a .gguf file or a hub id')
    p.add_argument("--patches", nargs="+", default=["none", "dynamic", "selfextend", "yarn[factor=2]"],
                   help="specs, space-separated; none = the unpatched model")
    p.add_argument("--lengths", default="16k", help="context lengths to measure, e.g. 8k,16k,32k")
    p.add_argument("--tasks", default="ppl,passkey", help="ppl, passkey, passkey_gen, niah, niah_gen, ...")
    p.add_argument("--text", nargs="*", default=["held-out"],
                   help="your text files (or held-out / train: Shakespeare's plays; default held-out)")
    p.add_argument("--depths", default="0.2,0.8", help="where the passkey / needle is hidden (fractions)")
    p.add_argument("--tail", type=int, default=None, help="tokens scored per perplexity window (default min(2048, length/2))")
    p.add_argument("--target-len", default=None, help="fill each spec's parameters for this length (e.g. 16k, or auto)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: where the model loads)")
    p.add_argument("--out", default="runs/compare-example", help="folder for leaderboard.md/.json and the plots")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    model, tokenizer = ctxpatch.load_model(args.model, device=args.device)
    # ctxpatch.compare takes ctxpatch.eval.EvalConfig's fields as keywords (lengths, tasks, depths, samples,
    # tail, seed, text_files, max_length, backend, target_len); ctxpatch.evaluate(model, tokenizer, spec, ...)
    # is the same for one spec. Each spec is applied, measured and removed in turn: the model is left as given.
    board = ctxpatch.compare(
        model,
        tokenizer,
        args.patches,
        lengths=args.lengths,  # "8k,16k" or [8192, 16384]
        tasks=args.tasks,
        depths=args.depths,
        text_files=args.text,
        tail=args.tail,
        target_len=args.target_len,
        out_dir=args.out,
        resume=True,  # every score lands in OUT/scores.jsonl: a re-run (or a run after a kill) reuses them
        name=args.model,
    )
    print(board.markdown())
    print(f"\nwritten to {args.out}/ (leaderboard.md, leaderboard.json, perplexity.png, one heatmap per retrieval task)")


if __name__ == "__main__":
    main()
