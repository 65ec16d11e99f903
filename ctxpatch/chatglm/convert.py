"""ChatGLM2 / ChatGLM3 checkpoints as transformers' `GlmForCausalLM`, without their remote code.

ChatGLM2-6B, ChatGLM3-6B (and their -32k / -128k variants, and GLM-4-9B's original release) are
published as `model_type: chatglm` folders that need `trust_remote_code`, and that code does not run
under transformers 5. Their architecture is transformers' `Glm`: a fused `query_key_value`
projection with bias and `multi_query_group_num` key-value groups of `kv_channels` dims, a
half-dim interleaved rotary, RMSNorm and SwiGLU. `load_chatglm` reads config.json as JSON and the
weights with safetensors or `torch.load(weights_only=True)` (no code from the folder is run),
maps every field and tensor, and returns the equivalent `GlmForCausalLM`;
`ctxpatch convert-chatglm SRC DST` writes it with `save_pretrained`, and the tokenizer as a fast
tokenizer (tokenizer.json, no remote code: see tokenizer.py) when SRC has ChatGLM's
SentencePiece tokenizer.model; other tokenizer files (GLM-4's tiktoken) are copied as they are.

`rope_ratio` means two different things: ChatGLM3 / GLM-4 multiply the rotary base by it
(base 10000 * rope_ratio), ChatGLM2-6B-32k divides positions by it (linear interpolation). Which
one a folder uses is read from the text of its modeling_chatglm.py, else from its name, else
ChatGLM3's rule; `rope_ratio_as=` overrides. Quantized (int4 / int8) checkpoints and ChatGLM-6B v1
(a different architecture) are refused with an error saying what to do.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .._compat import transformers as hf
from ..dtypes import resolve_dtype
from ..errors import ModelPathError
from .config import train_len
from .errors import ChatGLMConversionError
from .tokenizer import build_tokenizer, chatglm_version, spm_or_none, stop_ids


# ChatGLMConfig's own defaults, for fields a config.json leaves out
DEFAULTS: dict[str, Any] = {
    "num_layers": 28,
    "padded_vocab_size": 65024,
    "hidden_size": 4096,
    "ffn_hidden_size": 13696,
    "kv_channels": 128,
    "num_attention_heads": 32,
    "seq_length": 2048,
    "attention_dropout": 0.0,
    "layernorm_epsilon": 1e-5,
    "rope_ratio": 1,
    "rmsnorm": True,
    "apply_residual_connection_post_layernorm": False,
    "post_layer_norm": True,
    "add_bias_linear": False,
    "add_qkv_bias": False,
    "multi_query_attention": False,
    "multi_query_group_num": 1,
    "quantization_bit": 0,
    "pre_seq_len": None,
    "tie_word_embeddings": False,
    "use_cache": True,
}

# fields read by `glm_config` or by the checks
MAPPED = set(DEFAULTS) | {
    "vocab_size", "torch_dtype", "dtype", "eos_token_id", "pad_token_id", "bos_token_id", "model_type",
}
# fields that do not change what the model computes at inference
IGNORED = {
    "original_rope",  # stored but never read by ChatGLM2/3's code
    "apply_query_key_layer_scaling",  # divides the scores by the layer number and multiplies back: cancels
    "attention_softmax_in_fp32", "fp32_residual_connection", "bias_dropout_fusion",  # numerics only
    "hidden_dropout", "classifier_dropout", "prefix_projection",  # training / p-tuning only
    "architectures", "auto_map", "_name_or_path", "transformers_version", "max_length",
}

ROPE_BASE = 10000.0
ROPE_RATIO_AS = ("base", "positions")
TOKENIZER_EXTRA = {"special_tokens_map.json", "added_tokens.json"}
LAYER = re.compile(r"^encoder\.layers\.(\d+)\.(.+)$")
LAYER_RENAMES = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.dense.weight": "self_attn.o_proj.weight",
    "post_attention_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.dense_h_to_4h.weight": "mlp.gate_up_proj.weight",  # swiglu: silu(first half) * second half = Glm's gate, up
    "mlp.dense_4h_to_h.weight": "mlp.down_proj.weight",
}
TOP_RENAMES = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "encoder.final_layernorm.weight": "model.norm.weight",
    "output_layer.weight": "lm_head.weight",
}
SKIPPED_SUFFIX = "rotary_pos_emb.inv_freq"  # recomputed by transformers from the config


# ---- reading a folder ---------------------------------------------------------------------------


def read_config(folder: Path) -> dict[str, Any]:
    if not folder.is_dir():
        raise ModelPathError(f"ChatGLM checkpoint folder {str(folder)!r} does not exist")
    path = folder / "config.json"
    if not path.is_file():
        raise ModelPathError(
            f"{str(folder)!r} has no config.json: pass the folder of a ChatGLM2/3 checkpoint "
            "(config.json plus .safetensors or .bin weights)"
        )
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ChatGLMConversionError(f"{str(path)!r} is not valid JSON: {error}") from None


def weight_files(folder: Path) -> list[Path]:
    """The weight shards: those an index json lists, else every safetensors file, else the .bin files."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            missing = [n for n in names if not (folder / n).is_file()]
            if missing:
                raise ModelPathError(f"{index_name} in {str(folder)!r} lists shards that are missing: {missing}")
            return [folder / n for n in names]
    found = (
        sorted(folder.glob("*.safetensors"))
        or sorted(folder.glob("pytorch_model*.bin"))
        or sorted(p for p in folder.glob("*.bin") if p.name != "training_args.bin")
    )
    if not found:
        raise ModelPathError(
            f"{str(folder)!r} holds no weights: expected *.safetensors or pytorch_model*.bin files "
            "(with or without an index json)"
        )
    return found


def read_shard(path: Path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)  # tensors only: no pickled code runs
    except pickle.UnpicklingError as error:
        raise ChatGLMConversionError(
            f"{path.name} cannot be read as tensors only (torch.load weights_only=True refused it: {error}); "
            "ctxpatch never runs pickled code. Re-save the weights as safetensors with a tool you trust"
        ) from None


def read_weights(folder: Path) -> Iterator[tuple[str, Tensor]]:
    seen: set[str] = set()
    for shard in weight_files(folder):
        for name, tensor in read_shard(shard).items():
            if name in seen:
                raise ChatGLMConversionError(f"weight {name!r} appears in more than one shard of {str(folder)!r}")
            seen.add(name)
            yield name, tensor


# ---- what can be mapped -------------------------------------------------------------------------


def check_supported(source: dict[str, Any]) -> None:
    model_type = source.get("model_type")
    if model_type in ("glm", "glm4"):
        raise ChatGLMConversionError(
            f"this folder is already a transformers {model_type!r} checkpoint: load it with "
            "AutoModelForCausalLM.from_pretrained(...) and patch it directly"
        )
    if model_type != "chatglm":
        raise ChatGLMConversionError(
            f"config.json has model_type {model_type!r}, not 'chatglm': load_chatglm reads ChatGLM2/3 checkpoints only"
        )
    if "position_encoding_2d" in source or "inner_hidden_size" in source or (
        "multi_query_group_num" not in source and "kv_channels" not in source
    ):
        raise ChatGLMConversionError(
            "this is a ChatGLM-6B (v1) checkpoint: a different architecture (2D positions, GeLU, no "
            "multi-query groups) that transformers' Glm cannot express. Use ChatGLM2-6B or ChatGLM3-6B"
        )
    if source.get("quantization_bit"):
        raise ChatGLMConversionError(
            f"this checkpoint is quantized (quantization_bit={source['quantization_bit']}): its int4/int8 weights "
            "cannot be mapped. Use the unquantized release (e.g. THUDM/chatglm3-6b rather than -int4) and quantize "
            "the converted model instead"
        )
    problems = {
        "rmsnorm": (False, "LayerNorm instead of RMSNorm"),
        "apply_residual_connection_post_layernorm": (True, "residuals taken after the layer norm"),
        "post_layer_norm": (False, "no final layer norm"),
        "add_bias_linear": (True, "biases on the output and MLP projections"),
    }
    for name, (bad, what) in problems.items():
        if bool(_get(source, name)) == bad:
            raise ChatGLMConversionError(
                f"{name}={bad} ({what}) has no equivalent in transformers' Glm; no released ChatGLM2/3 uses it, "
                "so this checkpoint cannot be converted"
            )
    if _get(source, "pre_seq_len") is not None:
        raise ChatGLMConversionError(
            f"pre_seq_len={source['pre_seq_len']}: a P-tuning v2 prefix cannot be mapped; convert the base "
            "checkpoint (set pre_seq_len to null in a copy of config.json) and fine-tune with LoRA instead"
        )


def _get(source: dict[str, Any], name: str) -> Any:
    return source.get(name, DEFAULTS.get(name))


def rope_ratio_rule(folder: Path, source: dict[str, Any], rope_ratio_as: str | None) -> str:
    """'base' (ChatGLM3, GLM-4: base 10000 * rope_ratio) or 'positions' (ChatGLM2-32k: positions / rope_ratio)."""
    if rope_ratio_as is not None:
        if rope_ratio_as not in ROPE_RATIO_AS:
            raise ChatGLMConversionError(f"rope_ratio_as={rope_ratio_as!r} must be one of {ROPE_RATIO_AS}")
        return rope_ratio_as
    code = folder / "modeling_chatglm.py"
    if code.is_file():  # read as text, never imported
        text = code.read_text(encoding="utf-8", errors="replace")
        if re.search(r"base\s*=\s*base\s*\*\s*self\.rope_ratio", text):
            return "base"
        if re.search(r"/\s*self\.rope_ratio", text):
            return "positions"
    if "chatglm2" in str(source.get("_name_or_path", "")).lower():
        return "positions"
    return "base"


def rope_parameters(source: dict[str, Any], rule: str) -> dict[str, Any]:
    ratio = float(_get(source, "rope_ratio"))
    params: dict[str, Any] = {"rope_type": "default", "rope_theta": ROPE_BASE, "partial_rotary_factor": 0.5}
    if ratio != 1.0 and rule == "base":
        params["rope_theta"] = ROPE_BASE * ratio
    elif ratio != 1.0:
        params.update(rope_type="linear", factor=ratio)
    return params


def glm_config(source: dict[str, Any], rule: str, dtype: torch.dtype):
    """The GlmConfig equivalent to a ChatGLM2/3 config.json (the mapping docs/chatglm.md states)."""
    heads = int(_get(source, "num_attention_heads"))
    hidden = int(_get(source, "hidden_size"))
    groups = int(_get(source, "multi_query_group_num")) if _get(source, "multi_query_attention") else heads
    return hf.glm_config(
        vocab_size=int(source.get("padded_vocab_size") or source.get("vocab_size") or DEFAULTS["padded_vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(_get(source, "ffn_hidden_size")),
        num_hidden_layers=int(_get(source, "num_layers")),
        num_attention_heads=heads,
        num_key_value_heads=groups,
        head_dim=int(source.get("kv_channels") or hidden // heads),
        hidden_act="silu",
        attention_dropout=float(_get(source, "attention_dropout")),
        max_position_embeddings=train_len(source),  # the one rule for ChatGLM's L
        rms_norm_eps=float(_get(source, "layernorm_epsilon")),
        tie_word_embeddings=bool(_get(source, "tie_word_embeddings")),
        rope_parameters=rope_parameters(source, rule),
        attention_bias=bool(_get(source, "add_qkv_bias")),
        use_cache=bool(_get(source, "use_cache")),
        pad_token_id=source.get("pad_token_id"),
        bos_token_id=source.get("bos_token_id"),
        eos_token_id=source.get("eos_token_id"),
        dtype=dtype,
    )


def warn_unknown_fields(source: dict[str, Any]) -> None:
    unknown = sorted(set(source) - MAPPED - IGNORED)
    if unknown:
        warnings.warn(
            f"load_chatglm: config.json fields not mapped (not part of ChatGLM2/3's config): {unknown}", stacklevel=3
        )


# ---- weights ------------------------------------------------------------------------------------


def split_qkv(fused: Tensor, config, multi_query: bool) -> tuple[Tensor, Tensor, Tensor]:
    """query_key_value weight (rows, hidden) or bias (rows,) -> q, k, v in Glm's layout.

    Multi-query: rows are [all q heads | all k groups | all v groups]. Otherwise they are grouped
    per head as [q_h | k_h | v_h], ChatGLM's `view(heads, 3 * head_dim)` then split.
    """
    heads, groups, dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    if multi_query:
        q, k, v = fused.split([heads * dim, groups * dim, groups * dim], dim=0)
        return q, k, v
    per_head = fused.reshape(heads, 3, dim, *fused.shape[1:])  # (heads, q/k/v, head_dim[, hidden])
    q, k, v = (per_head[:, n].reshape(heads * dim, *fused.shape[1:]) for n in range(3))  # (heads * head_dim[, hidden])
    return q, k, v


def is_quantized(name: str, tensor: Tensor) -> bool:
    return name.endswith("_scale") or not (tensor.is_floating_point() or tensor.is_complex())


def convert_weights(
    weights: Iterator[tuple[str, Tensor]], config, dtype: torch.dtype, multi_query: bool
) -> dict[str, Tensor]:
    """ChatGLM tensor names -> GlmForCausalLM's, every tensor accounted for."""
    out: dict[str, Tensor] = {}
    unknown = []
    for name, tensor in weights:
        short = name.removeprefix("transformer.")
        if is_quantized(name, tensor):
            raise ChatGLMConversionError(
                f"weight {name!r} is quantized ({tensor.dtype}): use the unquantized release of this model"
            )
        if short.endswith(SKIPPED_SUFFIX):
            continue
        tensor = tensor.to(dtype)
        if short in TOP_RENAMES:
            out[TOP_RENAMES[short]] = tensor
            continue
        match = LAYER.match(short)
        if match is None:
            unknown.append(name)
            continue
        layer, rest = match.groups()
        prefix = f"model.layers.{layer}."
        if rest in LAYER_RENAMES:
            out[prefix + LAYER_RENAMES[rest]] = tensor
        elif rest in ("self_attention.query_key_value.weight", "self_attention.query_key_value.bias"):
            kind = rest.rsplit(".", 1)[1]
            for proj, part in zip(("q_proj", "k_proj", "v_proj"), split_qkv(tensor, config, multi_query)):
                out[f"{prefix}self_attn.{proj}.{kind}"] = part.contiguous()
        else:
            unknown.append(name)
    if unknown:
        raise ChatGLMConversionError(f"weights with no counterpart in transformers' Glm: {unknown[:8]}")
    return out


def build_model(config, state: dict[str, Tensor]):
    """GlmForCausalLM holding `state` (no random initialisation: built on the meta device).

    ChatGLM's own code never ties output_layer to the embedding, whatever tie_word_embeddings says: a
    checkpoint holding an output_layer keeps it; one without gets the embedding, tied, if the flag is set.
    """
    from transformers import GlmForCausalLM

    config.tie_word_embeddings = config.tie_word_embeddings and "lm_head.weight" not in state
    if config.tie_word_embeddings and "model.embed_tokens.weight" in state:
        state = {**state, "lm_head.weight": state["model.embed_tokens.weight"]}
    with torch.device("meta"):
        model = GlmForCausalLM(config)
    expected = set(model.state_dict())
    missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or extra:
        raise ChatGLMConversionError(
            f"the checkpoint does not match its config.json: missing {[_chatglm_name(n) for n in missing][:8]}, "
            f"unexpected {extra[:8]}"
        )
    model.load_state_dict(state, strict=True, assign=True)
    model.model.rotary_emb = hf.rebuild_rotary(model.model.rotary_emb, config)  # buffers made on meta: rebuild
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def _chatglm_name(glm_name: str) -> str:
    """The ChatGLM tensor a Glm tensor comes from (for error messages)."""
    for old, new in TOP_RENAMES.items():
        if glm_name == new:
            return "transformer." + old
    match = re.match(r"model\.layers\.(\d+)\.(.+)$", glm_name)
    if match is None:
        return glm_name
    layer, rest = match.groups()
    for old, new in LAYER_RENAMES.items():
        if rest == new:
            return f"transformer.encoder.layers.{layer}.{old}"
    kind = rest.rsplit(".", 1)[1]
    return f"transformer.encoder.layers.{layer}.self_attention.query_key_value.{kind}"


# ---- public API ---------------------------------------------------------------------------------


def load_chatglm(
    path: str | Path,
    dtype: torch.dtype | str | None = "auto",
    rope_ratio_as: str | None = None,
    tokenizer: bool = False,
):
    """A ChatGLM2/3 checkpoint folder as an equivalent transformers `GlmForCausalLM`, in eval mode.

    `dtype`: "auto" (the checkpoint's torch_dtype), a torch dtype or its name. `rope_ratio_as`:
    "base" (ChatGLM3, GLM-4) or "positions" (ChatGLM2-6B-32k); None reads it off the folder.
    `tokenizer=True` returns (model, tokenizer): the folder's tokenizer.model as a fast tokenizer
    that encodes as ChatGLM's own, with ChatGLM3's chat template; the model's generation config then
    also stops at ChatGLM3's `<|user|>` and `<|observation|>`. Nothing from the folder is executed.
    """
    folder = Path(path)
    source = read_config(folder)
    check_supported(source)
    warn_unknown_fields(source)
    dtype = resolve_dtype(dtype, source)
    config = glm_config(source, rope_ratio_rule(folder, source, rope_ratio_as), dtype)
    fast = read_tokenizer(folder, source, config) if tokenizer else None
    state = convert_weights(read_weights(folder), config, dtype, bool(_get(source, "multi_query_attention")))
    model = build_model(config, state)
    generation = folder / "generation_config.json"
    if generation.is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(str(folder))
    if fast is None:
        return model
    model.generation_config.eos_token_id = stop_ids(fast)
    model.generation_config.pad_token_id = fast.pad_token_id
    return model, fast


def read_tokenizer(folder: Path, source: dict[str, Any], config):
    """The folder's tokenizer.model as a fast tokenizer whose specials fit in the model's vocabulary."""
    fast = build_tokenizer(folder, chatglm_version(folder, source))
    if len(fast) > config.vocab_size:
        raise ChatGLMConversionError(
            f"tokenizer.model plus ChatGLM's specials make {len(fast)} ids, more than the model's "
            f"{config.vocab_size} embeddings: the tokenizer does not belong to this checkpoint"
        )
    return fast


def tokenizer_files(folder: Path) -> list[Path]:
    names = (p for p in folder.iterdir() if p.is_file())
    return sorted(p for p in names if p.name.startswith("tokeniz") or p.name in TOKENIZER_EXTRA)


def convert_chatglm(
    src: str | Path, dst: str | Path, dtype: torch.dtype | str | None = "auto", rope_ratio_as: str | None = None
) -> list[Path]:
    """Write `src` (ChatGLM2/3) to `dst` as a transformers Glm checkpoint (safetensors) plus its
    tokenizer; returns the tokenizer files written or copied.

    A SentencePiece tokenizer.model becomes a fast tokenizer (tokenizer.json, tokenizer_config.json
    without auto_map, ChatGLM3's chat template) and is copied alongside; the remote-code tokenizer
    files are not. Without one (GLM-4's tiktoken file, or none), the tokenizer files are copied as
    they are.
    """
    src, dst = Path(src), Path(dst)
    if dst.exists() and dst.resolve() == src.resolve():
        raise ChatGLMConversionError(
            "the destination must differ from the source folder (config.json would be overwritten)"
        )
    check_supported(read_config(src))  # a missing or unconvertible folder is reported before the tokenizer is read
    with_tokenizer = spm_or_none(src) is not None
    loaded = load_chatglm(src, dtype=dtype, rope_ratio_as=rope_ratio_as, tokenizer=with_tokenizer)
    model, fast = loaded if with_tokenizer else (loaded, None)
    dst.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dst)
    if fast is None:
        return copy_files(tokenizer_files(src), dst)
    written = [Path(p) for p in fast.save_pretrained(dst, save_jinja_files=False)]  # template in tokenizer_config
    return sorted({*written, *copy_files([src / "tokenizer.model"], dst)})


def copy_files(files: list[Path], dst: Path) -> list[Path]:
    for f in files:
        shutil.copy2(f, dst / f.name)
    return [dst / f.name for f in files]
