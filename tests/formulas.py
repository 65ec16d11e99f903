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
from dataclasses import dataclass
from typing import Any, Callable

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


def hybrid_random(i, j, w, block, count, seed):
    """j in one of the `count` key blocks drawn for i's query block qb = i // B, among the whole key blocks
    ending before the window of the block's first query (kb < (qb B - W + 1) // B), without replacement:
    the first `count` of a random permutation seeded seed * 1_000_003 + qb. Pair by pair, in Python."""
    i, j = torch.broadcast_tensors(i, j)
    out = torch.zeros(i.shape, dtype=torch.bool)
    draws: dict[int, set[int]] = {}
    for index in torch.cartesian_prod(*(torch.arange(n) for n in i.shape)).tolist():
        qi, kj = int(i[tuple(index)]), int(j[tuple(index)])
        qb = qi // block
        if qb not in draws:
            candidates = max(0, (qb * block - w + 1) // block)
            order = torch.randperm(candidates, generator=torch.Generator().manual_seed(seed * 1_000_003 + qb))
            draws[qb] = set(order[:count].tolist())
        out[tuple(index)] = kj <= qi and kj // block in draws[qb]
    return out


def hybrid(i, j, w, global_tokens, random_blocks=0, block=64, seed=0):
    seen = window(i, j, w) | ((j < global_tokens) & (j <= i))
    return seen | hybrid_random(i, j, w, block, random_blocks, seed) if random_blocks else seen


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


# ---- selections: which keys a query sees by their content --------------------------------------------


def round_bits(x: float, bits: int) -> float:
    """x rounded to `bits` significant bits (half to even), infinities kept."""
    if not math.isfinite(x):
        return x
    mantissa, exponent = math.frexp(x)
    return math.ldexp(round(mantissa * 2**bits) / 2**bits, exponent)


def retrieval_visible(q, k, i, j, key_real, sinks, w, block, top_k, scorer="mean", per="kv_head", summary=None):
    """(B, H, Tq, Tk): Δ < W, j < S, or j in one of the top_k candidate blocks of query i, pair by pair in Python.

    A block b = ⌊j/B⌋ is a candidate for i when b·B ≤ i − W and (b+1)·B ≤ i + 1 and it holds a real key. Its
    parts are the runs of `summary` positions from b·B (the whole block when None); a part's score for head h
    is q_h · mean(its un-rotated keys) ("mean") or Σ_c max(q_c min_c, q_c max_c) ("quest"), summed over the heads
    sharing the choice (`per`); the block's score is its best part's, rounded to 12 significant bits; ties go to the
    earlier block."""
    batch, heads, tq, _ = q.shape
    groups = heads // k.shape[1]
    i, j = i.expand(batch, 1, tq, 1)[:, 0, :, 0], j.expand(batch, 1, 1, k.shape[2])[:, 0, 0, :]  # (B, Tq), (B, Tk)
    real = torch.ones(j.shape, dtype=torch.bool) if key_real is None else key_real.expand(batch, 1, 1, -1)[:, 0, 0]
    out = torch.zeros(batch, heads, tq, j.shape[1], dtype=torch.bool)
    for b in range(batch):
        members: dict[int, list[int]] = {}
        for n in range(j.shape[1]):
            if real[b, n]:
                members.setdefault(int(math.floor(float(j[b, n]) / block)), []).append(n)
        for t in range(tq):
            pos = float(i[b, t])
            blocks = [blk for blk in sorted(members) if blk * block <= pos - w and (blk + 1) * block <= pos + 1]
            for h in range(heads):
                sharing = {"head": [h], "kv_head": list(range(h // groups * groups, h // groups * groups + groups)),
                           "layer": list(range(heads))}[per]
                scores = {}
                for blk in blocks:
                    parts: dict[int, list[int]] = {}
                    for n in members[blk]:
                        offset = float(j[b, n]) - blk * block
                        parts.setdefault(0 if summary is None else int(offset // summary), []).append(n)
                    best = -math.inf
                    for part in parts.values():
                        total = 0.0
                        for g in sharing:
                            keys = k[b, g // groups, part].double()  # (n, d)
                            query = q[b, g, t].double()
                            if scorer == "mean":
                                total += float(query @ keys.mean(0))
                            else:
                                low, high = query * keys.min(0).values, query * keys.max(0).values
                                total += float(torch.maximum(low, high).sum())
                        best = max(best, total)
                    scores[blk] = round_bits(best, 12)
                top = set(sorted(scores, key=lambda blk: (-scores[blk], blk))[:top_k])
                for n in range(j.shape[1]):
                    jp = float(j[b, n])
                    out[b, h, t, n] = pos - jp < w or jp < sinks or math.floor(jp / block) in top
    return out


# ---- the table: one entry per method ---------------------------------------------------------------


@dataclass
class Pairs:
    """A spec's formula being assembled over the pair grid: each method's entry narrows `visible`,
    sets the relative position RoPE sees (`rel`), the per-pair weights (xpos), the query scale or adds
    a bias; `scaler` names the rope type whose frequencies the harness takes from transformers."""

    i: torch.Tensor  # (B, 1, Tq, 1) query positions
    j: torch.Tensor  # (B, 1, 1, Tk) key positions
    params: dict[str, Any]
    heads: int
    rotary_dim: int
    train_len: int
    tensors: Callable[[str], dict[str, torch.Tensor]]  # a method's per-head tensors (KERPLE's r1, r2)
    visible: torch.Tensor
    rel: torch.Tensor
    weights: torch.Tensor | None = None
    kappa: Any = 1.0
    bias: Any = 0.0
    scaler: str = "default"
    q: Any = None  # (B, H, Tq, d) un-rotated queries and (B, Hk, Tk, d) keys, for selections
    k: Any = None
    key_real: Any = None  # (B, 1, 1, Tk) or None
    names: tuple = ()  # every method of the spec

    def narrow(self, seen: torch.Tensor) -> None:
        self.visible = self.visible & seen


@dataclass(frozen=True)
class Formula:
    """A method's formula (`apply` on the pairs) and the parameters at which it acts on the tests'
    16/22-token inputs (`case`, one backend test per method)."""

    case: dict[str, Any]
    apply: Callable[[Pairs], None]


def _scaler(name: str) -> Callable[[Pairs], None]:
    def use(p: Pairs) -> None:
        p.scaler = name

    return use


def _sinks(p: Pairs) -> None:
    p.narrow(sinks_visible(p.i, p.j, p.params["global_tokens"], p.params["window"]))
    p.rel = sinks_relative(p.i, p.j, p.params["global_tokens"], p.params["window"])


def _set(**changes: Callable[[Pairs], Any]) -> Callable[[Pairs], None]:
    def apply(p: Pairs) -> None:
        for name, value in changes.items():
            setattr(p, name, value(p))

    return apply


def _add_bias(term: Callable[[Pairs], torch.Tensor]) -> Callable[[Pairs], None]:
    def apply(p: Pairs) -> None:
        p.bias = p.bias + term(p)

    return apply


def _kerple(name: str) -> Callable[[Pairs], None]:
    kernel = {"kerple_log": kerple_log, "kerple_power": kerple_power}[name]
    return _add_bias(lambda p: kernel(p.tensors(name)["r1"].detach(), p.tensors(name)["r2"].detach(), p.i, p.j))


POSITION_RULES = {"rerope", "leaky_rerope", "selfextend", "dca", "string", "sinks", *("linear", "ntk", "dynamic", "yarn"),
                  "llama3", "longrope"}


def _retrieval(p: Pairs) -> None:
    """The selection narrows what is seen; alone (no other position rule) keys outside W are seen at W (ReRoPE)."""
    a = p.params
    p.narrow(retrieval_visible(
        p.q, p.k, p.i, p.j, p.key_real, a["sinks"], a["local_window"], a["block_size"], a["top_k"],
        a.get("scorer", "mean"), a.get("per", "kv_head"), a.get("summary_size", max(1, p.train_len // 512)),
    ))
    if not POSITION_RULES & set(p.names):
        p.rel = rerope(p.i, p.j, a["local_window"])


FORMULAS: dict[str, Formula] = {
    "window": Formula({"window": 5}, lambda p: p.narrow(window(p.i, p.j, p.params["window"]))),
    "bca": Formula({"block_size": 4}, lambda p: p.narrow(bca(p.i, p.j, p.params["block_size"]))),
    "hybrid": Formula(
        {"window": 4, "global_tokens": 3, "random_blocks": 2, "block_size": 3, "seed": 1},
        lambda p: p.narrow(hybrid(
            p.i, p.j, p.params["window"], p.params["global_tokens"], p.params.get("random_blocks", 0),
            p.params.get("block_size", 64), p.params.get("seed", 0),
        )),
    ),
    "logn": Formula({"train_len": 6}, _set(kappa=lambda p: logn(p.i, p.params.get("train_len", p.train_len)))),
    "alibi": Formula({}, _add_bias(lambda p: alibi(p.heads, p.i, p.j))),
    "sandwich": Formula(
        {"sandwich_dim": 16}, _add_bias(lambda p: sandwich(p.heads, p.params.get("sandwich_dim", 128), p.i, p.j))
    ),
    "kerple_log": Formula({}, _kerple("kerple_log")),
    "kerple_power": Formula({}, _kerple("kerple_power")),
    "linear": Formula({"factor": 3.0}, _scaler("linear")),
    "ntk": Formula({"factor": 4.0}, _scaler("ntk")),
    "dynamic": Formula({"factor": 2.0}, _scaler("dynamic")),
    "yarn": Formula({"factor": 4.0}, _scaler("yarn")),
    "llama3": Formula({"factor": 8.0}, _scaler("llama3")),
    "longrope": Formula({"factor": 2.0}, _scaler("longrope")),
    "xpos": Formula(
        {"scale_base": 16.0}, _set(weights=lambda p: xpos_weights(p.i, p.j, p.rotary_dim, p.params["scale_base"]))
    ),
    "rerope": Formula({"window": 6}, _set(rel=lambda p: rerope(p.i, p.j, p.params["window"]))),
    "leaky_rerope": Formula(
        {"window": 6, "leak": 4.0}, _set(rel=lambda p: leaky_rerope(p.i, p.j, p.params["window"], p.params["leak"]))
    ),
    "selfextend": Formula(
        {"window": 6, "group": 3}, _set(rel=lambda p: selfextend(p.i, p.j, p.params["window"], p.params["group"]))
    ),
    "sinks": Formula({"global_tokens": 3, "window": 7}, _sinks),
    "dca": Formula(
        {"chunk_len": 5, "local_window": 2},
        _set(rel=lambda p: dca(p.i, p.j, p.params["chunk_len"], p.params["local_window"])),
    ),
    "string": Formula(
        {"offset": 6, "local_window": 2}, _set(rel=lambda p: string(p.i, p.j, p.params["offset"], p.params["local_window"]))
    ),
    "retrieval": Formula({"sinks": 2, "local_window": 4, "block_size": 3, "top_k": 2}, _retrieval),
}
