"""`blockwise`: linear-memory attention on CPU and GPU.

Walks query chunks; for each, keeps only the key blocks the layer's mask may make visible (so a
window of W costs O(n W)), and calls PyTorch's fused SDPA kernel with a boolean mask for the chunk.
Biases are built per chunk, or, when every bias splits into q/k features (ALiBi, Sandwich) and
the dtype is fp32/fp64, folded into the fused kernel as extra dimensions (DESIGN.md, "What
measurement says about cost"). No tensor of size heads x n x n is ever allocated.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .common import AttentionCall, LayerRuntime, head_index

BLOCK = 256  # rows of a query chunk and size of a key block
SCORE_BUDGET = 1 << 25  # elements of one chunk's float scores (128 MiB in fp32)
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
        ).any(0)  # (n,)
        ok[(call.q_offset + q0) // self.block :] = True  # the chunk's own blocks: a query sees itself
        ids = ok.nonzero().flatten()
        if ids[-1] - ids[0] + 1 == ids.numel():
            return slice(int(ids[0]) * self.block, last + 1)
        idx = (ids[:, None] * self.block + torch.arange(self.block, device=ids.device)).flatten()
        return idx[idx <= last]


def _is_plain_causal(call: AttentionCall, layer: LayerRuntime, tq: int, tk: int) -> bool:
    return (
        len(layer.views()) == 1
        and not layer.has_mask(call)
        and not layer.plan.biases
        and not layer.plan.modifiers
        and (tq == tk or tq == 1)
        and (call.key_padding is None or bool(call.key_padding.all()))
    )


def _chunk_rows(batch: int, heads: int, tk: int, layer: LayerRuntime, float_scores: bool, block: int) -> int:
    if not float_scores:
        return block
    keys = min(tk, layer.max_keys(tk) + 2 * block)
    return max(16, min(block, SCORE_BUDGET // max(1, batch * heads * keys)))


def _key_indices(cols: Tensor | slice, tk: int, device: torch.device) -> Tensor:
    return torch.arange(tk, device=device)[cols] if isinstance(cols, slice) else cols


def blockwise_attention(
    q: Tensor, k: Tensor, v: Tensor, call: AttentionCall, layer: LayerRuntime, block: int | None = None
) -> Tensor:
    block = block or BLOCK
    batch, heads, tq, _ = q.shape
    kv_heads, tk, dv = k.shape[1], k.shape[2], v.shape[-1]
    layer.prepare(call)
    q_views = layer.rotated_views(q, call.q_pos, 0)
    k_views = layer.rotated_views(k, call.k_pos, 1)
    kappa = layer.kappa(call.q_pos)  # (B, Tq)
    if kappa is not None:
        q_views = [qv * kappa[:, None, :, None].to(qv.dtype) for qv in q_views]
    gqa = heads != kv_heads
    if _is_plain_causal(call, layer, tq, tk):
        out = F.scaled_dot_product_attention(
            q_views[0], k_views[0], v, is_causal=tq > 1, dropout_p=call.dropout, scale=call.scaling, enable_gqa=gqa
        )
        return out.transpose(1, 2)

    fold = len(q_views) == 1 and layer.biases_fold and q.dtype in (torch.float32, torch.float64)
    float_scores = len(q_views) > 1 or (bool(layer.plan.biases) and not fold)
    rows = _chunk_rows(batch, heads, tk, layer, float_scores, block)
    keys = KeyBlocks(call, block)
    h = head_index(heads, q.device)
    outs = []
    for q0 in range(0, tq, rows):
        q1 = min(tq, q0 + rows)
        cols = keys.select(layer, call, q0, q1)
        i, j = call.q_pos[:, q0:q1], call.k_pos[:, cols]  # (B, Qc), (B, Kr)
        qi = torch.arange(q0, q1, device=q.device).view(1, 1, -1, 1) + call.q_offset
        kj = _key_indices(cols, tk, q.device).view(1, 1, 1, -1)
        key_real = None if call.key_padding is None else call.key_padding[:, cols][:, None, None, :]
        seen = layer.visible(call, i[:, None, :, None], j[:, None, None, :], qi, kj, key_real)  # (B, 1, Qc, Kr)
        qs = [qv[:, :, q0:q1] for qv in q_views]
        ks = [kv[:, :, cols] for kv in k_views]
        vs = v[:, :, cols]
        if len(qs) == 1:
            outs.append(_fused_chunk(qs[0], ks[0], vs, seen, i, j, h, call, layer, fold)[..., :dv])
        else:
            outs.append(_views_chunk(qs, ks, vs, seen, i, j, h, call, layer))
    return torch.cat(outs, dim=2).transpose(1, 2)


def _fused_chunk(qc, kc, vc, seen, i, j, h, call: AttentionCall, layer: LayerRuntime, fold: bool) -> Tensor:
    """One chunk through SDPA: a boolean mask, plus biases folded in or as a float mask."""
    mask = seen
    if fold:
        centre = i[:, -1:]  # (B, 1): keeps the folded key features small (they are positions for ALiBi)
        f_q, f_k = layer.features(h[..., 0], i - centre, j - centre)  # (B, H, Qc, F), (B, 1, Kr, F)
        batch, kv_heads, keys, _ = kc.shape
        qc = torch.cat([qc, (f_q / call.scaling).to(qc.dtype)], dim=-1)
        kc = torch.cat([kc, f_k.to(kc.dtype).expand(batch, kv_heads, keys, -1)], dim=-1)
        # v padded to the same width keeps SDPA on its fused kernel; the extra columns are dropped
        width = qc.shape[-1] - vc.shape[-1]
        vc = torch.cat([vc, vc.new_zeros(batch, kv_heads, keys, width)], dim=-1)
    elif layer.plan.biases:
        bias = layer.bias(h, i[:, None, :, None], j[:, None, None, :])  # (B, H, Qc, Kr)
        mask = bias.masked_fill(~seen, float("-inf")).to(qc.dtype)
    return F.scaled_dot_product_attention(
        qc, kc, vc, attn_mask=mask, dropout_p=call.dropout, scale=call.scaling, enable_gqa=qc.shape[1] != kc.shape[1]
    )


def _views_chunk(qs, ks, vs, seen, i, j, h, call: AttentionCall, layer: LayerRuntime) -> Tensor:
    """One chunk for a position rule with several views: scores per view, chosen per pair."""
    batch, heads, rows, dim = qs[0].shape
    kv_heads = ks[0].shape[1]
    groups = heads // kv_heads
    select = layer.select(i[:, None, :, None], j[:, None, None, :])
    scores = None
    for n, (qv, kv) in enumerate(zip(qs, ks)):
        grouped = qv.reshape(batch, kv_heads, groups, rows, dim).float()  # query heads sharing a kv head
        s = (grouped @ kv.float().unsqueeze(2).transpose(-1, -2)).reshape(batch, heads, rows, -1) * call.scaling
        scores = s if scores is None else torch.where(select == n, s, scores)
    bias = layer.bias(h, i[:, None, :, None], j[:, None, None, :])
    if bias is not None:
        scores = scores + bias
    probs = torch.softmax(scores.masked_fill(~seen, float("-inf")), dim=-1)
    probs = F.dropout(probs, p=call.dropout, training=call.dropout > 0).to(vs.dtype)
    grouped = probs.reshape(batch, kv_heads, groups, rows, -1)  # (B, Hk, G, Qc, Kr)
    return (grouped @ vs.unsqueeze(2)).reshape(batch, heads, rows, -1)
