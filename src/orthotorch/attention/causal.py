"""Causal FAVOR+ algebra: prefix states, stabilised chunks, the SLiM autograd Function, rebuilds.

Notation: for one (batch, head), key exponents ``ek (L, M)`` and query exponents ``eq (L, M)`` with
``φ(x) = base(x) ⊙ exp(expo(x))`` (:meth:`FeatureMap.parts`). The causal output of query ``t`` is
``Σ_{s≤t} a_ts [v_s, 1] `` normalised by its last column, ``a_ts = Σ_i exp(eq_ti + ek_si)``.

Stabilisation (every stabiliser cancels exactly between numerator and normaliser, and none uses a key
after the query it serves, so no future key can change a past output, not even in its last bit):

- state (prefix sums): one running maximum **per feature**, ``c_i = max_{s<a} ek_si``; the state holds
  ``Σ_s exp(ek_si − c_i) [v_s, 1]`` in float64 (normaliser column ≥ 1 once a key is in).
- a chunk ``[a, b)`` takes the per-feature reference ``κ_i = max(c_i, ek_ai)`` (the state and the
  chunk's first key) and a scalar running excess ``E_t = max_{a≤s≤t, i} (ek_si − κ_i)⁺``. Query ``t``
  subtracts ``r_t + E_t`` with ``r_t = max_i (eq_ti + κ_i)``. Every exponentiated term is ≤ 1 and the
  largest term of the normaliser is ≥ ``exp(−E_t)``; where ``E_t`` would pass :data:`EXCESS_LIMIT` the
  chunk is split there (a decision that depends on keys up to that position only) and the rest of the
  chunk is redone from the intermediate state. So the normaliser of a query with a valid key never
  underflows and its gradient ``−num/den²`` never overflows, whatever the norms of ``q`` and ``k``.

Half precision is computed in float32 (:func:`orthotorch._numerics.compute_dtype`) by the caller.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from orthotorch.attention.features import FeatureMap

__all__ = [
    "AMPLIFICATION_LIMIT",
    "CheckpointRule",
    "FavorState",
    "SlimFunction",
    "autograd_causal",
    "causal_chunk",
    "init_state",
    "prefix_causal",
    "rebuild_state_chunks",
    "safe_div",
    "slices",
]

NEG_INF = float("-inf")
#: Checkpointing rule of the SLiM backward: keep the incoming state of a chunk when rebuilding it by
#: subtraction would amplify float64 rounding by more than this factor (:class:`CheckpointRule`).
AMPLIFICATION_LIMIT = 1e6
#: Largest scalar excess ``E_t`` (nats) a chunk may accumulate before it is split, by compute dtype: the
#: normaliser stays ≥ exp(−limit), far above the smallest normal number.
EXCESS_LIMIT = {torch.float32: 60.0, torch.float64: 400.0}
#: Length of the pieces that follow a split inside a chunk (doubled while no further split occurs).
_MIN_PIECE = 32


@dataclass
class FavorState:
    """Recurrent state of causal FAVOR attention (prefix sums), for decoding and slice-wise training.

    Attributes:
        kv: ``(..., M, dv + 1)`` float64: ``Σ_s φ̃(k_s) [v_s, 1]ᵀ`` with
            ``φ̃_i(k_s) = φ_i(k_s)·exp(−max_i)`` (the last column is the normaliser's key sum).
        max_: ``(..., M)`` float64 running maximum of each feature's key exponent (``-inf`` before the
            first valid key).

    Memory per (batch, head): ``8·M·(dv + 2)`` bytes, independent of the sequence length.
    """

    kv: torch.Tensor
    max_: torch.Tensor

    def detach(self) -> FavorState:
        """A copy cut from the autograd graph."""
        return FavorState(self.kv.detach(), self.max_.detach())


def init_state(
    lead: tuple[int, ...] | torch.Size,
    feature_dim: int,
    value_dim: int,
    *,
    device: torch.device | str | None = None,
) -> FavorState:
    """Empty causal state for leading dims ``lead`` (e.g. ``(batch, heads)``): zeros and ``-inf`` maxima.

    Returns kv ``(*lead, M, dv + 1)`` and max_ ``(*lead, M)``, float64.
    """
    kv = torch.zeros(*lead, feature_dim, value_dim + 1, dtype=torch.float64, device=device)
    mx = torch.full((*lead, feature_dim), NEG_INF, dtype=torch.float64, device=device)
    return FavorState(kv, mx)


def safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num/den`` with rows whose normaliser is exactly 0 (no valid key) mapped to 0, never NaN."""
    ok = den != 0
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


def slices(length: int, chunk: int) -> list[tuple[int, int]]:
    """``[(0, C), (C, 2C), …]`` covering ``range(length)``."""
    return [(s, min(s + chunk, length)) for s in range(0, length, chunk)]


def _sub(t: torch.Tensor | None, a: int, b: int) -> torch.Tensor | None:
    return None if t is None else t[..., a:b]


def decay(max_prev: torch.Tensor, max_new: torch.Tensor) -> torch.Tensor:
    """Per-feature rescaling ``exp(max_prev − max_new) ≤ 1`` of a carried state (0 if nothing carried)."""
    fin = torch.isfinite(max_prev)
    new = torch.where(torch.isfinite(max_new), max_new, torch.zeros_like(max_new))
    dec = torch.exp((max_prev - new).clamp(max=0.0))
    return torch.where(fin, dec, torch.zeros_like(dec))


def augment(v: torch.Tensor) -> torch.Tensor:
    """``[v, 1]``: ``(..., L, dv) → (..., L, dv + 1)`` (the last column accumulates the normaliser)."""
    return torch.cat([v, torch.ones(*v.shape[:-1], 1, dtype=v.dtype, device=v.device)], dim=-1)


def features(
    fmap: FeatureMap, x: torch.Tensor, valid: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(expo (..., L, M), base)`` of scaled ``x``; exponents of invalid positions are ``-inf``."""
    expo, base = fmap.parts(x)
    width = fmap.feature_dim
    if expo.shape[-1] != width:
        expo = expo.expand(*expo.shape[:-1], width)
    if valid is not None:
        expo = expo.masked_fill(~valid[..., None], NEG_INF)
    return expo, base


def _times(x: torch.Tensor, base: torch.Tensor | None) -> torch.Tensor:
    return x if base is None else x * base


def key_delta(
    ek: torch.Tensor, bk: torch.Tensor | None, v_aug: torch.Tensor, max_prev: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Contribution of a block of keys to the state.

    Args:
        ek: ``(..., C, M)`` key exponents (``-inf`` = padded), bk: base or ``None``;
        v_aug: ``(..., C, dv + 1)``; max_prev: ``(..., M)`` float64 incoming per-feature maxima.

    Returns:
        ``delta`` ``(..., M, dv + 1)`` (compute dtype, relative to the new maxima), ``decay`` ``(..., M)``
        float64 (``kv_new = kv_prev·decay + delta``) and the new maxima ``(..., M)`` float64.
    """
    with torch.no_grad():
        blk = ek.amax(dim=-2) if ek.shape[-2] > 0 else torch.full_like(max_prev, NEG_INF)
        new_max = torch.maximum(max_prev, blk.to(torch.float64))
        ref = torch.where(torch.isfinite(new_max), new_max, torch.zeros_like(new_max)).to(ek.dtype)
        dec = decay(max_prev, new_max)
    fk = _times(torch.exp(ek - ref[..., None, :]), bk)
    return fk.transpose(-1, -2) @ v_aug, dec, new_max


def _apply(state: FavorState, delta: torch.Tensor, dec: torch.Tensor, new_max: torch.Tensor):
    return FavorState(state.kv * dec[..., None] + delta.to(torch.float64), new_max)


def _outputs_piece(
    eq: torch.Tensor,
    bq: torch.Tensor | None,
    ek: torch.Tensor,
    bk: torch.Tensor | None,
    v_aug: torch.Tensor,
    state: FavorState,
    limit: float,
) -> tuple[torch.Tensor, int]:
    """Normalised outputs of the first ``n`` queries of a block (see the module docstring).

    Returns ``(y (..., n, dv), n)`` with ``n ≥ 1`` the first position where the running excess passes
    ``limit`` in any batch element (the block length if none). Rows are computed with the full block's
    shapes and every row depends only on keys up to it, so the split never changes earlier rows.
    """
    c = ek.shape[-2]
    with torch.no_grad():
        c0 = state.max_.to(ek.dtype)
        kappa = torch.maximum(c0, ek[..., 0, :])  # (..., M)
        fin = torch.isfinite(kappa)
        kappa_s = torch.where(fin, kappa, torch.zeros_like(kappa))
        rel = ek - kappa_s[..., None, :]
        # no reference yet (empty state, padded first key): any valid key must start a new piece
        rel = torch.where(
            fin[..., None, :],
            rel,
            torch.where(torch.isfinite(ek), torch.full_like(ek, float("inf")), ek),
        )
        excess = torch.cummax(rel.amax(dim=-1).clamp(min=0.0), dim=-1).values  # (..., C)
        over = (excess > limit).reshape(-1, c).any(dim=0)
        n = int(over.int().argmax()) if bool(over.any()) else c
        ex = torch.where(torch.isfinite(excess), excess, torch.zeros_like(excess))
        r = (eq + kappa_s[..., None, :]).amax(dim=-1, keepdim=True)  # (..., C, 1)
        tril = torch.ones(c, c, dtype=torch.bool, device=ek.device).tril()
        diff = (ex[..., None, :] - ex[..., :, None]).clamp(max=0.0)  # [t, s] = E_s − E_t
        dmat = torch.where(tril, torch.exp(diff), torch.zeros_like(diff))
        inter = decay(state.max_, kappa.to(torch.float64))  # exp(c0 − κ) ≤ 1, 0 if empty
        row = torch.exp(-ex)[..., None]  # (..., C, 1)
        late = torch.arange(c, device=ek.device)[:, None] >= n
    if n < c:  # keys past the split serve no kept row: zero them (their excess may be inf)
        ek = ek.masked_fill(late, NEG_INF)
    fq = _times(torch.exp(eq + kappa_s[..., None, :] - r), bq)
    fk = _times(torch.exp(ek - kappa_s[..., None, :] - ex[..., None]), bk)
    carried = (state.kv * inter[..., None]).to(fq.dtype)
    out = ((fq @ fk.transpose(-1, -2)) * dmat) @ v_aug + (fq @ carried) * row
    out = out[..., :n, :]
    return safe_div(out[..., :-1], out[..., -1:]), n


def chunk_outputs(
    eq: torch.Tensor,
    bq: torch.Tensor | None,
    ek: torch.Tensor,
    bk: torch.Tensor | None,
    v_aug: torch.Tensor,
    state: FavorState,
) -> torch.Tensor:
    """Normalised causal outputs ``(..., C, dv)`` of one chunk given its incoming ``state``."""
    limit = EXCESS_LIMIT.get(ek.dtype, EXCESS_LIMIT[torch.float32])
    length = ek.shape[-2]
    outs = []
    start, width = 0, length
    while start < length:
        # piece bounds depend only on earlier split positions, so they never see a future key
        sl = slice(start, min(length, start + width))
        y, n = _outputs_piece(
            eq[..., sl, :],
            None if bq is None else bq[..., sl, :],
            ek[..., sl, :],
            None if bk is None else bk[..., sl, :],
            v_aug[..., sl, :],
            state,
            limit,
        )
        outs.append(y)
        split = n < sl.stop - start
        if start + n < length:
            kept = slice(start, start + n)
            state = _apply(
                state,
                *key_delta(
                    ek[..., kept, :],
                    None if bk is None else bk[..., kept, :],
                    v_aug[..., kept, :],
                    state.max_,
                ),
            )
        start += n
        # after a split, continue with short pieces (less work redone if the keys keep jumping),
        # doubling while they do not
        width = _MIN_PIECE if split else 2 * width
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-2)


def causal_chunk(
    fmap: FeatureMap,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    valid: torch.Tensor | None,
    state: FavorState,
) -> tuple[torch.Tensor, FavorState]:
    """One causal chunk: scaled ``q, k (..., C, d)``, ``v (..., C, dv)``, ``valid (..., C)`` or ``None``.

    Returns the normalised outputs ``(..., C, dv)`` and the outgoing state.
    """
    eq, bq = features(fmap, q)
    ek, bk = features(fmap, k, valid)
    v_aug = augment(v)
    y = chunk_outputs(eq, bq, ek, bk, v_aug, state)
    return y, _apply(state, *key_delta(ek, bk, v_aug, state.max_))


def autograd_causal(
    fmap: FeatureMap,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    valid: torch.Tensor | None,
    state: FavorState,
    chunk: int,
) -> tuple[torch.Tensor, FavorState]:
    """Causal FAVOR chunk by chunk under plain autograd (stores every chunk's graph)."""
    outs = []
    for a, b in slices(q.shape[-2], chunk):
        y, state = causal_chunk(
            fmap, q[..., a:b, :], k[..., a:b, :], v[..., a:b, :], _sub(valid, a, b), state
        )
        outs.append(y)
    if not outs:  # empty sequence: an empty output that is still part of the graph
        return q[..., :0] @ v[..., :0, :] + k[..., :0, :].sum(), state
    return torch.cat(outs, dim=-2), state


class CheckpointRule:
    """Which incoming states the forward pass must keep so that the backward can rebuild the others.

    Rebuilding ``kv_prev = (kv_new − Δ)/decay`` in float64 amplifies rounding by about
    ``‖kv_new_i‖/‖kv_prev_i·decay_i‖`` per feature ``i``; amplifications compound along the chain of
    rebuilds, so the product since the last kept state is tracked and a state is kept when it passes
    :data:`AMPLIFICATION_LIMIT` (O(log L) states for stationary inputs). One host synchronisation per
    call. Used by :class:`SlimFunction` and by ``slim_train_step`` (model-level SLiM).
    """

    def __init__(self, limit: float = AMPLIFICATION_LIMIT) -> None:
        self.limit = limit
        self.amp = 1.0

    def keep(self, old: FavorState, new: FavorState) -> bool:
        """Account for the step ``old → new``; True if ``old`` must be stored for the backward."""
        carried = (old.kv * decay(old.max_, new.max_)[..., None]).norm(dim=-1)
        ratio = new.kv.norm(dim=-1) / carried
        empty = ~torch.isfinite(old.max_)  # nothing carried: the rebuild is exact (zeros)
        ratio = torch.where(torch.isnan(ratio) | empty, torch.ones_like(ratio), ratio)
        self.amp *= float(ratio.max()) if ratio.numel() else 1.0
        if self.amp > self.limit:
            self.amp = 1.0
            return True
        return False


def rebuild(kv_new: torch.Tensor, delta: torch.Tensor, dec: torch.Tensor) -> torch.Tensor:
    """Incoming kv from the outgoing one: ``(kv_new − Δ)/decay`` (0 where nothing was carried)."""
    dd = dec[..., None]
    out = (kv_new - delta.to(torch.float64)) / torch.where(dd > 0, dd, torch.ones_like(dd))
    return torch.where(dd > 0, out, torch.zeros_like(out))


class SlimFunction(torch.autograd.Function):
    """Causal FAVOR by chunks with memory independent of L beyond inputs and outputs (SLiM).

    Forward keeps only the running state; backward walks the chunks in reverse, rebuilding each chunk's
    incoming state by subtraction in float64 and recomputing the chunk under autograd. A boundary state
    is stored in the forward pass only where :class:`CheckpointRule` says the rebuild would be inexact.

    Double backward: when the backward itself is differentiated (``create_graph=True``, so grad mode is
    on inside :meth:`backward`), the gradients are computed by differentiable autograd through the whole
    chunked forward instead (the memory of ``implementation="chunked"``): second derivatives are exact.
    """

    @staticmethod
    def forward(ctx, q, k, v, kv0, max0, valid, fmap, chunk, root):
        # q, k arrive unscaled: scaling chunk by chunk avoids L-sized copies (``root`` = √scale)
        state = FavorState(kv0.detach(), max0.detach())
        result = torch.empty(*q.shape[:-1], v.shape[-1], dtype=v.dtype, device=v.device)
        maxes = [state.max_]
        ckpt: dict[int, torch.Tensor] = {}
        rule = CheckpointRule()
        spans = slices(q.shape[-2], chunk)
        for idx, (a, b) in enumerate(spans):
            y, new = causal_chunk(
                fmap,
                q[..., a:b, :] * root,
                k[..., a:b, :] * root,
                v[..., a:b, :],
                _sub(valid, a, b),
                state,
            )
            result[..., a:b, :] = y
            if idx > 0 and rule.keep(state, new):
                ckpt[idx] = state.kv  # incoming state of chunk idx
            state = new
            maxes.append(state.max_)
        ctx.fmap, ctx.chunk, ctx.spans, ctx.ckpt, ctx.root = fmap, chunk, spans, ckpt, root
        ctx.maxes = maxes
        ctx.has_valid = valid is not None
        empty = q.new_empty(0, dtype=torch.bool)
        ctx.save_for_backward(q, k, v, kv0, max0, state.kv, valid if valid is not None else empty)
        ctx.mark_non_differentiable(state.max_)
        return result, state.kv, state.max_

    @staticmethod
    def backward(ctx, g_out, g_kv, _g_max):
        q, k, v, kv0, max0, kv, valid = ctx.saved_tensors
        valid = valid if ctx.has_valid else None
        if g_out is None:
            g_out = torch.zeros(*q.shape[:-1], v.shape[-1], dtype=v.dtype, device=v.device)
        if torch.is_grad_enabled():
            return _differentiable_backward(ctx, q, k, v, kv0, max0, valid, g_out, g_kv)
        fmap, root = ctx.fmap, ctx.root
        gq, gk, gv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        g_kv = torch.zeros_like(kv) if g_kv is None else g_kv
        for idx in range(len(ctx.spans) - 1, -1, -1):
            a, b = ctx.spans[idx]
            max_prev = ctx.maxes[idx]
            with torch.enable_grad():
                qc = q[..., a:b, :].detach().requires_grad_()
                kc = k[..., a:b, :].detach().requires_grad_()
                vc = v[..., a:b, :].detach().requires_grad_()
                eq, bq = features(fmap, qc * root)
                ek, bk = features(fmap, kc * root, _sub(valid, a, b))
                v_aug = augment(vc)
                delta, dec, _ = key_delta(ek, bk, v_aug, max_prev)
                if idx in ctx.ckpt:
                    kv_prev = ctx.ckpt[idx]
                elif idx == 0:
                    kv_prev = kv0.detach()
                else:
                    kv_prev = rebuild(kv, delta.detach(), dec)
                kv_leaf = kv_prev.detach().requires_grad_()
                incoming = FavorState(kv_leaf, max_prev)
                y = chunk_outputs(eq, bq, ek, bk, v_aug, incoming)
                kv_new = _apply(incoming, delta, dec, max_prev).kv
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


def _differentiable_backward(ctx, q, k, v, kv0, max0, valid, g_out, g_kv):
    """Backward as a differentiable function of the inputs and of the incoming gradients."""
    needs = ctx.needs_input_grad[:4]
    inputs = [t for t, need in zip((q, k, v, kv0), needs) if need]
    with torch.enable_grad():
        y, final = autograd_causal(
            ctx.fmap,
            q * ctx.root,
            k * ctx.root,
            v,
            valid,
            FavorState(kv0, max0),
            ctx.chunk,
        )
        outs, grads_in = [y], [g_out]
        if g_kv is not None:
            outs.append(final.kv)
            grads_in.append(g_kv)
        got = torch.autograd.grad(outs, inputs, grads_in, create_graph=True, allow_unused=True)
    it = iter(got)
    res = []
    for t, need in zip((q, k, v, kv0), needs):
        g = next(it) if need else None
        res.append(torch.zeros_like(t) if need and g is None else g)
    return (*res, None, None, None, None, None)


def prefix_causal(
    fmap: FeatureMap, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None
) -> torch.Tensor:
    """Textbook causal FAVOR by cumulative sums of outer products: O(L·M·dv) memory (reference).

    Keys are stabilised by the data-independent bound of :meth:`FeatureMap.key_bound` (uses no key at
    all, so nothing leaks from the future). That bound is loose for large key norms: where a query's
    normaliser would underflow (or, for ``trig`` features, which have no such bound, at all) this
    raises ``ValueError`` instead of returning zeros; the chunked implementations have no such limit.
    """
    if fmap.kind == "trig":
        raise ValueError(
            "implementation='prefix' cannot stabilise trig features (their exponent ‖x‖²/2 has no "
            "data-independent bound); use implementation='slim' or 'chunked'"
        )
    eq, bq = features(fmap, q)
    ek, bk = features(fmap, k, valid)
    bound = fmap.key_bound().to(ek.dtype)
    with torch.no_grad():
        r = (eq + bound).amax(dim=-1, keepdim=True)
    fk = _times(torch.exp(ek - bound), bk)
    fq = _times(torch.exp(eq + bound - r), bq)
    v_aug = augment(v)
    prefix = torch.cumsum(fk[..., :, :, None] * v_aug[..., :, None, :], dim=-3)  # (..., L, M, dv+1)
    out = (fq[..., None, :] @ prefix).squeeze(-2)
    den = out[..., -1:]
    with torch.no_grad():
        seen = (
            torch.ones_like(den, dtype=torch.bool)
            if valid is None
            else valid.cumsum(-1)[..., None] > 0
        )
        # below tiny/eps the terms that matter at working precision are subnormal (or 0)
        info = torch.finfo(den.dtype)
        if bool((seen & (den.abs() < info.tiny / info.eps)).any()):
            raise ValueError(
                "implementation='prefix' underflows at these key norms (its data-independent "
                "stabiliser is too loose); use implementation='slim' or 'chunked'"
            )
    return safe_div(out[..., :-1], den)


@torch.no_grad()
def rebuild_state_chunks(
    fmap: FeatureMap,
    k: torch.Tensor,
    v: torch.Tensor,
    state_out: FavorState,
    max_in: torch.Tensor,
    chunk: int,
) -> FavorState:
    """Incoming state of a slice of scaled keys ``k (..., T, d)``, ``v (..., T, dv)`` (no padding)."""
    acc = FavorState(torch.zeros_like(state_out.kv), max_in)
    for a, b in slices(k.shape[-2], chunk):
        ek, bk = features(fmap, k[..., a:b, :])
        acc = _apply(acc, *key_delta(ek, bk, augment(v[..., a:b, :]), acc.max_))
    kv_in = rebuild(state_out.kv, acc.kv, decay(max_in, acc.max_))
    return FavorState(kv_in, max_in)
