"""Forward time and peak memory of every method on both backends, as ratios to the unpatched model.

    python benchmarks/attention.py                       # n = 2k, 4k, 8k, 16k; all methods
    python benchmarks/attention.py --lengths 2048,8192 --specs window,alibi --layers 2
    python benchmarks/attention.py --lengths 8192,16384,32768 --specs dca,selfextend,rerope,string --backends blockwise
    python benchmarks/attention.py --lengths 16384,32768,65536,131072 --specs retrieval,dca --backends blockwise --layers 1 --repeat 1

One process: a small random Llama-architecture model shaped like SmolLM2-135M's attention
(9 query / 3 key-value heads of 64 dims, trained length 8k), built from a config. Time is the best
of `--repeat` forwards after a warm-up; peak memory is the resident set size sampled every
millisecond during the forward, above what it was just before (freed memory is handed back to
the OS between runs with malloc_trim, so runs do not inherit each other's peaks). `dense` is the
reference backend and builds the whole score matrix: it is skipped above `--dense-max`.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import threading
import time

import psutil
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import ctxpatch
from ctxpatch.spec import split_top_level

SPECS = [
    "window", "hybrid", "bca", "logn", "logn+window", "alibi", "alibi+window", "kerple_log", "kerple_power",
    "sandwich", "linear", "ntk", "dynamic", "yarn", "llama3", "longrope",
    "xpos", "rerope", "leaky_rerope", "selfextend", "sinks", "selfextend+logn", "hybrid+rerope", "dca", "dca+logn",
    "string", "retrieval", "retrieval+dca",
]
PARAMS = {"window": {"window": 2048}, "alibi+window": {"window": 2048}, "hybrid": {"window": 2048, "random_blocks": 2},
          "sinks": {"window": 2048}}


def model_for(layers: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=1024, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: peaks may then include earlier runs
        pass


def measure(model, ids: torch.Tensor, repeat: int) -> tuple[float, float]:
    """(seconds, peak MiB above the starting RSS) of a forward, best of `repeat` after a warm-up."""
    process = psutil.Process()
    with torch.no_grad():
        model(ids, logits_to_keep=1)
        best, peak = float("inf"), 0
        for _ in range(repeat):
            _trim()
            base, top, done = process.memory_info().rss, [0], threading.Event()

            def sample() -> None:
                while not done.is_set():
                    top[0] = max(top[0], process.memory_info().rss)
                    time.sleep(0.001)

            sampler = threading.Thread(target=sample)
            sampler.start()
            start = time.perf_counter()
            model(ids, logits_to_keep=1)
            best = min(best, time.perf_counter() - start)
            done.set()
            sampler.join()
            peak = max(peak, top[0] - base)
    return best, peak / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="2048,4096,8192,16384")
    parser.add_argument("--specs", default=",".join(SPECS))
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--dense-max", type=int, default=4096, help="longest n the dense reference runs at")
    parser.add_argument("--backends", default="blockwise,dense", help="comma-separated: blockwise, dense, flex")
    args = parser.parse_args()
    lengths = [int(n) for n in args.lengths.split(",")]
    model = model_for(args.layers)
    torch.set_num_threads(torch.get_num_threads())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.layers} layers, 9x64 heads (3 kv), fp32")
    print("time and peak-memory ratios to the unpatched model (SDPA) at the same n; '-' = not run\n")
    base = {n: measure(model, torch.randint(0, 1024, (1, n)), args.repeat) for n in lengths}
    header = " | ".join(f"n={n}" for n in lengths)
    print(f"| spec | backend | {header} |")
    print("|---|---|" + "---|" * len(lengths))
    print("| unpatched | sdpa | " + " | ".join(f"{base[n][0]:.2f}s, {base[n][1]:.0f} MiB" for n in lengths) + " |")
    growth = {"unpatched": base}
    for spec in split_top_level(args.specs, ","):  # brackets may hold commas: retrieval[a=1,b=2]
        for backend in args.backends.split(","):
            cells, runs = [], {}
            for n in lengths:
                if backend == "dense" and n > args.dense_max:
                    cells.append("-")
                    continue
                with ctxpatch.apply(model, spec, backend=backend, **PARAMS.get(spec, {})):
                    runs[n] = measure(model, torch.randint(0, 1024, (1, n)), args.repeat)
                cells.append(f"{runs[n][0] / base[n][0]:.2f}x, {runs[n][1] / max(base[n][1], 1):.2f}x")
            if backend == "blockwise":
                growth[spec] = runs
            print(f"| {spec} | {backend} | " + " | ".join(cells) + " |", flush=True)
    if len(lengths) >= 2:
        small, large = lengths[-2], lengths[-1]
        print(f"\ngrowth from n={small} to n={large} (blockwise): time ratio, peak-memory ratio")
        for spec, runs in growth.items():
            print(f"  {spec:<18} {runs[large][0] / runs[small][0]:5.2f}  {runs[large][1] / max(runs[small][1], 1):5.2f}")


if __name__ == "__main__":
    main()
