"""Several position views of a chunk as separate fused-attention calls, merged by their log-sum-exps.

For inference on CPU: each view attends to the keys it owns with PyTorch's fused flash kernel, which
also returns the log-sum-exp of every row; the partial results combine exactly,

    out = sum_n out_n * exp(lse_n - lse),  lse = logsumexp_n lse_n,

so a key block costs one product at the head width, and a second only where the views meet. The
keys a view owns as whole blocks (every pair visible, no padding) go in a call with no mask at all;
only the rest is masked, pair by pair, in row pieces that take only the columns they own a pair of.
The kernel is the one SDPA itself dispatches to on CPU (ctxpatch._compat.torch), called directly
because SDPA does not hand out the log-sum-exp. Where it is missing, or when gradients are needed
(it does not differentiate through the log-sum-exp), the blockwise backend's single-call path
(views side by side) runs instead. (Not to be confused with ctxpatch.merge, which folds a
fine-tune's adapter into the weights.)
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from .._compat.torch import cpu_flash_attention_available, cpu_flash_attention_with_lse
from ..plan import AttentionCall, LayerRuntime
from .common import as_slice, column_count, compute_dtype

EXACT_PIECES = 4  # row pieces of a chunk's masked pairs (see _exact_rows)


class ViewChunk(Protocol):
    """What a query chunk tells this module (the blockwise backend's `Chunk`)."""

    pair_i: Tensor  # (B, 1, Qc, 1) query positions
    pair_j: Tensor  # (B, 1, 1, Kr) positions of the chunk's selected keys

    def whole_columns(self, n: int) -> Tensor | slice:
        """Columns view n owns as whole blocks (every pair visible)."""
        ...

    def exact_columns(self, layer: LayerRuntime, n: int) -> tuple[Tensor | slice, Tensor]:
        """The other columns view n may own, and which pairs of them it owns (B, 1, Qc, those columns)."""
        ...


def available(q: Tensor, k: Tensor, v: Tensor, call: AttentionCall, layer: LayerRuntime) -> bool:
    trainable = [] if layer.tensors is None else list(layer.tensors.parameters())
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, *trainable))
    return cpu_flash_attention_available() and q.device.type == "cpu" and not needs_grad and call.dropout == 0.0


def _attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> tuple[Tensor, Tensor]:
    """(out (B, H, Qc, d), lse (B, H, Qc)) of one call; query heads sharing a kv head folded into rows."""
    batch, heads, rows, dim = q.shape
    kv_heads = k.shape[1]
    groups = heads // kv_heads
    folded = q.reshape(batch, kv_heads, groups * rows, dim)  # (B, Hk, G*Qc, d): rows of a group side by side
    if mask is not None:
        if mask.shape[1] == 1:  # one mask for every head: repeat it for each head of a group
            mask = mask.unsqueeze(2).expand(-1, -1, groups, -1, -1).reshape(batch, 1, groups * rows, -1)
        else:  # (B, H, Qc, Kr) -> (B, Hk, G*Qc, Kr)
            mask = mask.reshape(batch, kv_heads, groups * rows, -1)
    out, lse = cpu_flash_attention_with_lse(folded, k, v, mask, scale)
    return out.reshape(batch, heads, rows, -1), lse.reshape(batch, heads, rows)


def views_chunk(
    qs: list[Tensor], ks: list[Tensor], vc: Tensor, chunk: ViewChunk, h: Tensor, call: AttentionCall,
    layer: LayerRuntime,
) -> Tensor:
    """A chunk of a multi-view rule: per view, one unmasked call over the whole blocks it owns and masked
    calls over the pairs it owns elsewhere, all merged exactly."""
    bias = layer.bias(h, chunk.pair_i, chunk.pair_j) if layer.plan.biases else None  # (B, H, Qc, Kr)
    outs, lses = [], []
    for n, (qv, kv) in enumerate(zip(qs, ks)):
        whole = chunk.whole_columns(n)
        if column_count(whole, vc.shape[2]):
            whole_bias = None if bias is None else bias[..., whole].to(qv.dtype)
            out, lse = _attend(qv, kv[:, :, whole], vc[:, :, whole], whole_bias, call.scaling)
            outs.append(out)
            lses.append(lse.to(compute_dtype(qv)))
        cols, owned = chunk.exact_columns(layer, n)
        if bool(owned.any()):
            out, lse = _exact_rows(qv, kv, vc, cols, owned, bias, call.scaling)
            outs.append(out)
            lses.append(lse)
    total = torch.logsumexp(torch.stack(lses), dim=0)  # (B, H, Qc)
    merged = sum(o.to(total.dtype) * torch.exp(l - total).unsqueeze(-1) for o, l in zip(outs, lses))
    return merged.to(qs[0].dtype)


def _exact_rows(
    qv: Tensor, kv: Tensor, vc: Tensor, cols: Tensor | slice, owned: Tensor, bias: Tensor | None, scale: float
) -> tuple[Tensor, Tensor]:
    """One view's masked pairs, in row pieces that each take only the columns they own a pair of: where views
    meet on a diagonal (|i - j| = W) or at the causal diagonal, a piece of r rows needs about r columns of the
    chunk's band, so the work thrown away by the mask shrinks with the piece."""
    batch, heads, rows, _ = qv.shape
    if isinstance(cols, slice):
        cols = torch.arange(vc.shape[2], device=vc.device)[cols]
    out = qv.new_zeros(batch, heads, rows, vc.shape[-1])
    lse = torch.full((batch, heads, rows), float("-inf"), dtype=compute_dtype(qv), device=qv.device)
    step = -(-rows // EXACT_PIECES)
    for r0 in range(0, rows, step):
        piece = owned[..., r0 : r0 + step, :]  # (B, 1, r, E)
        used = as_slice(piece.any(-2).any(0).flatten().nonzero().flatten())  # columns this piece owns a pair of
        if not column_count(used, cols.numel()):
            continue
        mine, piece = as_slice(cols[used]), piece[..., used]
        mask = torch.zeros(piece.shape, dtype=qv.dtype, device=qv.device).masked_fill_(~piece, float("-inf"))
        if bias is not None:
            mask = mask + bias[..., r0 : r0 + step, mine].to(qv.dtype)
        o, l = _attend(qv[:, :, r0 : r0 + step], kv[:, :, mine], vc[:, :, mine], mask, scale)
        out[:, :, r0 : r0 + step] = o
        empty = ~piece.any(-1)  # (B, 1, r): rows with nothing here; the kernel reports lse 0 for them
        lse[:, :, r0 : r0 + step] = l.to(lse.dtype).masked_fill(empty, float("-inf"))
    return out, lse
