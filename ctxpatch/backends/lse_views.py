"""Several position views of a chunk as separate fused-attention calls, merged by their log-sum-exps.

On CPU: each view attends to the keys it owns with PyTorch's fused flash kernel, which also returns
the log-sum-exp of every row; the partial results combine exactly,

    out = sum_n out_n * exp(lse_n - lse),  lse = logsumexp_n lse_n,

so a key block costs one product at the head width, and a second only where the views meet. The
keys a view owns as whole blocks (every pair visible, no padding) go in a call with no mask at all;
only the rest is masked, pair by pair, in row pieces that take only the columns they own a pair of.
The kernel is the one SDPA itself dispatches to on CPU (ctxpatch._compat.torch), called directly
because SDPA does not hand out the log-sum-exp.

Gradients (a fine-tune) go through the kernel's own backward, one call at a time, given the merged
output and the merged log-sum-exp: the kernel then takes each call's probabilities against all views
together, exp(s - lse), and its row term rowsum(dout * out) against the merged output, which is the
exact gradient of the merge (the same split as ring / split-KV flash attention). Where the kernels are
missing, the patch's own tensors train (KERPLE's r1, r2: the kernel has no gradient for a mask) or
dropout is on, the blockwise backend's single-call path (views side by side) runs instead. (Not to be
confused with ctxpatch.merge, which folds a fine-tune's adapter into the weights.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from .._compat.torch import (
    cpu_flash_attention_available,
    cpu_flash_attention_backward,
    cpu_flash_attention_backward_available,
    cpu_flash_attention_with_lse,
)
from ..plan import AttentionCall, LayerRuntime
from .common import as_slice, column_count, compute_dtype

EXACT_PIECES = 4  # row pieces of a chunk's masked pairs (see _exact_rows)


class ViewChunk(Protocol):
    """What a query chunk tells this module (the blockwise backend's `Chunk`)."""

    def whole_columns(self, n: int) -> Tensor | slice:
        """Columns view n owns as whole blocks (every pair visible)."""
        ...

    def exact_columns(self, layer: LayerRuntime, n: int) -> tuple[Tensor | slice, Tensor]:
        """The other columns view n may own, and which pairs of them it owns (B, 1, Qc, those columns)."""
        ...


def _needs_grad(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def available(q: Tensor, k: Tensor, v: Tensor, call: AttentionCall, layer: LayerRuntime) -> bool:
    if layer.tensors is not None and _needs_grad(*layer.tensors.parameters()):
        return False  # the kernel has no gradient for a mask: the patch's own tensors train elsewhere
    return (
        cpu_flash_attention_available()
        and q.device.type == "cpu"
        and call.dropout == 0.0
        and (not _needs_grad(q, k, v) or cpu_flash_attention_backward_available())
    )


@dataclass
class ViewCall:
    """One fused call: view `view`'s queries `rows` against its key columns `cols`. `blocked` (B, 1, r, E): the
    pairs it does not own (None: it owns all, no mask); `empty` (B, 1, r): rows that own no pair here (the kernel
    reports lse 0 for them; they count as -inf). Positions only: the layers of a forward share a chunk's calls."""

    view: int
    rows: slice
    cols: Tensor | slice
    blocked: Tensor | None
    empty: Tensor | None

    def mask(self, dtype: torch.dtype, bias: Tensor | None) -> Tensor | None:
        """The call's float mask: the chunk's bias (B, H, Qc, Kr) on its pairs, -inf on the pairs it does not own."""
        part = None if bias is None else bias[..., self.rows, self.cols].to(dtype)
        if self.blocked is None:
            return part
        if part is None:
            part = torch.zeros(self.blocked.shape, dtype=dtype, device=self.blocked.device)
        return part.masked_fill(self.blocked, float("-inf"))


def views_chunk(
    qs: list[Tensor], ks: list[Tensor], vc: Tensor, calls: list[ViewCall], bias: Tensor | None, scale: float
) -> Tensor:
    """A chunk of a multi-view rule through its planned calls (`plan_calls`), merged exactly; bias (B, H, Qc, Kr)."""
    if _needs_grad(*qs, *ks, vc):
        return _MergedViews.apply(calls, bias, scale, vc, *qs, *ks)
    return _merge(qs, ks, vc, calls, bias, scale)[0]


def plan_calls(views: int, rows: int, keys: int, chunk: ViewChunk, layer: LayerRuntime) -> list[ViewCall]:
    """A chunk's calls: per view, one unmasked call over the whole blocks it owns and masked calls over the pairs
    it owns elsewhere. `rows`, `keys`: the chunk's queries and selected keys."""
    calls = []
    for n in range(views):
        whole = chunk.whole_columns(n)
        if column_count(whole, keys):
            calls.append(ViewCall(n, slice(0, rows), whole, None, None))
        cols, owned = chunk.exact_columns(layer, n)
        if bool(owned.any()):
            calls.extend(_exact_pieces(n, keys, cols, owned))
    return calls


def _exact_pieces(view: int, keys: int, cols: Tensor | slice, owned: Tensor) -> list[ViewCall]:
    """One view's masked pairs, in row pieces that each take only the columns they own a pair of: where views
    meet on a diagonal (|i - j| = W) or at the causal diagonal, a piece of r rows needs about r columns of the
    chunk's band, so the work thrown away by the mask shrinks with the piece."""
    if isinstance(cols, slice):
        cols = torch.arange(keys, device=owned.device)[cols]
    rows = owned.shape[-2]
    step = -(-rows // EXACT_PIECES)
    pieces = []
    for r0 in range(0, rows, step):
        piece = owned[..., r0 : r0 + step, :]  # (B, 1, r, E)
        used = as_slice(piece.any(-2).any(0).flatten().nonzero().flatten())  # columns this piece owns a pair of
        if not column_count(used, cols.numel()):
            continue
        piece = piece[..., used]
        pieces.append(ViewCall(view, slice(r0, r0 + piece.shape[-2]), as_slice(cols[used]), ~piece, ~piece.any(-1)))
    return pieces


def _merge(
    qs: list[Tensor], ks: list[Tensor], vc: Tensor, calls: list[ViewCall], bias: Tensor | None, scale: float
) -> tuple[Tensor, Tensor]:
    """(merged output (B, H, Qc, dv) in q's dtype, merged log-sum-exp (B, H, Qc)) of the calls."""
    batch, heads, rows, _ = qs[0].shape
    dtype = compute_dtype(qs[0])
    lses = torch.full((len(calls), batch, heads, rows), float("-inf"), dtype=dtype, device=vc.device)
    outs = []
    for n, c in enumerate(calls):
        mask = c.mask(qs[0].dtype, bias)
        out, lse = attend(qs[c.view][:, :, c.rows], ks[c.view][:, :, c.cols], vc[:, :, c.cols], mask, scale)
        lses[n, :, :, c.rows] = lse if c.empty is None else lse.masked_fill(c.empty, float("-inf"))
        outs.append(out)
    total = torch.logsumexp(lses, dim=0)  # (B, H, Qc)
    merged = torch.zeros(batch, heads, rows, vc.shape[-1], dtype=dtype, device=vc.device)
    for n, (c, out) in enumerate(zip(calls, outs)):
        weight = torch.exp(lses[n, :, :, c.rows] - total[:, :, c.rows]).unsqueeze(-1)  # (B, H, r, 1)
        merged[:, :, c.rows] += out.to(dtype) * weight
    return merged.to(qs[0].dtype), total


class _MergedViews(torch.autograd.Function):
    """The merge with its gradient: each call's kernel backward, against the merged output and lse."""

    @staticmethod
    def forward(ctx, calls: list[ViewCall], bias: Tensor | None, scale: float, vc: Tensor, *qks: Tensor) -> Tensor:
        views = len(qks) // 2
        merged, total = _merge(list(qks[:views]), list(qks[views:]), vc, calls, bias, scale)
        ctx.calls, ctx.bias, ctx.scale = calls, bias, scale
        ctx.save_for_backward(vc, merged, total, *qks)
        return merged

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        vc, merged, total, *qks = ctx.saved_tensors
        views = len(qks) // 2
        qs, ks = qks[:views], qks[views:]
        dqs, dks, dv = [torch.zeros_like(q) for q in qs], [torch.zeros_like(k) for k in ks], torch.zeros_like(vc)
        lse = total.masked_fill(torch.isinf(total), 0.0)  # a row that sees nothing: every probability is 0 anyway
        for c in ctx.calls:
            dq, dk, dvc = _attend_backward(
                grad[:, :, c.rows], qs[c.view][:, :, c.rows], ks[c.view][:, :, c.cols], vc[:, :, c.cols],
                merged[:, :, c.rows], lse[:, :, c.rows], c.mask(qs[0].dtype, ctx.bias), ctx.scale,
            )
            dqs[c.view][:, :, c.rows] += dq
            _add_columns(dks[c.view], c.cols, dk)
            _add_columns(dv, c.cols, dvc)
        return (None, None, None, dv, *dqs, *dks)


def _add_columns(target: Tensor, cols: Tensor | slice, values: Tensor) -> None:
    if isinstance(cols, slice):
        target[:, :, cols] += values
    else:
        target.index_add_(2, cols, values)


def _fold(x: Tensor, kv_heads: int) -> Tensor:
    """(B, H, r, ...) -> (B, Hk, G*r, ...): the rows of the query heads sharing a kv head side by side."""
    batch, heads, rows = x.shape[:3]
    return x.reshape(batch, kv_heads, (heads // kv_heads) * rows, *x.shape[3:])


def _fold_mask(mask: Tensor | None, kv_heads: int, heads: int) -> Tensor | None:
    if mask is None:
        return None
    batch, rows = mask.shape[0], mask.shape[2]
    if mask.shape[1] == 1:  # one mask for every head: repeat it for each head of a group
        groups = heads // kv_heads
        return mask.unsqueeze(2).expand(-1, -1, groups, -1, -1).reshape(batch, 1, groups * rows, -1)
    return _fold(mask, kv_heads)  # (B, H, Qc, Kr) -> (B, Hk, G*Qc, Kr)


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> tuple[Tensor, Tensor]:
    """(out (B, H, Qc, d), lse (B, H, Qc)) of one call; query heads sharing a kv head folded into rows."""
    batch, heads, rows, _ = q.shape
    kv_heads = k.shape[1]
    out, lse = cpu_flash_attention_with_lse(_fold(q, kv_heads), k, v, _fold_mask(mask, kv_heads, heads), scale)
    return out.reshape(batch, heads, rows, -1), lse.reshape(batch, heads, rows)


def _attend_backward(
    grad: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, mask: Tensor | None, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq (B, H, r, d), dk, dv (B, Hk, E, d)) of one call, its probabilities taken against the merged lse."""
    kv_heads, heads = k.shape[1], q.shape[1]
    dq, dk, dv = cpu_flash_attention_backward(
        _fold(grad.contiguous(), kv_heads), _fold(q.contiguous(), kv_heads), k.contiguous(), v.contiguous(),
        _fold(out.contiguous(), kv_heads), _fold(lse.contiguous(), kv_heads), _fold_mask(mask, kv_heads, heads), scale,
    )
    return dq.reshape(q.shape), dk, dv
