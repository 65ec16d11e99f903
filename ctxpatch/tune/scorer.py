"""The real `Scorer`: the eval package's prompts and windows, scored by its strict lm-eval model.

Each measurement builds its doc with `ctxpatch.eval.data` (the same perplexity windows, passkey and needle
prompts `ctxpatch eval` builds, from the same seed) and scores it with `CtxpatchLM.score` (one forward, only
the scored logits kept, nothing truncated): perplexity = exp(-loglikelihood / tail), found = every answer
token is the argmax — what the `ctxpatch_ppl` / `ctxpatch_passkey` / `ctxpatch_niah` tasks report.
"""

from __future__ import annotations

import math
import time
from typing import Any

from ..eval import data
from .candidates import Candidate
from .schedule import depth


class EvalScorer:
    """Measures candidates on an in-memory model; the candidate's patch stays on until another is asked for."""

    def __init__(self, model: Any, tokenizer: Any, text: str, *, train_len: int, target_len: int, tail: int,
                 seed: int = 0, backend: str = "blockwise", text_name: str = "text"):
        from ..eval.lm import CtxpatchLM
        from ..eval.ruler import LENGTH_MARGIN

        self.model, self.train_len, self.target_len = model, train_len, target_len
        self.tail, self.seed, self.backend = tail, seed, backend
        self.encoder = data.Encoder(tokenizer)
        self.corpus = data.Corpus(self.encoder, text, text_name)
        self.lm = CtxpatchLM(model, tokenizer, max_length=target_len + LENGTH_MARGIN, state="none")
        self._patch, self._label = None, "none"
        self._docs: dict[tuple[str, int, int], dict] = {}

    # ---- the protocol -----------------------------------------------------------------------------------------

    def measure(self, candidate: Candidate, kind: str, length: int, index: int) -> float:
        self.use(candidate)
        doc = self.doc(kind, length, index)
        context_ids, continuation_ids = self.encoder.pair(doc["context"], doc["continuation"])
        loglikelihood, is_greedy = self.lm.score(context_ids, continuation_ids)
        if kind in ("ppl", "native"):
            return math.exp(-loglikelihood / doc["tail"])
        return float(is_greedy)

    def use(self, candidate: Candidate) -> None:
        if candidate.label == self._label:
            return
        from ..patch import apply

        self.release()
        if candidate.parts:
            self._patch = apply(self.model, candidate.methods(), backend=self.backend, target_len=self.target_len)
        self._label = self.lm.state = candidate.label

    def release(self) -> None:
        if self._patch is not None:
            self._patch.remove()
        self._patch, self._label, self.lm.state = None, "none", "none"

    # ---- docs, built by the eval package ------------------------------------------------------------------------

    def doc(self, kind: str, length: int, index: int) -> dict:
        key = (kind, length, index)
        if key not in self._docs:
            self._docs[key] = self._build(kind, length, index)
        return self._docs[key]

    def _build(self, kind: str, length: int, index: int) -> dict:
        if kind in ("ppl", "native"):
            request = data.PplRequest((length,), self.tail, self.train_len, index + 1, self.seed)
            data.check_tail(request)
            start = data.window_starts(self.seed, length, index + 1)[index]
            ids = self.corpus.ids(start + length + data.MAX_SHIFT)
            full, native = data.ppl_window(self.encoder, ids, start, length, request, index)
            return full if kind == "ppl" else native
        request = data.RetrievalRequest((length,), (depth(index),), 1, self.seed)
        if kind == "passkey":
            return data.passkey_docs(self.encoder, request)[0]
        if kind == "niah":
            return data.niah_docs(self.encoder, self.corpus, request)[0]
        raise ValueError(f"unknown measurement kind {kind!r}")

    # ---- for the schedule ---------------------------------------------------------------------------------------

    def time_forward(self, length: int) -> float:
        """Seconds of one unpatched forward of `length` tokens of the text (the cost model's calibration)."""
        import torch

        self.release()
        ids = torch.tensor([self.corpus.ids(length)[:length]], device=self.lm.device)  # (1, length)
        with torch.no_grad():
            self.lm._last_logits(ids[:, : min(length, 16)], 1)  # warm-up
            began = time.perf_counter()
            self.lm._last_logits(ids, 1)
            if ids.is_cuda:
                torch.cuda.synchronize()
        return time.perf_counter() - began
