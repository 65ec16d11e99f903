"""Does a query choose the passkey's block? `retrieval`'s scorers and sharings, per layer, on the default model.

    python benchmarks/selection_recall.py --length 16384 --depths 0.25,0.5,0.75 --out benchmarks/retrieval/recall-16k.json

One forward per passkey prompt (the `passkey` task's prompts: filler text, the key line at a depth) under
`retrieval` with its defaults for the length. Hooks keep every layer's un-rotated keys and the queries of the
prompt's last 8 tokens (the question); for each scorer (`mean`, `quest`) and sharing (`head`, `kv_head`, `layer`)
the script makes the choice `retrieval` would make from those q and k and records whether the block(s) holding
the key line are among the top k. The forward itself runs one configuration (the default), so a layer's inputs
are those of the default; what differs is only the choice read from them. Recall = chosen / asked, per layer and
over all layers; random choice would give about k / candidates.
"""

from __future__ import annotations

import argparse
import json
import random

import torch

import ctxpatch
from ctxpatch.backends.selected import _top_blocks
from ctxpatch.eval.data import PASSKEY_LINE, Encoder, passkey_doc
from ctxpatch.registry import ModelInfo, method

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


def recall(selection, q: torch.Tensor, k: torch.Tensor, heads: int, kv_heads: int, needle: set[int]) -> float:
    """Share of (query, choice group) pairs whose top-k holds a needle block; q (1, Q, H·d), k (1, T, Hk·d)."""
    dim = q.shape[-1] // heads
    length = k.shape[1]
    keys = k.view(1, length, kv_heads, dim).transpose(1, 2).float()  # (1, Hk, T, d)
    queries = q.view(1, QUERIES, kv_heads, heads // kv_heads, dim).permute(0, 2, 3, 1, 4).float()  # (1, Hk, G, Q, d)
    block_of = torch.arange(length)[None] // selection.block
    blocks = int(block_of.max()) + 1
    scores = selection.score(queries, selection.summarize(keys, block_of, torch.ones(1, length, dtype=torch.bool),
                                                          blocks))  # (1, Hk, G, Q, nb)
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
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    model, tokenizer = ctxpatch.load_model("default")
    encoder, config = Encoder(tokenizer), model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    ctxpatch.apply(model, "retrieval", target_len=args.length)
    variants = [(s, p) for s in ("mean", "quest") for p in ("head", "kv_head", "layer")]
    results = []
    info = ModelInfo(config.max_position_embeddings, config.num_hidden_layers, heads, kv_heads,
                     config.hidden_size // heads, config.hidden_size // heads)
    for depth in (float(d) for d in args.depths.split(",")):
        key = str(random.Random(f"recall {depth}").randint(10000, 99999))
        doc, _ = passkey_doc(encoder, key, args.length, depth, args.length * 3 // 4)
        ids = torch.tensor([encoder.pair(doc["context"], doc["continuation"])[0]])
        line = len(encoder.encode_plain(PASSKEY_LINE.format(key=key)))
        kept, handles = capture(model)
        with torch.no_grad():
            model(ids, logits_to_keep=1)
        for handle in handles:
            handle.remove()
        row = {"depth": depth, "key_position": doc["key_position"], "tokens": ids.shape[1], "recall": {}}
        for scorer, per in variants:
            selection = method("retrieval", scorer=scorer, per=per).resolve(info)
            first, last = doc["key_position"], doc["key_position"] + line - 1
            needle = set(range(first // selection.block, last // selection.block + 1))
            per_layer = [recall(selection, kept[("q", n)], kept[("k", n)], heads, kv_heads, needle)
                         for n in range(config.num_hidden_layers)]
            row["recall"][f"{scorer}/{per}"] = {"mean": sum(per_layer) / len(per_layer), "layers": per_layer}
            print(depth, scorer, per, round(row["recall"][f"{scorer}/{per}"]["mean"], 3), flush=True)
        results.append(row)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump({"length": args.length, "queries": QUERIES, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
