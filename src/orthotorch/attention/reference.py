"""Exact softmax attention with the conventions of :func:`orthotorch.attention.favor_attention`."""

from __future__ import annotations

import torch

from orthotorch.attention._checks import broadcast_qkv, check_scale, key_validity

__all__ = ["softmax_attention"]

_NEG_INF = float("-inf")


def softmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Exact softmax attention ``softmax(q kᵀ·scale) v`` (reference), O(Lq·Lk) memory.

    Args:
        q: ``(..., Lq, d)``; k: ``(..., Lk, d)``; v: ``(..., Lk, dv)``; leading dims broadcast.
        causal: query ``t`` attends to keys ``s ≤ t + Lk − Lq`` (aligned to the end, as in decoding with a
            cache; for ``Lq == Lk`` the usual lower triangle).
        key_padding_mask: bool ``(batch, Lk)`` or broadcastable to ``(..., Lk)``, True = padded key.
        scale: positive finite temperature (default ``1/√d``).

    Returns:
        ``(..., Lq, dv)``. Queries with no valid key return zeros (SDPA would return NaN); padded values
        never reach the output, even when they are NaN.
    """
    q, k, v = broadcast_qkv(q, k, v)
    s = check_scale(q.shape[-1], scale)
    lq, lk = q.shape[-2], k.shape[-2]
    valid, _ = key_validity(None, key_padding_mask, tuple(q.shape[:-2]), lq, lk, q.device)
    if valid is not None:
        keep = valid[..., None]
        k = k.masked_fill(~keep, 0.0)
        v = v.masked_fill(~keep, 0.0)
    logits = (q @ k.transpose(-1, -2)) * s
    allowed = torch.ones(lq, lk, dtype=torch.bool, device=q.device)
    if causal:
        allowed = allowed.tril(lk - lq)
    allowed = allowed if valid is None else allowed & valid[..., None, :]
    logits = logits.masked_fill(~allowed, _NEG_INF)
    any_ok = allowed.any(dim=-1, keepdim=True)
    logits = torch.where(any_ok, logits, torch.zeros_like(logits))
    p = torch.softmax(logits, dim=-1) * any_ok.to(logits.dtype)
    return p @ v
