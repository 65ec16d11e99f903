"""`CtxpatchLM`: lm-eval's HFLM around a (patched) model, with nothing cut or capped silently.

Two ways in:
  * in memory, as `ctxpatch eval|compare` use it: `CtxpatchLM(model, tokenizer, max_length=...)`;
  * as lm-eval's model type "ctxpatch" (registered on import), which loads and patches the model itself:
        python -m ctxpatch.eval.harness --model ctxpatch \
            --model_args pretrained=FOLDER,patch=selfextend,target_len=16384 \
            --include_path "$(python -c 'import ctxpatch.eval.tasks as t; print(t.TASKS_DIR)')" \
            --tasks ctxpatch_passkey --metadata '{"lengths": [16384]}'
    (`lm_eval` alone cannot find it: lm-eval 0.4 discovers models only through its registry, so ctxpatch must be
    imported first; `ctxpatch.eval.harness` is lm-eval's own command line after that import.)

What it changes in HFLM, and why (each measured on lm-eval 0.4.x):
  * `max_length` is required and governs everything: HFLM otherwise takes the model's trained length from its
    config and runs past it without a word, or cuts prompts to it.
  * A prompt longer than `max_length` is a `TruncationError`. HFLM cuts loglikelihood inputs from the left with
    only a warning, and generation prompts to `max_length - max_gen_toks` the same way.
  * Generation passes `max_new_tokens` explicitly: a `max_new_tokens` in the model's generation config would
    otherwise override the task's `max_gen_toks`.
  * Loglikelihood runs one sequence at a time and asks the model only for the logits it scores
    (`logits_to_keep`, when the model's forward takes it): a 32k-token forward with a 49k vocabulary would
    otherwise materialise 6 GB of logits. A sequence goes in pieces of 8,192 tokens through the KV cache, in
    token order, and starts from the previous sequence's cache where they share pieces (`prefix`): a comparison's
    passkey prompts, which differ only from the key on, cost about two thirds of their tokens.
  * Results are cached per model state (`state`, e.g. the patch spec): the same tokens scored under the same
    state are computed once, so the unpatched native-context reference is shared between specs. With
    `score_log` (a `JsonLog`) each score is also written as it is computed and read back at start: a comparison
    killed after hours resumes without repeating a forward. `scored_only=True` runs no forward at all: a score
    not in the log is `UNSCORED` (NaN, and counted in `unscored`), so a run in progress can be reported.
  * Under torchrun / accelerate launch the requests are split over the processes and every result gathered to
    every process (`distributed`): lm-eval sees one process, and every process the same results.
The lm-eval hooks this overrides are named in `ctxpatch._compat.lm_eval`.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import math
import time
from typing import Any

import torch
from tqdm.auto import tqdm

from .._compat import transformers as hf
from .._compat.lm_eval import HFLMHooks, register_model, stopping_criteria
from ..jsonlog import JsonLog
from ..patch import current_patch
from . import distributed, prefix
from .errors import EvalError, TruncationError
from .ruler import LENGTH_MARGIN  # max_length past target_len when only target_len is given

log = logging.getLogger(__name__)

UNSCORED = (math.nan, False)  # what `scored_only` answers for a sequence its score log does not hold


@register_model("ctxpatch")
class CtxpatchLM(HFLMHooks):
    """HFLM on a model object: strict about length, explicit about generation, cached per model state.

    `pretrained` is a model object (with `tokenizer`), or — as lm-eval's "ctxpatch" model — a name that
    `ctxpatch eval --model` takes, loaded with `dtype`, `device` / `device_map` and patched with `patch`
    (a spec), `target_len` and any other keyword as a patch parameter (`window=4096`)."""

    def __init__(self, pretrained: Any, tokenizer: Any = None, max_length: int | None = None, state: str | None = None,
                 *, patch: str | None = "none", target_len: int | None = None, backend: str = "blockwise",
                 dtype: str | None = None, device: str | None = None, device_map: str | None = None,
                 launch: distributed.Launch | None = None, batch_size: int | str | None = 1,
                 max_batch_size: int | None = None, score_log: JsonLog | None = None, scored_only: bool = False,
                 **params: Any):
        self.launch = launch or distributed.launch_from_env()
        if max_length is None and (target_len is None or not isinstance(pretrained, str)):
            raise EvalError("pass max_length=N (tokens), or target_len=N (max_length = N + 256): ctxpatch never "
                            "takes it from the model's config")
        if isinstance(pretrained, str):
            pretrained, tokenizer, state = load_and_patch(
                pretrained, patch, params, target_len=target_len, backend=backend, dtype=dtype,
                device=lenient_device(device, self.launch), device_map=device_map, launch=self.launch,
            )
            if max_length is None and target_len is not None:
                max_length = int(target_len) + LENGTH_MARGIN
        elif params or (patch not in (None, "none")) or target_len is not None:
            raise EvalError("a model object is evaluated as it is: apply the patch with ctxpatch.apply first")
        if tokenizer is None:
            raise EvalError("pass the tokenizer with the model object")
        # one sequence at a time whatever lm-eval asks (batch_size): long contexts do not batch
        super().__init__(pretrained=pretrained, tokenizer=tokenizer, max_length=max_length, batch_size=1)
        if self.max_length != max_length:
            raise RuntimeError(f"lm-eval ignored max_length={max_length} (it uses {self.max_length})")
        self.state = state or "model"
        self.forwards = 0  # forward passes run, over all processes (cache hits excluded)
        self._scores: dict[tuple[str, str], tuple[float, bool]] = {}
        self.score_log = score_log
        self.scored_only = scored_only
        self.unscored = 0  # sequences `scored_only` found no score for
        for row in score_log.rows() if score_log is not None else ():  # read before any process writes (join)
            self._scores[(row["state"], row["key"])] = (row["logprob"], row["greedy"])
        self._logits_to_keep = takes_logits_to_keep(self.model)
        self._cache_keyword = hf.model_cache_keyword(self.model)
        # loglikelihood sequences go in pieces of this many tokens (`prefix`); whole to a forward without a cache
        self.piece = prefix.PIECE if self._cache_keyword else None
        distributed.join(self.launch, self.device)

    # ---- loglikelihood: one sequence at a time, only the scored logits, split over processes --------------------

    def score_requests(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        for request, context_ids, continuation_ids in requests:
            self.check_prompt(len(context_ids) + len(continuation_ids) - 1, request[0] if request else "")
        keys = [(self.state, token_key(ctx, cont)) for _, ctx, cont in requests]
        todo = {}  # key -> request index: each distinct sequence not yet scored, once
        for i, key in enumerate(keys):
            if key not in self._scores and key not in todo:
                todo[key] = i
        if self.scored_only:
            self.unscored += len(todo)
            return [self._scores.get(key, UNSCORED) for key in keys]
        order = sorted(todo, key=lambda k: requests[todo[k]][1] + requests[todo[k]][2])
        mine = self.launch.share(order)  # in token order (alike beginnings next to each other), round robin
        quiet = disable_tqdm or len(mine) < 2 or not self.launch.is_main

        def compute() -> dict[tuple[str, str], tuple[float, bool]]:
            computed, shared = {}, prefix.PrefixCache(self._piece())
            for key in tqdm(mine, desc=f"loglikelihood [{self.state}]", disable=quiet):
                _, context_ids, continuation_ids = requests[todo[key]]
                computed[key] = self._score_logged(key, context_ids, continuation_ids, shared)
            return computed

        self._scores.update(distributed.merged(self.launch, compute))
        self.forwards += len(order)
        return [self._scores[key] for key in keys]

    def score(self, context_ids: list[int], continuation_ids: list[int]) -> tuple[float, bool]:
        """(sum of log-probabilities of the continuation, whether every continuation token is the argmax), computed
        in this process (cached per state)."""
        key = (self.state, token_key(context_ids, continuation_ids))
        if key not in self._scores:
            if self.scored_only:
                self.unscored += 1
                return UNSCORED
            self._scores[key] = self._score_logged(key, context_ids, continuation_ids)
            self.forwards += 1
        return self._scores[key]

    def _score_logged(self, key: tuple[str, str], context_ids: list[int], continuation_ids: list[int],
                      shared: prefix.PrefixCache | None = None):
        """`_score`, written to the score log as soon as it is computed: a resumed comparison reads it instead of
        a forward (the seconds and tokens are the evidence of what the run cost, over all its sessions; `reused`
        the tokens taken from the sequence scored before, so a row with 0 is a whole forward)."""
        began = time.perf_counter()
        logprob, greedy, reused = self._score(context_ids, continuation_ids, shared)
        if self.score_log is not None:
            self.score_log.append([{
                "state": key[0], "key": key[1], "logprob": logprob, "greedy": greedy,
                "seconds": round(time.perf_counter() - began, 3), "tokens": len(context_ids) + len(continuation_ids),
                "reused": reused,
            }])
        return logprob, greedy

    def _score(self, context_ids: list[int], continuation_ids: list[int],
               shared: prefix.PrefixCache | None = None) -> tuple[float, bool, int]:
        """(log-probability of the continuation, whether each of its tokens is the argmax, tokens reused from
        `shared`'s cache); the sequence fed in pieces (`prefix`)."""
        ids, keep = (context_ids + continuation_ids)[:-1], len(continuation_ids)
        shared = shared or prefix.PrefixCache(self._piece())
        cache, starts = shared.lend(ids, keep)
        with torch.no_grad():
            for start, stop in zip(starts, starts[1:] + [len(ids)]):
                piece = torch.tensor([ids[start:stop]], device=self.device)  # (1, stop - start)
                logits, cache = self._forward(piece, keep if stop == len(ids) else 1, cache)
                if cache is None and stop < len(ids):  # a forward that names a cache but returns none: whole
                    self.piece = shared.piece = None
                    return self._score(context_ids, continuation_ids, shared)
        shared.remember(ids, keep, cache)
        log_probs = torch.log_softmax(logits, dim=-1)
        target = torch.tensor(continuation_ids, device=log_probs.device)  # (keep,)
        picked = log_probs.gather(1, target[:, None])[:, 0]  # (keep,)
        return float(picked.sum()), bool((log_probs.argmax(dim=-1) == target).all()), starts[0]

    def _piece(self) -> int | None:
        """Tokens a piece for the model as it is now (`prefix`); None, each sequence whole, where pieces would not
        give one forward's logits: a forward that takes no cache, or a rope whose frequencies follow the length of
        each forward (transformers' dynamic and longrope scalings)."""
        patch = current_patch(self.model)
        by_length = hf.length_dependent_rope(self.model) or (patch is not None and patch.rotates_by_forward_length())
        return None if by_length else self.piece

    def _forward(self, ids: torch.Tensor, keep: int, cache: Any) -> tuple[torch.Tensor, Any]:
        """(logits of the last `keep` positions of ids (1, T) -> (keep, vocab), float32; the KV cache after them),
        `cache` holding the tokens before ids (None: none)."""
        kwargs = {"use_cache": True, self._cache_keyword: cache} if self._cache_keyword else {}
        if self._logits_to_keep:
            kwargs["logits_to_keep"] = keep
        output = self.model(ids, **kwargs)
        return output.logits[0, -keep:].float(), hf.output_cache(output)

    def _last_logits(self, ids: torch.Tensor, keep: int) -> torch.Tensor:
        """Logits of the last `keep` positions of ids (1, T) -> (keep, vocab), float32, from one forward."""
        return self._forward(ids, keep, None)[0]

    # ---- generation: no cut prompt, an explicit budget, split over processes -----------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        if self.scored_only:
            raise EvalError("generated answers are not kept in the score log, so a generation task cannot be "
                            "reported without running it: drop it from --tasks (or drop --report)")
        self.forwards += len(requests)  # one generation per request (batch size 1)
        if not self.launch.distributed:
            return super().generate_until(requests, disable_tqdm=disable_tqdm)
        mine = self.launch.share(range(len(requests)))
        quiet = disable_tqdm or not self.launch.is_main

        def compute() -> dict[int, str]:
            outputs = super(CtxpatchLM, self).generate_until([requests[i] for i in mine], quiet) if mine else []
            return dict(zip(mine, outputs))

        every = distributed.merged(self.launch, compute)
        return [every[i] for i in range(len(requests))]

    def generate_tokens(self, context: torch.Tensor, max_length: int, stop: list[str], **generation_kwargs: Any):
        """Greedy (or the task's) generation of exactly `max_length - prompt` new tokens at most: passed as
        `max_new_tokens`, which a generation config's own `max_new_tokens` cannot override."""
        for key in ("max_new_tokens", "max_length"):
            generation_kwargs.pop(key, None)
        if not generation_kwargs.get("do_sample") and generation_kwargs.get("temperature", 0.0) == 0.0:
            generation_kwargs.pop("temperature", None)
            generation_kwargs["do_sample"] = False
        stopping = stopping_criteria(self.tokenizer, stop, context.shape[1], context.shape[0])
        return self.model.generate(
            input_ids=context,
            max_new_tokens=max_length - context.shape[1],
            stopping_criteria=stopping,
            pad_token_id=self.tokenizer.pad_token_id,
            use_cache=True,
            **generation_kwargs,
        )

    # ---- the one rule: never score a shorter context than asked --------------------------------------------------

    def check_prompt(self, tokens: int, text: str, budget: int | None = None) -> None:
        budget = self.max_length if budget is None else budget
        if tokens > budget:
            raise TruncationError(
                f"a prompt of {tokens} tokens does not fit max_length={self.max_length}"
                + ("" if budget == self.max_length else f" minus the generation budget ({self.max_length - budget})")
                + f" (it starts {text[:60]!r}); lm-eval would cut it from the left and score a shorter context. "
                "Raise max_length (ctxpatch eval --max-length) or ask for shorter lengths."
            )


def takes_logits_to_keep(model: Any) -> bool:
    """Whether the model's forward names a `logits_to_keep` parameter (a peft wrapper: its base model's).
    Decided once, from the signature: retrying a failed call without it would hide errors raised inside the
    forward and silently build every position's logits."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return "logits_to_keep" in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):  # a forward without a readable signature
        return False


def lenient_device(device: str | None, launch: distributed.Launch) -> str | None:
    """lm-eval's --device as HFLM reads it: its default "cuda:0" on a machine without a GPU means the CPU, and
    under a launcher "cuda:N" means this process's own GPU."""
    if device is None or not str(device).startswith("cuda"):
        return device
    if not distributed.cuda_available():
        log.warning("ctxpatch: device %s asked for, but torch sees no CUDA GPU: evaluating on the CPU", device)
        return "cpu"
    return "cuda" if launch.distributed else device


def load_and_patch(name: str, patch: str | None, params: dict[str, Any], *, target_len: int | None, backend: str,
                   dtype: str | None, device: str | None, device_map: str | None,
                   launch: distributed.Launch) -> tuple[Any, Any, str]:
    """(model, tokenizer, state label) for lm-eval's "ctxpatch" model: loaded as `ctxpatch eval` loads it, and
    patched with `patch` at `target_len`."""
    from .. import patch as patching
    from ..loading import carries_patch, load_for_eval
    from .options import eval_spec

    spec = eval_spec(patch or "none", params)
    if carries_patch(name) and not spec.is_none:
        raise EvalError(f"{name!r} carries its own patch (a ctxpatch run folder): drop patch= to evaluate it as loaded")
    if spec.is_none and params:
        raise EvalError(f"{', '.join(params)}: patch parameters without patch=SPEC")
    placed = distributed.resolve_device(device, launch, device_map)
    model, tokenizer = load_for_eval(name, dtype=dtype, device=placed, device_map=device_map)
    if spec.is_none:
        return model, tokenizer, "none"
    applied = patching.apply(model, spec.spec, backend=backend, target_len=target_len, **spec.params)
    log.info("ctxpatch: %r", applied)
    return model, tokenizer, spec.label if target_len is None else f"{spec.label}@{target_len}"


def token_key(context_ids: list[int], continuation_ids: list[int]) -> str:
    digest = hashlib.sha1()
    digest.update(torch.tensor(context_ids, dtype=torch.int64).numpy().tobytes())
    digest.update(b"|")
    digest.update(torch.tensor(continuation_ids, dtype=torch.int64).numpy().tobytes())
    return digest.hexdigest()
