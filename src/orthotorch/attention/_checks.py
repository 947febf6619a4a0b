"""Argument checks shared by the attention entry points (FAVOR+ and the exact softmax reference).

Conventions (those of ``scaled_dot_product_attention`` and ``nn.MultiheadAttention``):

- ``q`` ``(..., Lq, d)``, ``k`` ``(..., Lk, d)``, ``v`` ``(..., Lk, dv)``; leading dims broadcast; with
  ``enable_gqa`` the key/value head dim (``-3``) may divide the query head dim (grouped-query attention:
  key head ``j`` serves query heads ``j·G … (j+1)·G − 1``, as SDPA's ``repeat_interleave``).
- ``attn_mask``: SDPA's meaning (bool: True = may attend; float: added to the logits). Linear attention
  can honour only masks that factor through the keys: a key mask (broadcastable to ``(..., 1, Lk)``), a
  causal mask (aligned to the end: query ``t`` sees keys ``s ≤ t + Lk − Lq``) or both.
- ``key_padding_mask``: ``nn.MultiheadAttention``'s meaning (bool, True = padded key).

Wrong types raise ``TypeError``, wrong values or shapes ``ValueError``, and each message names the argument.
"""

from __future__ import annotations

import math

import torch

from orthotorch._validation import check_tensor, describe

__all__ = [
    "broadcast_qkv",
    "check_dropout",
    "check_scale",
    "key_validity",
]


def check_scale(d: int, scale: object) -> float:
    """The softmax temperature: ``1/√d`` by default; must be a positive finite number."""
    if scale is None:
        return 1.0 / math.sqrt(d)
    if isinstance(scale, torch.Tensor) and scale.numel() == 1:
        scale = scale.item()
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"`scale` must be a real number or None, got {type(scale).__name__}")
    s = float(scale)
    if not (s > 0 and math.isfinite(s)):
        raise ValueError(f"`scale` must be a positive finite number, got {scale!r}")
    return s


def check_dropout(dropout_p: object) -> None:
    """Only ``dropout_p == 0`` is possible: FAVOR+ never forms the attention weights to drop."""
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"`dropout_p` must be a float, got {type(dropout_p).__name__}")
    if dropout_p != 0.0:
        raise ValueError(
            f"`dropout_p` must be 0.0, got {dropout_p!r}: linear attention never forms the attention "
            "weights, so attention dropout cannot be applied (drop the output or the values instead)"
        )


def broadcast_qkv(
    q: object, k: object, v: object, *, enable_gqa: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Check ``q``, ``k``, ``v`` and expand them to one leading shape (views, no copy except GQA).

    Returns ``q (*lead, Lq, d)``, ``k (*lead, Lk, d)``, ``v (*lead, Lk, dv)``.
    """
    q = check_tensor("q", q)
    k = check_tensor("k", k)
    v = check_tensor("v", v)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not t.is_floating_point():
            raise TypeError(f"`{name}` must be a floating tensor, got {describe(t)}")
        if t.dim() < 2:
            raise ValueError(f"`{name}` must have shape (..., length, dim), got {describe(t)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"`q`, `k`, `v` must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(
            f"`q`, `k`, `v` must be on one device, got {q.device}, {k.device}, {v.device}"
        )
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(
            f"`k` feature dim must equal `q`'s ({q.shape[-1]}), got k {tuple(k.shape)}"
        )
    if v.shape[-2] != k.shape[-2]:
        raise ValueError(f"`v` length must equal `k`'s ({k.shape[-2]}), got v {tuple(v.shape)}")
    if enable_gqa and q.dim() >= 3 and k.dim() >= 3 and q.shape[-3] != k.shape[-3]:
        hq, hk = q.shape[-3], k.shape[-3]
        if v.dim() < 3 or v.shape[-3] != hk or hk == 0 or hq % hk:
            raise ValueError(
                "with `enable_gqa=True` the query heads (dim -3) must be a multiple of the key/value "
                f"heads, got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
            )
        k = k.repeat_interleave(hq // hk, dim=-3)
        v = v.repeat_interleave(hq // hk, dim=-3)
    try:
        lead = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    except RuntimeError:
        hint = " (pass enable_gqa=True for grouped-query attention)" if not enable_gqa else ""
        raise ValueError(
            "`q`, `k`, `v` must have broadcastable leading (batch, heads) dims, got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}{hint}"
        ) from None
    q = q.expand(*lead, *q.shape[-2:])
    k = k.expand(*lead, *k.shape[-2:])
    v = v.expand(*lead, *v.shape[-2:])
    return q, k, v


def _padding_validity(mask: object, lead: tuple[int, ...], lk: int) -> torch.Tensor:
    """``key_padding_mask`` (True = padded) → validity ``(*lead, Lk)`` (True = a real key)."""
    mask = check_tensor("key_padding_mask", mask)
    if mask.dtype != torch.bool:
        raise TypeError(
            f"`key_padding_mask` must be a bool tensor (True = padded key), got {describe(mask)}"
        )
    if len(lead) >= 2 and mask.dim() == 2 and mask.shape == (lead[0], lk):
        # (batch, Lk), the nn.MultiheadAttention layout: broadcast over the heads
        mask = mask.reshape(lead[0], *([1] * (len(lead) - 1)), lk)
    try:
        shape = torch.broadcast_shapes(mask.shape, (*lead, lk))
    except RuntimeError:
        shape = None
    if shape != (*lead, lk):
        raise ValueError(
            f"`key_padding_mask` must have shape (batch, Lk) = ({lead[0] if lead else '-'}, {lk}) "
            f"or be broadcastable to {(*lead, lk)}, got {tuple(mask.shape)}"
        )
    return ~mask.expand(*lead, lk)


def _attn_mask_allowed(mask: object) -> torch.Tensor:
    """SDPA's ``attn_mask`` as a bool tensor (True = may attend)."""
    mask = check_tensor("attn_mask", mask)
    if mask.dtype == torch.bool:
        return mask
    if not mask.is_floating_point():
        raise TypeError(f"`attn_mask` must be a bool or floating tensor, got {describe(mask)}")
    allowed = mask == 0
    if not bool((allowed | (mask == float("-inf"))).all()):
        raise ValueError(
            "`attn_mask` holds additive biases other than 0 and -inf: linear attention cannot honour "
            "an arbitrary additive mask (only a key-padding mask or a causal mask, as bool or 0/-inf)"
        )
    return allowed


def key_validity(
    attn_mask: object,
    key_padding_mask: object,
    lead: tuple[int, ...],
    lq: int,
    lk: int,
    device: torch.device,
) -> tuple[torch.Tensor | None, bool]:
    """Fold ``attn_mask`` and ``key_padding_mask`` into a key validity mask and a causal flag.

    Returns:
        ``valid`` bool ``(*lead, Lk)`` (True = a real key) or ``None`` (every key valid), and whether the
        mask was (also) causal, end-aligned. Any other mask raises ``ValueError``.
    """
    valid = None
    causal = False
    if key_padding_mask is not None:
        valid = _padding_validity(key_padding_mask, lead, lk)
    if attn_mask is not None:
        allowed = _attn_mask_allowed(attn_mask)
        try:
            shape = torch.broadcast_shapes(allowed.shape, (*lead, lq, lk))
        except RuntimeError:
            shape = None
        if shape != (*lead, lq, lk):
            raise ValueError(
                f"`attn_mask` must be broadcastable to (..., Lq, Lk) = {(*lead, lq, lk)}, "
                f"got {tuple(allowed.shape)}"
            )
        if allowed.dim() < 2 or allowed.shape[-2] == 1:
            keys = allowed.expand(*lead, lq, lk)[..., 0, :] if lq > 0 else None
        else:
            full = allowed.expand(*lead, lq, lk)
            last = full[..., -1:, :]
            tri = torch.ones(lq, lk, dtype=torch.bool, device=allowed.device).tril(lk - lq)
            if bool((full == full[..., :1, :]).all()):
                keys = full[..., 0, :]
            elif bool((full == (tri & last)).all()):
                keys, causal = full[..., -1, :], True
            else:
                raise ValueError(
                    "`attn_mask` is an arbitrary dense mask: linear attention can only honour a key "
                    "mask (broadcastable to (batch, 1, 1, Lk)), a causal mask aligned to the end "
                    "(query t sees keys s <= t + Lk - Lq; prefer is_causal=True) or their combination; "
                    f"got a mask of shape {tuple(allowed.shape)} that is neither"
                )
        if keys is not None:
            keys = keys.to(device)
            valid = keys if valid is None else valid & keys
    if valid is not None:
        valid = valid.to(device)
        if bool(valid.all()):
            valid = None
    return valid, causal
