"""PyTorch internals ctxpatch uses, in one place.

`aten::_scaled_dot_product_flash_attention_for_cpu` is the kernel SDPA itself dispatches to on CPU;
it is called directly because SDPA does not hand out the log-sum-exp of each row. It is a private
op: where a torch build lacks it, `cpu_flash_attention_available()` says so and callers fall back.
"""

from __future__ import annotations

import torch
from torch import Tensor

_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_CPU_FLASH_BACKWARD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


def cpu_flash_attention_available() -> bool:
    return _CPU_FLASH is not None


def cpu_flash_attention_backward_available() -> bool:
    return _CPU_FLASH_BACKWARD is not None


def cpu_flash_attention_with_lse(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float
) -> tuple[Tensor, Tensor]:
    """(out (B, H, T, d), lse (B, H, T)) of SDPA on CPU, no dropout, not causal; q and k/v share heads."""
    out, lse = _CPU_FLASH(q, k, v, 0.0, False, attn_mask=mask, scale=scale)
    return out, lse


def cpu_flash_attention_backward(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, mask: Tensor | None, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of the kernel above, given the output and the log-sum-exp its probabilities are taken
    against (exp(q·k·scale + mask - lse)), no dropout, not causal."""
    return _CPU_FLASH_BACKWARD(grad_out, q, k, v, out, lse, 0.0, False, attn_mask=mask, scale=scale)
