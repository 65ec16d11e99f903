"""Fine-tune from Python, load the run with its patch, merge it into a standalone model.

    python examples/finetune_and_load.py                                    # recipes/smollm2-135m-32k.yaml: ~1 h on 2 CPU cores
    python examples/finetune_and_load.py max_steps=20 output_dir=runs/quick # a short try (overrides as for `ctxpatch finetune`)
    python examples/finetune_and_load.py --recipe recipes/smollm2-135m-64k.yaml --merged runs/64k-merged
    python examples/finetune_and_load.py model=FOLDER 'data.files=[text.txt]' seq_len=16 target_len=512 max_steps=1  # tiny

The same as `ctxpatch finetune RECIPE key=value ...` then `ctxpatch merge RUN DST`. For several processes use
the command line: `torchrun --nproc_per_node 2 -m ctxpatch.finetune RECIPE ...`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import ctxpatch
from ctxpatch.finetune import load_recipe, train

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default=str(RECIPES / "smollm2-135m-32k.yaml"), help="a recipe YAML file")
    p.add_argument("--merged", default=None, help="folder for the merged model (default: OUTPUT_DIR-merged)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides, dotted keys for sections")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    # Every key is validated here, before any model loads: an unknown key names the closest valid one.
    recipe = load_recipe(args.recipe, args.overrides)
    print(f"recipe {args.recipe}: patch {recipe.patch!r}, {recipe.max_steps} steps of {recipe.seq_len} tokens "
          f"with positions up to {recipe.target_len}, into {recipe.output_dir}")
    result = train(recipe)  # the adapter, ctxpatch.json, checkpoints, metrics.jsonl and loss.png in output_dir
    run_dir = result.output_dir
    print(f"trained {result.steps} steps in {result.wall_time_s:.0f} s; run folder {run_dir}")

    # The base model + the patch it was trained under (resolved parameters) + the peft adapter.
    # (peft's AutoPeftModelForCausalLM would load the adapter WITHOUT the patch: not the model you trained.)
    model, tokenizer = ctxpatch.load(run_dir)
    print("loaded:", repr(ctxpatch.current_patch(model)))
    ids = tokenizer("To be, or not to be", return_tensors="pt").input_ids.to(model.device)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                             temperature=None, top_p=None, top_k=None)
    print("generated:", repr(tokenizer.decode(out[0, ids.shape[1]:])))

    # Standalone weights (the adapter folded in). A single rope scaler (yarn, linear, dynamic, ...) is written
    # as config.json's native rope_parameters, so plain transformers, vLLM and TGI compute it (see
    # serve_merged.py); any other patch is only recorded there and needs ctxpatch.load(merged).
    merged = Path(args.merged or f"{run_dir}-merged")
    ctxpatch.merge(run_dir, merged, overwrite=True)
    model, tokenizer = ctxpatch.load(merged)
    print(f"merged into {merged}; ctxpatch.load gives", repr(ctxpatch.current_patch(model)).splitlines()[0])
    written = json.loads((merged / "config.json").read_text())
    print("config.json rope_parameters:", written.get("rope_parameters"))


if __name__ == "__main__":
    main()
