"""FAVOR+ attention, the functional API: bidirectional, causal (SLiM / chunked / prefix), decoding.

``favor_attention`` takes ``scaled_dot_product_attention``'s arguments with their meaning (``q``
``(..., Lq, d)``, ``k`` ``(..., Lk, d)``, ``v`` ``(..., Lk, dv)``, broadcast leading dims, ``attn_mask``,
``dropout_p``, ``is_causal``, ``scale``, ``enable_gqa``) plus FAVOR's own keywords. The causal algebra
(prefix states, stabilised chunks, the SLiM autograd Function) lives in
:mod:`orthotorch.attention.causal`, the argument checks in :mod:`orthotorch.attention._checks` and the
exact reference in :mod:`orthotorch.attention.reference`.

Bidirectional stabilisation: the row maximum of the query exponents is subtracted, and a per-feature
maximum ``c_i`` over the (unpadded) keys is moved from the key exponents to the query exponents before
that row maximum, so the normaliser is at least its largest single term: no overflow, no underflow to
zero. Both cancel exactly. Half-precision inputs are computed in float32 and the output is cast back.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections import OrderedDict

import torch

from orthotorch._numerics import compute_dtype
from orthotorch._validation import check_bool, check_generator, check_positive_int
from orthotorch.attention._checks import broadcast_qkv, check_dropout, check_scale, key_validity
from orthotorch.attention.causal import (
    FavorState,
    SlimFunction,
    augment,
    autograd_causal,
    init_state,
    prefix_causal,
    rebuild_state_chunks,
    safe_div,
)
from orthotorch.attention.features import FeatureMap
from orthotorch.attention.reference import softmax_attention

__all__ = [
    "IMPLEMENTATIONS",
    "FavorState",
    "clear_feature_cache",
    "favor_attention",
    "favor_decode_step",
    "init_state",
    "rebuild_state",
    "softmax_attention",
]

IMPLEMENTATIONS = ("slim", "chunked", "prefix")
_NEG_INF = float("-inf")

# ------------------------------------------------------------------------------ feature-map cache
#: How many feature maps ``favor_attention`` keeps when it builds them itself (least recently used go).
FEATURE_CACHE_SIZE = 32
_CACHE: OrderedDict[tuple, tuple[FeatureMap, torch.Tensor | None]] = OrderedDict()
_CACHE_LOCK = threading.Lock()


def clear_feature_cache() -> None:
    """Forget the feature maps that :func:`favor_attention` built and cached (see ``features=``)."""
    with _CACHE_LOCK:
        _CACHE.clear()


def _cached_features(
    dim: int,
    num_features: int,
    kind: str,
    projection: str,
    generator: torch.Generator | None,
    device: torch.device,
    dtype: torch.dtype,
) -> FeatureMap:
    """The feature map of one call without ``features=``, from the cache when possible.

    Keyed by ``(d, m, kind, projection, device, dtype)`` and the generator's state before the draw
    (``None`` = the default generator seeded 0). A hit leaves the generator in the state a fresh draw
    would have left it in, so results and generator streams are exactly those of an uncached call.
    """
    check_positive_int("num_features", num_features)
    gen_key: tuple[str, ...] = ("seed0",)
    if generator is not None:
        digest = hashlib.sha1(generator.get_state().cpu().numpy().tobytes()).hexdigest()
        gen_key = (str(generator.device), digest)
    key = (dim, num_features, kind, projection, str(device), dtype, gen_key)
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
        if hit is not None:
            _CACHE.move_to_end(key)
    if hit is not None:
        fmap, after = hit
        if generator is not None and after is not None:
            generator.set_state(after)
        return fmap
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    fmap = FeatureMap(dim, num_features, kind=kind, projection=projection, generator=gen)
    fmap = fmap.to(device=device, dtype=dtype)
    fmap.requires_grad_(False)
    after = None if generator is None else generator.get_state()
    with _CACHE_LOCK:
        _CACHE[key] = (fmap, after)
        while len(_CACHE) > FEATURE_CACHE_SIZE:
            _CACHE.popitem(last=False)
    return fmap


# ------------------------------------------------------------------------------ bidirectional
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
        r = (eq + c).amax(dim=-1, keepdim=True)
    fk = torch.exp(ek - c)
    if bk is not None:
        fk = fk * bk
    fq = torch.exp(eq + c - r)
    if bq is not None:
        fq = fq * bq
    if fk.shape[-1] != fq.shape[-1]:  # trig/relu with scalar exponents: broadcast explicitly
        width = max(fk.shape[-1], fq.shape[-1])
        fk = fk.expand(*fk.shape[:-1], width)
        fq = fq.expand(*fq.shape[:-1], width)
    kv = fk.transpose(-1, -2) @ augment(v)  # (..., M, dv+1)
    out = fq @ kv
    return safe_div(out[..., :-1], out[..., -1:])


def _check_state(state: object, lead, feature_dim: int, value_dim: int) -> FavorState:
    if not isinstance(state, FavorState):
        raise TypeError(f"`state` must be a FavorState, got {type(state).__name__}")
    want = (*lead, feature_dim, value_dim + 1)
    if tuple(state.kv.shape) != want or tuple(state.max_.shape) != (*lead, feature_dim):
        raise ValueError(
            f"`state` must have kv {want} and max_ {(*lead, feature_dim)}, got kv "
            f"{tuple(state.kv.shape)} and max_ {tuple(state.max_.shape)}"
        )
    return state


def _empty_output(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Zeros ``(..., Lq, dv)`` for ``Lq == 0`` or ``Lk == 0``, connected to q, k, v (zero gradients)."""
    return q[..., :0] @ v[..., :0, :] + k[..., :0, :].sum()


def favor_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    causal: bool = False,
    features: FeatureMap | None = None,
    num_features: int = 256,
    kind: str = "positive",
    projection: str = "orthogonal",
    generator: torch.Generator | None = None,
    key_padding_mask: torch.Tensor | None = None,
    chunk_size: int = 256,
    implementation: str = "slim",
    state: FavorState | None = None,
    return_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, FavorState]:
    """FAVOR+ linear attention with the signature of ``scaled_dot_product_attention``.

    Approximates ``softmax(q kᵀ·scale) v`` by ``D⁻¹ φ(q')(φ(k')ᵀ v)`` with ``q' = q·√scale``,
    ``k' = k·√scale``, in O(L·M·(d + dv)) time (``M`` features, docs/attention.md).

    Args:
        q: ``(..., Lq, d)``; k: ``(..., Lk, d)``; v: ``(..., Lk, dv)``; leading dims (e.g. ``(batch,
            heads)``) broadcast. float16/bfloat16 are computed in float32, the output is cast back.
        attn_mask: SDPA's mask (bool, True = may attend; or float 0/-inf), broadcastable to
            ``(..., Lq, Lk)``. Only masks linear attention can honour are accepted: a key mask
            (e.g. ``(B, 1, 1, Lk)``), a causal mask aligned to the end, or their combination; any other
            dense mask raises ``ValueError``.
        dropout_p: must be 0.0 (``ValueError`` otherwise: no attention weights exist to drop).
        is_causal: query ``t`` attends to keys ``s ≤ t + Lk − Lq`` (queries aligned to the end of the
            keys, as in decoding with a cache; for ``Lq == Lk`` SDPA's lower triangle. SDPA aligns the
            start instead when ``Lq ≠ Lk``).
        scale: softmax temperature, a positive finite number (default ``1/√d``).
        enable_gqa: grouped-query attention: ``k``, ``v`` may have ``Hq/G`` heads (dim -3).
        causal: same as ``is_causal`` (kept for existing code).
        features: a :class:`FeatureMap` (its projection is reused). If ``None`` one is built from
            ``num_features``, ``kind``, ``projection`` and ``generator`` (default: a generator seeded 0,
            so calls are reproducible; pass your own generator or feature map to redraw) and cached
            by (d, m, kind, projection, device, dtype, generator state), see :func:`clear_feature_cache`.
        key_padding_mask: bool ``(batch, Lk)`` or broadcastable to ``(..., Lk)``, True = padded key (the
            ``nn.MultiheadAttention`` convention). Padded keys and values (even NaN) never reach the
            output; queries with no valid key get a zero output (SDPA would give NaN).
        chunk_size: causal chunk length ``C``: time O(L·C·M) for the intra-chunk part, memory O(C·M).
        implementation: causal only: ``"slim"`` (custom autograd, memory independent of L beyond inputs
            and outputs; double backward supported), ``"chunked"`` (same maths, plain autograd: stores
            every chunk) or ``"prefix"`` (textbook cumulative sums, O(L·M·dv) memory; reference, raises
            where its data-independent stabiliser underflows).
        state: causal only: a :class:`FavorState` to continue from (e.g. the previous slice/tokens).
        return_state: causal only: also return the final :class:`FavorState` (``slim``/``chunked``).

    Returns:
        ``(..., Lq, dv)`` (and the final state when ``return_state``). Empty ``Lq`` or ``Lk`` give
        empty/zero outputs with zero gradients.
    """
    check_dropout(dropout_p)
    check_bool("is_causal", is_causal)
    check_bool("causal", causal)
    check_bool("enable_gqa", enable_gqa)
    check_bool("return_state", return_state)
    check_generator("generator", generator)
    q, k, v = broadcast_qkv(q, k, v, enable_gqa=enable_gqa)
    lead = tuple(q.shape[:-2])
    lq, lk, d = q.shape[-2], k.shape[-2], q.shape[-1]
    if features is not None and not isinstance(features, FeatureMap):
        raise TypeError(f"`features` must be a FeatureMap or None, got {type(features).__name__}")
    if features is not None and features.dim != d:
        raise ValueError(
            f"`features` was built for dim {features.dim}, but `q` has dim {d} {tuple(q.shape)}"
        )
    check_positive_int("chunk_size", chunk_size)
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"`implementation` must be one of {IMPLEMENTATIONS}, got {implementation!r}"
        )
    valid, mask_causal = key_validity(attn_mask, key_padding_mask, lead, lq, lk, q.device)
    causal = causal or is_causal or mask_causal
    root = math.sqrt(check_scale(d, scale))
    out_dtype = q.dtype
    cd = compute_dtype(q.dtype)
    if features is None:
        features = _cached_features(
            d, num_features, kind, projection, generator, q.device, torch.float32
        )
    if not causal and (state is not None or return_state):
        raise ValueError("`state`/`return_state` are only meaningful with causal=True")
    if implementation == "prefix" and causal and (state is not None or return_state):
        raise ValueError("implementation='prefix' does not carry a state; use 'slim' or 'chunked'")
    if causal and state is not None:
        state = _check_state(state, lead, features.feature_dim, v.shape[-1])
    q, k, v = q.to(cd), k.to(cd), v.to(cd)
    if valid is not None:  # padded keys and values must not touch the result, even as 0·NaN
        keep = valid[..., None]
        k = k.masked_fill(~keep, 0.0)
        v = v.masked_fill(~keep, 0.0)
    if not causal:
        if lq == 0 or lk == 0:
            return _empty_output(q, k, v).to(out_dtype)
        return _bidirectional(features, q * root, k * root, v, valid).to(out_dtype)

    # causal, queries aligned to the end of the keys: pad the shorter side at the front
    if lq < lk:
        q = torch.cat([q.new_zeros(*lead, lk - lq, d), q], dim=-2)
    elif lk < lq:
        pad = lq - lk
        k = torch.cat([k.new_zeros(*lead, pad, d), k], dim=-2)
        v = torch.cat([v.new_zeros(*lead, pad, v.shape[-1]), v], dim=-2)
        front = torch.zeros(*lead, pad, dtype=torch.bool, device=q.device)
        base = torch.ones(*lead, lk, dtype=torch.bool, device=q.device) if valid is None else valid
        valid = torch.cat([front, base], dim=-1)
    drop = max(0, lk - lq)
    if implementation == "prefix":
        out = prefix_causal(features, q * root, k * root, v, valid)
        return out[..., drop:, :].to(out_dtype)
    if state is None:
        state = init_state(lead, features.feature_dim, v.shape[-1], device=q.device)
    if implementation == "chunked":
        out, final = autograd_causal(features, q * root, k * root, v, valid, state, chunk_size)
    else:
        out, kv, mx = SlimFunction.apply(
            q, k, v, state.kv, state.max_, valid, features, chunk_size, root
        )
        final = FavorState(kv, mx)
    out = out[..., drop:, :].to(out_dtype)
    return (out, final) if return_state else out


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

    ``kv_in = (kv_out − Δ)/exp(max_in − max_out)`` per feature, where ``Δ`` is the slice's contribution
    (computed chunk by chunk, O(C·M) memory, without a graph). Exact up to float64 rounding, amplified
    by ``‖kv_out‖/‖kv_in·decay‖``; callers keep a stored state where that amplification is large
    (``orthotorch.attention.causal.CheckpointRule``).

    Args:
        k: ``(..., T, d)``, v: ``(..., T, dv)`` unscaled, as given to :func:`favor_attention`.
        state_out: state after the slice. max_in: ``(..., M)`` per-feature maxima before the slice.
    """
    cd = compute_dtype(k.dtype)
    root = math.sqrt(check_scale(k.shape[-1], scale))
    return rebuild_state_chunks(
        features,
        k.to(cd) * root,
        v.to(cd),
        state_out,
        max_in,
        check_positive_int("chunk_size", chunk_size),
    )
