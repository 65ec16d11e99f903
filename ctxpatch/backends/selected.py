"""A selection's choices for one attention call (DESIGN.md, "Selection"), and the blockwise backend's way of
attending under them.

`BlockChoice` makes per-block summaries of the keys once per call and, per query chunk, the blocks each query (or
each head group) chooses; dense, blockwise and flex all ask it, so they see the same choices.

The blockwise path computes a layer under a selection in time linear in the length: per query chunk, the pairs
seen whatever the content (window, sinks) against only those keys; then, per chosen key block, the queries that
chose it against only its keys, merged into the chunks' running softmax (max, sum, weighted values), so a query
costs S + W + k·B products, not n. A call with a few queries (decoding, short pieces) takes every block its
queries chose at once instead (`UNION_MAX`).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..kinds import Selection
from ..plan import AttentionCall, LayerRuntime
from .._compat.torch import cpu_flash_attention_available
from . import lse_views
from .common import as_slice, column_count, compute_dtype, head_index, soft_cap

UNION_MAX = 32  # calls with at most this many queries attend to the union of their chosen blocks in one go
ROWS = 256  # queries of a chunk
SCORE_BUDGET = 1 << 25  # elements of one chunk's score tensor


class BlockChoice:
    """The blocks of one call's keys and what each query chooses among them (`top`, `chosen`)."""

    def __init__(self, selection: Selection, k: Tensor, call: AttentionCall):
        self.selection, self.kv_heads, self.k_pos = selection, k.shape[1], call.k_pos
        self.native_window = call.native_window
        real = call.key_padding if call.key_padding is not None else torch.ones_like(call.k_pos, dtype=torch.bool)
        self.block_of = torch.div(call.k_pos, selection.block, rounding_mode="floor").long().clamp(min=0)  # (B, Tk)
        self.blocks = int(self.block_of.max()) + 1
        counts = torch.zeros(real.shape[0], self.blocks, device=k.device).scatter_add_(1, self.block_of, real.float())
        self.occupied = counts > 0  # (B, nb): blocks holding a real key
        self.summary = selection.summarize(k.to(compute_dtype(k)), self.block_of, real, self.blocks)

    def top(self, q: Tensor, i: Tensor) -> Tensor:
        """(B, Hs, C, k) the blocks each query chooses, best first, -1 where it has fewer candidates; q (B, H, C, d)
        un-rotated, i (B, C) its positions. Hs is H, Hk or 1 as the selection's `per` says."""
        batch, heads, rows, dim = q.shape
        grouped = q.to(compute_dtype(q)).view(batch, self.kv_heads, heads // self.kv_heads, rows, dim)  # (B, Hk, G, C, d)
        scores = self.selection.score(grouped, self.summary)  # (B, Hk, G, C, nb)
        per = self.selection.sharing
        if per == "head":
            scores = scores.reshape(batch, heads, rows, self.blocks)  # (B, H, C, nb)
        else:
            scores = scores.sum(2) if per == "kv_head" else scores.sum((1, 2))[:, None]  # (B, Hk or 1, C, nb)
        blocks = torch.arange(self.blocks, device=q.device)
        allowed = self.selection.candidates(i[:, None, :, None], blocks) & self.occupied[:, None, None, :]
        if self.native_window is not None:  # the model's own window wins: choose among blocks wholly inside it
            allowed &= blocks * self.selection.block > i[:, None, :, None] - self.native_window
        scores = scores.masked_fill(~allowed, float("-inf"))
        # a stable sort: equal scores (identical blocks of repeated text) go to the earlier block, in every schedule
        order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., : self.selection.count]
        return order.masked_fill(scores.gather(-1, order) == float("-inf"), -1)

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


def expand_heads(seen: Tensor, heads: int) -> Tensor:
    """(B, Hs, ...) -> broadcastable to (B, H, ...): a key-value head's choice repeated for its query heads."""
    if seen.shape[1] in (1, heads):
        return seen
    return seen.repeat_interleave(heads // seen.shape[1], dim=1)


Modify = Callable[[list[Tensor], list[Tensor], Tensor, Tensor], tuple[list[Tensor], list[Tensor]]]


def selected_attention(
    q: Tensor, k: Tensor, v: Tensor, q_views: list[Tensor], k_views: list[Tensor], call: AttentionCall,
    layer: LayerRuntime, modify: Modify,
) -> Tensor:
    """(B, Tq, H, dv): a selection layer on the blockwise backend; q, k un-rotated, the views rotated (and scaled)."""
    choice = BlockChoice(layer.plan.selection, k, call)
    spans = None if q.shape[2] <= UNION_MAX or layer.plan.modifiers or call.dropout else choice.block_spans()
    if spans is None:
        return _union_chunks(q, k, v, q_views, k_views, call, layer, modify, choice)
    return _near_then_blocks(q, v, q_views, k_views, call, layer, choice, spans)


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
    """Per chunk, every key some query of it may see (its window, the sinks and every block its queries chose)."""
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
        qs, ks = modify([qv[:, :, q0:q1] for qv in q_views], [kv[:, :, cols] for kv in k_views], i[:, 0, :, 0], j[:, 0, 0])
        scores = _scores(qs, ks, layer.select(i, j), call.scaling, layer.bias(h, i, j), call.softcap)
        probs = torch.softmax(scores.masked_fill(~seen, float("-inf")), dim=-1)
        probs = F.dropout(probs, p=call.dropout, training=call.dropout > 0)
        outs.append(_weighted(probs, v[:, :, cols]))
    return torch.cat(outs, dim=2).transpose(1, 2)


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
    state = _Softmax(*(torch.cat(part, 2) for part in zip(*parts)))  # (B, H, Tq), (B, H, Tq, dv)
    _add_chosen_blocks(state, torch.cat(tops, 2), q_views, k_views, v, call, layer, spans)
    return state.out.to(q.dtype).transpose(1, 2)


def _near_part(q_views, k_views, v, call: AttentionCall, layer: LayerRuntime, q0: int, q1: int, cols, h):
    """(lse (B, H, C), out (B, H, C, dv)) of a chunk's pairs shown whatever the content (window, sinks). Through the
    fused kernel, columns every query of the chunk sees in one view (the window's middle) go in a call with no mask;
    only the window's two edges and the sinks are masked pair by pair."""
    qs, ks, vc = [qv[:, :, q0:q1] for qv in q_views], [kv[:, :, cols] for kv in k_views], v[:, :, cols]
    if layer.plan.biases or call.softcap is not None or not _fused_kernel_serves(*qs, *ks, vc):
        i, j, qi, kj, real = _pairs(call, q0, q1, cols)
        seen = layer.visible(call, i, j, qi, kj, real) & layer.plan.selection.always_visible(i, j)  # (B, 1, C, K)
        return _part(qs, ks, vc, seen, layer.select(i, j), call.scaling, layer.bias(h, i, j), call.softcap)
    whole, view = _whole_columns(call, layer, q0, q1, cols)
    exact = as_slice((~whole).nonzero().flatten())
    kept = torch.arange(call.k_pos.shape[1], device=whole.device)[cols]  # (K,) the chunk's key indices
    i, j, qi, kj, real = _pairs(call, q0, q1, kept[exact])
    seen = layer.visible(call, i, j, qi, kj, real) & layer.plan.selection.always_visible(i, j)  # (B, 1, C, E)
    select = layer.select(i, j)
    lses, outs = [], []
    for n, (qv, kv) in enumerate(zip(qs, ks)):
        mine = as_slice((whole & (view == n)).nonzero().flatten())
        if column_count(mine, whole.numel()):
            _attend_into(lses, outs, qv, kv[:, :, mine], vc[:, :, mine], None, call.scaling)
        owned = seen if select is None else seen & (select == n)
        some = as_slice(owned.flatten(0, -2).any(0).nonzero().flatten())
        owned = owned[..., some]
        if owned.shape[-1]:
            where = as_slice(torch.arange(whole.numel(), device=whole.device)[exact][some])
            _attend_into(lses, outs, qv, kv[:, :, where], vc[:, :, where], owned, call.scaling)
    return _merged(lses, outs)


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
    return whole & (needs.sum(0) == 1), needs.int().argmax(0)


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


class _Softmax:
    """A softmax being summed over parts: per row the log-sum-exp so far and the output so far."""

    def __init__(self, lse: Tensor, out: Tensor):
        self.lse, self.out = lse, out

    def add(self, index: tuple, lse: Tensor, out: Tensor) -> None:
        """Merge a part's (lse, out) into the rows at `index` (a part's empty rows have lse -inf)."""
        old = self.lse[index]  # never -inf: every query sees itself in the window part
        new = torch.logaddexp(old, lse)
        self.out[index] = self.out[index] * torch.exp(old - new)[..., None] + out * torch.exp(lse - new)[..., None]
        self.lse[index] = new


def _add_chosen_blocks(state: _Softmax, top: Tensor, q_views, k_views, v, call: AttentionCall, layer, spans) -> None:
    """Each chosen block against the queries that chose it: pairs outside what the window and sinks already gave."""
    heads, kv_heads, sharing = q_views[0].shape[1], k_views[0].shape[1], top.shape[1]
    share, groups = heads // sharing, heads // kv_heads  # query heads per choice, per key-value head
    positions = torch.arange(top.shape[2], device=top.device).repeat_interleave(top.shape[3])  # (Tq * k,)
    for b in range(top.shape[0]):
        for hs in range(sharing):
            chosen = top[b, hs].flatten()  # (Tq * k,) block ids, -1 for none
            keep = chosen >= 0
            chosen, rows = chosen[keep], positions[keep]
            order = torch.argsort(chosen, stable=True)
            counts = torch.bincount(chosen, minlength=spans.shape[1] - 1).tolist()
            blocks = [n for n, c in enumerate(counts) if c]
            heads_here = slice(hs * share, (hs + 1) * share)
            kvs = slice(hs * share // groups, ((hs + 1) * share - 1) // groups + 1)
            for block, rows_of_block in zip(blocks, torch.split(rows[order], [counts[n] for n in blocks])):
                cols = slice(int(spans[b, block]), int(spans[b, block + 1]))
                _add_block(state, b, heads_here, kvs, rows_of_block, cols, q_views, k_views, v, call, layer)


def _add_block(state, b: int, heads: slice, kvs: slice, rows: Tensor, cols: slice, q_views, k_views, v, call, layer):
    """One block's keys (cols) against the queries (rows) of the heads that chose it. Through the fused kernel, rows
    that see every key of the block in one view (the block is wholly outside their window) go unmasked."""
    qs = [qv[b : b + 1, heads][:, :, rows] for qv in q_views]  # (1, share, n, d)
    ks, vc = [kv[b : b + 1, kvs, cols] for kv in k_views], v[b : b + 1, kvs, cols]  # (1, kv heads of those, Bk, d)
    if not layer.plan.biases and call.softcap is None and _fused_kernel_serves(*qs, *ks, vc):
        clean, view = _clean_rows(call, layer, b, rows, cols)
        for n in range(len(qs)):
            mine = (clean & (view == n)).nonzero().flatten()
            if mine.numel():
                out, lse = lse_views.attend(qs[n][:, :, mine], ks[n], vc, None, call.scaling)
                state.add((b, heads, rows[mine]), lse[0].to(state.lse.dtype), out[0].to(state.out.dtype))
        rest = (~clean).nonzero().flatten()
        rows, qs = rows[rest], [qv[:, :, rest] for qv in qs]
        if not rows.numel():
            return
    i = call.q_pos[b, rows].view(1, 1, -1, 1)  # (1, 1, n, 1)
    j = call.k_pos[b, cols].view(1, 1, 1, -1)  # (1, 1, 1, Bk)
    qi = (rows + call.q_offset).view(1, 1, -1, 1)
    kj = torch.arange(cols.start, cols.stop, device=rows.device).view(1, 1, 1, -1)
    real = None if call.key_padding is None else call.key_padding[b, cols].view(1, 1, 1, -1)
    seen = layer.visible(call, i, j, qi, kj, real) & ~layer.plan.selection.always_visible(i, j)  # (1, 1, n, Bk)
    if not bool(seen.any()):
        return
    h = torch.arange(heads.start, heads.stop, device=rows.device).view(-1, 1, 1)
    lse, out = _part(qs, ks, vc, seen, layer.select(i, j), call.scaling, layer.bias(h, i, j), call.softcap)
    state.add((b, heads, rows), lse[0], out[0])


def _clean_rows(call: AttentionCall, layer: LayerRuntime, b: int, rows: Tensor, cols: slice) -> tuple[Tensor, Tensor]:
    """Per row (query) of a block's group: does it see every key of the block, none of them already shown (window,
    sinks), all in one view (n,) bool, and that view (n,)."""
    i = call.q_pos[b, rows][:, None]  # (n, 1)
    j = call.k_pos[b, cols]
    j_lo, j_hi = j.amin().view(1, 1), j.amax().view(1, 1)
    shown = layer.plan.selection.shown()
    clean = layer.blocks_all_visible(call, i, i, j_lo, j_hi) & ~shown.blocks_visible(i, i, j_lo, j_hi)
    clean = clean[:, 0] & (cols.stop - 1 < rows + call.q_offset)  # every key before the query by index too
    if call.key_padding is not None:
        clean = clean & call.key_padding[b, cols].all()
    needs = torch.stack([need[:, 0] for need in layer.view_needs(i, i, j_lo, j_hi)])  # (V, n)
    return clean & (needs.sum(0) == 1), needs.int().argmax(0)
