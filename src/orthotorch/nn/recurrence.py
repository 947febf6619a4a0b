"""The time loop of an orthogonal RNN layer: ``h_t = f(x̃_t + W h_{t−1})`` with ``x̃ = W_ih x + b`` precomputed.

Two fast paths, both taking the recurrent matrix ``W`` evaluated once per sequence:

- ``tanh`` / ``relu``: torch's fused C++ loop (``torch._VF.rnn_tanh`` / ``rnn_relu``, what ``nn.RNN`` runs on
  CPU), called with our weights; packed sequences go through its packed variant.
- ``modrelu`` / ``identity``: :class:`_Recurrence`, a custom autograd function. Its forward is a loop of one
  ``addmm`` and two or three pointwise ops per step with no autograd bookkeeping; its backward is a
  reverse loop of one ``mm`` per step, and the weight gradient is **one** GEMM over all steps,
  ``dW = Σ_t dz_tᵀ h_{t−1}``. Variable lengths are a boolean mask (a finished sequence holds its state).

:func:`reference_recurrence` is the explicit per-step autograd loop, the reference of the tests.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from orthotorch._compat import functorch_transforms_active
from orthotorch.nn.nonlinearities import modrelu

__all__ = ["recurrence", "reference_recurrence"]


def _step(z: torch.Tensor, nonlinearity: str, bias: torch.Tensor | None) -> torch.Tensor:
    if nonlinearity == "modrelu":
        assert bias is not None
        return modrelu(z, bias)
    if nonlinearity == "tanh":
        return torch.tanh(z)
    if nonlinearity == "relu":
        return torch.relu(z)
    return z


def reference_recurrence(
    xproj: torch.Tensor,
    h0: torch.Tensor,
    weight: torch.Tensor,
    nonlinearity: str,
    bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Explicit loop ``h_t = f(xproj_t + h_{t−1} Wᵀ)``; ``(T, B, H)`` states (held where ``mask`` is False).

    Shapes: ``xproj (T, B, H)``, ``h0 (B, H)``, ``weight (H, H)``, ``bias (H,)`` (modrelu), ``mask (T, B)``.
    """
    h = h0
    out = []
    for t in range(xproj.shape[0]):
        new = _step(xproj[t] + h @ weight.T, nonlinearity, bias)
        if mask is not None:
            new = torch.where(mask[t].unsqueeze(-1), new, h)
        out.append(new)
        h = new
    return torch.stack(out) if out else xproj.new_zeros((0, *h0.shape))


class _Recurrence(torch.autograd.Function):
    """modrelu / identity recurrence with a hand-written backward (see the module docstring)."""

    @staticmethod
    def forward(ctx, xproj, h0, weight, bias, mask, modrelu_on):
        T = xproj.shape[0]
        hs = torch.empty_like(xproj)
        zs = torch.empty_like(xproj) if modrelu_on else xproj.new_empty(0)
        wt = weight.T
        h = h0
        for t in range(T):
            z = torch.addmm(xproj[t], h, wt)
            if modrelu_on:
                zs[t] = z
                new = torch.relu_(z.abs().add_(bias)).mul_(torch.sign(z))
            else:
                new = z
            if mask is not None:
                new = torch.where(mask[t].unsqueeze(-1), new, h)
            hs[t] = new
            h = hs[t]
        ctx.modrelu_on = modrelu_on
        ctx.save_for_backward(h0, weight, bias, mask, hs, zs)
        return hs

    @staticmethod
    @once_differentiable
    def backward(ctx, dhs):
        h0, weight, bias, mask, hs, zs = ctx.saved_tensors
        T, H = hs.shape[0], hs.shape[2]
        dzs = torch.empty_like(hs)
        dh = torch.zeros_like(h0)
        dbias = torch.zeros(H, dtype=hs.dtype, device=hs.device)
        for t in range(T - 1, -1, -1):
            g = dhs[t] + dh
            carry = None
            if mask is not None:
                m = mask[t].unsqueeze(-1)
                carry = torch.where(m, 0.0, g)
                g = torch.where(m, g, 0.0)
            if ctx.modrelu_on:
                z = zs[t]
                s = torch.sign(z)
                active = (z.abs() + bias) > 0
                gs = torch.where(active, g, 0.0)
                dbias += (gs * s).sum(0)
                dz = gs * (s * s)
            else:
                dz = g
            dzs[t] = dz
            dh = dz @ weight
            if carry is not None:
                dh = dh + carry
        hprev = torch.cat([h0.unsqueeze(0), hs[:-1]]) if T else hs
        dweight = dzs.reshape(-1, H).T @ hprev.reshape(-1, H)
        return dzs, dh, dweight, (dbias if ctx.modrelu_on else None), None, None


def recurrence(
    xproj: torch.Tensor,
    h0: torch.Tensor,
    weight: torch.Tensor,
    nonlinearity: str,
    bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fast ``(T, B, H)`` states for ``modrelu``/``identity`` (same contract as :func:`reference_recurrence`).

    Falls back to the reference loop for another nonlinearity, an empty sequence and under a
    ``torch.func`` transform. The fast path is ``once_differentiable`` (no double backward).
    """
    if (
        nonlinearity not in ("modrelu", "identity")
        or xproj.shape[0] == 0
        or functorch_transforms_active()
    ):
        return reference_recurrence(xproj, h0, weight, nonlinearity, bias, mask)
    if nonlinearity == "modrelu" and bias is None:
        raise ValueError("modrelu needs its bias")
    b = bias if bias is not None else xproj.new_zeros(0)
    return _Recurrence.apply(
        xproj.contiguous(), h0.contiguous(), weight, b, mask, nonlinearity == "modrelu"
    )
