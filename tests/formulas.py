"""Independent float64 evaluations of DESIGN.md's formulas, written without ctxpatch's code.

Rotary scores are computed the textbook way: pair k of a head is the complex number
q_k + i q_{k + d_r/2} (half layout) or q_{2k} + i q_{2k+1} (interleaved), R(p) multiplies it by
exp(i p theta_k), so R(i)q . R(j)k = Re sum_k q_k conj(k_k) exp(i (i - j) theta_k), and a position
rule only changes the relative position fed to that exponential.
Positions may be fractional (the `stretched` training scheme): every ⌊·⌋ below is a floor and every
mod a floor-based remainder (in [0, s)), so a fractional position belongs to the chunk or group its
floor names; comparisons are on the real values.
"""

from __future__ import annotations

import math

import torch


def pairs(x: torch.Tensor, rotary_dim: int, interleaved: bool) -> torch.Tensor:
    rot = x[..., :rotary_dim]
    if interleaved:
        return torch.complex(rot[..., 0::2], rot[..., 1::2])
    half = rotary_dim // 2
    return torch.complex(rot[..., :half], rot[..., half:])


def default_theta(rotary_dim: int, base: float) -> torch.Tensor:
    return base ** (-torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)


def rotary_scores(q, k, rel, theta, rotary_dim, interleaved=False, attention_scaling=1.0, pair_weights=None):
    """(B, H, Tq, Tk) of R-rotated dot products at relative positions rel (B, 1, Tq, Tk).

    pair_weights (B, 1, Tq, Tk, P), if given, multiplies each rotary pair's contribution (xpos).
    """
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    qc, kc = pairs(q, rotary_dim, interleaved), pairs(k, rotary_dim, interleaved)
    prod = qc[:, :, :, None, :] * kc[:, :, None, :, :].conj()  # (B, H, Tq, Tk, P)
    phase = torch.exp(1j * rel[..., None].to(torch.float64) * theta.to(torch.float64))
    contributions = (prod * phase).real
    if pair_weights is not None:
        contributions = contributions * pair_weights
    scores = contributions.sum(-1) * attention_scaling**2
    rest = q[..., rotary_dim:] @ k[..., rotary_dim:].transpose(-1, -2)
    return scores + rest


def attention(q, k, v, scores, visible):
    groups = q.shape[1] // v.shape[1]
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    return probs @ v.repeat_interleave(groups, dim=1)  # (B, H, Tq, d)


def causal(i, j, key_real=None):
    seen = j <= i
    return seen if key_real is None else seen & key_real


# ---- method definitions, straight from DESIGN.md's table ---------------------------------------


def window(i, j, w):
    return (i - j >= 0) & (i - j < w)


def bca(i, j, b):
    return (j <= i) & (torch.div(i, b, rounding_mode="floor") - torch.div(j, b, rounding_mode="floor") <= 1)


def logn(i, train_len):
    return torch.clamp(torch.log(i.double() + 1) / math.log(train_len), min=1.0)


def alibi_slopes(h_count):
    def geometric(n):
        return [2 ** (-8 * h / n) for h in range(1, n + 1)]

    p = 2 ** int(math.log2(h_count))
    return torch.tensor(geometric(p) + geometric(2 * p)[0::2][: h_count - p], dtype=torch.float64)


def alibi(h_count, i, j):
    return -alibi_slopes(h_count).view(-1, 1, 1) * (i - j).double()


def kerple_log(r1, r2, i, j):
    delta = (i - j).double().clamp(min=0)
    return -r1.double().view(-1, 1, 1) * torch.log(1 + r2.double().view(-1, 1, 1) * delta)


def kerple_power(r1, r2, i, j):
    delta = (i - j).double().clamp(min=0)
    return -r1.double().view(-1, 1, 1) * delta ** r2.double().view(-1, 1, 1)


def sandwich(h_count, dim, i, j):
    delta = (i - j).double()
    total = sum(torch.cos(delta * 10000 ** (-2 * k / dim)) for k in range(dim // 2)) - dim / 2
    h = torch.arange(1, h_count + 1, dtype=torch.float64).view(-1, 1, 1)
    return total * h_count / (8 * h)


# ---- position rules: the relative position RoPE sees ------------------------------------------


def rerope(i, j, w):
    d = (i - j).double()
    return torch.where(d < w, d, torch.full_like(d, float(w)))


def leaky_rerope(i, j, w, leak):
    d = (i - j).double()
    return torch.where(d < w, d, w + (d - w) / leak)


def selfextend(i, j, w, g):
    d = (i - j).double()
    grouped = (torch.div(i, g, rounding_mode="floor") - torch.div(j, g, rounding_mode="floor")) + w - w // g
    return torch.where(d < w, d, grouped.double())


def dca(i, j, s, w):
    """Dual Chunk Attention: keys at j mod s; the query at i mod s (same chunk), min(i mod s + s, s + w)
    (previous chunk) or s + w (older chunks)."""
    behind = torch.div(i, s, rounding_mode="floor") - torch.div(j, s, rounding_mode="floor")
    key, query = torch.remainder(j, s).double(), torch.remainder(i, s).double()
    same, previous, older = query - key, torch.clamp(query + s, max=s + w) - key, (s + w) - key
    return torch.where(behind == 0, same, torch.where(behind == 1, previous, older))


def string(i, j, offset, w):
    d = (i - j).double()
    return torch.where(d < offset, d, d - offset + w)


def sinks_visible(i, j, sinks, w):
    return window(i, j, w) | ((j < sinks) & (j <= i))


def sinks_relative(i, j, sinks, w):
    """Inside the cache the query sits at slot min(i, S + W - 1); window keys keep their distance."""
    d = (i - j).double()
    return torch.where(d < w, d, (torch.clamp(i, max=sinks + w - 1) - j).double())


def xpos_weights(i, j, rotary_dim, scale_base):
    """zeta_k ** (Δ / γ) per pair: (B, 1, Tq, Tk, P)."""
    zeta = (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim + 0.4) / 1.4
    return zeta ** ((i - j).double()[..., None] / scale_base)
