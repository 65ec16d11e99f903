"""lm-eval's internals that ctxpatch depends on, in one place (measured on lm-eval 0.4.x).

ctxpatch's LM (`ctxpatch.eval.lm.CtxpatchLM`) is lm-eval's HFLM with two of its private hooks replaced and its
tokenising hook tightened. `HFLMHooks` overrides exactly those, under lm-eval's names and signatures, and calls
methods named by ctxpatch: an lm-eval upgrade that renames or re-signs a hook is fixed here, nowhere else.

    _loglikelihood_tokens(requests, disable_tqdm, override_bs)  ->  score_requests(requests, disable_tqdm)
    _model_generate(context, max_length, stop, **kwargs)        ->  generate_tokens(context, max_length, stop, **kwargs)
    tok_batch_encode(strings, ..., left_truncate_len, ...)      ->  HFLM's, never cut; then check_prompt(ids, text, budget)

Public lm-eval names are re-exported from here too, so ctxpatch imports lm-eval in one module:
`register_model` (lm_eval.api.registry) and `stop_sequences_criteria`, which moved between 0.4 releases.
"""

from __future__ import annotations

from typing import Any

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

try:
    from lm_eval.models.utils_hf import stop_sequences_criteria
except ImportError:  # lm-eval before the HF helpers moved (< 0.4.9)
    from lm_eval.models.utils import stop_sequences_criteria

__all__ = ["HFLM", "HFLMHooks", "register_model", "stopping_criteria"]


def stopping_criteria(tokenizer: Any, stop: list[str], prompt_length: int, batch: int) -> Any:
    """transformers StoppingCriteriaList that stops a generation at any of the `stop` strings (lm-eval's)."""
    return stop_sequences_criteria(tokenizer, stop, prompt_length, batch)


class HFLMHooks(HFLM):
    """HFLM whose private hooks call ctxpatch-named methods; subclasses implement those."""

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        # requests: [((context text, continuation text) or None, context ids, continuation ids)]
        results = self.score_requests(requests, disable_tqdm=disable_tqdm)
        for (request, _, _), result in zip(requests, results):
            if request is not None:  # lm-eval's request cache (CachingLM) reads what is added here
                self.cache_hook.add_partial("loglikelihood", request, result)
        return results

    def _model_generate(self, context: torch.Tensor, max_length: int, stop: list[str], **generation_kwargs: Any):
        return self.generate_tokens(context, max_length, stop, **generation_kwargs)

    def tok_batch_encode(self, strings, padding_side="left", left_truncate_len=None, truncation=False):
        ids, mask = super().tok_batch_encode(strings, padding_side=padding_side, left_truncate_len=None,
                                             truncation=truncation)
        if left_truncate_len is not None:  # HFLM's generation budget: max_length minus max_gen_toks
            self.check_prompt(ids.shape[1], strings[0], budget=left_truncate_len)
        return ids, mask

    # ---- implemented by the subclass ---------------------------------------------------------------------

    def score_requests(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """[(sum of continuation log-probabilities, whether the continuation is greedy)] per request."""
        raise NotImplementedError

    def generate_tokens(self, context: torch.Tensor, max_length: int, stop: list[str], **generation_kwargs: Any):
        """Token ids (batch, prompt + generated) of at most `max_length` tokens in all."""
        raise NotImplementedError

    def check_prompt(self, tokens: int, text: str, budget: int) -> None:
        """Refuse a prompt of `tokens` tokens that exceeds `budget`."""
        raise NotImplementedError
