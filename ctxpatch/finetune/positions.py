"""Position-id schemes for training samples: `contiguous`, `pose`, `randomized` and `stretched`.

Each scheme returns the position ids of one sample of `seq_len` tokens: a strictly increasing
tensor of shape (seq_len,) whose values lie in [0, target_len) (int64; float32 for `stretched`,
whose positions are fractional). The patched model reads its
positions from these ids, so a sample whose ids skip ahead shows every attention pair the relative
distance Δ = i - j it would have at that length, while the text itself stays `seq_len` tokens long.

  * contiguous: 0, 1, ..., seq_len - 1 (train at the real length).
  * pose: PoSE (Zhu et al., "PoSE: Efficient Context Window Extension of LLMs via Positional
    Skip-wise Training", ICLR 2024). The sample is cut into `chunks` contiguous pieces at uniformly
    drawn cut points; the first piece keeps positions 0.. (the attention sink stays at 0) and piece k
    is shifted by an offset o_k, with 0 <= o_1 <= ... <= o_{chunks-1} <= target_len - seq_len drawn
    as sorted uniform integers. Positions up to target_len - 1 and distances up to target_len - 1
    are reached, and the large distances are covered about evenly.
  * randomized: randomized positional encodings (Ruoss et al., "Randomized Positional Encodings
    Boost Length Generalization of Transformers", ACL 2023): a sorted uniform random subset of
    seq_len distinct positions of [0, target_len).
  * stretched: Su Jianlin's `random_position_ids(N)` ("Transformer升级之路" series, quoted in
    reference/position-encoding-survey.zh.txt): draw a span n, then space the N = seq_len tokens
    evenly over [0, n]: positions linspace(0, 1, N) * n, fractional. n is drawn from
    [N - 1, target_len - 1] by `distribution`: "uniform" (default; continuous uniform) or
    "log_uniform" (ln n uniform: as many samples stretched x2 as x32). Neighbours are n / (N - 1) >= 1
    apart, so the text is only ever stretched, never squeezed, and the last token sits at n.
    Every method takes fractional positions during training (rotation at a real-valued angle;
    masks compare real values; floor / mod are floor-based); at inference positions are integers.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor


def contiguous(seq_len: int, target_len: int, generator: torch.Generator, chunks: int = 1) -> Tensor:
    return torch.arange(seq_len, dtype=torch.long)


def _sorted_uniform(count: int, low: int, high: int, generator: torch.Generator) -> Tensor:
    """`count` integers drawn uniformly from [low, high] (repeats allowed), sorted."""
    if count == 0:
        return torch.zeros(0, dtype=torch.long)
    return torch.randint(low, high + 1, (count,), generator=generator).sort().values


def pose(seq_len: int, target_len: int, generator: torch.Generator, chunks: int = 2) -> Tensor:
    skip_budget = target_len - seq_len
    # cut points: chunks - 1 distinct values in [1, seq_len - 1], so every chunk holds >= 1 token
    cuts = (torch.randperm(seq_len - 1, generator=generator)[: chunks - 1] + 1).sort().values
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), _sorted_uniform(chunks - 1, 0, skip_budget, generator)])
    chunk_of_token = torch.bucketize(torch.arange(seq_len), cuts, right=True)  # (seq_len,) chunk index 0..chunks-1
    return torch.arange(seq_len, dtype=torch.long) + offsets[chunk_of_token]


def randomized(seq_len: int, target_len: int, generator: torch.Generator, chunks: int = 1) -> Tensor:
    return torch.randperm(target_len, generator=generator)[:seq_len].sort().values


DISTRIBUTIONS = ("uniform", "log_uniform")


def stretch_span(seq_len: int, target_len: int, generator: torch.Generator, distribution: str = "uniform") -> float:
    """The span n of a stretched sample, drawn from [seq_len - 1, target_len - 1] by `distribution`."""
    low, high = float(seq_len - 1), float(target_len - 1)
    u = float(torch.rand((), generator=generator, dtype=torch.float64))
    if distribution == "uniform":
        return low + u * (high - low)
    if distribution == "log_uniform":
        return math.exp(math.log(low) + u * (math.log(high) - math.log(low)))
    raise ValueError(f"unknown stretch distribution {distribution!r}; use one of {', '.join(DISTRIBUTIONS)}")


def stretched(
    seq_len: int, target_len: int, generator: torch.Generator, chunks: int = 1, distribution: str = "uniform"
) -> Tensor:
    if seq_len == 1:
        return torch.zeros(1, dtype=torch.float32)
    span = stretch_span(seq_len, target_len, generator, distribution)
    # arange * (n / (N - 1)) is linspace(0, 1, N) * n, but exact at n = N - 1 (positions 0, 1, ..., N - 1);
    # float64, then float32 (what rotary embeddings compute in): rounding keeps the last one <= target_len - 1
    return (torch.arange(seq_len, dtype=torch.float64) * (span / (seq_len - 1))).to(torch.float32)


SCHEMES: dict[str, Callable[..., Tensor]] = {
    "contiguous": contiguous,
    "pose": pose,
    "randomized": randomized,
    "stretched": stretched,
}


def position_ids(
    scheme: str,
    seq_len: int,
    target_len: int,
    generator: torch.Generator,
    chunks: int = 2,
    distribution: str = "uniform",
) -> Tensor:
    """The position ids (seq_len,) of one sample under `scheme`."""
    if seq_len > target_len:
        raise ValueError(f"seq_len={seq_len} > target_len={target_len}: the positions cannot fit")
    try:
        make = SCHEMES[scheme]
    except KeyError:
        raise ValueError(f"unknown position scheme {scheme!r}; use one of {', '.join(SCHEMES)}") from None
    if scheme == "stretched":
        return stretched(seq_len, target_len, generator, distribution=distribution)
    return make(seq_len, target_len, generator, chunks=chunks)


def sample_generator(seed: int, index: int) -> torch.Generator:
    """A generator for sample `index` of a run seeded `seed`: the same on every process and resume."""
    return torch.Generator().manual_seed((seed * 1_000_003 + index) % (2**63 - 1))
