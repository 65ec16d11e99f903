"""ChatGLM2/3's tokenizer without remote code, against `sentencepiece` itself.

A small SentencePiece BPE model with ChatGLM's settings (byte fallback, dummy prefix, no whitespace
collapsing, identity normalisation) is trained here; `Reference` is ChatGLM3's tokenizer rebuilt from
`sentencepiece` and the rules of its tokenization_chatglm.py: nine specials appended after the pieces,
`[gMASK] sop` before every encoding, a chat message as `<|role|>` + encode(metadata + "\\n") +
encode(content), each text stretch between specials encoded on its own.
"""

from __future__ import annotations

import io
import json
import re
import warnings
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from torch.testing import assert_close
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

import ctxpatch
from ctxpatch import chatglm, cli
from ctxpatch.chatglm import tokenizer as chatglm_tokenizer
from test_chatglm import REMOTE_CODE, chatglm_config, chatglm_forward, chatglm_weights, write_checkpoint

CHATGLM3 = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]
CHATGLM3_CODE = REMOTE_CODE + 'role_special_tokens = ["<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]\n'
CHATGLM3_CODE += 'special_tokens = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop"] + role_special_tokens\n'
CHATGLM2_CODE = REMOTE_CODE + 'special_tokens = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop"]\n'

CORPUS = [
    "The quick brown fox jumps over the lazy dog. Hello world, hello tokens!",
    "def main(argv):\n    for i in range(10):\n        print(i, argv[i])\n    return 0\n",
    "if x == 1:\n\treturn None\nelse:\n\treturn {'key': [1, 2, 3]}\n",
    "你好，世界！今天天气很好。我们在北京学习机器学习和自然语言处理。",
    "人工智能助手可以回答问题，也可以写代码。中文 and English 混合文本。",
    "  leading spaces,   runs of   spaces,\n\n  and blank lines   ",
    "numbers 12345 67890 3.14159 and symbols #@$%^&*()",
]


def train_spm(corpus=CORPUS, **overrides) -> bytes:
    """A SentencePiece model with ChatGLM's settings, unless overridden (about 10 ms)."""
    settings = dict(
        model_type="bpe", vocab_size=500, byte_fallback=True, add_dummy_prefix=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", character_coverage=1.0, allow_whitespace_only_pieces=True,
        minloglevel=2, num_threads=1,
    )
    settings.update(overrides)
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus * 20), model_writer=out, **settings)
    return out.getvalue()


class Reference:
    """ChatGLM3's tokenizer from `sentencepiece` and tokenization_chatglm.py's rules."""

    def __init__(self, model: bytes, specials=CHATGLM3):
        self.sp = spm.SentencePieceProcessor(model_proto=model)
        self.n = self.sp.get_piece_size()
        self.ids = {s: self.n + i for i, s in enumerate(specials)}
        self.prefix = [self.ids["[gMASK]"], self.ids["sop"]]
        # SPTokenizer.tokenize(encode_special_tokens=True)'s pattern, with sop / eop as whole words
        brackets = "|".join(re.escape(s) for s in specials if s not in ("sop", "eop"))
        self.pattern = re.compile(rf"{brackets}|(?<!\w)(?:sop|eop)(?!\w)")

    def text(self, text: str, specials: bool = True) -> list[int]:
        """build_inputs_with_special_tokens(tokenize(text)): each stretch between specials on its own."""
        if not specials:
            return self.prefix + self.sp.encode(text)
        ids, last = [], 0
        for match in self.pattern.finditer(text):
            ids += self.sp.encode(text[last : match.start()]) + [self.ids[match.group()]]
            last = match.end()
        return self.prefix + ids + self.sp.encode(text[last:])

    def chat(self, messages: list[dict], add_generation_prompt: bool) -> list[int]:
        """build_chat_input: <|role|> + encode(metadata + "\\n") + encode(content) per message."""
        ids = list(self.prefix)
        for message in messages:
            content = message["content"]
            if message["role"] == "system" and "tools" in message:
                content = content + "\n" + json.dumps(message["tools"], indent=4, ensure_ascii=False)
            ids += [self.ids[f"<|{message['role']}|>"]] + self.sp.encode(message.get("metadata", "") + "\n")
            ids += self.sp.encode(content)
        return ids + [self.ids["<|assistant|>"]] * add_generation_prompt


@pytest.fixture(scope="module")
def model_bytes() -> bytes:
    return train_spm()


@pytest.fixture(scope="module")
def reference(model_bytes) -> Reference:
    return Reference(model_bytes)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory, model_bytes):
    folder = tmp_path_factory.mktemp("chatglm3")
    (folder / "tokenizer.model").write_bytes(model_bytes)
    return chatglm_tokenizer.build_tokenizer(folder, version=3)


TEXTS = {
    "english": "The quick brown fox jumps over the lazy dog.",
    "chinese": "你好，世界！我们在北京学习机器学习。",
    "rare-chinese": "龘靐齉爩 are not in the vocabulary",  # byte fallback
    "code": "def main(argv):\n    for i in range(10):\n        print(i)\n    return {'a': [1, 2]}\n",
    "whitespace-runs": "a  b   c    d\t\te\n\n\nf     ",
    "leading-space": "  two leading spaces",
    "leading-newline": "\n newline first",
    "only-space": " ",
    "empty": "",
    "emoji": "emoji 🙂🚀 and 👩‍💻 zwj",
    "mixed": "mixed 中文 and English 文本 12345",
    "role-token": "a<|user|>b <|assistant|>\n c<|observation|>",
    "template-string": "[gMASK]sop<|system|>\n You are a helpful assistant<|user|>\n Hello",
    "mask-tokens": "x [MASK] y[sMASK]z [gMASK]",
    "sop-eop-words": "sop eop, sop.",
    "sop-eop-inside-words": "philosophy people Aesop eopx",
    "near-misses": "<|user| |user|> <|User|> [gmask] SOP",
    "escaped-space": "▁starts with the escape character ▁ and\r\nwindows newlines",
    "control-pieces-as-text": "<s> <0x41> ▁▁",
}


@pytest.mark.parametrize("text", TEXTS.values(), ids=TEXTS.keys())
def test_text_ids_equal_chatglm3(tokenizer, reference, text):
    assert tokenizer(text).input_ids == reference.text(text)
    # ChatGLM3's default mode: every special string is ordinary text
    assert tokenizer(text, split_special_tokens=True).input_ids == reference.text(text, specials=False)


def test_long_text_and_batches_with_left_padding(tokenizer, reference):
    long = " ".join(TEXTS.values()) * 20
    assert tokenizer(long).input_ids == reference.text(long)
    texts = [TEXTS["english"], TEXTS["chinese"], TEXTS["empty"]]
    batch = tokenizer(texts, padding=True)
    longest = max(len(ids) for ids in batch.input_ids)
    for text, ids, mask in zip(texts, batch.input_ids, batch.attention_mask):
        expected = reference.text(text)
        assert ids == [0] * (longest - len(expected)) + expected  # ChatGLM pads with <unk> (0) on the left
        assert mask == [0] * (longest - len(expected)) + [1] * len(expected)


def test_a_pair_is_prefix_a_b_eos(tokenizer, reference):
    a, b = TEXTS["english"], TEXTS["chinese"]
    expected = reference.prefix + reference.sp.encode(a) + reference.sp.encode(b) + [reference.sp.eos_id()]
    assert tokenizer(a, b).input_ids == expected


def test_special_ids_follow_the_pieces(tokenizer, reference):
    n = reference.n
    assert [tokenizer.convert_tokens_to_ids(s) for s in CHATGLM3] == list(range(n, n + 9))
    assert tokenizer.convert_ids_to_tokens([n + 1, n + 3]) == ["[gMASK]", "sop"]
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("</s>", 2) == ("</s>", reference.sp.eos_id())
    assert (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.padding_side) == (0, 0, "left")
    assert len(tokenizer) == n + 9
    assert chatglm_tokenizer.stop_ids(tokenizer) == [2, n + 6, n + 8]


@pytest.mark.parametrize("text", [TEXTS[k] for k in ("english", "chinese", "code", "whitespace-runs", "emoji")])
def test_decode_is_sentencepiece_decode(tokenizer, reference, text):
    assert tokenizer.decode(tokenizer(text).input_ids, skip_special_tokens=True) == reference.sp.decode(
        reference.sp.encode(text)
    )


TOOLS = [{"name": "get_weather", "description": "天气查询", "parameters": {"city": {"type": "string"}}}]
CONVERSATIONS = {
    "user": [{"role": "user", "content": "Hello, who are you?"}],
    "system-user-assistant": [
        {"role": "system", "content": "You are ChatGLM3, a helpful assistant."},
        {"role": "user", "content": "你好，请介绍一下你自己。"},
        {"role": "assistant", "content": "我是人工智能助手 ChatGLM3。"},
        {"role": "user", "content": "def f(x):\n    return x * 2\n"},
    ],
    "empty-content": [{"role": "system", "content": ""}, {"role": "user", "content": ""}],
    "content-starting-with-whitespace": [
        {"role": "user", "content": " one space"},
        {"role": "assistant", "content": "\nnewline first"},
        {"role": "user", "content": "    indented code\n\ttab"},
        {"role": "assistant", "content": "\n\n"},
    ],
    "metadata-and-observation": [
        {"role": "system", "content": "Answer with tools.", "tools": TOOLS},
        {"role": "user", "content": "北京天气怎么样？"},
        {"role": "assistant", "metadata": "get_weather", "content": "tool_call(city='北京')"},
        {"role": "observation", "content": '{"temperature": 22}'},
        {"role": "assistant", "metadata": " spaced meta", "content": "晴，22 度。"},
    ],
    "emoji-and-code": [{"role": "user", "content": "🙂 print('hi')  \n"}],
}


@pytest.mark.parametrize("generation_prompt", [True, False])
@pytest.mark.parametrize("messages", CONVERSATIONS.values(), ids=CONVERSATIONS.keys())
def test_chat_template_ids_equal_build_chat_input(tokenizer, reference, messages, generation_prompt):
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, return_dict=False)
    assert ids == reference.chat(messages, generation_prompt)


def test_chat_template_refuses_unknown_roles(tokenizer):
    with pytest.raises(Exception, match="not tool"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "x"}])


# ---- convert-chatglm and load_chatglm(tokenizer=True) --------------------------------------------


def checkpoint_with_tokenizer(folder: Path, model: bytes, code: str = CHATGLM3_CODE, **overrides) -> tuple[dict, dict]:
    """A ChatGLM3 folder (tiny weights) whose vocabulary fits tokenizer.model plus the nine specials."""
    vocab = spm.SentencePieceProcessor(model_proto=model).get_piece_size() + 11
    config = chatglm_config(padded_vocab_size=vocab, **overrides)
    weights = chatglm_weights(config)
    g = torch.Generator().manual_seed(1)
    weights["transformer.embedding.word_embeddings.weight"] = torch.randn(vocab, config["hidden_size"], generator=g)
    weights["transformer.output_layer.weight"] = torch.randn(vocab, config["hidden_size"], generator=g) * 0.3
    write_checkpoint(folder, config, weights)
    (folder / "tokenizer.model").write_bytes(model)
    (folder / "tokenization_chatglm.py").write_text(code)
    return config, weights


def test_cli_convert_writes_a_fast_tokenizer_that_loads_without_remote_code(tmp_path, capsys, model_bytes, reference):
    src, dst = tmp_path / "chatglm3", tmp_path / "glm"
    config, weights = checkpoint_with_tokenizer(src, model_bytes)
    assert cli.main(["convert-chatglm", str(src), str(dst), "--dtype", "float64"]) == 0
    assert "tokenizer.json" in capsys.readouterr().out
    written = json.loads((dst / "tokenizer_config.json").read_text())
    assert "auto_map" not in written and written["chat_template"].startswith("[gMASK]sop")
    assert not (dst / "tokenization_chatglm.py").exists() and not (dst / "modeling_chatglm.py").exists()
    assert (dst / "tokenizer.model").read_bytes() == model_bytes

    tokenizer = AutoTokenizer.from_pretrained(dst)  # no trust_remote_code
    for text in TEXTS.values():
        assert tokenizer(text).input_ids == reference.text(text)
    for messages in CONVERSATIONS.values():
        assert tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False) == reference.chat(
            messages, True
        )
    n = reference.n
    assert GenerationConfig.from_pretrained(dst).eos_token_id == [2, n + 6, n + 8]
    model = AutoModelForCausalLM.from_pretrained(dst)
    ids = torch.tensor([reference.text(TEXTS["chinese"])])
    with torch.no_grad():
        logits = model(ids).logits.double()
    assert_close(logits, chatglm_forward(weights, config, ids), rtol=2e-5, atol=2e-5)


def test_load_chatglm_with_tokenizer_returns_model_and_tokenizer(tmp_path, model_bytes, reference):
    checkpoint_with_tokenizer(tmp_path / "m", model_bytes)
    model, tokenizer = ctxpatch.load_chatglm(tmp_path / "m", dtype=torch.float32, tokenizer=True)
    assert tokenizer(TEXTS["code"]).input_ids == reference.text(TEXTS["code"])
    assert model.generation_config.eos_token_id == [2, reference.n + 6, reference.n + 8]
    assert tokenizer.model_max_length > 10**9  # unbounded, as ChatGLM's: ctxpatch reads past the trained length
    assert not isinstance(ctxpatch.load_chatglm(tmp_path / "m", dtype=torch.float32), tuple)


def test_chatglm2_gets_five_specials_and_no_chat_template(tmp_path, model_bytes):
    checkpoint_with_tokenizer(tmp_path / "m", model_bytes, code=CHATGLM2_CODE, _name_or_path="THUDM/chatglm2-6b")
    model, tokenizer = ctxpatch.load_chatglm(tmp_path / "m", dtype=torch.float32, tokenizer=True)
    reference = Reference(model_bytes, specials=CHATGLM3[:5])
    assert len(tokenizer) == reference.n + 5 and tokenizer.chat_template is None
    text = "a<|user|>b [gMASK] sop"
    assert tokenizer(text).input_ids == reference.text(text)
    assert model.generation_config.eos_token_id == [2]


def test_a_piece_named_sop_renames_the_special(tmp_path):
    corpus = ["philosophy aesop esop isop osop usop ysop", "xsop zsop wsop qsop"] + CORPUS
    model = train_spm(corpus)
    pieces = {p for p in (spm.SentencePieceProcessor(model_proto=model).id_to_piece(i) for i in range(500))}
    assert "sop" in pieces  # the corpus makes one: the test can fail
    (tmp_path / "tokenizer.model").write_bytes(model)
    tokenizer = chatglm_tokenizer.build_tokenizer(tmp_path)
    reference = Reference(model)
    assert tokenizer.convert_ids_to_tokens(reference.n + 3) == "<sop>"
    assert tokenizer.chat_template.startswith("[gMASK]<sop>")
    text = "philosophy isop <sop> x"
    sop = reference.ids["sop"]
    expected = reference.prefix + reference.sp.encode("philosophy isop ") + [sop] + reference.sp.encode(" x")
    assert tokenizer(text).input_ids == expected
    messages = CONVERSATIONS["system-user-assistant"]
    assert tokenizer.apply_chat_template(messages, return_dict=False) == reference.chat(messages, False)


def edited(model: bytes, edit) -> bytes:
    proto = chatglm_tokenizer.model_proto()()
    proto.ParseFromString(model)
    edit([p for p in proto.pieces if p.type == 1 and len(p.piece) > 1])
    return proto.SerializeToString()


def test_vocabularies_the_rebuild_may_not_match_are_warned_about(tmp_path, model_bytes):
    def same_score(pieces):
        pieces[5].score = pieces[4].score

    def word_start_inside(pieces):
        pieces[-1].piece = "x" + chatglm_tokenizer.SPACE

    (tmp_path / "tokenizer.model").write_bytes(model_bytes)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        chatglm_tokenizer.build_tokenizer(tmp_path)
    for edit, message in [(same_score, "equal score"), (word_start_inside, r"cross a word start \(\['x▁'\]\)")]:
        (tmp_path / "tokenizer.model").write_bytes(edited(model_bytes, edit))
        with pytest.warns(UserWarning, match=message):
            chatglm_tokenizer.build_tokenizer(tmp_path)


def test_a_non_sentencepiece_tokenizer_model_is_copied_with_a_warning(tmp_path):
    config = chatglm_config()
    src = write_checkpoint(tmp_path / "glm4", config, chatglm_weights(config))
    (src / "tokenizer.model").write_text("IQ== 0\nIg== 1\nIw== 2\n")  # tiktoken, as GLM-4's original release
    with pytest.warns(UserWarning, match="not a SentencePiece model"):
        files = ctxpatch.chatglm.convert_chatglm(src, tmp_path / "out")
    assert {p.name for p in files} == {"tokenizer.model", "tokenizer_config.json", "tokenization_chatglm.py"}
    with pytest.raises(chatglm.ChatGLMConversionError, match="not a SentencePiece model"):
        ctxpatch.load_chatglm(src, tokenizer=True)


# ---- refusals -----------------------------------------------------------------------------------

REFUSED = {
    "unigram": ({"model_type": "unigram", "vocab_size": 380}, r"model_type=UNIGRAM, ChatGLM's .* model_type=BPE"),
    "no-byte-fallback": ({"byte_fallback": False}, r"byte_fallback=False, .* byte_fallback=True"),
    "collapsing": ({"remove_extra_whitespaces": True}, r"remove_extra_whitespaces=True, .*=False"),
    "nfkc": ({"normalization_rule_name": "nmt_nfkc"}, r"normalizer 'nmt_nfkc'.*'identity'"),
    "no-dummy-prefix": ({"add_dummy_prefix": False}, r"add_dummy_prefix=False"),
    "user-defined": ({"user_defined_symbols": ["<tool>"]}, r"user-defined or unused pieces \['<tool>'\]"),
}


@pytest.mark.parametrize("overrides,message", REFUSED.values(), ids=REFUSED.keys())
def test_other_sentencepiece_settings_are_refused(tmp_path, capsys, overrides, message):
    (tmp_path / "tokenizer.model").write_bytes(train_spm(**overrides))
    with pytest.raises(chatglm.ChatGLMConversionError, match=message):
        chatglm_tokenizer.build_tokenizer(tmp_path)
    src = tmp_path / "src"
    checkpoint_with_tokenizer(src, train_spm(**overrides))
    assert cli.main(["convert-chatglm", str(src), str(tmp_path / "dst")]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and err.count("\n") == 1
    assert not (tmp_path / "dst").exists()


def test_a_tokenizer_larger_than_the_model_vocabulary_is_refused(tmp_path, model_bytes):
    config = chatglm_config()  # 101 embeddings
    write_checkpoint(tmp_path / "m", config, chatglm_weights(config))
    (tmp_path / "m" / "tokenizer.model").write_bytes(model_bytes)
    with pytest.raises(chatglm.ChatGLMConversionError, match=r"509 ids, more than the model's 101 embeddings"):
        ctxpatch.load_chatglm(tmp_path / "m", tokenizer=True)


def test_a_missing_source_folder_is_one_sentence_and_exit_2(tmp_path, capsys):
    assert cli.main(["convert-chatglm", str(tmp_path / "nowhere"), str(tmp_path / "dst")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and err.count("\n") == 1
    with pytest.raises(FileNotFoundError, match="has no tokenizer.model"):
        chatglm_tokenizer.build_tokenizer(tmp_path)
