"""Which choices does the needle need? `retrieval` with the needle's block forced into some choices, on the default
model and the `niah` task's prompts (held-out plays).

    python benchmarks/selection_oracle.py --length 8192 --depths 0.25 --oracle \
        --out benchmarks/retrieval/oracle-niah-8k.json
    python benchmarks/selection_oracle.py --length 16384 --depths 0.25,0.5 --patch 'retrieval[summary_size=128]' \
        --patch 'retrieval[block_size=16,top_k=128,summary_size=16]' --patch retrieval --out granularity.json
    python benchmarks/selection_oracle.py --length 65536 --depths 0.5 --oracle --variants 'none,late layers (10-29)' \
        --out benchmarks/retrieval/oracle-niah-64k.json
    python benchmarks/selection_oracle.py --length 65536 --depths 0.5 --oracle \
        --patch 'retrieval[scorer=quest,summary_size=8,per=layer]' --variants 'shared from 11,none' --out shared.json
    python benchmarks/selection_oracle.py --length 65536 --depths 0.25,0.75 --samples 0,1 --oracle \
        --patch 'retrieval[scorer=quest,summary_size=8,per=layer]' --variants 'shared from 11' --out shared-more.json

`--samples` picks which prompts of each depth (0: the first, as `ctxpatch compare` numbers them). Per prompt and
patch, one forward per variant; each reports the answer's log-probability (the key's tokens after
the question, as the `niah` task scores it) and whether greedy decoding gives it (found). `none` is the patch as
it is; with `--oracle` the others give the needle's block(s) the highest score, so the choice takes them, for the
queries from `--from` tokens before the prompt's end (the question and the answer) in the layers named, or for
every query that may choose it (`every query`); `layers A-B` forces it in layers A to B. `shared from X` reads no
needle: every query in layers X onwards takes the blocks layer X chooses for it (that layer's scores summed over
its choice groups), as TidalDecode (Yang et al., 2024) reuses one layer's choice in the next. `none` and `shared
from X` also record, per layer, the share of those queries' choices (per choice group) that hold a needle block.
The oracle is no method: it reads where the needle is. The oracle file of 2026-12-03 was written before `--patch`
and `found` existed (one patch, `retrieval` with whole-block summaries, then its default).
"""

from __future__ import annotations

import argparse
import json
from typing import NamedTuple

import torch

import ctxpatch
from ctxpatch.backends import selected
from ctxpatch.eval.data import NIAH_NEEDLE, Encoder, RetrievalRequest, niah_docs
from ctxpatch.eval.sources import corpus_from_metadata


class Variant(NamedTuple):
    layers: set  # layers whose choices take the needle's blocks
    tail_only: bool  # only the queries from `--from` tokens before the end (else every query)
    shared_from: int | None = None  # layers from this one on take its choice


class Oracle:
    """Patches `selected` so that queries at positions ≥ `start`, in `layers`, take the needle's blocks; or, with
    `shared_from` = X, every query in the layers after X takes the blocks layer X chooses for it (one choice for the
    whole layer: its scores summed over the choice groups), the needle's place unread."""

    def __init__(self, model):
        self.layer, self.positions, self.needle, self.layers, self.start = 0, None, [], set(), 0
        self.shared_from, self.shared, self.call = None, [], 0  # layer X's choices, by call within a layer
        self.hits: dict[int, list[float]] = {}
        for n, layer in enumerate(model.model.layers):
            layer.self_attn.register_forward_pre_hook(lambda m, a, n=n: self.enter(n))
        top, pick = selected.BlockChoice.top, selected._top_blocks

        def top_noting_positions(choice, q, i):
            self.positions = i  # (B, C)
            return top(choice, q, i)

        def pick_with_needle(scores, count):  # scores (B, Hs, C, nb)
            late = (self.positions >= self.start)[:, None, :, None]
            if self.shared_from is not None and self.layer >= self.shared_from:
                ids = self.pick_shared(pick, scores, count)
            else:
                if self.layer in self.layers:
                    column = torch.zeros(scores.shape[-1], dtype=torch.bool)  # blocks up to the chunk's reach
                    column[[b for b in self.needle if b < scores.shape[-1]]] = True
                    scores = scores.masked_fill(late & column & (scores > float("-inf")), 1e30)
                ids = pick(scores, count)
            if late.any():
                held = torch.isin(ids, torch.tensor(self.needle)).any(-1, keepdim=True)  # (B, Hs, C, 1)
                self.hits.setdefault(self.layer, []).extend(held[late.expand_as(held)].float().tolist())
            return ids

        selected.BlockChoice.top, selected._top_blocks = top_noting_positions, pick_with_needle

    def enter(self, layer: int) -> None:
        self.layer, self.call = layer, 0
        if layer == 0:
            self.shared = []

    def pick_shared(self, pick, scores, count):
        """Layer X: its per-layer choice (B, 1, C, k), kept; later layers: the kept choice of the same call."""
        if self.layer == self.shared_from:
            self.shared.append(pick(scores.sum(1, keepdim=True), count))
        ids = self.shared[self.call]
        self.call += 1
        return ids.expand(scores.shape[0], scores.shape[1], *ids.shape[2:])  # (B, Hs, C, k)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--depths", default="0.25,0.5")
    parser.add_argument("--samples", default="0", help="which prompts of each depth (0: the first, as `compare`'s)")
    parser.add_argument("--from", dest="tail", type=int, default=32, help="tokens before the end the oracle helps")
    parser.add_argument("--patch", action="append", help="a spec with a selection (repeatable; default retrieval)")
    parser.add_argument("--oracle", action="store_true", help="also the forced variants")
    parser.add_argument("--variants", help="with --oracle, only these variants ('none' among them or not)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    model, tokenizer = ctxpatch.load_model("default")
    encoder, layers = Encoder(tokenizer), model.config.num_hidden_layers
    oracle = Oracle(model)
    variants = {"none": Variant(set(), True)}
    if args.oracle:
        variants.update({"all layers": Variant(set(range(layers)), True),
                         "early layers (0-9)": Variant(set(range(10)), True),
                         "late layers (10-29)": Variant(set(range(10, layers)), True),
                         "every query, all layers": Variant(set(range(layers)), False)})
    if args.variants:
        variants = {name: variants.get(name) or named_variant(name) for name in args.variants.split(",")}
    corpus = corpus_from_metadata(encoder, {"text_files": ["held-out"]})
    depths = tuple(float(d) for d in args.depths.split(","))
    samples = [int(s) for s in args.samples.split(",")]
    docs = [doc for doc in niah_docs(encoder, corpus, RetrievalRequest((args.length,), depths, max(samples) + 1, 0))
            if doc["sample"] in samples]
    results = []
    for spec in args.patch or ["retrieval"]:
        with ctxpatch.apply(model, spec, target_len=args.length) as patch:
            selection = patch.plans[0].selection
            for doc in docs:
                row = {"patch": spec, "params": selection.values, "depth": doc["depth"], "sample": doc["sample"]}
                results.append(row)

                def keep():  # after every forward: a long run keeps what it measured
                    with open(args.out, "w", encoding="utf-8") as f:
                        json.dump({"length": args.length, "tail": args.tail, "results": results}, f, indent=1)

                measure(model, encoder, oracle, doc, selection.block, variants, args.tail, row, keep)


def named_variant(name: str) -> Variant:
    """'layers A-B': the needle forced in layers A to B (the question and answer's queries); 'shared from X'."""
    words = name.split()
    if words[0] == "layers":
        first, last = (int(n) for n in words[1].split("-"))
        return Variant(set(range(first, last + 1)), True)
    if words[:2] == ["shared", "from"]:
        return Variant(set(), True, int(words[2]))
    raise SystemExit(f"unknown variant {name!r}")


def measure(model, encoder, oracle: Oracle, doc: dict, block: int, variants: dict, tail: int, row: dict,
            keep) -> None:
    """Into `row`: the answer's log-probability under each variant, and where the unforced choices put the needle;
    `keep()` after each variant."""
    context, answer = encoder.pair(doc["context"], doc["continuation"])
    ids = torch.tensor([context + answer])
    first = doc["key_position"]
    last = first + len(encoder.encode_plain(NIAH_NEEDLE.format(value=doc["answer"]))) - 1
    oracle.needle = list(range(first // block, last // block + 1))
    row.update({"key_position": first, "tokens": ids.shape[1], "logprob": {}, "found": {}})
    for name, variant in variants.items():
        oracle.layers, oracle.shared_from, oracle.hits = variant.layers, variant.shared_from, {}
        oracle.start = ids.shape[1] - tail if variant.tail_only else 0
        with torch.no_grad():
            logits = model(ids, logits_to_keep=len(answer) + 1).logits[0, :-1].float()
        row["logprob"][name] = logits.log_softmax(-1).gather(-1, torch.tensor(answer)[:, None]).sum().item()
        row["found"][name] = bool((logits.argmax(-1) == torch.tensor(answer)).all())
        if name == "none" or variant.shared_from is not None:
            label = "needle chosen per layer" + ("" if name == "none" else f" ({name})")
            row[label] = [sum(h) / len(h) for _, h in sorted(oracle.hits.items())]
        print(doc["depth"], doc["sample"], name, round(row["logprob"][name], 2), row["found"][name], flush=True)
        keep()


if __name__ == "__main__":
    main()
