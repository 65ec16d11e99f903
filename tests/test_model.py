"""The patch on whole models (Llama, Mistral, Qwen2, Qwen3, GLM, GLM-4): every mode under every method.

Neutral parameters give the unpatched logits; remove() gives them back bit for bit; greedy
generation with the KV cache equals the argmax of the patched full forward at every step; a
left-padded row equals the same row unpadded; bf16 agrees with fp32; training gives gradients.
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import ctxpatch
from conftest import TRAIN_LEN, tiny_model, token_ids
from ctxpatch.backends import blockwise

SPECS = [
    ("window", {"window": 6}),
    ("hybrid", {"window": 5, "global_tokens": 2, "random_blocks": 1, "block_size": 3}),
    ("bca", {"block_size": 5}),
    ("logn", {"train_len": 8}),
    ("logn+window", {"window": 6}),
    ("alibi", {}),
    ("alibi+window", {"window": 7}),
    ("kerple_log", {}),
    ("kerple_power", {"r2": 0.5}),
    ("sandwich", {"sandwich_dim": 16}),
    ("linear", {}),
    ("ntk", {}),
    ("dynamic", {"factor": 4.0}),
    ("yarn", {}),
    ("llama3", {}),
    ("longrope", {}),
    ("logn+yarn+bca", {"block_size": 6}),
    ("xpos", {"scale_base": 32.0}),
    ("rerope", {"window": 7}),
    ("leaky_rerope", {"window": 7, "leak": 4.0}),
    ("selfextend", {"window": 6, "group": 4}),
    ("sinks", {"global_tokens": 3, "window": 8}),
    ("selfextend+logn", {"window": 6, "group": 4, "train_len": 16}),
    ("hybrid+rerope", {"window": 6, "global_tokens": 2}),
    ("xpos+rerope+alibi", {"window": 7, "scale_base": 32.0}),
    ("dca", {"chunk_len": 7, "local_window": 3}),
    ("dca+logn", {"chunk_len": 6, "local_window": 2, "train_len": 8}),
    ("string", {"offset": 9, "local_window": 3}),
    ("retrieval", {"sinks": 2, "local_window": 6, "block_size": 4, "top_k": 2}),
    ("retrieval+dca", {"sinks": 1, "local_window": 3, "block_size": 3, "top_k": 2, "chunk_len": 7}),
    ("retrieval+selfextend", {"sinks": 0, "local_window": 6, "block_size": 4, "top_k": 1, "group": 4, "per": "head"}),
    ("retrieval+alibi", {"sinks": 1, "local_window": 5, "block_size": 3, "top_k": 1}),  # a per-head bias, heads in groups
]
IDS = [s for s, _ in SPECS]
BACKENDS = ["dense", "blockwise"]

NEUTRAL = [
    ("window", {"window": 10_000}),
    ("hybrid", {"window": 10_000}),
    ("bca", {"block_size": 10_000}),
    ("logn", {}),  # the sequence stays inside train_len, so kappa = 1
    ("linear", {"factor": 1.0}),
    ("ntk", {"factor": 1.0}),
    ("dynamic", {"factor": 1.0}),
    ("yarn", {"factor": 1.0}),
    ("llama3", {"factor": 1.0}),
    ("logn+window", {"window": 10_000}),
    ("rerope", {"window": 10_000}),
    ("leaky_rerope", {"window": 10_000}),
    ("selfextend", {"window": 10_000}),
    ("sinks", {"window": 10_000}),
    ("selfextend+logn", {"window": 10_000}),
    ("xpos", {"scale_base": 1e12}),  # zeta^(Δ/γ) = 1 to double precision
    ("dca", {"chunk_len": 30, "local_window": 1}),  # one chunk holds the whole sequence
    ("string", {"offset": 32, "local_window": 0}),
    ("retrieval", {"local_window": 31, "top_k": 0}),  # the window holds the whole sequence
]


def test_every_registered_method_is_covered():
    covered = {name for spec, _ in SPECS for name in spec.split("+")}
    assert {m.name for m in ctxpatch.methods()} <= covered


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(blockwise, "BLOCK", 8)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spec,params", NEUTRAL, ids=[s for s, _ in NEUTRAL])
def test_neutral_parameters_give_the_unpatched_model(arch, spec, params, backend):
    model = tiny_model(arch)
    ids = token_ids(2, TRAIN_LEN - 4)
    with torch.no_grad():
        expected = model(ids).logits
        with ctxpatch.apply(model, spec, backend=backend, **params):
            got = model(ids).logits
    assert_close(got, expected, rtol=1e-5, atol=5e-5)  # fp32 summation order only: a real change is >= 1e-2


@pytest.mark.parametrize("spec,params", SPECS, ids=IDS)
def test_remove_restores_logits_bit_for_bit(arch, spec, params):
    model = tiny_model(arch)
    ids = token_ids(2, 40)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        before = model(ids).logits
        patch = ctxpatch.apply(model, spec, **params)
        patched = model(ids).logits
        patch.remove()
        after = model(ids).logits
    assert not torch.equal(patched, before)  # the patch did something
    assert torch.equal(after, before)
    assert model.config._attn_implementation == "sdpa"
    assert set(model.state_dict()) == set(state)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


LENGTH_DEPENDENT = {"dynamic", "longrope"}  # their frequencies depend on the current sequence length


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spec,params", SPECS, ids=IDS)
def test_greedy_generation_equals_argmax_of_full_forward(arch, spec, params, backend):
    """Each decoding step (KV cache) equals a full forward of the sequence so far.

    Rules whose frequencies depend on the current length (dynamic, longrope) change every
    token's hidden state when the length grows, so past layer 0 no KV cache can match a fresh
    forward (transformers' own dynamic rope has the same property); on a one-layer model the
    cache holds only un-rotated keys and values, and ctxpatch, which rotates cached keys at
    attention time, must match exactly. For the others the single full forward of the final
    sequence must agree as well.
    """
    model = tiny_model(arch, num_hidden_layers=1 if spec in LENGTH_DEPENDENT else 3)
    prompt = token_ids(2, 30)  # generation runs past train_len (32)
    with torch.no_grad(), ctxpatch.apply(model, spec, backend=backend, **params):
        out = model.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10, do_sample=False,
            output_logits=True, return_dict_in_generate=True, pad_token_id=0,
        )
        seq, start = out.sequences, prompt.shape[1]
        prefixes = torch.stack([model(seq[:, : start + t]).logits[:, -1] for t in range(10)], dim=1)
        full = model(seq).logits[:, start - 1 : -1]
    assert torch.equal(seq[:, start:], prefixes.argmax(-1))
    assert_close(torch.stack(out.logits, dim=1), prefixes, rtol=1e-4, atol=1e-4)
    if spec not in LENGTH_DEPENDENT:
        assert torch.equal(seq[:, start:], full.argmax(-1))
        assert_close(full, prefixes, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spec,params", SPECS, ids=IDS)
@pytest.mark.parametrize("pad", [5, 20])  # 20 > two key blocks: whole blocks of padding
def test_left_padding_equals_the_row_alone(arch, spec, params, backend, pad):
    """Positions come from the attention mask: a padded row computes what it computes alone.

    Length-dependent rules see the longest row of a batch (as in transformers), so for them
    both rows are padded alike and compared with the unpadded batch.
    """
    model = tiny_model(arch)
    ids = token_ids(2, 36)
    rows = slice(0, 2) if spec in LENGTH_DEPENDENT else slice(1, 2)
    mask = torch.ones_like(ids)
    mask[rows, :pad] = 0
    padded = ids.masked_fill(mask == 0, 0)
    alone_ids = ids[rows, pad:]
    with torch.no_grad(), ctxpatch.apply(model, spec, backend=backend, **params):
        logits = model(padded, attention_mask=mask).logits
        batch = logits[rows, pad:]
        alone = model(alone_ids).logits
        generated = model.generate(padded, attention_mask=mask, max_new_tokens=6, do_sample=False)[rows, 36:]
        generated_alone = model.generate(
            alone_ids, attention_mask=torch.ones_like(alone_ids), max_new_tokens=6, do_sample=False
        )[:, 36 - pad :]
    assert torch.isfinite(logits).all()  # padding queries must not produce NaNs either
    assert_close(batch, alone, rtol=1e-4, atol=1e-4)
    assert torch.equal(generated, generated_alone)


@pytest.mark.parametrize("spec,params", SPECS, ids=IDS)
def test_bf16_agrees_with_fp32(spec, params):
    """The patched bf16 model stays as close to its fp32 self as the unpatched model does.

    Uses transformers' default initialisation: the large-weight test models amplify any rounding
    through their layers, whatever computes the attention. Each backend's own bf16 accuracy
    against float64 is tested per method in test_formulas.py. A selection (retrieval) is a discrete
    choice: bf16's rounded hidden states (and each backend's own rounding of them) may choose another
    block near a tie, so there it is finite; its backends agree in fp32 and float64 (test_formulas.py).
    """
    ids = token_ids(2, 40)
    fp32 = tiny_model("llama", initializer_range=0.02)
    bf16 = tiny_model("llama", initializer_range=0.02, dtype=torch.bfloat16)
    with torch.no_grad():
        native_error = (bf16(ids).logits.float() - fp32(ids).logits).abs().max()
        with ctxpatch.apply(fp32, spec, backend="dense", **params):
            reference = fp32(ids).logits
        outputs = {}
        for backend in BACKENDS:
            with ctxpatch.apply(bf16, spec, backend=backend, **params):
                outputs[backend] = bf16(ids).logits.float()
    for backend, got in outputs.items():
        assert torch.isfinite(got).all(), backend
        assert "retrieval" in spec or (got - reference).abs().max() <= 3 * native_error, backend
    assert "retrieval" in spec or (outputs["blockwise"] - outputs["dense"]).abs().max() <= 3 * native_error


@pytest.mark.parametrize("spec,params", SPECS, ids=IDS)
def test_training_gradients_agree_across_backends(spec, params):
    ids = token_ids(2, 40)
    grads = {}
    for backend in BACKENDS:
        model = tiny_model("qwen3").train()
        with ctxpatch.apply(model, spec, backend=backend, **params) as patch:
            loss = model(ids, labels=ids).loss
            loss.backward()
            grads[backend] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            assert len(patch.parameters()) == (6 if spec.startswith("kerple") else 0)  # r1, r2 x 3 layers
    assert grads["dense"].keys() == grads["blockwise"].keys()
    assert any(n.endswith("q_proj.weight") for n in grads["dense"])
    for name, grad in grads["dense"].items():
        assert_close(grads["blockwise"][name], grad, rtol=1e-4, atol=1e-5, msg=name)


def test_mistral_native_sliding_window_is_kept():
    model = tiny_model("mistral", sliding_window=8)
    ids = token_ids(1, 30)
    with torch.no_grad():
        expected = model(ids).logits
        with ctxpatch.apply(model, "window", window=10_000):
            got = model(ids).logits
    assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_chunked_prefill_equals_one_pass():
    """Feeding the prompt in pieces through the cache gives the same logits as one forward."""
    model = tiny_model("llama")
    ids = token_ids(1, 40)
    with torch.no_grad(), ctxpatch.apply(model, "alibi+window", window=9):
        whole = model(ids).logits
        first = model(ids[:, :17], use_cache=True)
        second = model(ids[:, 17:], past_key_values=first.past_key_values, use_cache=True)
    assert_close(torch.cat([first.logits, second.logits], dim=1), whole, rtol=1e-5, atol=1e-5)


def test_two_models_do_not_interfere():
    patched, plain = tiny_model("llama"), tiny_model("llama")
    ids = token_ids(1, 20)
    with torch.no_grad():
        expected = plain(ids).logits
        with ctxpatch.apply(patched, "alibi"):
            assert_close(plain(ids).logits, expected, rtol=0, atol=0)


def test_a_model_sharing_the_config_of_a_patched_one_computes_plain_attention():
    """Patching switches the attention implementation on the config; a second model built on the same
    config object has no ctxpatch runtime and gets transformers' own causal attention, cache included."""
    patched = tiny_model("llama")
    other = type(patched)(patched.config).eval()  # the same config object
    other.load_state_dict(patched.state_dict())
    ids = token_ids(2, 12)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    with torch.no_grad():
        expected = other(ids, attention_mask=mask).logits
        expected_generated = other.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        with ctxpatch.apply(patched, "window", window=5):
            assert other.config._attn_implementation == "ctxpatch"  # the shared config now names ctxpatch
            got = other(ids, attention_mask=mask).logits
            generated = other.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    real = mask.bool()[:, :, None]
    assert_close(got.masked_fill(~real, 0), expected.masked_fill(~real, 0), rtol=1e-5, atol=1e-5)
    assert torch.equal(generated, expected_generated)
