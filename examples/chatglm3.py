"""ChatGLM3 without remote code: convert once, then chat under a patch with plain transformers.

    python examples/chatglm3.py                                   # ./chatglm3-6b-32k (THUDM's folder, downloaded by you)
    python examples/chatglm3.py /models/chatglm3-6b --converted /models/chatglm3-6b-glm --spec "selfextend" --target-len 65536
    python examples/chatglm3.py SRC --converted DST --new-tokens 4 --prompt "Hi"        # a tiny folder

The conversion (`ctxpatch convert-chatglm SRC DST` on the command line) reads config.json as JSON and the
weights with safetensors / torch.load(weights_only=True): nothing from the folder is imported or unpickled as
code. It writes transformers' own GlmForCausalLM (safetensors) and ChatGLM's tokenizer as a fast tokenizer
with ChatGLM3's chat template, so both load with no trust_remote_code. Reading tokenizer.model needs protobuf
(`pip install 'ctxpatch[chatglm]'`). Without converting: `model, tokenizer = ctxpatch.load_chatglm(SRC, tokenizer=True)`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import ctxpatch
from ctxpatch.chatglm import convert_chatglm


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", nargs="?", default="chatglm3-6b-32k", help="a ChatGLM2/3 folder as published (model_type chatglm)")
    p.add_argument("--converted", default=None, help="where to write the converted folder (default: SRC-glm)")
    p.add_argument("--dtype", default="auto", help="auto (the checkpoint's torch_dtype), float32, bfloat16, float16")
    p.add_argument("--spec", default="logn+window", help="the patch to chat under (any ctxpatch spec; none for none)")
    p.add_argument("--target-len", type=int, default=None, help="fill the spec's parameters for this length")
    p.add_argument("--prompt", default="Summarise the plot of Hamlet in three sentences.", help="the user's message")
    p.add_argument("--new-tokens", type=int, default=128, help="at most this many tokens in the answer")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def main() -> None:
    p = parser()
    args = p.parse_args()
    src = Path(args.src)
    dst = Path(args.converted or f"{src}-glm")
    if not (dst / "config.json").is_file() and not (src / "config.json").is_file():  # usage, not a traceback
        p.error(f"{src} holds no ChatGLM2/3 checkpoint (no config.json): download one (e.g. THUDM/chatglm3-6b-32k) "
                "and name its folder")
    if not (dst / "config.json").is_file():
        written = convert_chatglm(src, dst, dtype=args.dtype)
        print(f"converted {src} -> {dst} (tokenizer files: {', '.join(p.name for p in written)})")

    # plain transformers on the converted folder: no remote code
    model = AutoModelForCausalLM.from_pretrained(dst, dtype="auto").to(args.device).eval()
    tokenizer = AutoTokenizer.from_pretrained(dst)
    patch = ctxpatch.apply(model, args.spec, target_len=args.target_len)
    print(repr(patch))

    messages = [{"role": "user", "content": args.prompt}]
    # ChatGLM3's format: [gMASK]sop<|user|>\n{prompt}<|assistant|>, ids equal to the remote-code tokenizer's
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True,
                                           return_tensors="pt").to(args.device)
    # the converted generation config stops at </s>, <|user|> and <|observation|> (the model's turn is over)
    stop = model.generation_config.eos_token_id
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=args.new_tokens, do_sample=False, eos_token_id=stop,
                             temperature=None, top_p=None, top_k=None)
    answer = out[0, inputs["input_ids"].shape[1]:]
    print(f"stop ids: {stop}")
    print(f"user: {args.prompt}")
    print(f"assistant: {tokenizer.decode(answer, skip_special_tokens=True).strip()}")
    patch.remove()


if __name__ == "__main__":
    main()
