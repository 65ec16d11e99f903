"""ChatGLM2 / ChatGLM3's tokenizer as a transformers fast tokenizer, without their remote code.

The original `ChatGLMTokenizer` (tokenization_chatglm.py) wraps a SentencePiece BPE model
(tokenizer.model: byte fallback, a dummy-prefix space, no whitespace collapsing, identity
normalisation) and appends its own specials after the model's pieces, in this order:
`[MASK] [gMASK] [sMASK] sop eop` and, for ChatGLM3, `<|system|> <|user|> <|assistant|> <|observation|>`.
Every encoding starts with `[gMASK] sop`; a pair is `[gMASK] sop A B </s>`. A ChatGLM3 chat message
is `<|role|>`, then the encoding of `metadata + "\\n"`, then, separately, the encoding of the content
(a system message's `tools` appended as indented JSON); the generation prompt is `<|assistant|>`.

`build_tokenizer` rebuilds that with the `tokenizers` library from tokenizer.model's protobuf, read
as data: a BPE over the same pieces with merges ranked by piece score (SentencePiece merges the
pair whose result scores highest), the dummy prefix and "▁" escaping as a normalizer, which
`tokenizers` applies to each stretch of text between specials, and the specials as added tokens.

Special-token strings typed in text: `[MASK] [gMASK] [sMASK]` and the role tokens become their ids
wherever they appear, and `sop` / `eop` only as whole words (so "philosophy", "people" stay text),
each stretch of text between them encoded on its own, as ChatGLM3's `tokenize` does with
`encode_special_tokens=True`; its chat template is text with `[gMASK]sop<|user|>` in it, so the
specials must be read out of text. `tokenizer(text, split_special_tokens=True)` is ChatGLM3's default
mode instead, every special string ordinary characters. Where tokenizer.model has a piece `sop` or
`eop` of its own, the special is named `<sop>` / `<eop>` (same id; a name maps to one id). A literal
`</s>` or `<unk>` in text is the control id (2, 0) here, ordinary characters in ChatGLM3:
transformers registers a tokenizer's eos/unk/pad strings as added tokens. For the same reason a
message whose content holds a special string is read by the chat template as that special, where
ChatGLM3's build_chat_input encodes the content as text; any other conversation gets its ids.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

from ..errors import ModelPathError
from .errors import ChatGLMConversionError

SPM_FILE = "tokenizer.model"
MASKS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")
ROLES = ("system", "user", "assistant", "observation")
ROLE_TOKENS = tuple(f"<|{role}|>" for role in ROLES)
SPECIALS = {2: MASKS, 3: MASKS + ROLE_TOKENS}  # ChatGLM version -> the specials appended after the pieces
CHAT_STOPS = ("<|user|>", "<|observation|>")  # ChatGLM3's chat() stops at these as well as at eos
WORDS = ("sop", "eop")  # matched in text as whole words only
EOS, UNK = "</s>", "<unk>"
SPACE = "▁"

# SentencePiece's piece types (sentencepiece_model.proto)
NORMAL, USER_DEFINED, UNUSED, BYTE = 1, 4, 5, 6

# ChatGLM3's build_chat_input, as a template: <|role|>metadata\n then " " + content, the space being
# the dummy prefix of content's separate encoding (no piece spans "\n▁": see `check_pieces`); an empty
# content encodes to nothing, so it gets no space
CHAT_TEMPLATE = (
    "[gMASK]sop"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant', 'observation'] %}"
    "{{ raise_exception('ChatGLM3 roles are system, user, assistant and observation, not ' + message['role']) }}"
    "{% endif %}"
    "{% set content = message['content'] %}"
    "{% if message['role'] == 'system' and 'tools' in message %}"
    "{% set content = content + '\\n' + message['tools'] | tojson(indent=4) %}"
    "{% endif %}"
    "<|{{ message['role'] }}|>{{ message['metadata'] if message['metadata'] is defined else '' }}\n"
    "{% if content %} {{ content }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


# ---- reading tokenizer.model --------------------------------------------------------------------


def model_proto():
    """SentencePiece's ModelProto class (from sentencepiece, else transformers' copy over protobuf)."""
    from transformers.convert_slow_tokenizer import import_protobuf

    try:
        return import_protobuf("reading ChatGLM's tokenizer.model").ModelProto
    except ImportError:
        raise ChatGLMConversionError(
            "reading ChatGLM's tokenizer.model needs protobuf: pip install 'ctxpatch[chatglm]' (or protobuf)"
        ) from None


def read_spm(path: Path):
    """tokenizer.model as a SentencePiece ModelProto, or None when the file is not one (GLM-4's is tiktoken)."""
    from google.protobuf.message import DecodeError

    proto = model_proto()()
    try:
        proto.ParseFromString(path.read_bytes())
    except DecodeError:
        return None
    return proto if len(proto.pieces) else None


def check_settings(proto, name: str = SPM_FILE) -> None:
    """Refuse a model whose encoding `build_tokenizer` would not reproduce, naming the setting."""
    trainer, normalizer = proto.trainer_spec, proto.normalizer_spec
    model_type = type(trainer).ModelType.Name(trainer.model_type)
    expected = [
        ("model_type", model_type, "BPE"),
        ("byte_fallback", trainer.byte_fallback, True),
        ("add_dummy_prefix", normalizer.add_dummy_prefix, True),
        ("remove_extra_whitespaces", normalizer.remove_extra_whitespaces, False),
        ("escape_whitespaces", normalizer.escape_whitespaces, True),
        ("treat_whitespace_as_suffix", trainer.treat_whitespace_as_suffix, False),
    ]
    for setting, value, wanted in expected:
        if value != wanted:
            raise ChatGLMConversionError(
                f"{name} has {setting}={value}, ChatGLM's tokenizer has {setting}={wanted}: this is not a "
                "ChatGLM2/3 SentencePiece model, so its encoding cannot be converted exactly"
            )
    if normalizer.precompiled_charsmap or normalizer.name not in ("identity", ""):
        raise ChatGLMConversionError(
            f"{name} has normalizer {normalizer.name!r}; ChatGLM's tokenizer uses the 'identity' normalizer "
            "(no Unicode normalisation rules), so this model's encoding cannot be converted exactly"
        )
    odd = [p.piece for p in proto.pieces if p.type in (USER_DEFINED, UNUSED)]
    if odd:
        raise ChatGLMConversionError(
            f"{name} has user-defined or unused pieces {odd[:5]}; ChatGLM's tokenizer has none (its specials "
            "are appended by its Python code), so this model's encoding cannot be converted exactly"
        )
    if sum(p.type == BYTE for p in proto.pieces) != 256:
        raise ChatGLMConversionError(f"{name} declares byte_fallback but lacks some of the 256 <0xNN> byte pieces")
    pieces = {p.piece for p in proto.pieces}
    for piece in (UNK, EOS):
        if piece not in pieces:
            raise ChatGLMConversionError(f"{name} has no {piece!r} piece (ChatGLM's unk and eos)")


def check_pieces(proto) -> None:
    """Warn about vocabularies where the rebuilt encoding or the chat template may differ from ChatGLM's."""
    normal = [p for p in proto.pieces if p.type == NORMAL and len(p.piece) > 1]
    scores = [p.score for p in normal]
    if len(set(scores)) < len(scores):
        warnings.warn(
            f"{SPM_FILE} has pieces of equal score: SentencePiece merges the leftmost of two equal-score pairs, "
            "the rebuilt BPE the one listed first, so some texts may be encoded differently",
            stacklevel=3,
        )
    spanning = [p.piece for p in normal if re.search(f"[^{SPACE}]{SPACE}", p.piece)]
    if spanning:
        warnings.warn(
            f"{SPM_FILE} has pieces that cross a word start ({spanning[:3]}): text is encoded exactly, but the chat "
            "template may merge a message's metadata line with its content where ChatGLM3 encodes them apart",
            stacklevel=3,
        )


# ---- building the fast tokenizer ----------------------------------------------------------------


def bpe_merges(proto) -> list[tuple[str, str]]:
    """Every split of a normal piece into two normal pieces, the highest-scoring result first."""
    normal = {p.piece: (p.score, i) for i, p in enumerate(proto.pieces) if p.type == NORMAL}
    ranked = []
    for piece, (score, index) in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-score, index, cut, left, right))
    return [(left, right) for *_, left, right in sorted(ranked)]


def special_names(proto, version: int) -> tuple[str, ...]:
    """The specials' token strings: ChatGLM's, but `<sop>` / `<eop>` where tokenizer.model has such a piece."""
    pieces = {p.piece for p in proto.pieces}
    names = tuple(f"<{s}>" if s in WORDS and s in pieces else s for s in SPECIALS[version])
    clashes = sorted(pieces.intersection(names))
    if clashes:
        raise ChatGLMConversionError(
            f"{SPM_FILE} has pieces {clashes} with the names of ChatGLM's specials: not a ChatGLM2/3 tokenizer"
        )
    return names


def build_backend(proto, names: tuple[str, ...]):
    """The `tokenizers.Tokenizer`: BPE, dummy prefix per stretch of text, the specials after the pieces."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE

    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    unk = proto.pieces[proto.trainer_spec.unk_id].piece
    backend = Tokenizer(BPE(vocab, bpe_merges(proto), unk_token=unk, fuse_unk=True, byte_fallback=True))
    # the normalizer runs on each stretch between added tokens, as ChatGLM encodes each stretch on its own
    backend.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])
    backend.decoder = decoders.Sequence(
        [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    backend.add_special_tokens(
        [AddedToken(s, special=True, normalized=False, single_word=s in WORDS) for s in names]
    )
    gmask, sop = names[1], names[3]  # every encoding starts with [gMASK] sop
    backend.post_processor = processors.TemplateProcessing(
        single=f"{gmask} {sop} $A:0",
        pair=f"{gmask} {sop} $A:0 $B:1 {EOS}:1",
        special_tokens=[(gmask, len(vocab) + 1), (sop, len(vocab) + 3), (EOS, vocab[EOS])],
    )
    return backend


def chatglm_version(folder: Path, source: dict[str, Any]) -> int:
    """3 (role tokens, chat template) or 2, read off tokenization_chatglm.py's text, else the name; default 3."""
    code = folder / "tokenization_chatglm.py"
    if code.is_file():  # read as text, never imported
        text = code.read_text(encoding="utf-8", errors="replace")
        if "[gMASK]" in text:
            return 3 if "<|user|>" in text else 2
    return 2 if "chatglm2" in str(source.get("_name_or_path", "")).lower() else 3


def build_tokenizer(folder: str | Path, version: int = 3):
    """The fast tokenizer for a ChatGLM2/3 folder's tokenizer.model (a transformers `PreTrainedTokenizerFast`)."""
    from transformers import PreTrainedTokenizerFast

    path = Path(folder) / SPM_FILE
    if not path.is_file():
        raise ModelPathError(f"{str(Path(folder))!r} has no {SPM_FILE} (ChatGLM's SentencePiece model)")
    proto = read_spm(path)
    if proto is None:
        raise ChatGLMConversionError(
            f"{str(path)!r} is not a SentencePiece model (GLM-4's original release ships a tiktoken file under "
            "this name): only ChatGLM2/3's tokenizer can be converted"
        )
    check_settings(proto, str(path))
    check_pieces(proto)
    names = special_names(proto, version)
    extra = {"chat_template": CHAT_TEMPLATE.replace("sop", names[3], 1)} if version == 3 else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=build_backend(proto, names),
        eos_token=EOS,
        unk_token=UNK,
        pad_token=UNK,  # ChatGLM pads with <unk> (id 0), on the left
        padding_side="left",
        clean_up_tokenization_spaces=False,
        **extra,
    )


def stop_ids(tokenizer) -> list[int]:
    """eos, then (ChatGLM3) the role tokens its chat generation also stops at."""
    ids = [tokenizer.convert_tokens_to_ids(EOS)]
    vocab = tokenizer.get_vocab()
    return ids + [vocab[s] for s in CHAT_STOPS if s in vocab]


def spm_or_none(folder: Path):
    """The folder's tokenizer.model as a ModelProto; None (with a warning) when it is not SentencePiece."""
    path = folder / SPM_FILE
    if not path.is_file():
        return None
    proto = read_spm(path)
    if proto is None:
        warnings.warn(
            f"{SPM_FILE} in {str(folder)!r} is not a SentencePiece model (GLM-4's tiktoken?): its tokenizer files "
            "are copied as they are and still need trust_remote_code",
            stacklevel=3,
        )
    return proto

