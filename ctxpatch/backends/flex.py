"""`flex`: PyTorch FlexAttention with the methods' own functions as `mask_mod` / `score_mod`.

Compiled on CUDA (the fast path there); on CPU it runs FlexAttention's eager reference, which is
slow and meant for checking. A position rule with several views runs one FlexAttention call per
view, each masked to the pairs that view owns, and merges them exactly with their log-sum-exps.
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch import Tensor

from ..plan import AttentionCall, LayerRuntime
from .common import compute_dtype, soft_cap
from .selected import BlockChoice


@functools.cache
def _flex_functions():
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    return create_block_mask, torch.compile(flex_attention, dynamic=False), flex_attention


def flex_attention_backend(q: Tensor, k: Tensor, v: Tensor, call: AttentionCall, layer: LayerRuntime) -> Tensor:
    if call.dropout:
        raise NotImplementedError("the flex backend has no attention dropout; use backend='blockwise' to train with it")
    create_block_mask, compiled, eager = _flex_functions()
    flex = compiled if q.is_cuda else eager
    layer.prepare(call)
    batch, heads, tq, _ = q.shape
    tk = k.shape[2]
    q_pos, k_pos, padding, offset = call.q_pos, call.k_pos, call.key_padding, call.q_offset
    kappa = layer.kappa(q_pos)
    q_views = layer.rotated_views(q, q_pos, 0)
    if kappa is not None:
        q_views = [qv * kappa[:, None, :, None].to(qv.dtype) for qv in q_views]
    k_views = layer.rotated_views(k, k_pos, 1)
    if layer.plan.modifiers:
        everything = torch.cat([q_pos, k_pos], dim=1)
        centre = (everything.amin(-1, keepdim=True) + everything.amax(-1, keepdim=True)) // 2  # (B, 1)
        q_views, k_views = layer.modify(q_views, q_pos, centre, 0), layer.modify(k_views, k_pos, centre, 1)

    selected = _selection_mask(q, k, call, layer)

    def score_mod(score, b, h, q_idx, kv_idx):
        score = soft_cap(score, call.softcap)
        bias = layer.bias(h, q_pos[b, q_idx], k_pos[b, kv_idx])
        return score if bias is None else score + bias.to(score.dtype)

    outs, lses = [], []
    for n, (qv, kv) in enumerate(zip(q_views, k_views)):

        def mask_mod(b, h, q_idx, kv_idx, n=n):
            i, j = q_pos[b, q_idx], k_pos[b, kv_idx]
            real = None if padding is None else padding[b, kv_idx]
            seen = layer.visible(call, i, j, q_idx + offset, kv_idx, real)
            if selected is not None:
                seen = seen & selected(b, h, q_idx, kv_idx, i, j)
            select = layer.select(i, j)
            return seen if select is None else seen & (select == n)

        block_mask = create_block_mask(mask_mod, batch, None if selected is None else heads, tq, tk, device=q.device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the eager (CPU) path warns that it is unfused
            out, lse = flex(
                qv, kv, v, score_mod=score_mod, block_mask=block_mask, scale=call.scaling,
                enable_gqa=heads != k.shape[1], return_lse=True,
            )
        outs.append(out)
        lses.append(lse.to(compute_dtype(q)))
    if len(outs) == 1:
        return outs[0].transpose(1, 2)
    total = torch.logsumexp(torch.stack(lses), dim=0)  # (B, H, Tq)
    merged = sum(o.to(total.dtype) * torch.exp(lse - total).unsqueeze(-1) for o, lse in zip(outs, lses))
    return merged.to(q.dtype).transpose(1, 2)


def _selection_mask(q: Tensor, k: Tensor, call: AttentionCall, layer: LayerRuntime):
    """A selection's pairs as a mask_mod term: every query's chosen blocks made up front (B, Hs, Tq, nb)."""
    if layer.plan.selection is None:
        return None
    choice = BlockChoice(layer.plan.selection, k, call)
    chosen = choice.chosen(q, call.q_pos)
    share = q.shape[1] // chosen.shape[1] if chosen.shape[1] > 1 else q.shape[1]  # query heads per choice

    def selected(b, h, q_idx, kv_idx, i, j):
        picked = chosen[b, h // share, q_idx, choice.block_of[b, kv_idx]]
        return picked | layer.plan.selection.always_visible(i, j)

    return selected
