"""`load_chatglm` / `ctxpatch convert-chatglm` against a ChatGLM3 forward pass written here.

`chatglm_forward` is an independent float64 implementation of ChatGLM2/3 from the architecture
(fused query_key_value with bias, multi_query_group_num key-value groups of kv_channels dims, the
rotary on the first kv_channels/2 dims with pairs (2k, 2k+1) and base 10000 * rope_ratio, RMSNorm,
SwiGLU in dense_h_to_4h), reading tiny random weights stored under ChatGLM's own tensor names.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch.testing import assert_close
from transformers import AutoModelForCausalLM, GlmForCausalLM

import ctxpatch
from ctxpatch import chatglm, cli

VOCAB, LENGTH = 101, 20
# a float64 Glm still computes its rotary angles and RMSNorm in float32 (transformers' code): that, not slack
TOL = {"rtol": 2e-5, "atol": 2e-5}


def chatglm_config(**overrides) -> dict:
    """A ChatGLM3-6B-32k config.json, shrunk (hidden_size != heads * kv_channels on purpose)."""
    config = {
        "_name_or_path": "THUDM/chatglm3-6b-32k",
        "model_type": "chatglm",
        "architectures": ["ChatGLMModel"],
        "auto_map": {"AutoConfig": "configuration_chatglm.ChatGLMConfig"},
        "add_bias_linear": False,
        "add_qkv_bias": True,
        "apply_query_key_layer_scaling": True,
        "apply_residual_connection_post_layernorm": False,
        "attention_dropout": 0.0,
        "attention_softmax_in_fp32": True,
        "bias_dropout_fusion": True,
        "ffn_hidden_size": 40,
        "fp32_residual_connection": False,
        "hidden_dropout": 0.0,
        "hidden_size": 24,
        "kv_channels": 8,
        "layernorm_epsilon": 1e-5,
        "multi_query_attention": True,
        "multi_query_group_num": 2,
        "num_attention_heads": 4,
        "num_layers": 2,
        "original_rope": True,
        "padded_vocab_size": VOCAB,
        "post_layer_norm": True,
        "rmsnorm": True,
        "rope_ratio": 50,
        "seq_length": 64,
        "use_cache": True,
        "torch_dtype": "float32",
        "transformers_version": "4.30.2",
        "tie_word_embeddings": False,
        "eos_token_id": 2,
        "pad_token_id": 0,
    }
    config.update(overrides)
    return config


def chatglm_weights(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under ChatGLM's tensor names (large enough that attention is far from uniform)."""
    g = torch.Generator().manual_seed(seed)
    hidden, heads, dim = config["hidden_size"], config["num_attention_heads"], config["kv_channels"]
    groups = config["multi_query_group_num"] if config["multi_query_attention"] else heads
    qkv_rows = (heads + 2 * groups) * dim

    def rand(*shape, scale=0.3):
        return torch.randn(*shape, generator=g) * scale

    w = {
        "transformer.embedding.word_embeddings.weight": rand(VOCAB, hidden, scale=1.0),
        "transformer.rotary_pos_emb.inv_freq": torch.ones(dim // 4),  # ignored by the loader
        "transformer.encoder.final_layernorm.weight": 1 + rand(hidden, scale=0.1),
        "transformer.output_layer.weight": rand(VOCAB, hidden),
    }
    for n in range(config["num_layers"]):
        p = f"transformer.encoder.layers.{n}."
        w[p + "input_layernorm.weight"] = 1 + rand(hidden, scale=0.1)
        w[p + "self_attention.query_key_value.weight"] = rand(qkv_rows, hidden, scale=0.5)
        w[p + "self_attention.query_key_value.bias"] = rand(qkv_rows)
        w[p + "self_attention.dense.weight"] = rand(hidden, heads * dim)
        w[p + "post_attention_layernorm.weight"] = 1 + rand(hidden, scale=0.1)
        w[p + "mlp.dense_h_to_4h.weight"] = rand(2 * config["ffn_hidden_size"], hidden)
        w[p + "mlp.dense_4h_to_h.weight"] = rand(hidden, config["ffn_hidden_size"])
    return w


# ---- the reference: ChatGLM2/3's forward pass from its architecture -----------------------------


def rms_norm(x, weight, eps):
    return weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def rotate(x, positions, base, position_scale):
    """Rotary on the first half of each head, pairs (2k, 2k+1) as complex numbers; x (B, T, heads, d)."""
    rot = x.shape[-1] // 2
    theta = base ** (-torch.arange(0, rot, 2, dtype=torch.float64) / rot)  # (rot/2,)
    angle = (positions.double() / position_scale)[:, :, None, None] * theta  # (B, T, 1, rot/2)
    pairs = torch.complex(x[..., 0:rot:2], x[..., 1:rot:2]) * torch.exp(1j * angle)
    turned = torch.stack((pairs.real, pairs.imag), dim=-1).flatten(-2)  # (B, T, heads, rot)
    return torch.cat((turned, x[..., rot:]), dim=-1)


def split_heads(qkv, config):
    """(B, T, rows) -> q (B, T, heads, d), k, v (B, T, groups, d)."""
    heads, dim = config["num_attention_heads"], config["kv_channels"]
    if config["multi_query_attention"]:
        groups = config["multi_query_group_num"]
        q, k, v = qkv.split([heads * dim, groups * dim, groups * dim], dim=-1)
        return q.unflatten(-1, (heads, dim)), k.unflatten(-1, (groups, dim)), v.unflatten(-1, (groups, dim))
    per_head = qkv.unflatten(-1, (heads, 3 * dim))  # (B, T, heads, 3d): [q | k | v] per head
    return per_head.split(dim, dim=-1)


def chatglm_forward(weights, config, ids, rope="base"):
    """Logits (B, T, V) in float64; rope 'base' (ChatGLM3) or 'positions' (ChatGLM2-32k)."""
    w = {name.removeprefix("transformer."): t.double() for name, t in weights.items()}
    eps, ratio = config["layernorm_epsilon"], config.get("rope_ratio", 1)
    base, position_scale = (10000.0 * ratio, 1.0) if rope == "base" else (10000.0, float(ratio))
    batch, length = ids.shape
    positions = torch.arange(length).expand(batch, length)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    x = w["embedding.word_embeddings.weight"][ids]  # (B, T, hidden)
    for n in range(config["num_layers"]):
        p = f"encoder.layers.{n}."
        h = rms_norm(x, w[p + "input_layernorm.weight"], eps)
        qkv = h @ w[p + "self_attention.query_key_value.weight"].T + w[p + "self_attention.query_key_value.bias"]
        q, k, v = split_heads(qkv, config)
        q, k = rotate(q, positions, base, position_scale), rotate(k, positions, base, position_scale)
        share = q.shape[2] // k.shape[2]
        k, v = k.repeat_interleave(share, dim=2), v.repeat_interleave(share, dim=2)  # group g serves heads g*share..
        scores = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(q.shape[-1])
        probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
        context = torch.einsum("bhij,bjhd->bihd", probs, v).flatten(2)  # (B, T, heads * d)
        x = x + context @ w[p + "self_attention.dense.weight"].T
        h = rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
        gate, up = (h @ w[p + "mlp.dense_h_to_4h.weight"].T).chunk(2, dim=-1)
        x = x + (torch.nn.functional.silu(gate) * up) @ w[p + "mlp.dense_4h_to_h.weight"].T
    x = rms_norm(x, w["encoder.final_layernorm.weight"], eps)
    return x @ w["output_layer.weight"].T


# ---- checkpoint folders -------------------------------------------------------------------------

REMOTE_CODE = 'raise RuntimeError("remote code was executed")\n'
ROPE_BASE_LINE = "        base = base * self.rope_ratio\n"
ROPE_POSITIONS_LINE = "        seq_idx = torch.arange(seq_len, dtype=dtype, device=device) / self.rope_ratio\n"


def write_checkpoint(folder: Path, config: dict, weights: dict, fmt: str = "safetensors-sharded", code=ROPE_BASE_LINE):
    """A ChatGLM folder as published: config, weights, remote code that must never run, tokenizer files."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_chatglm.py").write_text(REMOTE_CODE + code)
    (folder / "configuration_chatglm.py").write_text(REMOTE_CODE)
    (folder / "tokenization_chatglm.py").write_text(REMOTE_CODE)
    (folder / "tokenizer.model").write_bytes(bytes(range(256)))
    tokenizer = {"auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]}}
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer))
    names = sorted(weights)
    halves = {"00001": names[: len(names) // 2], "00002": names[len(names) // 2 :]}
    if fmt == "safetensors":
        save_file({n: weights[n].contiguous() for n in names}, str(folder / "model.safetensors"))
    elif fmt == "safetensors-sharded":
        index = {}
        for part, keys in halves.items():
            shard = f"model-{part}-of-00002.safetensors"
            save_file({n: weights[n].contiguous() for n in keys}, str(folder / shard))
            index.update({n: shard for n in keys})
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    elif fmt == "bin":
        torch.save(weights, folder / "pytorch_model.bin")
    elif fmt == "bin-sharded":
        index = {}
        for part, keys in halves.items():
            shard = f"pytorch_model-{part}-of-00002.bin"
            torch.save({n: weights[n] for n in keys}, folder / shard)
            index.update({n: shard for n in keys})
        (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    return folder


def ids(batch: int = 2, length: int = LENGTH, seed: int = 3) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits_of(model, tokens) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits.double()


# ---- the conversion is exact --------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["safetensors-sharded", "safetensors", "bin", "bin-sharded"])
def test_loaded_model_equals_the_chatglm_forward_pass(tmp_path, fmt):
    config, weights = chatglm_config(), chatglm_weights(chatglm_config())
    folder = write_checkpoint(tmp_path / "chatglm3", config, weights, fmt)
    model = ctxpatch.load_chatglm(folder, dtype=torch.float64)
    assert isinstance(model, GlmForCausalLM) and not model.training
    tokens = ids()
    assert_close(logits_of(model, tokens), chatglm_forward(weights, config, tokens), **TOL)


@pytest.mark.parametrize(
    "overrides",
    [
        {"multi_query_attention": False},  # per-head [q | k | v] rows
        {"rope_ratio": 1, "_name_or_path": "THUDM/chatglm3-6b"},
        {"multi_query_group_num": 1},
        {"multi_query_group_num": 4},  # as many groups as heads, still [q | k | v] blocks
        {"tie_word_embeddings": True},  # ChatGLM's code never ties: the stored output_layer is used
    ],
    ids=["no-mqa", "rope_ratio-1", "one-group", "groups-equal-heads", "tie-flag-with-output-layer"],
)
def test_config_variants_equal_the_chatglm_forward_pass(tmp_path, overrides):
    config = chatglm_config(**overrides)
    weights = chatglm_weights(config)
    model = ctxpatch.load_chatglm(write_checkpoint(tmp_path / "m", config, weights), dtype=torch.float64)
    tokens = ids()
    assert_close(logits_of(model, tokens), chatglm_forward(weights, config, tokens), **TOL)
    assert model.lm_head.weight is not model.model.embed_tokens.weight


def test_no_qkv_bias_and_a_tied_output_layer(tmp_path):
    config = chatglm_config(add_qkv_bias=False, tie_word_embeddings=True)
    weights = chatglm_weights(config)
    stored = {n: t for n, t in weights.items() if not n.endswith("query_key_value.bias") and "output_layer" not in n}
    for name in [n for n in weights if n.endswith("query_key_value.bias")]:
        weights[name] = torch.zeros_like(weights[name])  # the reference adds it: zero is no bias
    weights["transformer.output_layer.weight"] = weights["transformer.embedding.word_embeddings.weight"]
    model = ctxpatch.load_chatglm(write_checkpoint(tmp_path / "m", config, stored), dtype=torch.float64)
    tokens = ids()
    assert_close(logits_of(model, tokens), chatglm_forward(weights, config, tokens), **TOL)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.model.layers[0].self_attn.q_proj.bias is None


def test_chatglm2_32k_rope_ratio_divides_positions(tmp_path):
    """ChatGLM2-6B-32k's code divides positions by rope_ratio; ChatGLM3 multiplies the base by it."""
    config = chatglm_config(_name_or_path="THUDM/chatglm2-6b-32k", rope_ratio=16)
    weights = chatglm_weights(config)
    folder = write_checkpoint(tmp_path / "chatglm2", config, weights, code=ROPE_POSITIONS_LINE)
    model = ctxpatch.load_chatglm(folder, dtype=torch.float64)
    tokens = ids()
    expected = chatglm_forward(weights, config, tokens, rope="positions")
    assert_close(logits_of(model, tokens), expected, **TOL)
    assert model.config.rope_parameters["rope_type"] == "linear"
    as_base = ctxpatch.load_chatglm(folder, dtype=torch.float64, rope_ratio_as="base")
    assert (logits_of(as_base, tokens) - expected).abs().max() > 1e-2  # the two rules differ: the test can fail


@pytest.mark.parametrize(
    "code,name,expected",
    [
        (ROPE_BASE_LINE, "THUDM/chatglm2-6b-32k", "base"),  # the code decides over the name
        (ROPE_POSITIONS_LINE, "THUDM/chatglm3-6b-32k", "positions"),
        (None, "THUDM/chatglm2-6b-32k", "positions"),
        (None, "THUDM/chatglm3-6b-32k", "base"),
        (None, "", "base"),
    ],
)
def test_rope_ratio_rule_is_read_off_the_folder(tmp_path, code, name, expected):
    if code is not None:
        (tmp_path / "modeling_chatglm.py").write_text(REMOTE_CODE + code)
    assert chatglm.rope_ratio_rule(tmp_path, {"_name_or_path": name}, None) == expected
    assert chatglm.rope_ratio_rule(tmp_path, {"_name_or_path": name}, "positions") == "positions"


def test_dtype_auto_is_the_checkpoint_dtype_and_float32_is_close(tmp_path):
    config = chatglm_config(torch_dtype="bfloat16")
    weights = chatglm_weights(config)
    folder = write_checkpoint(tmp_path / "m", config, weights)
    assert ctxpatch.load_chatglm(folder).dtype == torch.bfloat16
    model = ctxpatch.load_chatglm(folder, dtype="float32")
    tokens = ids()
    assert_close(logits_of(model, tokens), chatglm_forward(weights, config, tokens), rtol=1e-4, atol=1e-4)


def test_config_fields_chatglm_does_not_have_are_named_in_a_warning(tmp_path):
    config, weights = chatglm_config(some_new_field=1), chatglm_weights(chatglm_config())
    with pytest.warns(UserWarning, match=r"not mapped .*\['some_new_field'\]"):
        ctxpatch.load_chatglm(write_checkpoint(tmp_path / "m", config, weights))


def test_converted_model_patches_and_unpatches(tmp_path):
    config, weights = chatglm_config(), chatglm_weights(chatglm_config())
    model = ctxpatch.load_chatglm(write_checkpoint(tmp_path / "m", config, weights), dtype=torch.float32)
    tokens = ids(length=40)
    before = logits_of(model, tokens)
    with ctxpatch.apply(model, "logn+window", window=8) as patch:
        values = {m.name: m.values for m in patch.methods}
        assert values == {"logn": {"train_len": 64}, "window": {"window": 8}}  # L is ChatGLM's seq_length
        patched = logits_of(model, tokens)
    assert not torch.equal(patched, before)
    assert torch.equal(logits_of(model, tokens), before)


def test_cli_convert_writes_a_glm_checkpoint_and_copies_the_tokenizer(tmp_path, capsys):
    config, weights = chatglm_config(), chatglm_weights(chatglm_config())
    src = write_checkpoint(tmp_path / "chatglm3", config, weights)
    dst = tmp_path / "glm"
    assert cli.main(["convert-chatglm", str(src), str(dst), "--dtype", "float64"]) == 0
    assert "tokenizer.model" in capsys.readouterr().out
    written = json.loads((dst / "config.json").read_text())
    assert written["model_type"] == "glm" and written["max_position_embeddings"] == 64
    assert written["rope_parameters"] == {"rope_type": "default", "rope_theta": 500000.0, "partial_rotary_factor": 0.5}
    assert written["eos_token_id"] == 2 and written["num_key_value_heads"] == 2 and written["head_dim"] == 8
    assert list(dst.glob("*.safetensors")) and not list(dst.glob("*.bin"))
    for name in ("tokenizer.model", "tokenizer_config.json", "tokenization_chatglm.py"):
        assert (dst / name).read_bytes() == (src / name).read_bytes()
    assert not (dst / "modeling_chatglm.py").exists()
    model = AutoModelForCausalLM.from_pretrained(dst)
    tokens = ids()
    assert_close(logits_of(model, tokens), chatglm_forward(weights, config, tokens), **TOL)


# ---- refusals: clear errors that say what to do -------------------------------------------------

V1_CONFIG = {  # ChatGLM-6B (v1)
    "model_type": "chatglm", "hidden_size": 24, "num_layers": 2, "num_attention_heads": 4, "vocab_size": VOCAB,
    "inner_hidden_size": 40, "position_encoding_2d": True, "max_sequence_length": 64, "layernorm_epsilon": 1e-5,
}

REFUSED = [
    ({"quantization_bit": 4}, r"quantized \(quantization_bit=4\).*unquantized release"),
    ("v1", r"ChatGLM-6B \(v1\).*Use ChatGLM2-6B or ChatGLM3-6B"),
    ({"model_type": "glm"}, r"already a transformers 'glm' checkpoint.*from_pretrained"),
    ({"model_type": "llama"}, r"model_type 'llama', not 'chatglm'"),
    ({"rmsnorm": False}, r"rmsnorm=False \(LayerNorm"),
    ({"apply_residual_connection_post_layernorm": True}, r"residuals taken after the layer norm"),
    ({"post_layer_norm": False}, r"no final layer norm"),
    ({"add_bias_linear": True}, r"add_bias_linear=True"),
    ({"pre_seq_len": 8}, r"P-tuning v2 prefix"),
]


@pytest.mark.parametrize("overrides,message", REFUSED, ids=[m.split(r"\(")[0][:30] for _, m in REFUSED])
def test_unmappable_checkpoints_are_refused(tmp_path, overrides, message):
    config = V1_CONFIG if overrides == "v1" else chatglm_config(**overrides)
    write_checkpoint(tmp_path / "m", config, chatglm_weights(chatglm_config()))
    with pytest.raises(chatglm.ChatGLMConversionError, match=message):
        ctxpatch.load_chatglm(tmp_path / "m")


def test_int8_weights_are_refused_even_without_quantization_bit(tmp_path):
    config, weights = chatglm_config(), chatglm_weights(chatglm_config())
    name = "transformer.encoder.layers.0.self_attention.query_key_value.weight"
    weights[name] = weights[name].to(torch.int8)
    write_checkpoint(tmp_path / "m", config, weights)
    with pytest.raises(chatglm.ChatGLMConversionError, match=r"query_key_value.weight' is quantized \(torch.int8\)"):
        ctxpatch.load_chatglm(tmp_path / "m")


def test_weights_that_do_not_match_the_config_are_named(tmp_path):
    config, weights = chatglm_config(), chatglm_weights(chatglm_config())
    del weights["transformer.encoder.layers.1.mlp.dense_4h_to_h.weight"]
    weights["transformer.prefix_encoder.embedding.weight"] = torch.zeros(2, 2)
    write_checkpoint(tmp_path / "extra", config, weights)
    with pytest.raises(chatglm.ChatGLMConversionError, match=r"no counterpart.*prefix_encoder"):
        ctxpatch.load_chatglm(tmp_path / "extra")
    del weights["transformer.prefix_encoder.embedding.weight"]
    write_checkpoint(tmp_path / "missing", config, weights)
    missing = r"missing \['transformer.encoder.layers.1.mlp.dense_4h_to_h"
    with pytest.raises(chatglm.ChatGLMConversionError, match=missing):
        ctxpatch.load_chatglm(tmp_path / "missing")


def test_pickled_code_in_a_bin_file_is_not_run(tmp_path):
    sentinel = tmp_path / "executed"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (sentinel,))

    folder = write_checkpoint(tmp_path / "m", chatglm_config(), {"x": torch.zeros(1)}, fmt="bin")
    torch.save({"x": Payload()}, folder / "pytorch_model.bin")
    with pytest.raises(chatglm.ChatGLMConversionError, match=r"pytorch_model.bin.*tensors only"):
        ctxpatch.load_chatglm(folder)
    assert not sentinel.exists()


def test_bad_folders_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist"):
        ctxpatch.load_chatglm(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"has no config.json"):
        ctxpatch.load_chatglm(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text(json.dumps(chatglm_config()))
    with pytest.raises(FileNotFoundError, match=r"holds no weights: expected \*.safetensors or pytorch_model"):
        ctxpatch.load_chatglm(tmp_path / "empty")
    folder = write_checkpoint(tmp_path / "m", chatglm_config(), chatglm_weights(chatglm_config()))
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"lists shards that are missing: \['model-00002-of-00002"):
        ctxpatch.load_chatglm(folder)
    with pytest.raises(ValueError, match=r"dtype='int8' must be 'auto' or a floating dtype"):
        ctxpatch.load_chatglm(tmp_path / "m", dtype="int8")


def test_cli_reports_errors_without_a_traceback(tmp_path, capsys):
    write_checkpoint(tmp_path / "m", chatglm_config(quantization_bit=8), chatglm_weights(chatglm_config()))
    assert cli.main(["convert-chatglm", str(tmp_path / "m"), str(tmp_path / "out")]) == 2
    assert "convert-chatglm: error: this checkpoint is quantized" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
