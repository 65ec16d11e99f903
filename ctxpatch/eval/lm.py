"""`CtxpatchLM`: lm-eval's HFLM around an in-memory (patched) model, with nothing cut or capped silently.

What it changes in HFLM, and why (each measured on lm-eval 0.4.x):
  * `max_length` is required and governs everything: HFLM otherwise takes the model's trained length from its
    config and runs past it without a word, or cuts prompts to it.
  * A prompt longer than `max_length` is a `TruncationError`. HFLM cuts loglikelihood inputs from the left with
    only a warning, and generation prompts to `max_length - max_gen_toks` the same way.
  * Generation passes `max_new_tokens` explicitly: a `max_new_tokens` in the model's generation config would
    otherwise override the task's `max_gen_toks`.
  * Loglikelihood runs one sequence at a time and asks the model only for the logits it scores
    (`logits_to_keep`): a 32k-token forward with a 49k vocabulary would otherwise materialise 6 GB of logits.
  * Results are cached per model state (`state`, e.g. the patch spec): the same tokens scored under the same
    state are computed once, so the unpatched native-context reference is shared between specs.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import torch
from lm_eval.models.huggingface import HFLM
try:
    from lm_eval.models.utils_hf import stop_sequences_criteria
except ImportError:  # lm-eval before the HF helpers moved
    from lm_eval.models.utils import stop_sequences_criteria
from tqdm.auto import tqdm

from .errors import TruncationError

log = logging.getLogger(__name__)


class CtxpatchLM(HFLM):
    """HFLM on a model object: strict about length, explicit about generation, cached per model state."""

    def __init__(self, model: Any, tokenizer: Any, max_length: int, state: str = "model", **kwargs: Any):
        super().__init__(pretrained=model, tokenizer=tokenizer, max_length=max_length, batch_size=1, **kwargs)
        if self.max_length != max_length:
            raise RuntimeError(f"lm-eval ignored max_length={max_length} (it uses {self.max_length})")
        self.state = state
        self.forwards = 0  # forward passes actually run (cache hits excluded)
        self._scores: dict[tuple[str, str], tuple[float, bool]] = {}

    # ---- loglikelihood: one sequence at a time, only the scored logits ------------------------------------------

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        for (context, _), context_ids, continuation_ids in requests:
            self.check_fits(len(context_ids) + len(continuation_ids) - 1, context)
        order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][1]) + len(requests[i][2])))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        for i in tqdm(order, desc=f"loglikelihood [{self.state}]", disable=disable_tqdm or len(requests) < 2):
            request, context_ids, continuation_ids = requests[i]
            results[i] = self.score(context_ids, continuation_ids)
            if request is not None:
                self.cache_hook.add_partial("loglikelihood", request, results[i])
        return results

    def score(self, context_ids: list[int], continuation_ids: list[int]) -> tuple[float, bool]:
        """(sum of log-probabilities of the continuation, whether every continuation token is the argmax)."""
        key = (self.state, token_key(context_ids, continuation_ids))
        if key not in self._scores:
            self._scores[key] = self._score(context_ids, continuation_ids)
        return self._scores[key]

    def _score(self, context_ids: list[int], continuation_ids: list[int]) -> tuple[float, bool]:
        ids = torch.tensor([(context_ids + continuation_ids)[:-1]], device=self.device)  # (1, T)
        keep = len(continuation_ids)
        with torch.no_grad():
            logits = self._last_logits(ids, keep)  # (keep, vocab)
        self.forwards += 1
        log_probs = torch.log_softmax(logits, dim=-1)
        target = torch.tensor(continuation_ids, device=log_probs.device)  # (keep,)
        picked = log_probs.gather(1, target[:, None])[:, 0]  # (keep,)
        return float(picked.sum()), bool((log_probs.argmax(dim=-1) == target).all())

    def _last_logits(self, ids: torch.Tensor, keep: int) -> torch.Tensor:
        """Logits of the last `keep` positions of ids (1, T) -> (keep, vocab), float32."""
        try:
            logits = self.model(ids, logits_to_keep=keep).logits  # (1, keep, vocab)
        except TypeError:  # a model whose forward has no logits_to_keep
            logits = self.model(ids).logits  # (1, T, vocab)
        return logits[0, -keep:].float()

    # ---- generation: no cut prompt, an explicit budget -------------------------------------------------------

    def tok_batch_encode(self, strings, padding_side="left", left_truncate_len=None, truncation=False):
        ids, mask = super().tok_batch_encode(strings, padding_side=padding_side, left_truncate_len=None,
                                             truncation=truncation)
        if left_truncate_len is not None:
            self.check_fits(ids.shape[1], strings[0], budget=left_truncate_len)
        return ids, mask

    def _model_generate(self, context, max_length: int, stop, **generation_kwargs):
        """Greedy (or the task's) generation of exactly `max_length - prompt` new tokens at most: passed as
        `max_new_tokens`, which a generation config's own `max_new_tokens` cannot override."""
        for key in ("max_new_tokens", "max_length"):
            generation_kwargs.pop(key, None)
        if not generation_kwargs.get("do_sample") and generation_kwargs.get("temperature", 0.0) == 0.0:
            generation_kwargs.pop("temperature", None)
            generation_kwargs["do_sample"] = False
        stopping = stop_sequences_criteria(self.tokenizer, stop, context.shape[1], context.shape[0])
        self.forwards += 1
        return self.model.generate(
            input_ids=context,
            max_new_tokens=max_length - context.shape[1],
            stopping_criteria=stopping,
            pad_token_id=self.tokenizer.pad_token_id,
            use_cache=True,
            **generation_kwargs,
        )

    # ---- the one rule: never score a shorter context than asked --------------------------------------------------

    def check_fits(self, tokens: int, text: str, budget: int | None = None) -> None:
        budget = self.max_length if budget is None else budget
        if tokens > budget:
            raise TruncationError(
                f"a prompt of {tokens} tokens does not fit max_length={self.max_length}"
                + ("" if budget == self.max_length else f" minus the generation budget ({self.max_length - budget})")
                + f" (it starts {text[:60]!r}); lm-eval would cut it from the left and score a shorter context. "
                "Raise max_length (ctxpatch eval --max-length) or ask for shorter lengths."
            )


def token_key(context_ids: list[int], continuation_ids: list[int]) -> str:
    digest = hashlib.sha1()
    digest.update(torch.tensor(context_ids, dtype=torch.int64).numpy().tobytes())
    digest.update(b"|")
    digest.update(torch.tensor(continuation_ids, dtype=torch.int64).numpy().tobytes())
    return digest.hexdigest()
