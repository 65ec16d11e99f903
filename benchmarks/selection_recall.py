"""Does a query choose the block holding the key? `retrieval`'s scorers and sharings, per layer, on the default model.

    python benchmarks/selection_recall.py --length 16384 --depths 0.25,0.5,0.75 --out benchmarks/retrieval/recall-16k.json
    python benchmarks/selection_recall.py --task niah --length 16384 --out benchmarks/retrieval/recall-niah-16k.json
    python benchmarks/selection_recall.py --task niah --length 65536 --depths 0.5 --summary-sizes 16,8,4 \
        --top-ks 96 --no-at-window --out benchmarks/retrieval/recall-niah-64k.json

One forward per prompt under `retrieval` with its defaults for the length: the `passkey` task's prompts (filler
text that repeats one passage, the key line at a depth), or with `--task niah` the `niah` task's (held-out plays,
the magic-number sentence at a depth; the first prompt of each depth, as `ctxpatch eval --text held-out`). Hooks
keep every layer's un-rotated keys and the queries of the prompt's last 8 tokens (the question); for each scorer
(`mean`, `quest`, `max`) and sharing (`head`, `kv_head`, `layer`) the script makes the choice `retrieval` would make
from those q and k and records whether the block(s) holding the key line are among the top k. The forward itself
runs one configuration (the default), so a layer's inputs are those of the default; what differs is only the
choice read from them. `max` is no scorer of `retrieval`: each block's best key, q·k exactly (as costly as dense
attention's scores), to bound what a block summary could choose. Recall = chosen / asked, per layer and over all
layers; random choice would give about k / candidates. `--summary-sizes` scores each block as its best part of
that many keys (today's default: L/512), `--top-ks` reads wider choices too.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random

import torch

import ctxpatch
from ctxpatch.adapters import find_adapter
from ctxpatch.backends.selected import _top_blocks
from ctxpatch.eval.data import NIAH_NEEDLE, PASSKEY_LINE, Encoder, RetrievalRequest, niah_docs, passkey_doc
from ctxpatch.eval.sources import corpus_from_metadata
from ctxpatch.registry import method
from ctxpatch.rotary import Rotary

QUERIES = 8  # the prompt's last tokens whose choices are read


def capture(model) -> tuple[dict, list]:
    """Forward hooks keeping each layer's q (last QUERIES tokens) and k projections, un-rotated."""
    kept, handles = {}, []
    for n, layer in enumerate(model.model.layers):
        attention = layer.self_attn
        handles.append(attention.q_proj.register_forward_hook(
            lambda m, a, out, n=n: kept.__setitem__(("q", n), out[:, -QUERIES:].detach())))
        handles.append(attention.k_proj.register_forward_hook(
            lambda m, a, out, n=n: kept.__setitem__(("k", n), out.detach())))
    return kept, handles


def block_max(queries: torch.Tensor, keys: torch.Tensor, block: int) -> torch.Tensor:
    """(1, Hk, G, Q, nb): each block's best key for each query, q·k un-rotated (not a scorer of `retrieval`: an
    exact score, as costly as dense attention's scores, to bound what a block summary could choose)."""
    scores = queries @ keys[:, :, None].transpose(-1, -2)  # (1, Hk, G, Q, T)
    pad = -scores.shape[-1] % block
    scores = torch.nn.functional.pad(scores, (0, pad), value=float("-inf"))
    return scores.unflatten(-1, (-1, block)).amax(-1)  # (1, Hk, G, Q, nb, B) -> (..., nb)


def at_distance(q: torch.Tensor, distance: int, rotary: Rotary, heads: int) -> torch.Tensor:
    """q (1, Q, H·d) rotated by the model's own RoPE to position `distance`: its product with an un-rotated key is
    their product at that distance (InfLLM scores its memory blocks this way, at the window)."""
    x = q.unflatten(-1, (heads, -1)).transpose(1, 2)  # (1, Q, H, d) -> (1, H, Q, d)
    turned = rotary.rotate(x, torch.full((1, q.shape[1]), distance))
    return turned.transpose(1, 2).flatten(-2)  # (1, Q, H·d)


def recall(selection, q: torch.Tensor, k: torch.Tensor, heads: int, kv_heads: int, needle: set[int],
           exact: bool = False) -> float:
    """Share of (query, choice group) pairs whose top-k holds a needle block; q (1, Q, H·d), k (1, T, Hk·d);
    `exact`: blocks scored by `block_max` instead of the selection's scorer. A block scores as its best part
    (`summary_size` keys), as `retrieval` scores it."""
    dim = q.shape[-1] // heads
    length = k.shape[1]
    keys = k.view(1, length, kv_heads, dim).transpose(1, 2).float()  # (1, Hk, T, d)
    queries = q.view(1, QUERIES, kv_heads, heads // kv_heads, dim).permute(0, 2, 3, 1, 4).float()  # (1, Hk, G, Q, d)
    blocks = -(-length // selection.block)
    if exact:
        scores = block_max(queries, keys, selection.block)
    else:
        part_of = selection.part_of(torch.arange(length)[None])  # (1, T)
        scores = selection.score(queries, selection.summarize(
            keys, part_of, torch.ones(1, length, dtype=torch.bool), blocks * selection.parts))  # (1, Hk, G, Q, nb·parts)
        scores = scores.unflatten(-1, (blocks, selection.parts)).amax(-1)  # (1, Hk, G, Q, nb)
    scores = {"head": scores.flatten(1, 2), "kv_head": scores.sum(2), "layer": scores.sum((1, 2))[:, None]}[
        selection.per]
    i = torch.arange(length - QUERIES, length)[None, None, :, None]
    allowed = selection.candidates(i, torch.arange(blocks))
    top = _top_blocks(scores.masked_fill(~allowed, float("-inf")), selection.count)  # (1, Hs, Q, k)
    hit = torch.zeros(top.shape[:3], dtype=torch.bool)
    for b in needle:
        hit |= (top == b).any(-1)
    return float(hit.float().mean())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--depths", default="0.25,0.5,0.75")
    parser.add_argument("--task", choices=("passkey", "niah"), default="passkey")
    parser.add_argument("--summary-sizes", default="block",
                        help="keys per part, comma-separated ('block': one part a block, as first measured)")
    parser.add_argument("--top-ks", default="", help="block counts to read besides the default k (comma-separated)")
    parser.add_argument("--no-at-window", action="store_true", help="skip the queries rotated to distance W")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    model, tokenizer = ctxpatch.load_model("default")
    encoder, config = Encoder(tokenizer), model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    adapter = find_adapter(model)
    info = adapter.info
    default = method("retrieval").resolve(info)
    window = default.local_window  # every variant's W: scorer, sharing, parts and k vary
    ctxpatch.apply(model, "retrieval", target_len=args.length)
    sizes = [default.block_size if size == "block" else int(size) for size in args.summary_sizes.split(",")]
    counts = [default.top_k, *(int(k) for k in args.top_ks.split(",") if k)]
    variants = [(s, p, size, k) for s in ("mean", "quest", "max") for p in ("head", "kv_head", "layer")
                for size in (sizes if s != "max" else sizes[:1]) for k in counts]
    results = []
    for depth, doc, line in prompts(args.task, encoder, args.length, [float(d) for d in args.depths.split(",")]):
        ids = torch.tensor([encoder.pair(doc["context"], doc["continuation"])[0]])
        kept, handles = capture(model)
        with torch.no_grad():
            model(ids, logits_to_keep=1)
        for handle in handles:
            handle.remove()
        row = {"depth": depth, "key_position": doc["key_position"], "tokens": ids.shape[1], "recall": {}}
        layers = range(config.num_hidden_layers)
        queries = {False: [kept[("q", n)] for n in layers],
                   True: [at_distance(kept[("q", n)], window, adapter.rotary_of(n), heads) for n in layers]}
        for (scorer, per, size, count), shown in itertools.product(
                variants, (False,) if args.no_at_window else (False, True)):
            # `max` is no scorer of retrieval: a selection with the default one gives its blocks and candidates
            selection = method("retrieval", scorer="mean" if scorer == "max" else scorer, per=per,
                               summary_size=size, top_k=count).resolve(info)
            first, last = doc["key_position"], doc["key_position"] + line - 1
            needle = set(range(first // selection.block, last // selection.block + 1))
            per_layer = [recall(selection, queries[shown][n], kept[("k", n)], heads, kv_heads, needle, scorer == "max")
                         for n in layers]
            name = f"{scorer}/{per}" + ("/at-window" if shown else "")
            if args.summary_sizes != "block":
                name += "" if scorer == "max" else f"/parts-{size}"
            if count != default.top_k:
                name += f"/k-{count}"
            row["recall"][name] = {"mean": sum(per_layer) / len(per_layer), "layers": per_layer}
            print(depth, name, round(row["recall"][name]["mean"], 3), flush=True)
        results.append(row)
        with open(args.out, "w", encoding="utf-8") as f:  # after every prompt: a long run keeps what it measured
            json.dump({"task": args.task, "length": args.length, "queries": QUERIES, "results": results}, f, indent=1)


def prompts(task: str, encoder: Encoder, length: int, depths: list[float]):
    """(depth, the task's doc, tokens of its key line) per depth."""
    if task == "niah":
        corpus = corpus_from_metadata(encoder, {"text_files": ["held-out"]})
        for doc in niah_docs(encoder, corpus, RetrievalRequest((length,), tuple(depths), 1, 0)):
            yield doc["depth"], doc, len(encoder.encode_plain(NIAH_NEEDLE.format(value=doc["answer"])))
        return
    for depth in depths:
        key = str(random.Random(f"recall {depth}").randint(10000, 99999))
        doc, _ = passkey_doc(encoder, key, length, depth, length * 3 // 4)
        yield depth, doc, len(encoder.encode_plain(PASSKEY_LINE.format(key=key)))


if __name__ == "__main__":
    main()
