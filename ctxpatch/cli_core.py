"""`ctxpatch methods` and `ctxpatch demo`."""

from __future__ import annotations

import argparse
import math
import time

import torch


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("methods", help="list every method: kind, parameters and defaults")
    p.set_defaults(func=run_methods)
    p = sub.add_parser("demo", help="a patched forward pass on the default model, past its trained length")
    p.add_argument("--model", default="default", help="'default' (SmolLM2-135M), a folder, a .gguf file or a hub name")
    p.add_argument("--length", type=int, default=12288, help="tokens of context (default 12288, 1.5x SmolLM2's 8k)")
    p.add_argument("--tail", type=int, default=1024, help="score the last this many tokens")
    p.add_argument("--patches", default="none,dynamic,logn+window", help="comma-separated specs; 'none' = unpatched")
    p.set_defaults(func=run_demo)


def run_methods(args: argparse.Namespace) -> int:
    import ctxpatch

    print(f"{'name':<14} {'kind':<9} {'parameters (defaults; L = trained length)':<60} summary")
    for row in ctxpatch.methods():
        print(row)
    return 0


def tail_perplexity(model, ids: torch.Tensor, tail: int) -> float:
    """exp(mean NLL) of the last `tail` tokens of `ids` (1, n), all of `ids` as context."""
    with torch.no_grad():
        logits = model(ids, logits_to_keep=tail + 1).logits[0, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits, ids[0, -tail:])
    return math.exp(float(nll))


def run_demo(args: argparse.Namespace) -> int:
    import ctxpatch
    from ctxpatch.models import load_model, read_texts

    model, tokenizer = load_model(args.model)
    train_len = ctxpatch.adapters.find_adapter(model).info.train_len
    ids = tokenizer(read_texts()[: args.length * 8], return_tensors="pt").input_ids[:, : args.length]
    native = ids[:, -train_len:]
    print(f"model trained to {train_len} tokens; scoring the last {args.tail} of {ids.shape[1]} tokens")
    start = time.perf_counter()
    base = tail_perplexity(model, native, args.tail)
    print(f"  native context ({train_len} tokens), unpatched: perplexity {base:8.2f}   [{time.perf_counter() - start:.0f}s]")
    for spec in args.patches.split(","):
        start = time.perf_counter()
        if spec == "none":
            ppl = tail_perplexity(model, ids, args.tail)
        else:
            with ctxpatch.apply(model, spec):
                ppl = tail_perplexity(model, ids, args.tail)
        print(f"  full context, {spec:<22}: perplexity {ppl:8.2f}  ratio {ppl / base:6.2f}   [{time.perf_counter() - start:.0f}s]")
    return 0
