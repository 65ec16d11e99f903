"""A model with its own sliding window (Mistral; Qwen2 with alternating sliding and full layers) under the cache.

transformers' cache keeps only the last `sliding_window - 1` keys of a sliding layer. Whatever a method's rule, the
model's window wins on those layers (DESIGN.md, "The model's own sliding window"), so a full forward, a prefill fed
in pieces through the cache and token-by-token decoding see the same keys and must give the same logits.
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import ctxpatch
from conftest import tiny_model, token_ids
from ctxpatch.backends import blockwise

WINDOW = 16  # the model's own window, shorter than the 40-token prompt
MODELS = {
    "mistral": lambda seed=0: tiny_model("mistral", seed, sliding_window=WINDOW),
    # sliding, full, sliding: Gemma 2/3 style alternation
    "alternating": lambda seed=0: tiny_model(
        "qwen2", seed, use_sliding_window=True, sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    ),
}
SPECS = [
    ("none", {}),
    ("window", {"window": 6}),
    ("window", {"window": 10_000}),  # a rule wider than the model's window: the model's window wins
    ("selfextend", {"window": 6, "group": 4}),
    ("rerope", {"window": 7}),
    ("dca", {"chunk_len": 7, "local_window": 3}),
    ("sinks", {"global_tokens": 3, "window": 8}),
    ("hybrid+rerope", {"window": 6, "global_tokens": 2}),
    ("alibi+logn", {"train_len": 8}),
    ("retrieval", {"sinks": 2, "local_window": 6, "block_size": 4, "top_k": 1}),  # chooses inside the model's window
]
IDS = [f"{s}-{next(iter(p.values()), '')}" for s, p in SPECS]
PIECES = [(0, 17), (17, 25)] + [(t, t + 1) for t in range(25, 40)]  # chunked prefill, then one token at a time


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(blockwise, "BLOCK", 8)


def test_the_cache_is_sliding():
    """The premise: transformers' cache drops keys of the sliding layers only."""
    model = MODELS["alternating"]()
    with torch.no_grad():
        cache = model(token_ids(1, 40), use_cache=True).past_key_values
    assert [layer.keys.shape[-2] for layer in cache.layers] == [WINDOW - 1, 40, WINDOW - 1]


@pytest.mark.parametrize("backend", ["dense", "blockwise"])
@pytest.mark.parametrize("spec,params", SPECS, ids=IDS)
@pytest.mark.parametrize("name", MODELS)
def test_cached_pieces_equal_the_full_forward(name, spec, params, backend):
    model = MODELS[name]()
    ids = token_ids(2, 40)
    with torch.no_grad(), ctxpatch.apply(model, spec, backend=backend, **params):
        whole = model(ids).logits
        cache, pieces = None, []
        for start, stop in PIECES:
            out = model(ids[:, start:stop], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            pieces.append(out.logits)
    assert_close(torch.cat(pieces, dim=1), whole, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("spec,params", SPECS, ids=IDS)
@pytest.mark.parametrize("name", MODELS)
def test_generate_equals_full_forwards(name, spec, params):
    model = MODELS[name]()
    prompt = token_ids(2, 30)
    with torch.no_grad(), ctxpatch.apply(model, spec, **params):
        out = model.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False,
            output_logits=True, return_dict_in_generate=True, pad_token_id=0,
        )
        seq, start = out.sequences, prompt.shape[1]
        full = model(seq).logits[:, start - 1 : -1]
    assert torch.equal(seq[:, start:], full.argmax(-1))
    assert_close(torch.stack(out.logits, dim=1), full, rtol=1e-4, atol=1e-4)


EVICTING = {"sinks"}  # a cache policy cannot be rolled back: refused under speculative decoding (below)


@pytest.mark.parametrize("spec,params", [(s, p) for s, p in SPECS if s not in EVICTING], ids=[
    i for (s, _), i in zip(SPECS, IDS) if s not in EVICTING
])
@pytest.mark.parametrize("name", MODELS)
def test_assisted_generation_equals_plain_generation(name, spec, params):
    """Speculative decoding keeps a sliding layer's past until it crops the rejected tokens from its end: the record
    follows by the count of keys written, so the patched model's greedy tokens do not change."""
    model, assistant = MODELS[name](), MODELS[name](seed=1)  # the assistant: another model, unpatched
    prompt = token_ids(1, 30)
    options = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad(), ctxpatch.apply(model, spec, **params):
        plain = model.generate(prompt, **options)
        assisted = model.generate(prompt, assistant_model=assistant, **options)
    assert torch.equal(assisted, plain)


def test_a_cache_policy_under_speculative_decoding_is_refused():
    """sinks drops keys every step; tokens the assistant proposed and the model rejected pushed some out of its
    window, and rolling the cache back cannot bring them back: a sentence, not silently different tokens."""
    model, assistant = tiny_model("llama"), tiny_model("llama", 1)
    prompt = token_ids(1, 30)
    with torch.no_grad(), ctxpatch.apply(model, "sinks", global_tokens=3, window=8):
        with pytest.raises(ctxpatch.UserInputError, match="generate without assistant_model"):
            model.generate(
                prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False, pad_token_id=0,
                assistant_model=assistant,
            )
