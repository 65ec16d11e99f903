"""`ctxpatch convert-chatglm SRC DST`: a ChatGLM2/3 folder to a transformers Glm checkpoint (ctxpatch/chatglm.py).

The parser lives apart from the conversion so that `ctxpatch --help` does not import torch.
"""

from __future__ import annotations

import argparse

ROPE_RATIO_AS = ("base", "positions")  # ctxpatch.chatglm.ROPE_RATIO_AS (tests/test_cli.py checks they agree)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert-chatglm",
        help="convert a ChatGLM2/3 checkpoint folder to a transformers Glm checkpoint (no remote code)",
    )
    p.add_argument("src", help="ChatGLM2/3 folder: config.json plus .safetensors or .bin weights")
    p.add_argument("dst", help="output folder: safetensors weights and a fast tokenizer (tokenizer.json)")
    p.add_argument("--dtype", default="auto", help="auto (the checkpoint's torch_dtype), float32, float16 or bfloat16")
    p.add_argument(
        "--rope-ratio-as", choices=ROPE_RATIO_AS, default=None,
        help="how rope_ratio is applied: base (ChatGLM3, GLM-4) or positions (ChatGLM2-6B-32k); default: read off SRC",
    )
    p.set_defaults(func=run_convert)


def run_convert(args: argparse.Namespace) -> int:
    from .chatglm import convert_chatglm

    files = convert_chatglm(args.src, args.dst, dtype=args.dtype, rope_ratio_as=args.rope_ratio_as)
    print(f"wrote a transformers Glm checkpoint to {args.dst}")
    print(f"tokenizer files: {', '.join(p.name for p in files) or 'none found'}")
    return 0
