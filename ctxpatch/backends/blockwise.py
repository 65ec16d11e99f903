"""`blockwise`: linear-memory attention on CPU and GPU.

Walks query chunks; for each, keeps only the key blocks the layer's mask may make visible (so a
window of W costs O(n W)), and calls PyTorch's fused SDPA kernel with a boolean mask for the chunk.
Biases are built per chunk, or, when every bias splits into q/k features (ALiBi, Sandwich) and
the dtype is fp32/fp64, folded into the fused kernel as extra dimensions (DESIGN.md, "What
measurement says about cost"). A position rule with several views (ReRoPE, SelfExtend) stays on
the fused kernel too: q carries every view side by side, and each key block enters once per view
it may need, zero outside its view's slot, masked to the pairs that view owns - so a key block
costs one extra product only where both views meet. No tensor of size heads x n x n is allocated.
Which keys a chunk takes and how its pairs are masked depends on positions only: the first layer of a
forward plans each multi-view chunk and the next layers reuse the plan (`ChunkPlanner`, `plan.ForwardShare`).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..plan import AttentionCall, LayerRuntime
from . import lse_views
from .common import as_slice, column_count, compute_dtype, head_index, soft_cap
from .selected import selected_attention

BLOCK = 256  # rows of a query chunk and size of a key block
# A multi-view rule makes a few fused calls per view and chunk, so its per-call overhead is paid once per view;
# larger chunks and blocks pay it less often, and only the few blocks where views meet get dearer.
MULTI_VIEW_SCALE = 2
SCORE_BUDGET = 1 << 25  # elements of one chunk's float mask (128 MiB in fp32)
_FAR = torch.iinfo(torch.long).max // 4


class KeyBlocks:
    """Position range of every key block, to choose the blocks a query chunk may see."""

    def __init__(self, call: AttentionCall, block: int):
        batch, tk = call.k_pos.shape
        self.block, n = block, math.ceil(tk / block)
        real = call.key_padding if call.key_padding is not None else torch.ones_like(call.k_pos, dtype=torch.bool)
        lo = F.pad(torch.where(real, call.k_pos, _FAR), (0, n * block - tk), value=_FAR)
        hi = F.pad(torch.where(real, call.k_pos, -_FAR), (0, n * block - tk), value=-_FAR)
        self.lo = lo.view(batch, n, block).amin(-1)  # (B, n)
        self.hi = hi.view(batch, n, block).amax(-1)

    def select(self, layer: LayerRuntime, call: AttentionCall, q0: int, q1: int) -> Tensor | slice:
        """Key indices the queries q0..q1-1 may see: a slice when contiguous, else an index tensor."""
        last = call.q_offset + q1 - 1  # index of the chunk's last query among the keys
        n = last // self.block + 1
        i = call.q_pos[:, q0:q1]
        ok = layer.blocks_visible(
            call, i.amin(-1, keepdim=True), i.amax(-1, keepdim=True), self.lo[:, :n], self.hi[:, :n]
        ).any(0).cpu()  # (n,): which blocks is a shape decision, so one transfer (none on CPU), then host work
        ok[(call.q_offset + q0) // self.block :] = True  # the chunk's own blocks: a query sees itself
        ids = ok.nonzero().flatten()
        if ids[-1] - ids[0] + 1 == ids.numel():
            return slice(int(ids[0]) * self.block, last + 1)
        idx = (ids[:, None] * self.block + torch.arange(self.block)).flatten()
        return idx[idx <= last].to(call.k_pos.device)

    def classify(self, layer: LayerRuntime, call: AttentionCall, i: Tensor, kj: Tensor, first: int):
        """Per key column of a chunk: (is every pair visible but for padding, the one view its block
        uses or -1 when both may). Decided per key block, so only the blocks where the answer changes
        inside the block are evaluated pair by pair. `first`: index of the chunk's first query."""
        blocks, column_block = kj.div(self.block, rounding_mode="floor").unique(return_inverse=True)
        i_lo, i_hi = i.amin(-1, keepdim=True), i.amax(-1, keepdim=True)
        lo, hi = self.lo[:, blocks], self.hi[:, blocks]
        before = (blocks + 1) * self.block - 1 < first  # strictly before every query: no diagonal inside
        full = layer.blocks_all_visible(call, i_lo, i_hi, lo, hi).all(0) & before
        if len(layer.views()) == 1:
            return full[column_block], None
        needs = torch.stack([need.any(0) for need in layer.view_needs(i_lo, i_hi, lo, hi)])  # (V, blocks)
        view = torch.where(needs.sum(0) == 1, needs.int().argmax(0), -1)
        return full[column_block], view[column_block]


def _is_plain_causal(call: AttentionCall, layer: LayerRuntime, tq: int, tk: int) -> bool:
    return (
        len(layer.views()) == 1
        and not layer.has_mask(call)
        and not layer.plan.biases
        and not layer.plan.modifiers
        and (tq == tk or tq == 1)
        and (call.key_padding is None or bool(call.key_padding.all()))
    )


def _chunk_rows(batch: int, heads: int, tk: int, layer: LayerRuntime, float_mask: bool, block: int) -> int:
    if not float_mask:
        return block
    keys = len(layer.views()) * min(tk, layer.max_keys(tk) + 2 * block)
    return max(16, min(block, SCORE_BUDGET // max(1, batch * heads * keys)))


def blockwise_attention(
    q: Tensor, k: Tensor, v: Tensor, call: AttentionCall, layer: LayerRuntime, block: int | None = None
) -> Tensor:
    block = block or BLOCK * (MULTI_VIEW_SCALE if len(layer.views()) > 1 else 1)
    batch, heads, tq, _ = q.shape
    kv_heads, tk, dv = k.shape[1], k.shape[2], v.shape[-1]
    layer.prepare(call)
    q_views = layer.rotated_views(q, call.q_pos, 0)
    kappa = layer.kappa(call.q_pos)  # (B, Tq)
    if kappa is not None:
        q_views = [qv * kappa[:, None, :, None].to(qv.dtype) for qv in q_views]
    if layer.plan.selection is not None:  # rotates the keys itself: a decoding step only those it attends to
        return selected_attention(q, k, v, q_views, call, layer, functools.partial(_modified, layer))
    k_views = layer.rotated_views(k, call.k_pos, 1)
    if call.softcap is None and _is_plain_causal(call, layer, tq, tk):
        out = F.scaled_dot_product_attention(
            q_views[0], k_views[0], v, is_causal=tq > 1, dropout_p=call.dropout, scale=call.scaling,
            enable_gqa=heads != kv_heads,
        )
        return out.transpose(1, 2)

    capped = call.softcap is not None  # a nonlinearity on the scores: no fused kernel applies it
    fold = layer.biases_fold and q.dtype in (torch.float32, torch.float64) and not capped
    float_mask = (bool(layer.plan.biases) and not fold) or capped
    rows = _chunk_rows(batch, heads, tk, layer, float_mask, block)
    h = head_index(heads, q.device)
    planner = ChunkPlanner(call, layer, block)
    if capped:
        outs = []
        for q0 in range(0, tq, rows):
            chunk = planner.chunk(q0, min(tq, q0 + rows))
            qs = [qv[:, :, q0 : q0 + rows] for qv in q_views]
            qs, ks = _modified(layer, qs, [kv[:, :, chunk.cols] for kv in k_views], chunk.i, chunk.j)
            outs.append(_scored_chunk(qs, ks, v[:, :, chunk.cols], chunk, h, call, layer))
    elif len(q_views) > 1 and lse_views.available(q, k, v, call, layer):
        outs = _view_chunks(q_views, k_views, v, call, layer, planner, rows, h)
    else:
        outs = []
        for q0 in range(0, tq, rows):
            chunk = planner.chunk(q0, min(tq, q0 + rows))
            qs = [qv[:, :, q0 : q0 + rows] for qv in q_views]
            qs, ks = _modified(layer, qs, [kv[:, :, chunk.cols] for kv in k_views], chunk.i, chunk.j)
            outs.append(_fused_chunk(qs, ks, v[:, :, chunk.cols], chunk, h, call, layer, fold))
    return torch.cat([out[..., :dv] for out in outs], dim=2).transpose(1, 2)


def _view_chunks(q_views, k_views, v, call: AttentionCall, layer: LayerRuntime, planner, rows: int, h) -> list[Tensor]:
    """Each chunk of a multi-view rule through its planned calls (lse_views), the plans shared between layers."""
    plans, tq, outs = planner.shared_plans(rows), call.q_pos.shape[1], []
    for q0 in range(0, tq, rows):
        if q0 not in plans:
            plans[q0] = planner.view_calls(q0, min(tq, q0 + rows))
        cols, calls = plans[q0]
        i, j = call.q_pos[:, q0 : q0 + rows], call.k_pos[:, cols]  # (B, Qc), (B, Kr)
        qs, ks = _modified(layer, [qv[:, :, q0 : q0 + rows] for qv in q_views], [kv[:, :, cols] for kv in k_views], i, j)
        bias = layer.bias(h, i[:, None, :, None], j[:, None, None, :]) if layer.plan.biases else None
        outs.append(lse_views.views_chunk(qs, ks, v[:, :, cols], calls, bias, call.scaling))
    return outs


def _modified(layer: LayerRuntime, qs: list[Tensor], ks: list[Tensor], i: Tensor, j: Tensor):
    """A chunk's query and key views under the layer's modifiers (xpos); i (B, Qc), j (B, Kr) their positions."""
    if not layer.plan.modifiers:
        return qs, ks
    centre = i.amax(-1, keepdim=True)  # (B, 1): the chunk's last query keeps every factor <= ~1
    return layer.modify(qs, i, centre, 0), layer.modify(ks, j, centre, 1)


class ChunkPlanner:
    """Which keys each query chunk takes and how its pairs are masked: positions only, never q, k or v."""

    def __init__(self, call: AttentionCall, layer: LayerRuntime, block: int):
        self.call, self.layer, self.block = call, layer, block

    @functools.cached_property
    def keys(self) -> KeyBlocks:
        return KeyBlocks(self.call, self.block)

    @functools.cached_property
    def narrow(self) -> bool:
        """Every position fits int32? The pair grids are a chunk's costliest elementwise work: int32 halves their
        traffic (one device sync per call)."""
        return not self.call.k_pos.is_floating_point() and bool(self.call.k_pos.abs().max() < 2**30)

    def chunk(self, q0: int, q1: int) -> Chunk:
        cols = self.keys.select(self.layer, self.call, q0, q1)
        return Chunk(self.call, self.layer, self.keys, q0, q1, cols, self.narrow)

    def view_calls(self, q0: int, q1: int) -> tuple[Tensor | slice, list[lse_views.ViewCall]]:
        """A multi-view chunk's key columns and its fused calls (lse_views.plan_calls)."""
        chunk = self.chunk(q0, q1)
        return chunk.cols, lse_views.plan_calls(len(self.layer.views()), q1 - q0, chunk.shape[-1], chunk, self.layer)

    def shared_plans(self, rows: int) -> dict:
        """Chunk start -> view_calls, shared by every layer of the forward that plans alike (same rule, mask,
        positions, padding and chunking): the later layers skip the planning. A call without a share gets its own."""
        call, layer = self.call, self.layer
        if call.share is None:
            return {}
        key = (layer.plan.position, layer.plan.mask, call.native_window, call.q_pos, call.k_pos, call.key_padding,
               self.block, rows)
        return call.share.get(key, layer.plan.index, dict)


class Chunk:
    """Positions, indices and visibility of one query chunk against its selected keys.

    Columns of key blocks that are visible as a whole, real in every row and in one view need no
    mask (`whole`); the others (`exact`) are checked pair by pair, and only they.
    """

    def __init__(self, call: AttentionCall, layer: LayerRuntime, keys: KeyBlocks, q0: int, q1: int, cols, narrow: bool):
        # (Kr,) the selected keys' indices: an index tensor already is one; a slice spans only its own range
        span = None if isinstance(cols, Tensor) else cols.indices(call.k_pos.shape[1])
        kj = cols if span is None else torch.arange(*span, device=call.k_pos.device)
        self.cols = cols
        self.i, self.j = call.q_pos[:, q0:q1], call.k_pos[:, cols]  # (B, Qc), (B, Kr)
        if narrow:  # every position fits int32
            self.i, self.j = self.i.int(), self.j.int()
        self.pair_i, self.pair_j = self.i[:, None, :, None], self.j[:, None, None, :]
        full, self.view = keys.classify(layer, call, self.i, kj, call.q_offset + q0)
        self.key_real = None if call.key_padding is None else call.key_padding[:, cols][:, None, None, :]  # (B, 1, 1, Kr)
        self.whole = full if self.key_real is None else full & self.key_real.all(0).flatten()
        if self.view is not None:
            self.whole = self.whole & (self.view >= 0)
        self.exact_index = (~self.whole).nonzero().flatten()  # (E,) columns checked pair by pair
        self.exact = as_slice(self.exact_index)
        self.shape = (self.i.shape[0], 1, self.i.shape[1], kj.numel())
        self.seen_exact = torch.ones(self.shape[:-1] + (0,), dtype=torch.bool, device=kj.device)  # (B, 1, Qc, E)
        if self.exact_index.numel():
            qi = torch.arange(q0, q1, device=kj.device).view(1, 1, -1, 1) + call.q_offset
            real = None if self.key_real is None else self.key_real[..., self.exact]
            self.seen_exact = layer.visible(
                call, self.pair_i, self.pair_j[..., self.exact], qi, kj[self.exact].view(1, 1, 1, -1), real
            )

    @property
    def seen(self) -> Tensor:
        """(B, 1, Qc, Kr) visibility of every pair of the chunk."""
        seen = torch.ones(self.shape, dtype=torch.bool, device=self.i.device)
        seen[..., self.exact] = self.seen_exact
        return seen

    def view_columns(self, layer: LayerRuntime, n: int) -> tuple[Tensor | slice, Tensor]:
        """Columns view n may own, and which pairs of them it does own (B, 1, Qc, those columns)."""
        cols = as_slice(((self.view == n) | (self.view < 0)).nonzero().flatten())
        owned = self.seen[..., cols]
        mixed = (self.view[cols] < 0).nonzero().flatten()
        if mixed.numel():
            owned = owned.clone()
            picked = layer.select(self.pair_i, self.pair_j[..., cols][..., mixed])
            owned[..., mixed] &= picked == n
        return cols, owned

    def whole_columns(self, n: int) -> Tensor | slice:
        """Columns view n owns as whole blocks: every pair visible, no mask needed."""
        return as_slice((self.whole & (self.view == n)).nonzero().flatten())

    def exact_columns(self, layer: LayerRuntime, n: int) -> tuple[Tensor | slice, Tensor]:
        """The other columns view n may own, and which of their pairs it does own (B, 1, Qc, those columns)."""
        # slices where the runs are contiguous (the usual case): views of the pair grids, not gathered copies
        mine = as_slice(((self.view == n) | (self.view < 0))[self.exact_index].nonzero().flatten())
        cols = self.exact_index[mine]
        owned = self.seen_exact[..., mine]
        mixed = as_slice((self.view[cols] < 0).nonzero().flatten())
        if column_count(mixed, cols.numel()):
            owned = owned.clone() if isinstance(mine, slice) else owned  # a slice would write into seen_exact
            picked = layer.select(self.pair_i, self.pair_j[..., cols[mixed]])
            owned[..., mixed] &= picked == n
        return as_slice(cols), owned


def _scored_chunk(qs, ks, vc, chunk: Chunk, h, call: AttentionCall, layer: LayerRuntime) -> Tensor:
    """One chunk with its scores written out (B, H, Qc, Kr), for what a fused kernel cannot apply: the model's
    soft-capping c·tanh(s/c) (Gemma 2) between the scaled product and the biases. Out: (B, H, Qc, d)."""
    groups, dtype = qs[0].shape[1] // ks[0].shape[1], compute_dtype(qs[0])
    select = layer.select(chunk.pair_i, chunk.pair_j)
    scores = None
    for n, (qv, kv) in enumerate(zip(qs, ks)):
        kv = kv.repeat_interleave(groups, dim=1)  # GQA: (B, H, Kr, d)
        view_scores = (qv.to(dtype) @ kv.to(dtype).transpose(-1, -2)) * call.scaling
        scores = view_scores if scores is None else torch.where(select == n, view_scores, scores)
    scores = soft_cap(scores, call.softcap)
    bias = layer.bias(h, chunk.pair_i, chunk.pair_j)
    if bias is not None:
        scores = scores + bias.to(dtype)
    probs = torch.softmax(scores.masked_fill(~chunk.seen, float("-inf")), dim=-1)
    probs = F.dropout(probs, p=call.dropout, training=call.dropout > 0)
    return probs.to(vc.dtype) @ vc.repeat_interleave(groups, dim=1)


def _fused_chunk(qs, ks, vc, chunk: Chunk, h, call: AttentionCall, layer: LayerRuntime, fold: bool) -> Tensor:
    """One chunk through SDPA: views side by side, biases folded in or as a float mask."""
    batch, kv_heads, _, dim = ks[0].shape
    bias = None
    if layer.plan.biases and not fold:
        bias = layer.bias(h, chunk.pair_i, chunk.pair_j)  # (B, H, Qc, Kr)
    chunk_j = chunk.j
    if len(qs) == 1:
        q_all, k_all, v_all, seen = qs[0], ks[0], vc, chunk.seen
    else:
        q_all = torch.cat(qs, dim=-1)  # (B, H, Qc, V*d): every view side by side
        parts = [chunk.view_columns(layer, n) for n in range(len(qs))]
        widths = [column_count(cols, ks[0].shape[2]) for cols, _ in parts]
        k_all = ks[0].new_zeros(batch, kv_heads, sum(widths), len(qs) * dim)  # each key in its view's slot
        start = 0
        for n, ((cols, _), width) in enumerate(zip(parts, widths)):
            k_all[:, :, start : start + width, n * dim : (n + 1) * dim] = ks[n][:, :, cols]
            start += width
        v_all = torch.cat([vc[:, :, cols] for cols, _ in parts], dim=2)
        seen = torch.cat([owned for _, owned in parts], dim=-1)
        bias = torch.cat([bias[..., cols] for cols, _ in parts], dim=-1) if bias is not None else None
        chunk_j = torch.cat([chunk.j[:, cols] for cols, _ in parts], dim=-1)
    mask = seen
    if fold:
        centre = chunk.i[:, -1:]  # (B, 1): keeps the folded key features small (they are positions for ALiBi)
        f_q, f_k = layer.features(h[..., 0], chunk.i - centre, chunk_j - centre)  # (B, H, Qc, F), (B, 1, Kr, F)
        q_all = torch.cat([q_all, (f_q / call.scaling).to(q_all.dtype)], dim=-1)
        k_all = torch.cat([k_all, f_k.to(k_all.dtype).expand(batch, kv_heads, -1, -1)], dim=-1)
    elif bias is not None:
        mask = bias.masked_fill(~seen, float("-inf")).to(q_all.dtype)
    # v padded to q's width keeps SDPA on its fused kernel; the extra columns are dropped by the caller
    v_all = F.pad(v_all, (0, max(0, q_all.shape[-1] - v_all.shape[-1])))
    return F.scaled_dot_product_attention(
        q_all, k_all, v_all, attn_mask=mask, dropout_p=call.dropout, scale=call.scaling,
        enable_gqa=q_all.shape[1] != k_all.shape[1],
    )
