"""Position schemes and packing: ids strictly increasing and inside [0, target_len); over many samples
the positions and relative distances cover the whole range (distributions against closed forms);
packing and the validation split; samples depend only on (seed, sample number)."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from ctxpatch.finetune.data import PackedSamples, TextTooShortError, pack
from ctxpatch.finetune.positions import position_ids, sample_generator

SCHEMES = ("contiguous", "pose", "randomized")


def draw(scheme: str, seq_len: int, target_len: int, n: int, chunks: int = 2) -> torch.Tensor:
    """(n, seq_len) position ids of samples 0..n-1."""
    return torch.stack([position_ids(scheme, seq_len, target_len, sample_generator(0, k), chunks) for k in range(n)])


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
    counts = torch.bincount(delta * bins // target_len, minlength=bins).double()
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
