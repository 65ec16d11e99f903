"""`dense`: the readable reference. Builds the whole (B, H, Tq, Tk) score tensor, so it is for
tests and short inputs; every other backend is tested against it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..plan import AttentionCall, LayerRuntime
from .common import compute_dtype, head_index, soft_cap
from .selected import BlockChoice, expand_heads


def dense_attention(q: Tensor, k: Tensor, v: Tensor, call: AttentionCall, layer: LayerRuntime) -> Tensor:
    batch, heads, tq, _ = q.shape
    tk, groups = k.shape[2], heads // k.shape[1]
    dtype = compute_dtype(q)
    layer.prepare(call)
    i = call.q_pos[:, None, :, None]  # (B, 1, Tq, 1)
    j = call.k_pos[:, None, None, :]  # (B, 1, 1, Tk)
    qi = torch.arange(tq, device=q.device).view(1, 1, tq, 1) + call.q_offset
    kj = torch.arange(tk, device=q.device).view(1, 1, 1, tk)
    key_real = None if call.key_padding is None else call.key_padding[:, None, None, :]  # (B, 1, 1, Tk)

    q_views = layer.rotated_views(q, call.q_pos, 0)
    k_views = layer.rotated_views(k, call.k_pos, 1)
    if layer.plan.modifiers:  # one centre per sequence: fine at test sizes (blockwise centres per chunk)
        everything = torch.cat([call.q_pos, call.k_pos], dim=1)
        centre = (everything.amin(-1, keepdim=True) + everything.amax(-1, keepdim=True)) // 2  # (B, 1)
        q_views = layer.modify(q_views, call.q_pos, centre, 0)
        k_views = layer.modify(k_views, call.k_pos, centre, 1)
    k_views = [kv.repeat_interleave(groups, dim=1) for kv in k_views]  # GQA: (B, H, Tk, d)
    select = layer.select(i, j)
    scores = None
    for n, (qv, kv) in enumerate(zip(q_views, k_views)):
        view_scores = (qv.to(dtype) @ kv.to(dtype).transpose(-1, -2)) * call.scaling
        scores = view_scores if scores is None else torch.where(select == n, view_scores, scores)

    kappa = layer.kappa(i)
    if kappa is not None:
        scores = scores * kappa.to(dtype)
    scores = soft_cap(scores, call.softcap)
    bias = layer.bias(head_index(heads, q.device), i, j)
    if bias is not None:
        scores = scores + bias.to(dtype)
    visible = layer.visible(call, i, j, qi, kj, key_real)
    if layer.plan.selection is not None:
        choice = BlockChoice(layer.plan.selection, k, call)
        chosen = choice.chosen(q, call.q_pos)
        visible = visible & expand_heads(choice.visible(chosen, i, j, choice.block_of[:, None, None, :]), heads)
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = F.dropout(probs, p=call.dropout, training=call.dropout > 0)
    out = probs.to(v.dtype) @ v.repeat_interleave(groups, dim=1)  # (B, H, Tq, d)
    return out.transpose(1, 2)
