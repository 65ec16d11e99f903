"""A merged rope-scaler fine-tune, loaded and run by plain transformers: no ctxpatch in the model's code path.

    python examples/finetune_and_load.py                   # first: train and merge (writes runs/smollm2-135m-32k-merged)
    python examples/serve_merged.py                        # runs/smollm2-135m-32k-merged, a 12k-token prompt
    python examples/serve_merged.py MERGED --length 300 --new-tokens 4                        # any merged folder

`ctxpatch merge` writes a patch that is ONE rope scaler on every layer (linear, ntk, dynamic, yarn, llama3,
longrope) as the config's own `rope_parameters`, e.g. {"rope_type": "yarn", "factor": 4.0,
"original_max_position_embeddings": 8192, ...}. Transformers' rotary embedding computes it, and so do servers
that read `rope_parameters` / `rope_scaling` from config.json: vLLM (`vllm serve MERGED`) and TGI
(`text-generation-launcher --model-id MERGED`) serve such a folder as it is, with no ctxpatch installed.
(`dynamic` and `longrope` depend on the length: exact in transformers for a full forward only; under a KV
cache transformers re-scales by the longest position so far.)

WARNING: any other patch (masks such as window/hybrid, biases such as alibi, logn, rerope, selfextend, dca, ...)
is only RECORDED in config.json under "ctxpatch". Transformers, vLLM and TGI load such a folder without the
patch and without a warning: past the trained length it is not the model you trained. Load it with
`ctxpatch.load(MERGED)`. This script checks and refuses such a folder.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ctxpatch.loading import is_native, read_texts  # the check below and the prompt's text only


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("merged", nargs="?", default="runs/smollm2-135m-32k-merged", help="a `ctxpatch merge` folder")
    p.add_argument("--length", type=int, default=12000, help="prompt tokens (past the base model's trained length)")
    p.add_argument("--new-tokens", type=int, default=16, help="tokens to generate, greedily")
    p.add_argument("--text", nargs="*", default=None, help="text files for the prompt (default: Shakespeare's plays)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def check_native(folder: Path) -> dict:
    """config.json's rope_parameters, after checking that a ctxpatch patch recorded there is native."""
    config = json.loads((folder / "config.json").read_text())
    record = config.get("ctxpatch")
    if record is not None and not is_native(record):  # recorded only: a patch transformers does not compute
        print(f"serve_merged.py: error: {folder}: the patch {record['patch']['spec']!r} is not a rope scaler "
              f"transformers computes; plain transformers (and vLLM, TGI) would load this model WITHOUT it. "
              f"Use: model, tokenizer = ctxpatch.load({str(folder)!r})", file=sys.stderr)
        sys.exit(2)
    return config.get("rope_parameters")


def main() -> None:
    p = parser()
    args = p.parse_args()
    folder = Path(args.merged)
    if not (folder / "config.json").is_file():  # usage and one line, not a traceback
        p.error(f"{folder} holds no merged model (no config.json): run examples/finetune_and_load.py first, "
                "or name a `ctxpatch merge` folder")
    print("rope_parameters:", check_native(folder))

    # plain transformers: no ctxpatch.apply, no trust_remote_code
    model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto").to(args.device).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)

    text = read_texts(args.text)
    ids = tokenizer(text[: 8 * args.length], add_special_tokens=False, return_tensors="pt").input_ids
    ids = ids[:, : args.length].to(args.device)  # (1, length)
    print(f"prompt: {ids.shape[1]} tokens")
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                             do_sample=False, temperature=None, top_p=None, top_k=None)
    print("generated:", repr(tokenizer.decode(out[0, ids.shape[1]:])))


if __name__ == "__main__":
    main()
