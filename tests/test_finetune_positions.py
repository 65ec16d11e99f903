"""Position schemes and packing: ids strictly increasing and inside [0, target_len); over many samples
the positions and relative distances cover the whole range (distributions against closed forms);
packing and the validation split; samples depend only on (seed, sample number)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from ctxpatch.finetune.data import PackedSamples, TextTooShortError, pack
from ctxpatch.finetune.positions import position_ids, sample_generator

SCHEMES = ("contiguous", "pose", "randomized")


def draw(
    scheme: str, seq_len: int, target_len: int, n: int, chunks: int = 2, distribution: str = "uniform"
) -> torch.Tensor:
    """(n, seq_len) position ids of samples 0..n-1."""
    return torch.stack(
        [position_ids(scheme, seq_len, target_len, sample_generator(0, k), chunks, distribution) for k in range(n)]
    )


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("seq_len,target_len,chunks", [(1, 5, 1), (7, 7, 3), (16, 128, 2), (64, 1024, 4), (33, 40, 5)])
def test_ids_strictly_increase_inside_the_target_range(scheme, seq_len, target_len, chunks):
    ids = draw(scheme, seq_len, target_len, 200, chunks)
    assert ids.shape == (200, seq_len) and ids.dtype == torch.long
    assert bool((ids[:, 1:] > ids[:, :-1]).all())
    assert int(ids.min()) >= 0 and int(ids.max()) < target_len


def test_contiguous_is_the_real_length():
    assert torch.equal(draw("contiguous", 16, 128, 3), torch.arange(16).expand(3, 16))


@pytest.mark.parametrize("chunks", [2, 3, 5])
def test_pose_keeps_the_sink_at_zero_and_skips_at_most_chunks_minus_one_times(chunks):
    ids = draw("pose", 32, 512, 300, chunks)
    assert bool((ids[:, 0] == 0).all())
    jumps = (ids[:, 1:] - ids[:, :-1] > 1).sum(1)
    assert int(jumps.max()) <= chunks - 1
    assert float((jumps == chunks - 1).float().mean()) > 0.9  # skips of 0 are rare


def distance_shares(ids: torch.Tensor, target_len: int, bins: int) -> torch.Tensor:
    """Share of causal pairs (i >= j of one sample) whose distance falls in each of `bins` equal bins."""
    delta = ids[:, :, None] - ids[:, None, :]  # (n, seq, seq)
    delta = delta[delta >= 0]
    counts = torch.bincount(torch.div(delta * bins, target_len, rounding_mode="floor").long(), minlength=bins).double()
    return counts / counts.sum()


@pytest.mark.parametrize("scheme", ["pose", "randomized"])
def test_distances_cover_the_whole_range(scheme):
    seq_len, target_len, bins = 64, 1024, 8
    shares = distance_shares(draw(scheme, seq_len, target_len, 400), target_len, bins)
    assert float(shares.min()) > 0.01, shares  # every eighth of [0, target_len) is trained
    ids = draw(scheme, seq_len, target_len, 400)
    assert int((ids[:, -1] - ids[:, 0]).max()) >= 0.97 * target_len  # the longest distances too


def test_contiguous_does_not_cover_the_range():  # the coverage test above can fail
    shares = distance_shares(draw("contiguous", 64, 1024, 20), 1024, 8)
    assert float(shares[1:].sum()) == 0.0


def test_pose_covers_the_skipped_distances_evenly():
    """Past seq_len, pose's distance shares are flat (within a factor of 1.8 of each other)."""
    shares = distance_shares(draw("pose", 64, 1024, 1000), 1024, 8)[1:]
    assert float(shares.max() / shares.min()) < 1.8, shares


def test_pose_offset_is_uniform():
    """Two chunks: the second is shifted by a uniform skip in [0, target_len - seq_len], so the last
    position is seq_len - 1 + U and its mean and spread are those of a discrete uniform."""
    seq_len, target_len, n = 16, 528, 4000
    last = draw("pose", seq_len, target_len, n)[:, -1].double() - (seq_len - 1)
    skip = target_len - seq_len
    expected_mean, expected_var = skip / 2, ((skip + 1) ** 2 - 1) / 12
    assert_close(last.mean(), torch.tensor(expected_mean, dtype=torch.double), rtol=0.04, atol=0)
    assert_close(last.var(), torch.tensor(expected_var, dtype=torch.double), rtol=0.08, atol=0)


def test_randomized_matches_uniform_order_statistics():
    """A uniform random n-subset of [0, N): the k-th smallest has mean (k + 1)(N + 1)/(n + 1) - 1."""
    seq_len, target_len, n = 8, 100, 4000
    ids = draw("randomized", seq_len, target_len, n).double()
    k = torch.arange(seq_len, dtype=torch.double)
    expected = (k + 1) * (target_len + 1) / (seq_len + 1) - 1
    assert_close(ids.mean(0), expected, rtol=0.03, atol=0.3)


# ---- stretched: linspace(0, 1, N) * n, n drawn from [N - 1, target_len - 1] --------------------------


@pytest.mark.parametrize("distribution", ["uniform", "log_uniform"])
@pytest.mark.parametrize("seq_len,target_len", [(2, 5), (7, 7), (16, 128), (64, 65536), (1000, 1024)])
def test_stretched_ids_are_evenly_spaced_fractional_and_below_the_target(seq_len, target_len, distribution):
    ids = draw("stretched", seq_len, target_len, 200, distribution=distribution).double()
    assert ids.shape == (200, seq_len)
    assert bool((ids[:, 0] == 0).all()) and float(ids.max()) <= target_len - 1
    gaps = ids[:, 1:] - ids[:, :-1]
    assert float(gaps.min()) >= 1 - 1e-3  # stretched, never squeezed: strictly increasing
    span = ids[:, -1:]
    assert_close(gaps, (span / (seq_len - 1)).expand_as(gaps), rtol=1e-5, atol=1e-2)  # even: linspace * n
    if target_len > seq_len:
        assert float((ids[:, 1:] != ids[:, 1:].round()).double().mean()) > 0.9  # fractional (but the first, at 0)


def test_stretched_at_the_smallest_span_is_contiguous():
    assert torch.equal(draw("stretched", 9, 9, 3), torch.arange(9, dtype=torch.float32).expand(3, 9))


def stretched_spans(distribution: str, seq_len: int, target_len: int, n: int) -> torch.Tensor:
    return draw("stretched", seq_len, target_len, n, distribution=distribution)[:, -1].double()


def test_stretched_uniform_span_matches_the_uniform_distribution():
    """n ~ U[N - 1, T - 1]: mean, variance and the CDF at every decile (Kolmogorov-Smirnov bound)."""
    seq_len, target_len, count = 16, 1040, 4000
    low, high = seq_len - 1, target_len - 1
    spans = stretched_spans("uniform", seq_len, target_len, count)
    assert_close(spans.mean(), torch.tensor((low + high) / 2, dtype=torch.double), rtol=0.02, atol=0)
    assert_close(spans.var(), torch.tensor((high - low) ** 2 / 12, dtype=torch.double), rtol=0.06, atol=0)
    quantiles = torch.linspace(0.1, 0.9, 9, dtype=torch.double)
    empirical = torch.stack([(spans <= low + q * (high - low)).double().mean() for q in quantiles])
    assert float((empirical - quantiles).abs().max()) < 1.36 / count**0.5  # KS at 5%


def test_stretched_log_uniform_span_matches_its_distribution():
    """ln n ~ U[ln(N - 1), ln(T - 1)]: as many spans in [15, 150) as in [150, 1500)."""
    seq_len, target_len, count = 16, 1501, 4000
    spans = stretched_spans("log_uniform", seq_len, target_len, count)
    logs = (spans.log() - torch.log(torch.tensor(15.0, dtype=torch.double))) / torch.log(
        torch.tensor(100.0, dtype=torch.double)
    )
    quantiles = torch.linspace(0.1, 0.9, 9, dtype=torch.double)
    empirical = torch.stack([(logs <= q).double().mean() for q in quantiles])
    assert float((empirical - quantiles).abs().max()) < 1.36 / count**0.5
    assert 0.45 < float((spans < 150).double().mean()) < 0.55


def expected_stretched_distance_shares(seq_len: int, target_len: int, bins: int) -> torch.Tensor:
    """Distance shares under n ~ U[N - 1, T - 1], integrated over a fine grid of n (float64): a sample
    of span n has N - k pairs at distance k n / (N - 1), k = 0 .. N - 1."""
    spans = seq_len - 1 + (torch.arange(20000, dtype=torch.double) + 0.5) / 20000 * (target_len - seq_len)
    k = torch.arange(seq_len, dtype=torch.double)
    distance = k[None, :] * spans[:, None] / (seq_len - 1)  # (grid, N)
    weight = (seq_len - k).expand_as(distance)
    which = torch.clamp((distance * bins / target_len).floor().long(), max=bins - 1)
    shares = torch.zeros(bins, dtype=torch.double).index_add_(0, which.flatten(), weight.flatten())
    return shares / shares.sum()


def test_stretched_distances_follow_the_uniform_span():
    """Coverage of distances: every bin of [0, target_len) is trained, in the shares the stated
    distribution of n gives (not flat: short distances are in every sample)."""
    seq_len, target_len, bins = 32, 1024, 8
    ids = draw("stretched", seq_len, target_len, 1500)
    got = distance_shares(ids, target_len, bins)
    expected = expected_stretched_distance_shares(seq_len, target_len, bins)
    assert_close(got, expected, rtol=0.08, atol=0.004)
    assert float(got.min()) > 0.0005  # the longest distances too, rarely: they need n near T and k near N
    assert float(ids[:, -1].max()) >= 0.97 * target_len


def test_stretched_density_matches_the_uniform_span():
    """Tokens per position, (N - 1) / n, has mean (N - 1) ln((T - 1)/(N - 1)) / (T - N) under n ~ U[N - 1, T - 1]."""
    seq_len, target_len = 16, 1040
    spans = stretched_spans("uniform", seq_len, target_len, 4000)
    density = (seq_len - 1) / spans
    expected = (seq_len - 1) * math.log((target_len - 1) / (seq_len - 1)) / (target_len - seq_len)
    assert_close(density.mean(), torch.tensor(expected, dtype=torch.double), rtol=0.05, atol=0)


def test_an_unknown_stretch_distribution_is_refused():
    with pytest.raises(ValueError, match="unknown stretch distribution 'gauss'; use one of uniform, log_uniform"):
        position_ids("stretched", 8, 64, sample_generator(0, 0), distribution="gauss")


def test_positions_are_a_function_of_seed_and_sample_number():
    a = position_ids("pose", 32, 512, sample_generator(3, 17))
    b = position_ids("pose", 32, 512, sample_generator(3, 17))
    c = position_ids("pose", 32, 512, sample_generator(4, 17))
    assert torch.equal(a, b) and not torch.equal(a, c)


# ---- packing ------------------------------------------------------------------------------------


def test_pack_cuts_windows_and_holds_the_tail_apart():
    stream = torch.arange(103)
    split = pack(stream, seq_len=10, val_sequences=2)
    assert torch.equal(split.train, torch.arange(80).view(8, 10))
    assert torch.equal(split.validation, torch.arange(80, 100).view(2, 10))


def test_text_too_short_says_how_many_tokens_it_has():
    with pytest.raises(
        TextTooShortError,
        match="has 29 tokens, too few for seq_len=10: one training window plus "
        "data.val_sequences=2 validation windows need 30",
    ):
        pack(torch.arange(29), seq_len=10, val_sequences=2)


def test_samples_visit_every_window_once_per_pass_in_a_seeded_order():
    windows = torch.arange(50).view(10, 5)
    samples = PackedSamples(windows, 30, "pose", 64, seed=1)
    first = [int(samples[k]["input_ids"][0]) // 5 for k in range(10)]
    second = [int(samples[k]["input_ids"][0]) // 5 for k in range(10, 20)]
    assert sorted(first) == list(range(10)) and sorted(second) == list(range(10)) and first != second
    again = PackedSamples(windows, 30, "pose", 64, seed=1)
    for k in (0, 7, 23):
        assert torch.equal(samples[k]["position_ids"], again[k]["position_ids"])
        assert torch.equal(samples[k]["input_ids"], again[k]["input_ids"])
