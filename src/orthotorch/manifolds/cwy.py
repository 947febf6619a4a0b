"""Compact WY (CWY) and truncated CWY (T-CWY) forms of Householder products.

A product of ``L`` Householder reflections ``H(u_1) … H(u_L)`` (``H(u) = I − 2uuᵀ`` for a unit vector
``u``) equals the compact WY form

    Q = I − U S⁻¹ Uᵀ,   S = ½ I + striu(UᵀU),   U = [u_1 … u_L]  (columns normalised),

and its first ``k`` columns, for ``L = k`` reflections, are the truncated form (T-CWY)

    Ω = [I_k; 0] − U S⁻¹ U_1ᵀ,   U_1 = U[:k, :],

which never forms an ``n × n`` matrix: ``O(nk² + k³)`` work, all in matrix-matrix products and one small
triangular solve. ``det Q = (−1)^L``: one CWY product covers only one component of O(d); the
parametrizations in :mod:`orthotorch.parametrize` add a fixed column-sign vector chosen at
initialisation to reach the other one (see :func:`householder_vectors`).

Columns of ``U`` need not be normalised: the functions normalise them (the result is invariant to the
scale of each column). A zero or non-finite column raises ``ValueError`` instead of producing NaN.
Both functions have an analytic backward (a custom :class:`torch.autograd.Function`), cheaper than
autograd through the same operations, batched over leading dimensions, in float32 and float64;
bfloat16/float16 inputs (and calls under autocast) are computed in float32 and cast back. The backward
is itself differentiable: when a graph of the gradient is requested (``create_graph=True``: gradient
penalties, Hessian-vector products, MAML) it is computed by autograd through a recomputation of the
forward in plain ops, so derivatives of every order are exact; inside ``torch.func`` transforms the
plain ops are used from the start.

``check=False`` skips the only guard against zero or non-finite columns: such a column then gives NaN
(a direction ``v/‖v‖`` with ``‖v‖ = 0``). The parametrizations never produce one (``right_inverse``
returns unit vectors and gradient steps only grow the norms), so ``check=False`` is safe there.
"""

from __future__ import annotations

import torch

from orthotorch._compat import functorch_transforms_active
from orthotorch._numerics import compute_dtype
from orthotorch._validation import check_floating, check_matrix, describe

__all__ = ["cwy", "cwy_columns", "householder_product", "householder_vectors", "tcwy"]


def _eye(d: int, m: int, like: torch.Tensor) -> torch.Tensor:
    return torch.eye(d, m, dtype=like.dtype, device=like.device)


def _check_columns(name: str, sq: torch.Tensor) -> None:
    """Raise ``ValueError`` when a squared column norm is zero or not finite (one sync)."""
    bad = (sq <= 0) | ~torch.isfinite(sq)
    if bool(bad.any()):
        idx = bad.nonzero()[0].tolist()
        raise ValueError(
            f"`{name}` must have nonzero, finite columns (each column is a Householder vector), got "
            f"column {idx[-1]} (flattened batch index {idx[0]}) with squared norm {float(sq[tuple(idx)])}"
        )


_BLOCK = 128  # row-block size of the triangle-only products below


def _triu_matmul(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``triu(x @ y)`` for ``x`` ``(B, L, r)``, ``y`` ``(B, r, L)``, computing only the blocks on and
    above the diagonal: one product per row block, about ``½(1 + 1/blocks)`` of the full cost."""
    ell = x.shape[-2]
    if ell < 2 * _BLOCK:
        return torch.bmm(x, y).triu_()
    bs = max(_BLOCK, -(-ell // 8))
    out = x.new_zeros(x.shape[0], ell, ell)
    for r0 in range(0, ell, bs):
        r1 = min(r0 + bs, ell)
        out[:, r0:r1, r0:] = torch.bmm(x[:, r0:r1, :], y[:, :, r0:])
    return out.triu_()


class _CWYColumns(torch.autograd.Function):
    """First ``m`` columns of ``I − U S⁻¹ Uᵀ`` for 3-D ``v`` ``(B, d, L)`` with an analytic backward.

    Forward: ``A = vᵀv``, norms ``ν = sqrt(diag A)``, ``u = v/ν``, ``S = ½I + striu(A/ννᵀ)``,
    ``Y = S⁻¹ U[:m]ᵀ`` (triangular solve), ``out = E_m − U Y``.
    Backward (``G = ∂ℓ/∂out``): ``Z = S⁻ᵀ (UᵀG)``, ``P = striu(Z Yᵀ)``,
    ``∂ℓ/∂U = −(G Yᵀ − U (P + Pᵀ) + [Zᵀ; 0])``, then through the normalisation
    ``∂ℓ/∂v = (g − u (uᵀg)) / ν``. Five matrix products / solves in all, with no transposed copies of
    large matrices; autograd through the same forward records two more and several extra passes.
    With ``create_graph=True`` the backward instead differentiates :func:`_cwy_columns_autograd` (the same
    forward in plain ops), so the gradient carries a graph and double backward is exact.
    """

    @staticmethod
    def forward(ctx, v: torch.Tensor, m: int, check: bool) -> torch.Tensor:
        a = _triu_matmul(v.mT, v)  # triu(vᵀv), (B, L, L)
        sq = a.diagonal(dim1=-2, dim2=-1)
        if check:
            _check_columns("U", sq)
        norms = sq.sqrt().unsqueeze(-2)  # (B, 1, L)
        u = v / norms
        s = a.triu_(diagonal=1).div_(norms.mT).div_(norms)
        s.diagonal(dim1=-2, dim2=-1).fill_(0.5)
        y = torch.linalg.solve_triangular(s, u[..., :m, :].mT, upper=True)  # (B, L, m)
        out = torch.bmm(u, y).neg_()
        out.diagonal(dim1=-2, dim2=-1).add_(1.0)
        ctx.save_for_backward(u, s, y, norms, v)
        ctx.m = m
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        u, s, y, norms, v = ctx.saved_tensors
        m = ctx.m
        if torch.is_grad_enabled():
            # create_graph=True: a gradient that is itself differentiable (in v and in g)
            with torch.enable_grad():
                leaf = v if v.requires_grad else v.detach().requires_grad_(True)
                out = _cwy_columns_autograd(leaf, m)
                (gv,) = torch.autograd.grad(out, leaf, g, create_graph=True)
            return gv, None, None
        g = g.contiguous()
        z = torch.linalg.solve_triangular(s.mT, torch.bmm(u.mT, g), upper=False)  # S⁻ᵀ UᵀG
        p = _triu_matmul(z, y.mT).triu_(diagonal=1)
        p.add_(p.mT.contiguous())
        w = torch.bmm(g, y.mT)  # −∂ℓ/∂U = G Yᵀ − U (P + Pᵀ) + [Zᵀ; 0]
        w.baddbmm_(u, p, alpha=-1.0)
        w[..., :m, :].add_(z.mT)
        w.sub_(u * (u * w).sum(dim=-2, keepdim=True)).div_(norms).neg_()
        return w, None, None


def _cwy_columns_autograd(v: torch.Tensor, m: int) -> torch.Tensor:
    """The forward of :class:`_CWYColumns` in plain differentiable ops (any derivative order, works under
    ``torch.func`` transforms); used there instead of the analytic backward."""
    a = v.mT @ v
    norms = a.diagonal(dim1=-2, dim2=-1).sqrt().unsqueeze(-2)
    u = v / norms
    s = (a / norms.mT / norms).triu(diagonal=1)
    s = s + 0.5 * torch.eye(s.shape[-1], dtype=s.dtype, device=s.device)
    y = torch.linalg.solve_triangular(s, u[..., :m, :].mT, upper=True)
    return _eye(v.shape[-2], m, v) - u @ y


def _compute(v: torch.Tensor, m: int, check: bool) -> torch.Tensor:
    """Flatten batch dims, upcast half dtypes to float32, turn autocast off inside, restore."""
    dtype = v.dtype
    batch, d, ell = v.shape[:-2], v.shape[-2], v.shape[-1]
    work = v.to(compute_dtype(dtype)).reshape(-1, d, ell)
    if work.shape[0] == 0:
        return v.new_zeros(*batch, d, m)
    dev = v.device.type
    if functorch_transforms_active():
        return _cwy_columns_autograd(work, m).reshape(*batch, d, m).to(dtype)
    if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev):
        with torch.autocast(device_type=dev, enabled=False):
            out = _CWYColumns.apply(work, m, check)
    else:
        out = _CWYColumns.apply(work, m, check)
    out = out.reshape(*batch, d, m)
    return out if out.dtype == dtype else out.to(dtype)


def _validate(name: str, u: torch.Tensor) -> tuple[int, int]:
    check_floating(name, u)
    d, ell = check_matrix(name, u)
    if ell < 1 or d < 1:
        raise ValueError(f"`{name}` must have at least one row and one column, got {describe(u)}")
    return d, ell


def cwy(U: torch.Tensor, *, check: bool = True) -> torch.Tensor:
    """The Householder product ``H(u_1) … H(u_L)`` in compact WY form ``I − U S⁻¹ Uᵀ``.

    Args:
        U: ``(..., d, L)`` Householder vectors as columns, ``1 ≤ L ≤ d``; each column is normalised
            internally (any nonzero scale gives the same result). Leading dimensions are batch.
        check: verify that no column is zero or non-finite (one reduction and a host sync); turn off
            only when the caller guarantees it: unchecked, such a column gives NaN.

    Returns:
        ``(..., d, d)`` orthogonal matrix with determinant ``(−1)^L``. Cost ``O(d²L)`` (three
        matrix products and an ``L × L`` triangular solve); the backward is analytic.

    Raises:
        TypeError: ``U`` is not a floating tensor.
        ValueError: ``U`` is not at least 2-D, ``L > d``, or a column is zero / non-finite.
    """
    d, ell = _validate("U", U)
    if ell > d:
        raise ValueError(
            f"`U` must have at most as many columns (reflections L) as rows (d): expected "
            f"(..., d, L) with L <= d, got {describe(U)}"
        )
    return _compute(U, d, check)


def tcwy(U: torch.Tensor, *, check: bool = True) -> torch.Tensor:
    """Truncated CWY: the first ``k`` columns of ``H(u_1) … H(u_k)``, a point of St(n, k).

    ``Ω = [I_k; 0] − U S⁻¹ U_1ᵀ`` with ``U_1 = U[..., :k, :]``; no ``n × n`` matrix is formed.

    Args:
        U: ``(..., n, k)`` Householder vectors as columns, ``1 ≤ k ≤ n`` (tall, the Stiefel
            convention; for a wide target transpose it). Columns are normalised internally.
        check: verify that no column is zero or non-finite (one reduction and a host sync);
            unchecked, such a column gives NaN.

    Returns:
        ``(..., n, k)`` with orthonormal columns. Cost ``O(nk² + k³)``, linear in ``n``; the backward
        is analytic. For ``n = k`` this equals :func:`cwy` (determinant ``(−1)^k``).

    Raises:
        TypeError: ``U`` is not a floating tensor.
        ValueError: ``U`` is not at least 2-D, ``k > n``, or a column is zero / non-finite.
    """
    n, k = _validate("U", U)
    if k > n:
        raise ValueError(
            f"`U` must be tall (..., n, k) with k <= n (Stiefel convention; transpose wide "
            f"weights), got {describe(U)}"
        )
    return _compute(U, k, check)


def cwy_columns(U: torch.Tensor, m: int, *, check: bool = True) -> torch.Tensor:
    """The first ``m`` columns of ``H(u_1) … H(u_L)`` (generalises :func:`cwy` and :func:`tcwy`).

    Args:
        U: ``(..., d, L)`` Householder vectors, ``1 ≤ L ≤ d``.
        m: number of leading columns to return, ``1 ≤ m ≤ d``.
        check: verify that no column is zero or non-finite (unchecked, such a column gives NaN).

    Returns:
        ``(..., d, m)``: ``I[:, :m] − U S⁻¹ U[:m]ᵀ``, cost ``O(dLm + dL² + L³)``.
    """
    d, ell = _validate("U", U)
    if ell > d:
        raise ValueError(f"`U` must have L <= d (..., d, L), got {describe(U)}")
    if isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= d:
        raise ValueError(f"`m` must be an int with 1 <= m <= d = {d}, got {m!r}")
    return _compute(U, m, check)


def householder_product(U: torch.Tensor, m: int | None = None) -> torch.Tensor:
    """Reference: ``H(u_1) … H(u_L)`` applied to ``I[:, :m]`` one reflection at a time.

    Sequential and slow (``L`` rank-1 updates); for tests and as a baseline only.

    Args:
        U: ``(..., d, L)`` nonzero columns (normalised internally).
        m: number of columns (default ``d``).

    Returns:
        ``(..., d, m)``.
    """
    d, ell = _validate("U", U)
    m = d if m is None else m
    if isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= d:
        raise ValueError(f"`m` must be an int with 1 <= m <= d = {d}, got {m!r}")
    sq = (U * U).sum(dim=-2)
    _check_columns("U", sq.detach().reshape(-1, ell))
    u = U / sq.sqrt().unsqueeze(-2)
    x = _eye(d, m, U).expand(*U.shape[:-2], d, m)
    for i in range(ell - 1, -1, -1):
        ui = u[..., :, i : i + 1]
        x = x - 2.0 * ui @ (ui.mT @ x)
    return x


def householder_vectors(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Householder QR of ``X``: unit vectors ``U`` and column signs with ``tcwy(U) * signs = Q``.

    ``Q`` is the orthonormal QR factor of ``X`` whose ``R`` has a positive diagonal; for ``X`` with
    orthonormal columns ``Q = X`` (up to rounding), so this is the right inverse of
    ``U, signs ↦ tcwy(U) * signs[..., None, :]`` (and of ``cwy(U) * signs`` for square ``X``).
    Uses ``torch.geqrf`` (LAPACK's sign choice keeps the reflectors well conditioned); LAPACK's
    ``(v, τ)`` pairs are converted to unit vectors, and a column that needs no reflection (``τ = 0``,
    always the last one of a square matrix) gets ``H(e_i)`` and a flipped sign, so that exactly ``k``
    reflections are used. For square ``X``: ``det Q = (−1)^k · prod(signs)``.

    Args:
        X: ``(..., n, k)`` tall (``n ≥ k``) float32/float64 (half dtypes computed in float32).

    Returns:
        ``U`` ``(..., n, k)`` with unit columns (``u_i`` zero above row ``i``), and ``signs``
        ``(..., k)`` of ±1 in ``X``'s dtype. Cost ``O(nk²)`` (blocked LAPACK QR).
    """
    check_floating("X", X)
    n, k = check_matrix("X", X, tall=True)
    if k < 1:
        raise ValueError(f"`X` must have at least one column, got {describe(X)}")
    dtype = X.dtype
    work = X.detach().to(compute_dtype(dtype))
    if not bool(torch.isfinite(work).all()):
        raise ValueError(f"`X` must be finite, got non-finite entries in {describe(X)}")
    a, tau = torch.geqrf(work)
    eye = _eye(n, k, a)
    v = torch.tril(a, diagonal=-1) + eye
    no_reflection = (tau == 0).unsqueeze(-2)  # (..., 1, k)
    v = torch.where(no_reflection, eye, v)
    u = v / torch.linalg.vector_norm(v, dim=-2, keepdim=True)
    r = a.diagonal(dim1=-2, dim2=-1)
    signs = torch.where(r < 0, -1.0, 1.0).to(a.dtype)
    signs = torch.where(tau == 0, -signs, signs)
    return u.to(dtype), signs.to(dtype)
