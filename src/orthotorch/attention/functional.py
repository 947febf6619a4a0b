"""FAVOR+ attention: bidirectional, causal (prefix sums / SLiM), incremental decoding.

Shapes follow ``torch.nn.functional.scaled_dot_product_attention``: ``q`` ``(..., Lq, d)``, ``k``
``(..., Lk, d)``, ``v`` ``(..., Lk, dv)`` with identical leading dims (typically ``(batch, heads)``).

Stabilisation (every stabiliser cancels exactly between numerator and normaliser):

- queries: the row maximum of the query exponents is subtracted (a per-query constant);
- keys, bidirectional: a per-feature maximum ``c_i`` over the (unpadded) keys is subtracted from the key
  exponents and added to the query exponents before the query row maximum, so that the normaliser is
  bounded below by the largest single term: no overflow, no underflow to zero;
- keys, causal: a running maximum ``M_t = max_{s≤t, i} expo_i(k_s)`` (a scalar per position, using no
  future key); terms are rescaled by ``exp(M_s − M_t) ≤ 1``, exactly like an online softmax. Incremental
  decoding and the chunked/SLiM paths use the same rule, so they agree with the full causal forward.

Half-precision inputs are computed in float32 and the output is cast back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from orthotorch._validation import check_positive_int, check_tensor, describe
from orthotorch.attention.features import FeatureMap

_NEG_INF = float("-inf")
# Forward-pass checkpointing rule of the SLiM backward: keep the prefix state of a chunk boundary when
# rebuilding it by subtraction would amplify float64 rounding by more than this factor.
_AMPLIFICATION_LIMIT = 1e6


@dataclass
class FavorState:
    """Recurrent state of causal FAVOR attention (prefix sums), for decoding and slice-wise training.

    Attributes:
        kv: ``(..., M, dv + 1)`` float64: ``Σ_s φ̃(k_s) [v_s, 1]ᵀ`` with ``φ̃(k_s) = φ(k_s)·exp(−max_)``
            (the last column is the normaliser's key sum).
        max_: ``(...,)`` float64 running key-exponent maximum (``-inf`` before the first valid key).

    Memory per (batch, head): ``8·M·(dv + 1)`` bytes, independent of the sequence length.
    """

    kv: torch.Tensor
    max_: torch.Tensor

    def detach(self) -> FavorState:
        """A copy cut from the autograd graph."""
        return FavorState(self.kv.detach(), self.max_.detach())


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num/den`` with rows whose normaliser is exactly 0 (no valid key) mapped to 0, never NaN."""
    ok = den != 0
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


def _check_inputs(
    q: object, k: object, v: object, key_padding_mask: object, fmap: FeatureMap | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
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
    if q.shape[:-2] != k.shape[:-2] or q.shape[:-2] != v.shape[:-2]:
        raise ValueError(
            "`q`, `k`, `v` must have the same leading (batch, heads) dims, got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(
            f"`k` feature dim must equal `q`'s ({q.shape[-1]}), got k {tuple(k.shape)}"
        )
    if v.shape[-2] != k.shape[-2]:
        raise ValueError(f"`v` length must equal `k`'s ({k.shape[-2]}), got v {tuple(v.shape)}")
    if fmap is not None and fmap.dim != q.shape[-1]:
        raise ValueError(
            f"`features` was built for dim {fmap.dim}, but `q` has dim {q.shape[-1]} {tuple(q.shape)}"
        )
    valid = None
    if key_padding_mask is not None:
        mask = check_tensor("key_padding_mask", key_padding_mask)
        if mask.dtype != torch.bool:
            raise TypeError(
                f"`key_padding_mask` must be a bool tensor (True = padded key), got {describe(mask)}"
            )
        lead, lk = k.shape[:-2], k.shape[-2]
        if mask.shape == (*lead, lk):
            full = mask
        elif len(lead) >= 1 and mask.shape == (lead[0], lk):
            full = mask.reshape(lead[0], *([1] * (len(lead) - 1)), lk).expand(*lead, lk)
        else:
            raise ValueError(
                f"`key_padding_mask` must have shape (batch, Lk) = ({lead[0] if lead else '-'}, {lk}) "
                f"or {(*lead, lk)}, got {tuple(mask.shape)}"
            )
        valid = (~full).to(q.device)
    return q, k, v, valid


def _check_scale(d: int, scale: float | None) -> float:
    """The softmax temperature: ``1/√d`` by default; must be a positive finite number."""
    s = (1.0 / math.sqrt(d)) if scale is None else float(scale)
    if not (s > 0 and math.isfinite(s)):
        raise ValueError(f"`scale` must be a positive finite number, got {scale!r}")
    return s


def _bidirectional(
    fmap: FeatureMap, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None
) -> torch.Tensor:
    eq, bq = fmap.parts(q)
    ek, bk = fmap.parts(k)
    if valid is not None:
        ek = ek.masked_fill(~valid[..., None], _NEG_INF)
    with torch.no_grad():
        c = ek.amax(dim=-2, keepdim=True)  # (..., 1, M or 1): per-feature key maximum
        c = torch.where(torch.isfinite(c), c, torch.zeros_like(c))
        oq = eq + c
        r = oq.amax(dim=-1, keepdim=True)
    fk = torch.exp(ek - c)
    if bk is not None:
        fk = fk * bk
        if valid is not None:
            fk = fk * valid[..., None].to(fk.dtype)
    fq = torch.exp(eq + c - r)
    if bq is not None:
        fq = fq * bq
    if fk.shape[-1] != fq.shape[-1]:  # trig/relu with scalar exponents: broadcast explicitly
        width = max(fk.shape[-1], fq.shape[-1])
        fk = fk.expand(*fk.shape[:-1], width)
        fq = fq.expand(*fq.shape[:-1], width)
    ones = torch.ones(*v.shape[:-1], 1, dtype=v.dtype, device=v.device)
    kv = fk.transpose(-1, -2) @ torch.cat([v, ones], dim=-1)  # (..., M, dv+1)
    out = fq @ kv
    return _safe_div(out[..., :-1], out[..., -1:])


def _features_full(expo: torch.Tensor, base: torch.Tensor | None, width: int) -> torch.Tensor:
    out = torch.exp(expo)
    if base is not None:
        out = out * base
    if out.shape[-1] != width:
        out = out.expand(*out.shape[:-1], width)
    return out


def _chunk_keys(
    fmap: FeatureMap,
    k: torch.Tensor,
    v: torch.Tensor,
    valid: torch.Tensor | None,
    max_prev: torch.Tensor,
):
    """Key half of one causal chunk. Returns fk (..., C, M), run (..., C), v_aug, delta, decay."""
    ek, bk = fmap.parts(k)
    if valid is not None:
        ek = ek.masked_fill(~valid[..., None], _NEG_INF)
    with torch.no_grad():
        pos = ek.amax(dim=-1)  # (..., C)
        run = torch.maximum(torch.cummax(pos, dim=-1).values, max_prev[..., None].to(pos.dtype))
        run_safe = torch.where(torch.isfinite(run), run, torch.zeros_like(run))
        new_max = run[..., -1].to(torch.float64)
        # decay of the carried state: exp(max_prev − new_max), 0 when nothing was carried
        fin = torch.isfinite(max_prev)
        dec = torch.exp((max_prev - new_max).clamp(max=0.0))
        decay = torch.where(fin, dec, torch.zeros_like(dec))
        to_end = torch.exp((run_safe - run_safe[..., -1:]).clamp(max=0.0))  # (..., C)
    fk = _features_full(ek - run_safe[..., None], bk, fmap.feature_dim)
    if valid is not None and bk is not None:
        fk = fk * valid[..., None].to(fk.dtype)
    ones = torch.ones(*v.shape[:-1], 1, dtype=v.dtype, device=v.device)
    v_aug = torch.cat([v, ones], dim=-1)
    # (..., M, dv+1), relative to new_max
    delta = (fk * to_end[..., None]).transpose(-1, -2) @ v_aug
    return fk, run_safe, run, v_aug, delta, decay, new_max


def _chunk_queries(
    fmap: FeatureMap,
    q: torch.Tensor,
    fk: torch.Tensor,
    run_safe: torch.Tensor,
    run: torch.Tensor,
    v_aug: torch.Tensor,
    kv_prev: torch.Tensor,
    max_prev: torch.Tensor,
) -> torch.Tensor:
    """Query half of one causal chunk: un-normalised ``(..., C, dv+1)`` (numerator, normaliser)."""
    eq, bq = fmap.parts(q)
    with torch.no_grad():
        r = eq.amax(dim=-1, keepdim=True)
        c = q.shape[-2]
        tril = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
        # [t, s] = M_s − M_t ≤ 0 for s ≤ t
        diff = (run_safe[..., None, :] - run_safe[..., :, None]).clamp(max=0.0)
        dmat = torch.where(tril, torch.exp(diff), torch.zeros_like(diff))
        fin = torch.isfinite(max_prev)[..., None]
        inter = torch.exp((max_prev[..., None].to(run.dtype) - run_safe).clamp(max=0.0))
        inter = torch.where(fin, inter, torch.zeros_like(inter))  # (..., C)
    fq = _features_full(eq - r, bq, fmap.feature_dim)
    scores = (fq @ fk.transpose(-1, -2)) * dmat
    out = scores @ v_aug
    out = out + (fq @ kv_prev.to(fq.dtype)) * inter[..., None]
    return out


def _causal_chunk(fmap, q, k, v, valid, state: FavorState):
    fk, run_safe, run, v_aug, delta, decay, new_max = _chunk_keys(fmap, k, v, valid, state.max_)
    out = _chunk_queries(fmap, q, fk, run_safe, run, v_aug, state.kv, state.max_)
    kv_new = state.kv * decay[..., None, None] + delta.to(torch.float64)
    return out, FavorState(kv_new, new_max)


def init_state(
    lead: tuple[int, ...] | torch.Size,
    feature_dim: int,
    value_dim: int,
    *,
    device: torch.device | str | None = None,
) -> FavorState:
    """Empty causal state for leading dims ``lead`` (e.g. ``(batch, heads)``): zeros and ``-inf`` max."""
    kv = torch.zeros(*lead, feature_dim, value_dim + 1, dtype=torch.float64, device=device)
    mx = torch.full(tuple(lead), _NEG_INF, dtype=torch.float64, device=device)
    return FavorState(kv, mx)


def _slices(length: int, chunk: int) -> list[tuple[int, int]]:
    return [(s, min(s + chunk, length)) for s in range(0, length, chunk)]


def _sub(t: torch.Tensor | None, a: int, b: int, dim: int) -> torch.Tensor | None:
    return None if t is None else t.narrow(dim, a, b - a)


class _SlimFunction(torch.autograd.Function):
    """Causal FAVOR by chunks with memory independent of L beyond inputs and outputs (SLiM).

    Forward keeps only the running state; backward walks the chunks in reverse, rebuilding each chunk's
    incoming state by subtraction in float64 (``kv_prev = (kv − Δ)/decay``) and recomputing the chunk
    under autograd. A boundary state is stored in the forward pass only where subtraction would amplify
    rounding by more than ``_AMPLIFICATION_LIMIT`` (O(log L) states for stationary inputs).
    """

    @staticmethod
    def forward(ctx, q, k, v, kv0, max0, valid, fmap, chunk, root):  # type: ignore[override]
        # q, k arrive unscaled: scaling chunk by chunk avoids L-sized copies (``root`` = √scale)
        length = q.shape[-2]
        state = FavorState(kv0.detach(), max0.detach())
        result = torch.empty(*q.shape[:-1], v.shape[-1], dtype=v.dtype, device=v.device)
        maxes = [state.max_]
        ckpt: dict[int, torch.Tensor] = {}
        amp = 1.0
        spans = _slices(length, chunk)
        for idx, (a, b) in enumerate(spans):
            out, new = _causal_chunk(
                fmap,
                q[..., a:b, :] * root,
                k[..., a:b, :] * root,
                v[..., a:b, :],
                _sub(valid, a, b, -1),
                state,
            )
            result[..., a:b, :] = _safe_div(out[..., :-1], out[..., -1:])
            carried = (state.kv * _decay(state.max_, new.max_)[..., None, None]).flatten(-2)
            ratio = new.kv.flatten(-2).norm(dim=-1) / carried.norm(dim=-1)
            ratio = torch.where(torch.isnan(ratio), torch.ones_like(ratio), ratio)
            amp *= float(ratio.max())
            if amp > _AMPLIFICATION_LIMIT:
                ckpt[idx] = state.kv  # incoming state of chunk idx
                amp = 1.0
            state = new
            maxes.append(state.max_)
        ctx.fmap, ctx.chunk, ctx.spans, ctx.ckpt, ctx.root = fmap, chunk, spans, ckpt, root
        ctx.maxes = maxes
        ctx.kv0 = kv0.detach()
        ctx.has_valid = valid is not None
        ctx.save_for_backward(q, k, v, state.kv, valid if valid is not None else q.new_empty(0))
        ctx.mark_non_differentiable(state.max_)
        return result, state.kv, state.max_

    @staticmethod
    def backward(ctx, g_out, g_kv, _g_max):  # type: ignore[override]
        q, k, v, kv, valid = ctx.saved_tensors
        valid = valid if ctx.has_valid else None
        fmap = ctx.fmap
        gq, gk, gv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        g_kv = torch.zeros_like(kv) if g_kv is None else g_kv
        if g_out is None:
            g_out = torch.zeros(*q.shape[:-1], v.shape[-1], dtype=v.dtype, device=v.device)
        for idx in range(len(ctx.spans) - 1, -1, -1):
            a, b = ctx.spans[idx]
            max_prev = ctx.maxes[idx]
            with torch.enable_grad():
                qc = q[..., a:b, :].detach().requires_grad_()
                kc = k[..., a:b, :].detach().requires_grad_()
                vc = v[..., a:b, :].detach().requires_grad_()
                fk, run_safe, run, v_aug, delta, decay, _ = _chunk_keys(
                    fmap, kc * ctx.root, vc, _sub(valid, a, b, -1), max_prev
                )
                with torch.no_grad():
                    if idx in ctx.ckpt:
                        kv_prev = ctx.ckpt[idx]
                    elif idx == 0:
                        kv_prev = ctx.kv0
                    else:
                        dd = decay[..., None, None]
                        rebuilt = (kv - delta.detach().to(torch.float64)) / torch.where(
                            dd > 0, dd, torch.ones_like(dd)
                        )
                        kv_prev = torch.where(dd > 0, rebuilt, torch.zeros_like(rebuilt))
                kv_leaf = kv_prev.detach().requires_grad_()
                out = _chunk_queries(
                    fmap, qc * ctx.root, fk, run_safe, run, v_aug, kv_leaf, max_prev
                )
                y = _safe_div(out[..., :-1], out[..., -1:])
                kv_new = kv_leaf * decay[..., None, None] + delta.to(torch.float64)
                gq_c, gk_c, gv_c, g_prev = torch.autograd.grad(
                    [y, kv_new],
                    [qc, kc, vc, kv_leaf],
                    [g_out[..., a:b, :], g_kv],
                    allow_unused=True,
                )
            if gq_c is not None:
                gq[..., a:b, :] = gq_c
            if gk_c is not None:
                gk[..., a:b, :] = gk_c
            if gv_c is not None:
                gv[..., a:b, :] = gv_c
            g_kv = g_prev if g_prev is not None else torch.zeros_like(kv)
            kv = kv_prev
        return gq, gk, gv, g_kv, None, None, None, None, None


def _decay(max_prev: torch.Tensor, max_new: torch.Tensor) -> torch.Tensor:
    fin = torch.isfinite(max_prev)
    dec = torch.exp((max_prev - max_new).clamp(max=0.0))
    return torch.where(fin, dec, torch.zeros_like(dec))


def _prefix_causal(
    fmap: FeatureMap, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None
) -> torch.Tensor:
    """Textbook causal FAVOR by cumulative sums of outer products: O(L·M·dv) memory (reference).

    Keys are stabilised by the data-independent bound of :meth:`FeatureMap.key_bound` (uses no key at
    all, so nothing leaks from the future); very large key norms can underflow in float32.
    """
    eq, bq = fmap.parts(q)
    ek, bk = fmap.parts(k)
    bound = fmap.key_bound().to(ek.dtype)
    width = fmap.feature_dim
    if valid is not None:
        ek = ek.masked_fill(~valid[..., None], _NEG_INF)
    with torch.no_grad():
        r = (eq + bound).amax(dim=-1, keepdim=True)
    fk = _features_full(ek - bound, bk, width)
    if valid is not None and bk is not None:
        fk = fk * valid[..., None].to(fk.dtype)
    fq = _features_full(eq + bound - r, bq, width)
    ones = torch.ones(*v.shape[:-1], 1, dtype=v.dtype, device=v.device)
    v_aug = torch.cat([v, ones], dim=-1)
    prefix = torch.cumsum(fk[..., :, :, None] * v_aug[..., :, None, :], dim=-3)  # (..., L, M, dv+1)
    out = (fq[..., None, :] @ prefix).squeeze(-2)
    return _safe_div(out[..., :-1], out[..., -1:])


def _autograd_causal(fmap, q, k, v, valid, state: FavorState, chunk: int):
    outs = []
    for a, b in _slices(q.shape[-2], chunk):
        out, state = _causal_chunk(
            fmap, q[..., a:b, :], k[..., a:b, :], v[..., a:b, :], _sub(valid, a, b, -1), state
        )
        outs.append(_safe_div(out[..., :-1], out[..., -1:]))
    return torch.cat(outs, dim=-2), state


IMPLEMENTATIONS = ("slim", "chunked", "prefix")


def favor_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    features: FeatureMap | None = None,
    num_features: int = 256,
    kind: str = "positive",
    projection: str = "orthogonal",
    generator: torch.Generator | None = None,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    chunk_size: int = 256,
    implementation: str = "slim",
    state: FavorState | None = None,
    return_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, FavorState]:
    """FAVOR+ linear attention, shaped like ``scaled_dot_product_attention``.

    Approximates ``softmax(q kᵀ·scale) v`` by ``D⁻¹ φ(q')(φ(k')ᵀ v)`` with ``q' = q·√scale``,
    ``k' = k·√scale`` (default ``scale = 1/√d``), in O(L·M·(d + dv)) time.

    Args:
        q: ``(..., Lq, d)``; k: ``(..., Lk, d)``; v: ``(..., Lk, dv)``; identical leading dims (e.g.
            ``(batch, heads)``). float16/bfloat16 inputs are computed in float32, output cast back.
        causal: position ``t`` attends to keys ``s ≤ t`` (needs ``Lq == Lk``).
        features: a :class:`FeatureMap` (its projection is reused); if ``None`` one is built from
            ``num_features``, ``kind``, ``projection`` and ``generator`` (default: a fresh generator
            seeded 0, so calls are reproducible; pass your own generator or feature map to redraw).
        key_padding_mask: bool ``(batch, Lk)`` or ``(..., Lk)``, True marks a padded key (the
            ``nn.MultiheadAttention`` convention). Padded keys are removed from numerator and normaliser.
            Queries with no valid key get a zero output.
        scale: softmax temperature (default ``1/√d``).
        chunk_size: causal chunk length ``C``: time O(L·C·M) for the intra-chunk part, memory O(C·M).
        implementation: causal only: ``"slim"`` (custom autograd, memory independent of L beyond inputs
            and outputs), ``"chunked"`` (same maths, plain autograd: stores every chunk) or ``"prefix"``
            (textbook cumulative sums, O(L·M·dv) memory; reference).
        state: causal only: a :class:`FavorState` to continue from (e.g. the previous slice/tokens).
        return_state: causal only: also return the final :class:`FavorState` (``slim``/``chunked``).

    Returns:
        ``(..., Lq, dv)`` (and the final state when ``return_state``).
    """
    q, k, v, valid = _check_inputs(q, k, v, key_padding_mask, features)
    if features is None:
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        features = FeatureMap(
            q.shape[-1], num_features, kind=kind, projection=projection, generator=gen
        ).to(q.device)
    elif not isinstance(features, FeatureMap):
        raise TypeError(f"`features` must be a FeatureMap or None, got {type(features).__name__}")
    check_positive_int("chunk_size", chunk_size)
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"`implementation` must be one of {IMPLEMENTATIONS}, got {implementation!r}"
        )
    out_dtype = q.dtype
    cd = _compute_dtype(q.dtype)
    q, k, v = q.to(cd), k.to(cd), v.to(cd)
    root = math.sqrt(_check_scale(q.shape[-1], scale))
    if not causal:
        if state is not None or return_state:
            raise ValueError("`state`/`return_state` are only meaningful with causal=True")
        return _bidirectional(features, q * root, k * root, v, valid).to(out_dtype)
    if q.shape[-2] != k.shape[-2]:
        raise ValueError(
            f"causal attention needs Lq == Lk, got q {tuple(q.shape)} and k {tuple(k.shape)}"
        )
    if implementation == "prefix":
        if state is not None or return_state:
            raise ValueError(
                "implementation='prefix' does not carry a state; use 'slim' or 'chunked'"
            )
        return _prefix_causal(features, q * root, k * root, v, valid).to(out_dtype)
    lead = q.shape[:-2]
    if state is None:
        state = init_state(lead, features.feature_dim, v.shape[-1], device=q.device)
    else:
        _check_state(state, lead, features.feature_dim, v.shape[-1])
    if implementation == "chunked":
        out, final = _autograd_causal(features, q * root, k * root, v, valid, state, chunk_size)
    else:
        out, kv, mx = _SlimFunction.apply(
            q, k, v, state.kv, state.max_, valid, features, chunk_size, root
        )
        final = FavorState(kv, mx)
    out = out.to(out_dtype)
    return (out, final) if return_state else out


def _check_state(state: object, lead, feature_dim: int, value_dim: int) -> None:
    if not isinstance(state, FavorState):
        raise TypeError(f"`state` must be a FavorState, got {type(state).__name__}")
    want = (*lead, feature_dim, value_dim + 1)
    if tuple(state.kv.shape) != want or tuple(state.max_.shape) != tuple(lead):
        raise ValueError(
            f"`state` must have kv {want} and max_ {tuple(lead)}, got kv {tuple(state.kv.shape)} "
            f"and max_ {tuple(state.max_.shape)}"
        )


def favor_decode_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: FavorState | None,
    *,
    features: FeatureMap,
    scale: float | None = None,
) -> tuple[torch.Tensor, FavorState]:
    """Causal FAVOR for new tokens given the prefix state: O(T·M·(d + dv)) for T new tokens, whatever
    the prefix length (O(1) per generated token).

    Args:
        q, k: ``(..., T, d)``; v: ``(..., T, dv)`` (usually ``T = 1``).
        state: the :class:`FavorState` after the prefix (``None`` for an empty prefix).
        features: the same :class:`FeatureMap` as the prefix was processed with.

    Returns:
        ``(out (..., T, dv), new_state)``; equal to the corresponding rows of the full causal forward.
    """
    out, new = favor_attention(
        q,
        k,
        v,
        causal=True,
        features=features,
        scale=scale,
        state=state,
        return_state=True,
        chunk_size=max(1, q.shape[-2]),
        implementation="chunked",
    )
    return out, new


def softmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Exact softmax attention with the same conventions as :func:`favor_attention` (reference).

    O(Lq·Lk) memory. Queries with no valid key return zeros (SDPA would return NaN).
    """
    q, k, v, valid = _check_inputs(q, k, v, key_padding_mask, None)
    s = (1.0 / math.sqrt(q.shape[-1])) if scale is None else float(scale)
    logits = (q @ k.transpose(-1, -2)) * s
    allowed = torch.ones(logits.shape[-2:], dtype=torch.bool, device=q.device)
    if causal:
        if q.shape[-2] != k.shape[-2]:
            raise ValueError(
                f"causal attention needs Lq == Lk, got q {tuple(q.shape)} and k {tuple(k.shape)}"
            )
        allowed = allowed.tril()
    allowed = allowed if valid is None else allowed & valid[..., None, :]
    logits = logits.masked_fill(~allowed, _NEG_INF)
    any_ok = allowed.any(dim=-1, keepdim=True)
    logits = torch.where(any_ok, logits, torch.zeros_like(logits))
    p = torch.softmax(logits, dim=-1) * any_ok.to(logits.dtype)
    return p @ v


@torch.no_grad()
def rebuild_state(
    features: FeatureMap,
    k: torch.Tensor,
    v: torch.Tensor,
    state_out: FavorState,
    max_in: torch.Tensor,
    *,
    scale: float | None = None,
    chunk_size: int = 256,
) -> FavorState:
    """Invert a causal slice: the incoming state from the outgoing one and the slice's keys/values.

    ``kv_in = (kv_out − Δ)/exp(max_in − max_out)`` where ``Δ`` is the slice's contribution (computed
    chunk by chunk, O(C·M) memory). Exact up to float64 rounding, amplified by
    ``‖kv_out‖/‖kv_in·decay‖``; callers keep a stored state where that amplification is large.

    Args:
        k: ``(..., T, d)``, v: ``(..., T, dv)`` unscaled, as given to :func:`favor_attention`.
        state_out: state after the slice. max_in: ``(...,)`` running maximum before the slice.
    """
    cd = _compute_dtype(k.dtype)
    s = _check_scale(k.shape[-1], scale)
    k, v = k.to(cd) * math.sqrt(s), v.to(cd)
    acc = FavorState(torch.zeros_like(state_out.kv), max_in)
    for a, b in _slices(k.shape[-2], chunk_size):
        _, _, _, _, delta, decay, new_max = _chunk_keys(
            features, k[..., a:b, :], v[..., a:b, :], None, acc.max_
        )
        acc = FavorState(acc.kv * decay[..., None, None] + delta.to(torch.float64), new_max)
    total_decay = _decay(max_in, acc.max_)[..., None, None]
    kv_in = (state_out.kv - acc.kv) / torch.where(
        total_decay > 0, total_decay, torch.ones_like(total_decay)
    )
    kv_in = torch.where(total_decay > 0, kv_in, torch.zeros_like(kv_in))
    return FavorState(kv_in, max_in)
