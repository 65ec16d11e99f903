"""A selection's choices for one attention call (DESIGN.md, "Selection"), and the blockwise backend's way of
attending under them.

`BlockChoice` makes per-block summaries of the keys once per call and, per query chunk, the blocks each query (or
each head group) chooses; dense, blockwise and flex all ask it, so they see the same choices.

The blockwise path computes a layer under a selection in time linear in the length: per query chunk, the pairs
seen whatever the content (window, sinks) against only those keys; then, per head group, the (query, chosen
block) pairs sorted by block, one fused call per block on the rows that chose it, each call's (log-sum-exp,
output) rows kept apart and merged into the rows' softmax once per window of queries, so a query
costs S + W + k·B products, not n, the calls grow with the number of blocks and the memory stays that of the
output plus one window's parts (`PARTS_BUDGET`). A call with a few queries (decoding, short pieces) takes every
block its queries chose at once instead (`UNION_MAX`).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..kinds import Selection
from ..plan import AttentionCall, LayerRuntime
from .._compat.torch import cpu_flash_attention_available
from . import lse_views
from .common import as_slice, compute_dtype, head_index, soft_cap

UNION_MAX = 32  # calls with at most this many queries attend to the union of their chosen blocks in one go
ROWS = 256  # queries of a chunk
SCORE_BUDGET = 1 << 25  # elements of one chunk's score tensor
RUNS_MAX = 4  # a near part's unmasked keys in one view: at most this many fused calls on slices, else one copy


class BlockChoice:
    """The blocks of one call's keys and what each query chooses among them (`top`, `chosen`)."""

    def __init__(self, selection: Selection, k: Tensor, call: AttentionCall):
        self.selection, self.kv_heads, self.k_pos = selection, k.shape[1], call.k_pos
        self.native_window = call.native_window
        real = call.key_padding if call.key_padding is not None else torch.ones_like(call.k_pos, dtype=torch.bool)
        part_of = selection.part_of(call.k_pos)  # (B, Tk): block b's parts are b·parts onwards
        self.block_of = torch.div(part_of, selection.parts, rounding_mode="floor")  # (B, Tk)
        self.blocks = int(self.block_of.max()) + 1
        parts = self.blocks * selection.parts
        counts = torch.zeros(real.shape[0], parts, device=k.device).scatter_add_(1, part_of, real.float())
        filled = (counts > 0).view(real.shape[0], self.blocks, -1)  # (B, nb, parts): parts holding a real key
        self.occupied = filled.any(-1)  # (B, nb): blocks holding one
        summary = selection.summarize(k.to(compute_dtype(k)), part_of, real, parts)
        self.summary = _empty_parts_copy_a_filled_one(summary, filled)

    def top(self, q: Tensor, i: Tensor) -> Tensor:
        """(B, Hs, C, k) the blocks each query chooses (in no order), -1 where it has fewer candidates; q (B, H, C, d)
        un-rotated, i (B, C) its positions. Hs is H, Hk or 1 as the selection's `per` says."""
        batch, heads, rows, dim = q.shape
        allowed = self._allowed(i)  # (B, 1, C, nb)
        some = allowed.flatten(0, -2).any(0)  # (nb,) blocks some query of the chunk may choose
        reach = int(some.nonzero().max()) + 1 if bool(some.any()) else 1
        allowed, parts = allowed[..., :reach], reach * self.selection.parts  # blocks past every candidate: unscored
        groups = heads // self.kv_heads
        grouped = q.to(compute_dtype(q)).view(batch, self.kv_heads, groups, rows, dim)  # (B, Hk, G, C, d)
        per = self.selection.sharing
        if self.selection.linear and per != "head":  # Σ_g score(q_g) = score(Σ_g q_g): one product, not G
            grouped = grouped.sum(2, keepdim=True)  # (B, Hk, 1, C, d)
        summary = {name: value[:, :, :parts] for name, value in self.summary.items()}
        scores = self.selection.score(grouped, summary)  # (B, Hk, G or 1, C, reach·parts)
        if per == "head":
            scores = scores.reshape(batch, heads, rows, -1)  # (B, H, C, reach·parts)
        elif per == "kv_head":
            scores = scores[:, :, 0] if scores.shape[2] == 1 else scores.sum(2)  # (B, Hk, C, reach·parts)
        else:
            scores = scores.sum((1, 2))[:, None]  # (B, 1, C, reach·parts)
        if self.selection.parts > 1:  # a block scores as its best part (empty parts repeat a filled one's score)
            scores = scores.unflatten(-1, (reach, -1)).amax(-1)  # (B, Hs, C, reach, parts) -> (B, Hs, C, reach)
        top = _top_blocks(_coarse(scores).masked_fill(~allowed, float("-inf")), self.selection.count)
        width = min(self.selection.count, self.blocks)  # every chunk's answer as wide, whatever its reach
        return F.pad(top, (0, width - top.shape[-1]), value=-1)

    def _allowed(self, i: Tensor) -> Tensor:
        """(B, 1, C, nb) bool: the blocks a query at i (B, C) may choose (candidates holding a real key)."""
        blocks = torch.arange(self.blocks, device=i.device)
        allowed = self.selection.candidates(i[:, None, :, None], blocks) & self.occupied[:, None, None, :]
        if self.native_window is not None:  # the model's own window wins: choose among blocks wholly inside it
            allowed &= blocks * self.selection.block > i[:, None, :, None] - self.native_window
        return allowed

    def chosen(self, q: Tensor, i: Tensor) -> Tensor:
        """(B, Hs, C, nb) bool: the blocks each query chooses (see `top`)."""
        top = self.top(q, i)
        chosen = torch.zeros(*top.shape[:3], self.blocks + 1, dtype=torch.bool, device=q.device)
        return chosen.scatter_(-1, top % (self.blocks + 1), True)[..., : self.blocks]  # -1 lands in the spare column

    def visible(self, chosen: Tensor, i: Tensor, j: Tensor, key_blocks: Tensor) -> Tensor:
        """(B, Hs, C, K): pairs the selection lets through; i (B, 1, C, 1), j and key_blocks (B, 1, 1, K)."""
        picked = chosen.gather(-1, key_blocks.expand(*chosen.shape[:3], key_blocks.shape[-1]))
        return picked | self.selection.always_visible(i, j)

    def reachable(self, i: Tensor, keys: int) -> Tensor:
        """(keys,) bool: the first `keys` keys some query at positions i (B, C) sees whatever the content."""
        j = self.k_pos[:, :keys]
        return self.selection.shown().blocks_visible(i.amin(-1, keepdim=True), i.amax(-1, keepdim=True), j, j).any(0)

    def columns(self, chosen: Tensor, i: Tensor, keys: int) -> Tensor:
        """(keys,) bool: the first `keys` keys some query of the chunk may see (any row, any head); i (B, C)."""
        hit = chosen.any(2).any(1).gather(1, self.block_of[:, :keys])  # (B, keys)
        return hit.any(0) | self.reachable(i, keys)

    def block_spans(self) -> Tensor | None:
        """(B, nb + 1) index of each block's first key (keys sorted by block in every row), else None."""
        if bool((self.block_of[:, 1:] < self.block_of[:, :-1]).any()):
            return None
        blocks = torch.arange(self.blocks + 1, device=self.block_of.device)
        return torch.searchsorted(self.block_of, blocks.expand(self.block_of.shape[0], -1).contiguous())


def _empty_parts_copy_a_filled_one(summary: dict[str, Tensor], filled: Tensor) -> dict[str, Tensor]:
    """Summaries (B, Hk, nb·parts, ...) where each part holding no real key takes the summary of its block's first
    filled part: a block's best part is then the best of its filled ones, with no mask over every query's scores."""
    if bool(filled.all()):
        return summary
    batch, blocks, parts = filled.shape
    first = filled.int().argmax(-1, keepdim=True)  # (B, nb, 1): a block's first filled part (0 if none)
    own = torch.arange(parts, device=filled.device).expand_as(filled)
    source = torch.where(filled, own, first) + torch.arange(blocks, device=filled.device)[:, None] * parts
    source = source.view(batch, 1, -1)  # (B, 1, nb·parts)
    return {
        name: value.gather(2, source.view(*source.shape, *[1] * (value.dim() - 3)).expand_as(value))
        for name, value in summary.items()
    }


SCORE_BITS = 12  # significant bits of a block score kept for the choice
_BITS_OF = {torch.float64: (torch.int64, 52), torch.float32: (torch.int32, 23)}  # same-width int, stored mantissa bits


def _coarse(scores: Tensor) -> Tensor:
    """Scores rounded to SCORE_BITS significant bits (half to even; infinities kept). The same token's key (and a
    query's product with it) differs in its last bits between a prefill and a decoding step (matmuls of other
    shapes); rounded, equal text ties in every schedule and the earlier block wins in all of them. A pair of such
    scores still splits when it straddles a rounding boundary, about 2^-10 of the time for a few ulps' difference.
    On the bits: the stored mantissa's low `drop` bits rounded away, a carry moving into the exponent."""
    if scores.dtype not in _BITS_OF:  # half precision keeps fewer bits than this already
        return scores
    integer, stored = _BITS_OF[scores.dtype]
    drop = stored + 1 - SCORE_BITS
    bits = scores.contiguous().view(integer)
    odd = (bits >> drop) & 1  # the last kept bit: a tie rounds towards it being even
    rounded = (bits + odd + ((1 << (drop - 1)) - 1)) & ~((1 << drop) - 1)
    return rounded.view(scores.dtype)


def _top_blocks(scores: Tensor, count: int) -> Tensor:
    """(..., k) the k best of each row of scores (..., nb) (-inf: not a candidate; -1 where fewer), ties at the
    k-th score going to the earlier blocks (identical blocks of repeated text choose alike in every schedule)."""
    k = min(count, scores.shape[-1])
    if k == 0:
        return torch.empty(*scores.shape[:-1], 0, dtype=torch.long, device=scores.device)
    kth = scores.topk(k, dim=-1).values[..., -1:]  # (..., 1) a top-k, not a sort: n/B blocks per query
    level = scores == kth
    need = k - (scores > kth).sum(-1, keepdim=True)
    picked = ((scores > kth) | (level & (level.cumsum(-1) <= need))) & (scores > float("-inf"))
    ids = picked.to(torch.uint8).topk(k, dim=-1).indices  # the picked ones (at most k), then unpicked
    return ids.masked_fill(~picked.gather(-1, ids), -1)


def expand_heads(seen: Tensor, heads: int) -> Tensor:
    """(B, Hs, ...) -> broadcastable to (B, H, ...): a key-value head's choice repeated for its query heads."""
    if seen.shape[1] in (1, heads):
        return seen
    return seen.repeat_interleave(heads // seen.shape[1], dim=1)


Modify = Callable[[list[Tensor], list[Tensor], Tensor, Tensor], tuple[list[Tensor], list[Tensor]]]


def selected_attention(
    q: Tensor, k: Tensor, v: Tensor, q_views: list[Tensor], call: AttentionCall, layer: LayerRuntime, modify: Modify,
) -> Tensor:
    """(B, Tq, H, dv): a selection layer on the blockwise backend; q, k un-rotated, the query views rotated (and
    scaled). A call of a few queries (decoding) rotates only the keys they may see, not the whole cache."""
    choice = BlockChoice(layer.plan.selection, k, call)
    few = q.shape[2] <= UNION_MAX
    spans = None if few or layer.plan.modifiers or call.dropout else choice.block_spans()
    if spans is None:
        k_views = None if few else layer.rotated_views(k, call.k_pos, 1)
        return _union_chunks(q, k, v, q_views, k_views, call, layer, modify, choice)
    return _near_then_blocks(q, v, q_views, layer.rotated_views(k, call.k_pos, 1), call, layer, choice, spans)


def _rows(batch: int, heads: int, keys: int) -> int:
    return max(min(16, ROWS), min(ROWS, SCORE_BUDGET // max(1, batch * heads * keys)))


def _pairs(call: AttentionCall, q0: int, q1: int, cols):
    """A chunk's pair grids: i (B, 1, C, 1), j (B, 1, 1, K), query and key indices, key realness."""
    i, j = call.q_pos[:, q0:q1][:, None, :, None], call.k_pos[:, cols][:, None, None, :]
    qi = torch.arange(q0, q1, device=i.device).view(1, 1, -1, 1) + call.q_offset
    kj = torch.arange(call.k_pos.shape[1], device=i.device)[cols].view(1, 1, 1, -1)
    real = None if call.key_padding is None else call.key_padding[:, cols][:, None, None, :]
    return i, j, qi, kj, real


def _union_chunks(q, k, v, q_views, k_views, call: AttentionCall, layer: LayerRuntime, modify: Modify, choice) -> Tensor:
    """Per chunk, every key some query of it may see (its window, the sinks and every block its queries chose);
    k_views None: each chunk rotates the keys it takes."""
    batch, heads, tq, _ = q.shape
    selection, h = layer.plan.selection, head_index(heads, q.device)
    per_query = getattr(selection, "sinks", 0) + getattr(selection, "local_window", 0) + 4 * selection.count * selection.block
    rows, outs = _rows(batch, heads, min(k.shape[2], per_query + ROWS)), []
    for q0 in range(0, tq, rows):
        q1 = min(tq, q0 + rows)
        chosen = choice.chosen(q[:, :, q0:q1], call.q_pos[:, q0:q1])  # (B, Hs, C, nb)
        cols = as_slice(choice.columns(chosen, call.q_pos[:, q0:q1], call.q_offset + q1).nonzero().flatten())
        i, j, qi, kj, real = _pairs(call, q0, q1, cols)
        seen = layer.visible(call, i, j, qi, kj, real) & expand_heads(
            choice.visible(chosen, i, j, choice.block_of[:, cols][:, None, None, :]), heads
        )
        ks = _key_views(layer, k[:, :, cols], call.k_pos[:, cols], call.q_pos[:, q0:q1]) if k_views is None else [
            kv[:, :, cols] for kv in k_views
        ]
        qs, ks = modify([qv[:, :, q0:q1] for qv in q_views], ks, i[:, 0, :, 0], j[:, 0, 0])
        scores = _scores(qs, ks, layer.select(i, j), call.scaling, layer.bias(h, i, j), call.softcap)
        probs = torch.softmax(scores.masked_fill(~seen, float("-inf")), dim=-1)
        probs = F.dropout(probs, p=call.dropout, training=call.dropout > 0)
        outs.append(_weighted(probs, v[:, :, cols]))
    return torch.cat(outs, dim=2).transpose(1, 2)


def _key_views(layer: LayerRuntime, k: Tensor, positions: Tensor, i: Tensor) -> list[Tensor]:
    """k (B, Hk, K, d) at `positions` (B, K) rotated for every view, for a chunk's queries at i (B, C): each view
    only at the columns some pair of the chunk may take it for (`view_needs`), zero elsewhere (scores no pair takes
    from that view). A decoding step's near view is then its window, not every key it may see."""
    i_lo, i_hi = i.amin(-1, keepdim=True), i.amax(-1, keepdim=True)  # (B, 1)
    needs = [need.any(0) for need in layer.view_needs(i_lo, i_hi, positions, positions)]  # per view (K,)
    return layer.rotated_views(k, positions, 1, needs)


def _scores(
    qs: list[Tensor], ks: list[Tensor], select: Tensor | None, scaling: float, bias: Tensor | None, cap: float | None
) -> Tensor:
    """(..., H, C, K) scores, each pair in its view, soft-capped (Gemma 2) before the bias; qs (..., H, C, d), ks
    (..., Hk, K, d) per view."""
    heads, rows, dim = qs[0].shape[-3:]
    kv_heads, dtype = ks[0].shape[-3], compute_dtype(qs[0])
    scores = None
    for n, (qv, kv) in enumerate(zip(qs, ks)):
        if select is not None and scores is not None and not bool((select == n).any()):
            continue
        grouped = qv.to(dtype).reshape(*qv.shape[:-3], kv_heads, -1, dim)  # (..., Hk, G*C, d): a group shares its keys
        view = (grouped @ kv.to(dtype).transpose(-1, -2)).reshape(*qv.shape[:-3], heads, rows, -1) * scaling
        scores = view if scores is None else torch.where(select == n, view, scores)
    scores = soft_cap(scores, cap)
    return scores if bias is None else scores + bias.to(dtype)


def _weighted(probs: Tensor, values: Tensor) -> Tensor:
    """(..., H, C, dv) = probs (..., H, C, K) @ values (..., Hk, K, dv), a group's heads sharing the values."""
    heads, rows, keys = probs.shape[-3:]
    kv_heads = values.shape[-3]
    out = probs.to(values.dtype).reshape(*probs.shape[:-3], kv_heads, -1, keys) @ values  # (..., Hk, G*C, dv)
    return out.reshape(*probs.shape[:-3], heads, rows, -1)


def _near_then_blocks(q, v, q_views, k_views, call: AttentionCall, layer: LayerRuntime, choice, spans) -> Tensor:
    """Window and sinks per chunk, then each chosen block with the queries that chose it; one softmax over both."""
    batch, heads, tq, _ = q.shape
    selection, h = layer.plan.selection, head_index(heads, q.device)
    rows = _rows(batch, heads, getattr(selection, "sinks", 0) + getattr(selection, "local_window", 0) + ROWS)
    parts, tops = [], []
    for q0 in range(0, tq, rows):
        q1 = min(tq, q0 + rows)
        tops.append(choice.top(q[:, :, q0:q1], call.q_pos[:, q0:q1]))  # (B, Hs, C, k)
        cols = as_slice(choice.reachable(call.q_pos[:, q0:q1], call.q_offset + q1).nonzero().flatten())
        parts.append(_near_part(q_views, k_views, v, call, layer, q0, q1, cols, h))
    lse, out = (torch.cat(part, 2) for part in zip(*parts))  # (B, H, Tq), (B, H, Tq, dv)
    out = _with_chosen_blocks(lse, out, torch.cat(tops, 2), q_views, k_views, v, call, layer, choice, spans)
    return out.to(q.dtype).transpose(1, 2)


def _near_part(q_views, k_views, v, call: AttentionCall, layer: LayerRuntime, q0: int, q1: int, cols, h):
    """(lse (B, H, C), out (B, H, C, dv)) of a chunk's pairs shown whatever the content (window, sinks). Through the
    fused kernel, columns every query of the chunk sees in one view (the window's middle, the sinks) go in a call
    with no mask, sliced from the keys in place; only the window's two edges are masked pair by pair."""
    qs = [qv[:, :, q0:q1] for qv in q_views]
    if layer.plan.biases or call.softcap is not None or not _fused_kernel_serves(*qs, *k_views, v):
        i, j, qi, kj, real = _pairs(call, q0, q1, cols)
        seen = layer.visible(call, i, j, qi, kj, real) & layer.plan.selection.always_visible(i, j)  # (B, 1, C, K)
        ks, vc = [kv[:, :, cols] for kv in k_views], v[:, :, cols]
        return _part(qs, ks, vc, seen, layer.select(i, j), call.scaling, layer.bias(h, i, j), call.softcap)
    whole, view = _whole_columns(call, layer, q0, q1, cols)
    kept = torch.arange(call.k_pos.shape[1], device=whole.device)[cols]  # (K,) the chunk's key indices
    edges = kept[~whole]  # (E,) key indices masked pair by pair
    i, j, qi, kj, real = _pairs(call, q0, q1, edges)
    seen = layer.visible(call, i, j, qi, kj, real) & layer.plan.selection.always_visible(i, j)  # (B, 1, C, E)
    select = layer.select(i, j)
    lses, outs = [], []
    for n, (qv, kv) in enumerate(zip(qs, k_views)):
        columns = kept[whole & (view == n)]
        runs = _runs(columns)
        for run in runs if len(runs) <= RUNS_MAX else [columns]:  # slices of the keys, or one gathered copy
            _attend_into(lses, outs, qv, kv[:, :, run], v[:, :, run], None, call.scaling)
        owned = seen if select is None else seen & (select == n)
        some = owned.flatten(0, -2).any(0).nonzero().flatten()
        if some.numel():
            where = as_slice(edges[some])
            _attend_into(lses, outs, qv, kv[:, :, where], v[:, :, where], owned[..., some], call.scaling)
    return _merged(lses, outs)


def _runs(columns: Tensor) -> list[slice]:
    """Sorted key indices (K,) as their contiguous runs (slices: views of the keys, not copies)."""
    if not columns.numel():
        return []
    breaks = (columns[1:] != columns[:-1] + 1).nonzero().flatten().tolist()
    bounds = [0, *[b + 1 for b in breaks], columns.numel()]
    ends = columns[[*bounds[:-1], *[b - 1 for b in bounds[1:]]]].tolist()
    starts, lasts = ends[: len(bounds) - 1], ends[len(bounds) - 1 :]
    return [slice(a, z + 1) for a, z in zip(starts, lasts)]


def _attend_into(lses: list, outs: list, q: Tensor, k: Tensor, v: Tensor, owned: Tensor | None, scale: float) -> None:
    """One fused call (lse_views.attend) on the pairs `owned` (B, 1, C, K; None: all), appended to lses and outs."""
    mask = None
    if owned is not None:
        mask = torch.zeros(owned.shape, dtype=q.dtype, device=q.device).masked_fill(~owned, float("-inf"))
    out, lse = lse_views.attend(q, k, v, mask, scale)
    lse = lse.to(compute_dtype(q))
    lses.append(lse if owned is None else lse.masked_fill(~owned.any(-1), float("-inf")))
    outs.append(out.to(compute_dtype(q)))


def _whole_columns(call: AttentionCall, layer: LayerRuntime, q0: int, q1: int, cols) -> tuple[Tensor, Tensor]:
    """Per key column of a chunk: is every pair of it shown, real and in one view (K,) bool, and that view (K,)."""
    i = call.q_pos[:, q0:q1]
    i_lo, i_hi, j = i.amin(-1, keepdim=True), i.amax(-1, keepdim=True), call.k_pos[:, cols]  # (B, 1), (B, 1), (B, K)
    kj = torch.arange(call.k_pos.shape[1], device=j.device)[cols]
    shown = layer.plan.selection.shown()
    whole = layer.blocks_all_visible(call, i_lo, i_hi, j, j) & shown.blocks_all_visible(i_lo, i_hi, j, j)
    if call.key_padding is not None:
        whole = whole & call.key_padding[:, cols]
    whole = whole.all(0) & (kj < call.q_offset + q0)  # before every query of the chunk: no diagonal
    needs = torch.stack([need.any(0) for need in layer.view_needs(i_lo, i_hi, j, j)])  # (V, K)
    return whole & (needs.sum(0) == 1), _first_view(needs)


def _first_view(needs: Tensor) -> Tensor:
    """(K,) the first view each column needs, needs (V, K) bool (V where none): the leading views it does not need."""
    return (~needs).int().cumprod(0).sum(0)


def _merged(lses: list[Tensor], outs: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Partial attentions (lse, out) merged by their log-sum-exps."""
    total = torch.logsumexp(torch.stack(lses), dim=0)  # (B, H, C)
    merged = sum(torch.nan_to_num(out * torch.exp(lse - total)[..., None]) for out, lse in zip(outs, lses))
    return total, merged


def _part(qs, ks, vc, seen, select, scaling: float, bias, cap: float | None) -> tuple[Tensor, Tensor]:
    """(lse (B, H, C), out (B, H, C, dv)) of the pairs `seen` (B, 1, C, K), each in its view, from explicit scores
    (autograd differentiates them); rows that see nothing have lse -inf and out 0."""
    scores = _scores(qs, ks, select, scaling, bias, cap).masked_fill(~seen, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.nan_to_num(torch.exp(scores - lse[..., None]))
    return lse, _weighted(probs, vc).to(probs.dtype)


def _fused_kernel_serves(*tensors: Tensor) -> bool:
    """The CPU kernel that returns log-sum-exps, for inference (a fine-tune takes the explicit scores: autograd)."""
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    return cpu_flash_attention_available() and tensors[0].device.type == "cpu" and not needs_grad


PAIR_BUDGET = 1 << 24  # elements of one batch of explicit pairs' scores (pair, head, key, channel)

class _HeadGroup:
    """The query heads that share a choice (`heads`), their key-value heads (`kvs`), in batch row b; the query views
    of those heads made contiguous once, on first use, so that a block's rows are one cheap gather."""

    def __init__(self, b: int, hs: int, share: int, groups: int, q_views, k_views, v):
        self.b, self.heads = b, slice(hs * share, (hs + 1) * share)
        self.kvs = slice(hs * share // groups, ((hs + 1) * share - 1) // groups + 1)
        self.q_views, self.k_views = q_views, [kv[b, self.kvs].contiguous() for kv in k_views]  # (kvs, Tk, d) each
        self.v, self._q = v[b, self.kvs].contiguous(), {}  # (kvs, Tk, dv)

    def q(self, view: int) -> Tensor:
        """(share, Tq, d): the group's queries in one view."""
        if view not in self._q:
            self._q[view] = self.q_views[view][self.b, self.heads].contiguous()
        return self._q[view]


class _Blocks:
    """Per block of batch row b: its key span (`starts`, `stops`), lowest and highest position, all keys real."""

    def __init__(self, choice: BlockChoice, call: AttentionCall, spans: Tensor, b: int):
        self.starts, self.stops = spans[b, :-1], spans[b, 1:]  # (nb,)
        self.width = int((self.stops - self.starts).max())
        block_of, pos = choice.block_of[b], call.k_pos[b]
        self.lo = pos.new_zeros(choice.blocks).scatter_reduce(0, block_of, pos, "amin", include_self=False)
        self.hi = pos.new_zeros(choice.blocks).scatter_reduce(0, block_of, pos, "amax", include_self=False)
        self.real = None
        if call.key_padding is not None:
            real = call.key_padding[b].int()
            self.real = real.new_ones(choice.blocks).scatter_reduce(0, block_of, real, "amin").bool()


def _with_chosen_blocks(lse, out, top, q_views, k_views, v, call: AttentionCall, layer, choice, spans) -> Tensor:
    """(B, H, Tq, dv): the near part's softmax (lse (B, H, Tq), out (B, H, Tq, dv)) merged with each query's chosen
    blocks (top (B, Hs, Tq, k)), pairs the window and sinks already gave left out. Per head group, the pairs
    (query, chosen block) that see the whole block in one view go through the fused kernel, one call per block on
    the rows that chose it; the pairs that see part of it (a block straddling the window's edge, padding) one
    masked call per block and view; with gradients or biases, explicit scores. A window of rows at a time, the
    whole-block pairs' parts are kept per (row, choice) and merged once, the others merged as they come, so memory
    stays that of the output plus one window's parts."""
    batch, heads = out.shape[:2]
    sharing = top.shape[1]
    share, groups = heads // sharing, heads // k_views[0].shape[1]
    fused = not layer.plan.biases and call.softcap is None and _fused_kernel_serves(*q_views, *k_views, v)
    scratch = _Scratch()  # lse and out are the caller's fresh tensors: each head group's rows are merged in place
    for b in range(batch):
        blocks = _Blocks(choice, call, spans, b)
        for hs in range(sharing):
            group = _HeadGroup(b, hs, share, groups, q_views, k_views, v)
            state = _RowSoftmax(lse[b, group.heads], out[b, group.heads])
            _chosen_pairs(state, group, blocks, top[b, hs], call, layer, fused, scratch)
    return out


class _RowSoftmax:
    """One head group's softmax being summed over parts, in place: per row the log-sum-exp (share, Tq) and the
    output (share, Tq, dv) so far (views of the call's, in its compute dtype)."""

    def __init__(self, lse: Tensor, out: Tensor):
        self.lse, self.out = lse, out

    def add(self, rows: Tensor, lse: Tensor, out: Tensor) -> None:
        """Merge a part's (lse (share, P), out (share, P, dv)) into the rows (P,), each row once; a part's empty
        rows have lse -inf (a row's own window part never does)."""
        old, lse = self.lse.index_select(1, rows), lse.to(self.lse.dtype)
        new = torch.logaddexp(old, lse)
        out = self.out.index_select(1, rows) * torch.exp(old - new)[..., None] + out * torch.exp(lse - new)[..., None]
        self.out.index_copy_(1, rows, out.to(self.out.dtype))
        self.lse.index_copy_(1, rows, new)


PARTS_BUDGET = 1 << 24  # elements of one row window's chosen-block outputs kept apart (share, rows, k, dv)


def _chosen_pairs(state: _RowSoftmax, group: _HeadGroup, blocks: _Blocks, top: Tensor, call, layer, fused: bool,
                  scratch: _Scratch):
    """Each query's chosen blocks, top (Tq, k) (-1: no choice), merged into `state`, a window of rows at a time."""
    share, _, dv = state.out.shape
    window = max(1, PARTS_BUDGET // (share * max(1, top.shape[1]) * dv))
    for r0 in range(0, top.shape[0], window):
        _window_pairs(state, group, blocks, top[r0 : r0 + window], r0, call, layer, fused, scratch)


def _window_pairs(state: _RowSoftmax, group: _HeadGroup, blocks: _Blocks, top: Tensor, r0: int, call, layer,
                  fused: bool, scratch: _Scratch):
    """The chosen blocks of rows r0.. (top (R, k)): the pairs that see a whole block in one view through the fused
    kernel, kept apart and merged once; the others merged as they come."""
    count = top.shape[1]
    chosen = top.flatten()  # (R·k,) pairs, query-major
    pair = (chosen >= 0).nonzero().flatten()
    chosen, rows, slot = chosen[pair], torch.div(pair, count, rounding_mode="floor") + r0, pair % count
    clean, view = _clean_pairs(call, layer, group.b, rows, chosen, blocks)
    if not fused:
        clean = torch.zeros_like(clean)
    if bool(clean.any()):
        parts = _WindowParts(state, r0, top.shape[0], count, scratch)
        for n in view[clean].unique().tolist():
            mine = (clean & (view == n)).nonzero().flatten()
            mine = mine[torch.argsort(chosen[mine], stable=True)]  # grouped by block
            _fused_blocks(parts, group, n, rows[mine], chosen[mine], blocks, call.scaling)
        parts.merge()
    rest = (~clean).nonzero().flatten()
    widest = group.v.shape[0] * blocks.width * max(group.v.shape[-1], group.k_views[0].shape[-1])
    for p in torch.split(rest, max(1, PAIR_BUDGET // widest)) if rest.numel() else ():
        if fused:
            _masked_pairs(state, group, rows[p], chosen[p], blocks, call, layer)
        else:
            _explicit_pairs(state, group, rows[p], chosen[p], slot[p], blocks, call, layer)


class _Scratch:
    """Buffers that one layer call's windows of rows reuse. A window's parts are tens of MB: a fresh tensor of that
    size is fresh pages from the OS, and faulting them in cost more than writing the parts (0.5-1.3 ms against
    0.1 ms a 1,820-row call)."""

    def __init__(self) -> None:
        self._flat: dict[str, Tensor] = {}

    def take(self, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """An uninitialised tensor of `shape` in `like`'s dtype and device; the previous one of this name is gone."""
        need, flat = math.prod(shape), self._flat.get(name)
        if flat is None or flat.numel() < need or flat.dtype != like.dtype or flat.device != like.device:
            flat = self._flat[name] = like.new_empty(need + need // 4)  # room for the next window's few more
        return flat[:need].view(shape)


class _WindowParts:
    """A window of rows' chosen-block parts, kept apart and merged into the window's running softmax in one step:
    each fused call appends its rows' parts as they come (a slice copy, no read-modify-write of the rows'
    outputs), and the merge sums every row's parts with one scatter per tensor."""

    def __init__(self, state: _RowSoftmax, r0: int, rows: int, count: int, scratch: _Scratch):
        share, _, dv = state.out.shape
        self.state, self.window, self.used = state, slice(r0, r0 + rows), 0
        self.lse = scratch.take("lse", (share, rows * count), state.lse)  # (share, R·k): at most k parts a row
        self.out = scratch.take("out", (share, rows * count, dv), state.out)  # (share, R·k, dv)
        index = state.lse.new_zeros((), dtype=torch.long)
        self.rows = scratch.take("rows", (rows * count,), index)  # (R·k,) each part's row in the window

    def add(self, rows: Tensor, lse: Tensor, out: Tensor) -> None:
        """A call's parts: rows (c,), lse (share, c), out (share, c, dv)."""
        at = slice(self.used, self.used + rows.numel())
        self.lse[:, at].copy_(lse)  # a bf16 call's output comes in bf16
        self.out[:, at].copy_(out)
        self.rows[at].copy_(rows - self.window.start)
        self.used = at.stop

    def merge(self) -> None:
        """Per row: lse = logsumexp(its window part, its parts), out their lse-weighted sum. A row's window part is
        never empty (it holds the query itself), so its lse is a finite start for the row's maximum."""
        state, used = self.state, self.used
        rows, lse, out = self.rows[:used], self.lse[:, :used], self.out[:, :used]  # (P,), (share, P), (share, P, dv)
        near = state.lse[:, self.window]  # (share, R)
        top = near.scatter_reduce(1, rows.expand_as(lse), lse, "amax")  # (share, R) each row's largest lse
        total = torch.exp(near - top).index_add_(1, rows, torch.exp(lse - top[:, rows])).log_() + top  # (share, R)
        out.mul_(torch.exp(lse - total[:, rows])[..., None])  # in place: the scratch's pages are already there
        state.out[:, self.window] = (state.out[:, self.window] * torch.exp(near - total)[..., None]).index_add_(
            1, rows, out)
        state.lse[:, self.window] = total


def _fused_blocks(into, group: _HeadGroup, n: int, rows: Tensor, chosen: Tensor, blocks, scale,
                  owned: Tensor | None = None) -> None:
    """Pairs (rows, chosen) grouped by block, each through one fused call per block in view n: the whole block, or
    the keys `owned` (P, Wb) of it; each call's rows added `into` a running softmax."""
    q = group.q(n)  # (share, Tq, d)
    counts = torch.bincount(chosen, minlength=blocks.starts.numel()).tolist()
    starts, stops = blocks.starts.tolist(), blocks.stops.tolist()
    first = 0
    for block, c in enumerate(counts):
        if not c:
            continue
        cols, mask, these = slice(starts[block], stops[block]), None, rows[first : first + c]
        if owned is not None:
            mask = torch.zeros(1, 1, c, cols.stop - cols.start, dtype=q.dtype, device=q.device)
            mask.masked_fill_(~owned[first : first + c, : cols.stop - cols.start], float("-inf"))
        out, lse = lse_views.attend(q.index_select(1, these)[None], group.k_views[n][None, :, cols],
                                    group.v[None, :, cols], mask, scale)
        into.add(these, lse[0], out[0])
        first += c


def _clean_pairs(call: AttentionCall, layer: LayerRuntime, b: int, rows: Tensor, chosen: Tensor, blocks: _Blocks):
    """Per pair (query rows[p], block chosen[p]): does the query see every key of the block, none of them already
    shown (window, sinks), all in one view (P,) bool, and that view (P,)."""
    i = call.q_pos[b, rows][:, None]  # (P, 1)
    j_lo, j_hi = blocks.lo[chosen][:, None], blocks.hi[chosen][:, None]
    shown = layer.plan.selection.shown()
    clean = layer.blocks_all_visible(call, i, i, j_lo, j_hi) & ~shown.blocks_visible(i, i, j_lo, j_hi)
    clean = clean[:, 0] & (blocks.stops[chosen] - 1 < rows + call.q_offset)  # every key before the query by index
    if blocks.real is not None:
        clean = clean & blocks.real[chosen]
    needs = torch.stack([need[:, 0] for need in layer.view_needs(i, i, j_lo, j_hi)])  # (V, P)
    return clean & (needs.sum(0) == 1), _first_view(needs)


def _pair_grids(group: _HeadGroup, rows: Tensor, chosen: Tensor, blocks: _Blocks, call, layer):
    """Per pair (rows, chosen): its block's key indices (P, Wb, padded to the widest block), the pairs of them seen
    and not already shown by the window and sinks (P, 1, 1, Wb), and the pair grids i (P, 1, 1, 1), j (P, 1, 1, Wb)."""
    b, pairs = group.b, rows.numel()
    keys = blocks.starts[chosen][:, None] + torch.arange(blocks.width, device=rows.device)  # (P, Wb)
    inside = keys < blocks.stops[chosen][:, None]
    keys = keys.clamp(max=call.k_pos.shape[1] - 1)
    i = call.q_pos[b, rows].view(pairs, 1, 1, 1)
    j = call.k_pos[b, keys].view(pairs, 1, 1, -1)
    qi, kj = (rows + call.q_offset).view(pairs, 1, 1, 1), keys.view(pairs, 1, 1, -1)
    real = None if call.key_padding is None else call.key_padding[b, keys].view(pairs, 1, 1, -1)
    seen = layer.visible(call, i, j, qi, kj, real) & ~layer.plan.selection.always_visible(i, j)
    return keys, seen & inside.view(pairs, 1, 1, -1), i, j


def _masked_pairs(state: _RowSoftmax, group: _HeadGroup, rows: Tensor, chosen: Tensor, blocks: _Blocks, call, layer):
    """Pairs (rows, chosen) that see part of their block, or it in several views: per view, the pairs that see some
    of it in that view, one masked fused call per block."""
    _, seen, i, j = _pair_grids(group, rows, chosen, blocks, call, layer)
    select = layer.select(i, j)
    for n in range(len(group.q_views)):
        owned = (seen if select is None else seen & (select == n))[:, 0, 0]  # (P, Wb)
        some = owned.any(-1).nonzero().flatten()
        some = some[torch.argsort(chosen[some], stable=True)]
        if some.numel():
            _fused_blocks(state, group, n, rows[some], chosen[some], blocks, call.scaling, owned[some])


def _explicit_pairs(state: _RowSoftmax, group: _HeadGroup, rows: Tensor, chosen: Tensor, slot: Tensor,
                    blocks: _Blocks, call, layer):
    """Pairs (rows, chosen) from explicit scores over each block's keys, the pairs the window and sinks gave left
    out; autograd differentiates them. Merged one choice slot at a time (`slot`: a row has each slot once)."""
    keys, seen, i, j = _pair_grids(group, rows, chosen, blocks, call, layer)
    qs = [group.q(n)[:, rows].transpose(0, 1)[:, :, None] for n in range(len(group.q_views))]  # (P, share, 1, d)
    ks = [kv[:, keys].transpose(0, 1) for kv in group.k_views]  # (P, kvs, Wb, d) each
    vc = group.v[:, keys].transpose(0, 1)  # (P, kvs, Wb, dv)
    h = torch.arange(group.heads.start, group.heads.stop, device=rows.device).view(-1, 1, 1)
    lse, out = _part(qs, ks, vc, seen, layer.select(i, j), call.scaling, layer.bias(h, i, j), call.softcap)
    lse, out = lse[..., 0].transpose(0, 1), out[:, :, 0].transpose(0, 1)  # (share, P), (share, P, dv)
    for s in slot.unique().tolist():
        mine = (slot == s).nonzero().flatten()
        state.add(rows[mine], lse[:, mine], out[:, mine])
