"""Stiefel manifold St(n, k), orthogonal group O(d) and special orthogonal group SO(d).

Points are tall ``(..., n, k)`` matrices with ``XᵀX = I_k`` (geoopt's convention; a wide weight
``(k, n)`` is handled by transposing it). O(d) and SO(d) are the square case ``n = k = d``. The classes
subclass :class:`geoopt.Stiefel`, so :class:`geoopt.ManifoldParameter`, :class:`geoopt.optim.RiemannianSGD`
and :class:`geoopt.optim.RiemannianAdam` accept them.

Conventions shared by every method:

- Tangent space at ``x``: ``{u : xᵀu + uᵀx = 0}``; the orthogonal projection onto it is
  ``u − x sym(xᵀu)`` for either metric (:meth:`Stiefel.proju`).
- Metrics: ``"euclidean"`` (embedded, ``⟨u, v⟩ = tr(uᵀv)``) and ``"canonical"``
  (``⟨u, v⟩ = tr(uᵀ(I − ½xxᵀ)v)``). Riemannian gradients: ``G − x sym(xᵀG)`` and ``G − x Gᵀ x`` (= ``W x``
  with ``W = G xᵀ − x Gᵀ``).
- Rotation-based retractions act on rows: ``R_x(u) = Q(A) x`` with the skew generator
  ``A = ũ xᵀ − x ũᵀ``, ``ũ = u − ½ x (xᵀu)``, which satisfies ``A x = u`` for tangent ``u``
  (:func:`skew_generator`). ``Q`` is the Cayley transform, the matrix exponential or one round-robin sweep
  of Givens rotations. Since ``Q(A)`` is orthogonal with determinant +1, these keep ``XᵀX = I`` to
  rounding and never leave SO(d). ``A = U Vᵀ`` has rank ``≤ 2k``, so for tall points (``2k < n``,
  ``4k < n`` for the exponential) the Cayley and exponential retractions use ``2k × 2k`` systems (the
  exponential: in the orthonormal basis of ``span[x, ũ]``) and cost ``O(nk² + k³)`` instead of geoopt's
  ``O(n³)`` ``n × n`` solve.
- float16/bfloat16 inputs are computed in float32 and cast back (LAPACK has no half precision); the
  shared rules live in :mod:`orthotorch._numerics` (docs/design.md, "Dtypes and devices").
- Batch dimensions of ``u``/``v`` broadcast against those of ``x`` (geoopt's convention); every result
  is contiguous row-major (docs/design.md, "Memory layout").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from geoopt.manifolds.stiefel import Stiefel as _GeooptStiefel
from geoopt.tensor import ManifoldTensor

from orthotorch._numerics import compute_dtype, det_sign, haar, qr_sign_fixed
from orthotorch._validation import check_floating, check_generator, check_tensor, describe
from orthotorch.graph_sampling import round_robin
from orthotorch.manifolds.givens import pair_coefficients, rotate_pairs_, rotate_pairs_autograd

__all__ = [
    "METRICS",
    "RETRACTIONS",
    "OrthogonalGroup",
    "SpecialOrthogonalGroup",
    "Stiefel",
    "cayley_rotate",
    "det_sign",
    "skew_generator",
]

#: Retractions selectable with ``retraction=``.
RETRACTIONS: tuple[str, ...] = ("qr", "cayley", "expm", "givens_sweep", "polar")
#: Metrics selectable with ``metric=``.
METRICS: tuple[str, ...] = ("euclidean", "canonical")

#: Largest ``batch·n²`` for which the Givens sweep forms the dense generator to read its angles.
_DENSE_GENERATOR_LIMIT = 1 << 24
_ROUND_ROBIN_CACHE: dict[tuple[int, str], list[tuple[torch.Tensor, torch.Tensor]]] = {}


# ----------------------------------------------------------------------------------------------------
# helpers


def _resolution(dtype: torch.dtype) -> float:
    """Smallest meaningful tolerance of an orthogonality check in ``dtype``: ``4·eps``.

    A Haar point rounded to float16/bfloat16 has ``max |XᵀX − I|`` up to about ``eps`` (3e-4 / 3e-3);
    for float32/float64 this is far below the default ``atol + rtol = 2e-5`` and changes nothing.
    """
    return 4.0 * torch.finfo(dtype).eps


def _broadcastable(a: Sequence[int], b: Sequence[int]) -> bool:
    try:
        torch.broadcast_shapes(tuple(a), tuple(b))
    except RuntimeError:
        return False
    return True


def _sym(a: torch.Tensor) -> torch.Tensor:
    return 0.5 * (a + a.mT)


def _eye(m: int, like: torch.Tensor) -> torch.Tensor:
    return torch.eye(m, dtype=like.dtype, device=like.device)


def _half_u(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``ũ = u − ½ x (xᵀu)``, shape ``(..., n, k)``, O(nk²)."""
    return u - 0.5 * (x @ (x.mT @ u))


def skew_generator(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The dense skew generator ``A = ũ xᵀ − x ũᵀ`` with ``ũ = u − ½ x (xᵀu)``.

    For ``x`` on St(n, k) and ``u`` tangent at ``x``, ``A x = u`` and ``A`` is the canonical-metric
    geodesic generator: ``expm(tA) x`` is the geodesic through ``x`` with velocity ``u``. For a non-tangent
    ``u`` one gets ``A x = proju(x, u)``.

    Args:
        x: point, shape ``(..., n, k)``.
        u: tangent vector (or any matrix), shape ``(..., n, k)``.

    Returns:
        ``(..., n, n)`` skew-symmetric matrix. O(n²k) time and O(n²) memory: reference and dense paths
        only; the retractions use the rank-``2k`` factorisation ``A = [ũ, x] [x, −ũ]ᵀ`` where possible.
    """
    check_floating("x", x)
    check_floating("u", u)
    if x.dim() < 2:
        raise ValueError(f"`x` must have shape (..., n, k), got {describe(x)}")
    if x.shape != u.shape:
        raise ValueError(
            f"`u` must have the same shape as `x` {tuple(x.shape)}, got {tuple(u.shape)}"
        )
    ut = _half_u(x, u)
    return ut @ x.mT - x @ ut.mT


def cayley_rotate(
    x: torch.Tensor,
    d: torch.Tensor,
    t: float,
    zs: Sequence[torch.Tensor],
    *,
    orthonormalize: bool = False,
) -> list[torch.Tensor]:
    """Apply the Cayley rotation ``Q = (I − ½tW)⁻¹(I + ½tW)`` of ``W = d xᵀ − x dᵀ`` to each of ``zs``.

    ``W`` is the skew generator of the Givens family (docs/design.md: ``W_ij = ⟨d_i, x_j⟩ − ⟨x_i, d_j⟩``)
    and ``Q ≈ expm(tW)`` to second order, so ``t = −lr`` with ``d`` a (Euclidean) gradient is the
    descent step ``X ← Q X`` along the whole generator, and ``W x`` is the canonical-metric Riemannian
    gradient. ``Q`` is orthogonal with det +1 for any ``t`` (to rounding), so ``XᵀX = I`` is kept and
    SO(d) is never left. Adding ``x S`` with ``S`` symmetric to ``d`` does not change ``W``.

    ``W`` has rank ``≤ 2k`` and is never formed. Split ``d = x G + d⊥`` with ``xᵀd⊥ = 0``
    (``B = xᵀx``, ``G = B⁻¹xᵀd``, in two passes): then ``span[x, d⊥]`` is ``W``-invariant, ``W [x, d⊥] = [x, d⊥] H``
    with ``H = [[K B, −C⊥], [B, 0]]``, ``K = G − Gᵀ``, ``C⊥ = d⊥ᵀd⊥``, and ``Q − I = 2α(I − αW)⁻¹W``
    (``α = t/2``) reduces to the ``k × k`` matrix ``M = I − α(K − αC⊥)B``: for ``z`` with ``a = xᵀz``,
    ``c = d⊥ᵀz``, ``p = M⁻¹((K − αC⊥)a − c)`` and ``Q z = z + 2α(x p + d⊥(a + αBp))``. For an
    orthonormal ``x`` the symmetric part of ``M`` is ``I + α²C⊥ ⪰ I`` (``K`` is skew), so ``‖M⁻¹‖ ≤ 1``
    for every step size, and its explicit inverse is safe (cheaper than triangular solves with as many
    right-hand sides as columns). The ``2k × 2k`` Woodbury form ``Q z = z + tU(I − ½tVᵀU)⁻¹Vᵀz``
    (``U = [d, x]``, ``V = [x, −d]``) is exact too, but needs the ``x·S`` part of ``d`` removed first
    in float32 (an ambient gradient is dominated by it) and a ``2k × 2k`` solve: at ``n = 1024,
    k = 256`` it cost as much as this form plus that projection. For ``Q x`` the identity is kept exact
    (its coefficients are ``I + 2αp`` and ``2αB M⁻¹``), so small steps lose no precision.

    Args:
        x: the point, ``(..., n, k)`` (full column rank; ``xᵀx`` is factorised).
        d: the direction, ``(..., n, k)`` (any matrix; only its generator matters).
        t: the step along ``W`` (``−lr`` for descent).
        zs: tensors ``(..., n, m)`` to rotate. An entry that *is* ``x`` or ``d`` (the same object)
            reuses the products already formed instead of ones of its own.
        orthonormalize: for the entries that are ``x``, return ``(Q x)(3/2·I − ½ xᵀx)`` instead: one
            Newton–Schulz step towards the polar factor, which squares the orthogonality error
            ``‖xᵀx − I‖`` of the input at no extra ``O(nk²)`` cost (only ``k × k`` products), so float
            rounding cannot accumulate over many steps.

    Returns:
        ``[Q z for z in zs]``, each ``(..., n, m)`` (column slices of one product: not contiguous when
        ``zs`` has several entries). Cost (multiply-adds): ``6nk²`` for ``xᵀx`` and for ``d⊥`` (split
        twice, so that ``xᵀd⊥`` is at rounding level of ``d⊥`` rather than of ``d``) and ``C⊥``,
        ``2nkm`` per entry that is ``x`` or ``d`` and ``4nkm`` per other entry, plus ``O(k³)``
        ``k × k`` work; no ``n × n`` matrix. Differentiable (plain torch ops).
    """
    k = x.shape[-1]
    alpha = 0.5 * t
    eye = _eye(k, x)
    xx, xd = x.mT @ x, x.mT @ d
    # the split d = x G + d⊥ in two passes ("twice is enough"): the formulas assume xᵀd⊥ = 0, and one
    # pass leaves eps·‖d‖ there, not eps·‖d⊥‖ (an ambient gradient or heavy-ball buffer is mostly
    # x·S); the second pass solves with B exactly, so xᵀd⊥ = 0 up to rounding for any full-rank x
    d_perp = d - x @ xd
    g2 = torch.cholesky_solve(x.mT @ d_perp, torch.linalg.cholesky(xx))
    d_perp = d_perp - x @ g2
    g = xd + g2
    c_perp = d_perp.mT @ d_perp
    kc = (g - g.mT) - alpha * c_perp  # K − αC⊥
    # ‖M⁻¹‖ ≤ 1 (for orthonormal x): an explicit inverse is safe, and cheaper than triangular solves
    m_inv = torch.linalg.inv(eye - alpha * (kc @ xx))
    coefs = []
    for z in zs:
        if z is x:
            a, p = xx, m_inv @ (kc @ xx)  # c = d⊥ᵀx = 0
        else:
            a, c = (xd, c_perp) if z is d else (x.mT @ z, d_perp.mT @ z)
            p = m_inv @ (kc @ a - c)
        if z is x:
            # Q x = [d⊥, x]·[2αB M⁻¹; I + 2αp]
            top, delta = (2 * alpha) * (xx @ m_inv), (2 * alpha) * p
            if orthonormalize:
                err = xx - eye  # (I + δ)(I − ½E) = I + δ − ½(E + δE)
                top = top - 0.5 * (top @ err)
                delta = delta - 0.5 * (err + delta @ err)
            coefs.append(torch.cat([top, delta + eye], dim=-2))
            continue
        top = (2 * alpha) * (a + alpha * (xx @ p))
        bottom = (2 * alpha) * p
        if z is d:
            # d = x G + d⊥: Q d = [d⊥, x]·[I + 2α(a + αBp); G + 2αp]
            top, bottom = top + eye, bottom + g
        coefs.append(torch.cat([top, bottom], dim=-2))
    # one GEMM for every output
    both = torch.cat([d_perp, x], dim=-1) @ torch.cat(coefs, dim=-1)
    out = []
    start = 0
    for z in zs:
        m = z.shape[-1]
        part = both[..., start : start + m]
        start += m
        out.append(part if (z is x or z is d) else z + part)
    return out


def _cayley_apply(x: torch.Tensor, u: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``(I − ½A)⁻¹ (I + ½A) z`` for the generator ``A`` of ``(x, u)``; ``z`` is ``(..., n, m)``."""
    n, k = x.shape[-2], x.shape[-1]
    if 2 * k < n:
        # the generator of (x, u) is W(x, ũ) = ũ xᵀ − x ũᵀ: the rank-2k form of cayley_rotate
        return cayley_rotate(x, _half_u(x, u), 1.0, [z])[0]
    a = skew_generator(x, u)
    eye = _eye(n, x)
    return torch.linalg.solve(eye - 0.5 * a, z + 0.5 * (a @ z))


def _expm_apply(x: torch.Tensor, u: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``expm(A) z`` for the generator ``A`` of ``(x, u)``; ``z`` is ``(..., n, m)``."""
    n, k = x.shape[-2], x.shape[-1]
    if 4 * k < n:
        if torch.is_grad_enabled() and (x.requires_grad or u.requires_grad or z.requires_grad):
            return _expm_lowrank_smooth(x, u, z)
        return _expm_lowrank_exact(x, u, z)
    return torch.linalg.matrix_exp(skew_generator(x, u)) @ z


def _expm_lowrank_exact(x: torch.Tensor, u: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``expm(A) z`` through an orthonormal basis of ``span[x, ũ]``: on the manifold for any step size.

    Householder QR ``[x, ũ] = Q R`` gives ``Q`` ``(..., n, 2k)`` with orthonormal columns (to rounding,
    whatever the rank) and ``A = Q M Qᵀ`` with the ``2k × 2k`` skew ``M = R_ũ R_xᵀ − R_x R_ũᵀ``, so
    ``expm(A) z = z + Q (expm(M) − I) Qᵀ z``. ``expm(M)`` is formed in float64 (a ``2k × 2k``
    exponential; float32 loses orthogonality like ``eps·‖M‖``), so the orthogonality error of the
    result is a few ulps of the working dtype for every ``‖u‖``. O(nk² + k³). Not used under
    autograd: the QR backward is singular where ``[x, ũ]`` is rank deficient (``u = 0`` for one).
    """
    k = x.shape[-1]
    ut = _half_u(x, u)
    q, r = torch.linalg.qr(torch.cat([x, ut], dim=-1))
    c = r[..., k:] @ r[..., :k].mT
    wide = torch.float64 if x.device.type != "mps" else x.dtype  # MPS has no float64
    e = torch.linalg.matrix_exp((c - c.mT).to(wide))
    e = e - torch.eye(2 * k, dtype=wide, device=x.device)
    return z + q @ (e.to(z.dtype) @ (q.mT @ z))


def _expm_lowrank_smooth(x: torch.Tensor, u: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``expm(A) z`` in ops that are smooth everywhere (any derivative order): the autograd path.

    ``expm(UVᵀ) = I + U φ(VᵀU) Vᵀ`` with ``φ(B) = Σ_j B^j/(j+1)!``, read off the top-right block of
    ``expm([[B, I], [0, 0]])`` (a 4k × 4k exponential), and the factors balanced, ``U = [ũ/s, x]``,
    ``V = [s x, −ũ]`` with ``s = max(1, ‖ũ‖_F)`` (detached: ``UVᵀ = A`` for every ``s``, so its derivative
    is exactly zero). Without the balancing ``VᵀU`` is non-normal like ``‖u‖²`` and float32 results
    leave the manifold like ``eps·‖u‖²``; balanced and with the exponential in float64, like
    ``eps·‖u‖/10`` (1e-5 at ``‖u‖ = 1e4`` in float32; the exact no-grad path does not drift at all).
    """
    k = x.shape[-1]
    ut = _half_u(x, u)
    s = torch.linalg.vector_norm(ut.detach(), dim=(-2, -1), keepdim=True).clamp_min(1.0)
    big_u = torch.cat([ut / s, x], dim=-1)
    big_v = torch.cat([s * x, -ut], dim=-1)
    b = big_v.mT @ big_u
    m = 2 * k
    eye = _eye(m, b).expand_as(b)
    block = torch.cat(
        [
            torch.cat([b, eye], dim=-1),
            torch.zeros(*b.shape[:-2], m, 2 * m, dtype=b.dtype, device=b.device),
        ],
        dim=-2,
    )
    # float64 (MPS has none): 10× less drift of float32 results
    wide = torch.float64 if x.device.type != "mps" else x.dtype
    phi = torch.linalg.matrix_exp(block.to(wide))[..., :m, m:].to(b.dtype)
    return z + big_u @ (phi @ (big_v.mT @ z))


def _round_robin_pairs(n: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    key = (n, str(device))
    pairs = _ROUND_ROBIN_CACHE.get(key)
    if pairs is None:
        pairs = [(m.i.to(device), m.j.to(device)) for m in round_robin(n, device=device)]
        if len(_ROUND_ROBIN_CACHE) > 64:
            _ROUND_ROBIN_CACHE.clear()
        _ROUND_ROBIN_CACHE[key] = pairs
    return pairs


def _givens_apply(x: torch.Tensor, u: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """One round-robin sweep of Givens rotations with angles ``θ_ij = A_ij`` applied to rows of ``z``."""
    n = x.shape[-2]
    if n < 2:
        return z.clone()
    ut = _half_u(x, u)
    rounds = _round_robin_pairs(n, x.device)
    differentiable = torch.is_grad_enabled() and (
        x.requires_grad or u.requires_grad or z.requires_grad
    )
    if differentiable:
        # angles and rotations in plain torch ops: differentiable to any order (the analytic backward of
        # givens.rotate_pairs is first order only, and its second derivative is silently zero)
        out = z
        for i, j in rounds:
            theta = torch.linalg.vecdot(ut.index_select(-2, i), x.index_select(-2, j)) - (
                torch.linalg.vecdot(x.index_select(-2, i), ut.index_select(-2, j))
            )
            out = rotate_pairs_autograd(out, i, j, theta)
        return out
    with torch.no_grad():
        # all angles come from the starting point (A is fixed), then the rotations are applied in order
        if x.numel() // max(x.shape[-1], 1) * n <= _DENSE_GENERATOR_LIMIT:
            # one GEMM for A (BLAS speed) and a gather, rather than O(n²) strided dot products
            a = ut @ x.mT - x @ ut.mT
            thetas = [a[..., i, j] for i, j in rounds]
        else:
            thetas = [pair_coefficients(x, ut, i, j) for i, j in rounds]
        out = z.detach().clone(memory_format=torch.contiguous_format)
        for (i, j), theta in zip(rounds, thetas):
            rotate_pairs_(out, i, j, theta)
    return out


def _polar(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Polar factor ``U Vᵀ`` of ``a`` ``(..., n, k)`` with the SVD factors (singular values descending)."""
    u, _, vh = torch.linalg.svd(a, full_matrices=False)
    return u @ vh, u, vh


def _size_tuple(size: Sequence[Any]) -> tuple[int, ...]:
    if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)):
        size = tuple(size[0])
    out = []
    for s in size:
        if isinstance(s, bool) or not isinstance(s, int):
            raise TypeError(f"`size` must be ints (or one tuple of ints), got {size!r}")
        if s < 0:
            raise ValueError(f"`size` entries must be >= 0, got {size!r}")
        out.append(s)
    return tuple(out)


# ----------------------------------------------------------------------------------------------------
# manifolds


class Stiefel(_GeooptStiefel):
    """The Stiefel manifold St(n, k) of tall ``(..., n, k)`` matrices with ``XᵀX = I_k``.

    A :class:`geoopt.Stiefel` subclass: use it with :class:`geoopt.ManifoldParameter` and geoopt's
    Riemannian optimizers. Every method is batched over leading dimensions. A wide weight ``(k, n)``
    (e.g. ``nn.Linear(n, k).weight``) is a point after transposing.

    Args:
        n: number of rows, or ``None`` for any. When given, shape checks enforce it.
        k: number of columns, or ``None`` for any (``k <= n``).
        metric: ``"euclidean"`` (default; embedded metric ``tr(uᵀv)``) or ``"canonical"``
            (``tr(uᵀ(I − ½xxᵀ)v)``). :meth:`egrad2rgrad`, :meth:`inner` and :meth:`expmap` follow it.
        retraction: used by :meth:`retr` (and by geoopt's optimizers):

            - ``"qr"`` (default): ``qf(x + u)`` with ``diag(R) > 0``, O(nk²). Vectors are transported by
              projection.
            - ``"cayley"``: ``(I − ½A)⁻¹(I + ½A) x``; ``O(nk² + k³)`` via a ``2k × 2k`` solve when
              ``2k < n`` (an ``n × n`` solve otherwise). Transport: the same rotation applied to ``v``.
            - ``"expm"``: ``expm(A) x``, the exact canonical-metric geodesic; ``O(nk² + k³)`` when
              ``4k < n`` via the QR of ``[x, ũ]`` and a ``2k × 2k`` exponential in float64, which stays
              on the manifold for any step size (under autograd: a balanced ``4k × 4k`` form,
              differentiable to any order); ``O(n³)`` otherwise. Transport: rotation.
            - ``"givens_sweep"``: one sweep of Givens rotations over the round-robin 1-factorisation of
              the ``n`` rows with angles ``θ_ij = A_ij`` (a first-order approximation of ``expm(A) x``),
              ``O(n²k)``, no factorisation at all. Transport: rotation.
            - ``"polar"``: the polar factor of ``x + u`` (an SVD, O(nk²)). Transport: projection.

            All are deterministic; ``R_x(0) = x`` and ``dR_x(0) = id``.

    Shapes: points and tangent vectors ``(..., n, k)``; :meth:`inner` returns ``(...)`` (or
    ``(..., 1, 1)`` with ``keepdim=True``). As in geoopt, the batch dimensions of ``u``/``v`` broadcast
    against those of ``x`` (the matrix shapes must match). Every returned point or vector is contiguous
    (row-major). :attr:`reversible` is ``True`` for ``cayley`` and ``expm`` (geoopt's samplers need it).
    Point and tangent checks use the tolerance ``max(atol + rtol, 4·eps(dtype))``.
    """

    ndim = 2
    _square = False

    def __new__(cls, *args: Any, **kwargs: Any) -> Stiefel:
        # skip geoopt.Stiefel.__new__, which dispatches on its own `canonical` argument
        return super(_GeooptStiefel, cls).__new__(cls)

    def __init__(
        self,
        n: int | None = None,
        k: int | None = None,
        *,
        metric: str = "euclidean",
        retraction: str = "qr",
    ) -> None:
        super().__init__()
        for arg, value in (("n", n), ("k", k)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise TypeError(
                    f"`{arg}` must be an int or None, got {type(value).__name__} {value!r}"
                )
            if value is not None and value < 1:
                raise ValueError(f"`{arg}` must be >= 1 or None, got {value}")
        if n is not None and k is not None and k > n:
            raise ValueError(
                f"Stiefel points are tall (n >= k): got n={n}, k={k}; transpose wide weights"
            )
        if not isinstance(metric, str) or metric not in METRICS:
            raise ValueError(f"`metric` must be one of {METRICS}, got {metric!r}")
        if not isinstance(retraction, str) or retraction not in RETRACTIONS:
            raise ValueError(f"`retraction` must be one of {RETRACTIONS}, got {retraction!r}")
        self.n = n
        self.k = k
        self.metric = metric
        self.retraction = retraction
        self.name = type(self).__name__

    # ------------------------------------------------------------------ description

    @property
    def reversible(self) -> bool:  # geoopt declares a class attribute (None); this overrides it
        """Whether ``retr_transp`` is reversible: ``R_y(−T(u)) = x`` and ``T(−T(u)) = −u`` at ``y = R_x(u)``.

        True for ``cayley`` and ``expm``: ``Q(A)`` is a function of ``A`` that commutes with it and
        ``Q(−A) = Q(A)⁻¹``, and the generator at ``y = Q x`` of the transported step ``−Q u`` is
        ``−Q A Qᵀ = −A``, so the same rotation is undone exactly. False for the others (``qr``/``polar``
        transport by projection, the Givens sweep's rotations do not commute). geoopt's samplers
        (``geoopt.samplers.RHMC``, ``SGRHMC``, ``RSGLD``) require it.
        """
        return self.retraction in ("cayley", "expm")

    @property
    def canonical(self) -> bool:
        """Whether the canonical metric is used."""
        return self.metric == "canonical"

    @property
    def manifold_dim(self) -> int | None:
        """Dimension ``nk − k(k+1)/2`` of the manifold, or ``None`` when ``n`` or ``k`` is unset."""
        if self.n is None or self.k is None:
            return None
        return self.n * self.k - self.k * (self.k + 1) // 2

    def extra_repr(self) -> str:
        return f"n={self.n}, k={self.k}, metric={self.metric!r}, retraction={self.retraction!r}"

    # ------------------------------------------------------------------ checks

    def _check_shape(self, shape: tuple[int, ...], name: str) -> tuple[bool, str | None]:
        shape = tuple(shape)
        if len(shape) < 2:
            return False, f"`{name}` must have shape (..., n, k) with at least 2 dims, got {shape}"
        n, k = shape[-2], shape[-1]
        if k > n:
            return False, (
                f"`{name}` must be tall (..., n, k) with n >= k, got {shape} (transpose wide weights)"
            )
        if self.n is not None and n != self.n:
            return False, f"`{name}` must have n={self.n} rows (shape[-2]), got shape {shape}"
        if self.k is not None and k != self.k:
            return False, f"`{name}` must have k={self.k} columns (shape[-1]), got shape {shape}"
        return True, None

    def _check_point_on_manifold(
        self, x: torch.Tensor, *, atol: float = 1e-5, rtol: float = 1e-5
    ) -> tuple[bool, str | None]:
        if not x.is_floating_point():
            return False, f"`x` must be floating point, got {describe(x)}"
        xc = x.to(compute_dtype(x.dtype))
        if not bool(torch.isfinite(xc).all()):
            return False, "`x` has non-finite entries"
        err = (xc.mT @ xc - _eye(x.shape[-1], xc)).abs()
        tol = max(atol + rtol, _resolution(x.dtype))
        worst = float(err.max()) if err.numel() else 0.0
        if worst > tol:
            return False, f"`x` is off the manifold: max |XᵀX − I| = {worst:.3g} > {tol:.3g}"
        return True, None

    def _check_vector_on_tangent(
        self, x: torch.Tensor, u: torch.Tensor, *, atol: float = 1e-5, rtol: float = 1e-5
    ) -> tuple[bool, str | None]:
        if x.shape[-2:] != u.shape[-2:] or not _broadcastable(x.shape, u.shape):
            return (
                False,
                f"`u` must have the shape of `x` {tuple(x.shape)} (batch dimensions may broadcast), "
                f"got {tuple(u.shape)}",
            )
        if not u.is_floating_point():
            return False, f"`u` must be floating point, got {describe(u)}"
        cd = compute_dtype(x.dtype)
        xc, uc = x.to(cd), u.to(cd)
        if not bool(torch.isfinite(uc).all()):
            return False, "`u` has non-finite entries"
        s = xc.mT @ uc
        err = (s + s.mT).abs()
        worst = float(err.max()) if err.numel() else 0.0
        scale = float(uc.abs().max()) if uc.numel() else 0.0
        tol = max(
            atol + rtol * scale, _resolution(torch.promote_types(x.dtype, u.dtype)) * (1 + scale)
        )
        if worst > tol:
            return False, f"`u` is not tangent at `x`: max |xᵀu + uᵀx| = {worst:.3g} > {tol:.3g}"
        return True, None

    def assert_check_point(self, x: torch.Tensor) -> None:
        """geoopt's shape check (run by :class:`geoopt.ManifoldTensor` / ``ManifoldParameter``), raising
        ``ValueError`` with our message (e.g. the remedy for wide weights) instead of geoopt's wrapper."""
        ok, reason = self._check_shape(tuple(x.shape), "x")
        if not ok:
            raise ValueError(f"{reason} [{self.name}({self.extra_repr()})]")

    def assert_check_vector(self, u: torch.Tensor) -> None:
        """geoopt's shape check of a tangent vector, with our message (see :meth:`assert_check_point`)."""
        ok, reason = self._check_shape(tuple(u.shape), "u")
        if not ok:
            raise ValueError(f"{reason} [{self.name}({self.extra_repr()})]")

    def _point(self, name: str, x: object) -> torch.Tensor:
        """Validate type, dtype and shape of a point-shaped argument (cheap, no device sync)."""
        check_tensor(name, x)
        assert isinstance(x, torch.Tensor)
        check_floating(name, x)
        ok, reason = self._check_shape(tuple(x.shape), name)
        if not ok:
            raise ValueError(f"{reason} [{self.name}({self.extra_repr()})]")
        return x

    def _pair(
        self, x: object, name: str, u: object, *, base: str = "x"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Validate a point ``base`` and a same-dtype companion ``name`` of the same matrix shape.

        Batch dimensions broadcast as in geoopt (``u`` ``(n, k)`` against ``x`` ``(b, n, k)`` or the
        other way round); both are returned expanded (views) to the common shape.
        """
        xt = self._point(base, x)
        check_tensor(name, u)
        assert isinstance(u, torch.Tensor)
        check_floating(name, u)
        if u.dtype != xt.dtype:
            raise TypeError(
                f"`{name}` must have the same dtype as `{base}` ({xt.dtype}), got {describe(u)}"
            )
        if u.shape == xt.shape:
            return xt, u
        if u.dim() < 2 or u.shape[-2:] != xt.shape[-2:] or not _broadcastable(xt.shape, u.shape):
            raise ValueError(
                f"`{name}` must have the shape of `{base}` {tuple(xt.shape)} (batch dimensions may "
                f"broadcast), got {describe(u)}"
            )
        shape = torch.broadcast_shapes(xt.shape, u.shape)
        return xt.expand(shape), u.expand(shape)

    def _triple(
        self, x: object, u: object, v: object
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`_pair` for a point and two companions ``u``, ``v``, all broadcast together."""
        xt, ut = self._pair(x, "u", u)
        xt, vt = self._pair(xt, "v", v)
        return xt, ut.expand(xt.shape), vt

    def assert_point(self, x: torch.Tensor, *, atol: float = 1e-5) -> None:
        """Raise ``ValueError`` unless ``x`` ``(..., n, k)`` lies on the manifold within ``atol``.

        Convenience wrapper around geoopt's :meth:`assert_check_point_on_manifold` that also checks type
        and dtype (``TypeError``). Costs one ``k × k`` Gram matrix per item and a device sync.
        """
        self._point("x", x)
        self.assert_check_point_on_manifold(x, atol=atol, rtol=0.0)

    def assert_tangent(self, x: torch.Tensor, u: torch.Tensor, *, atol: float = 1e-5) -> None:
        """Raise ``ValueError`` unless ``u`` ``(..., n, k)`` is tangent at ``x`` (``xᵀu + uᵀx ≈ 0``)."""
        self._pair(x, "u", u)
        self.assert_check_vector_on_tangent(x, u, ok_point=True, atol=atol, rtol=0.0)

    # ------------------------------------------------------------------ projections, metric

    def _fix_component(self, q: torch.Tensor) -> torch.Tensor:
        """Hook for SO(d): move a point into the required connected component. Identity here."""
        return q

    def projx(self, x: torch.Tensor) -> torch.Tensor:
        """Nearest point on the manifold in Frobenius norm: the polar factor ``U Vᵀ`` of ``x = U Σ Vᵀ``.

        Args:
            x: ``(..., n, k)`` any full-rank matrix (for rank-deficient ``x`` the factor is not unique;
                an orthonormal one is still returned).

        Returns:
            ``(..., n, k)`` point. Cost: one thin SVD, O(nk²).
        """
        x = self._point("x", x)
        cd = compute_dtype(x.dtype)
        q, _, _ = _polar(x.to(cd))
        return q.to(x.dtype).contiguous()

    def proju(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Orthogonal projection onto the tangent space at ``x``: ``u − x sym(xᵀu)``.

        The same for both metrics (the tangent space does not depend on the metric); idempotent.

        Args:
            x: point ``(..., n, k)``.
            u: any matrix ``(..., n, k)``.

        Returns:
            ``(..., n, k)`` tangent vector. O(nk²).
        """
        x, u = self._pair(x, "u", u)
        return u - x @ _sym(x.mT @ u)

    def egrad2rgrad(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Riemannian gradient from the Euclidean gradient ``u``.

        Euclidean metric: ``u − x sym(xᵀu)``; canonical metric: ``u − x uᵀ x`` (= ``W x`` with
        ``W = u xᵀ − x uᵀ``). Shapes ``(..., n, k)``; O(nk²).
        """
        x, u = self._pair(x, "u", u)
        if self.canonical:
            return u - x @ (u.mT @ x)
        return u - x @ _sym(x.mT @ u)

    def inner(
        self,
        x: torch.Tensor,
        u: torch.Tensor,
        v: torch.Tensor | None = None,
        *,
        keepdim: bool = False,
    ) -> torch.Tensor:
        """Metric ``⟨u, v⟩_x`` of tangent vectors (``v = u`` when omitted).

        Euclidean: ``tr(uᵀv)``; canonical: ``tr(uᵀv) − ½ tr((xᵀu)ᵀ(xᵀv))``.

        Args:
            x, u, v: ``(..., n, k)``.
            keepdim: keep the two matrix dimensions (``(..., 1, 1)``), as geoopt's Adam expects.

        Returns:
            ``(...)`` or ``(..., 1, 1)``.
        """
        if v is None:
            x, u = self._pair(x, "u", u)
            v = u
        else:
            x, u, v = self._triple(x, u, v)
        out = (u * v).sum(dim=(-2, -1), keepdim=keepdim)
        if self.canonical:
            xu = x.mT @ u
            xv = xu if v is u else x.mT @ v
            out = out - 0.5 * (xu * xv).sum(dim=(-2, -1), keepdim=keepdim)
        return out

    # ------------------------------------------------------------------ retractions

    def _rotation_based(self) -> bool:
        return self.retraction in ("cayley", "expm", "givens_sweep")

    def _apply_rotation(self, x: torch.Tensor, u: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
        fn = {"cayley": _cayley_apply, "expm": _expm_apply, "givens_sweep": _givens_apply}[
            self.retraction
        ]
        return fn(x, u, z)

    def _retr_impl(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        if self.retraction == "qr":
            return self._fix_component(qr_sign_fixed(x + u))
        if self.retraction == "polar":
            return self._fix_component(_polar(x + u)[0])
        return self._apply_rotation(x, u, x)

    def retr(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Retraction ``R_x(u)`` selected by ``retraction`` (see the class docstring).

        Args:
            x: point ``(..., n, k)``.
            u: tangent vector at ``x`` ``(..., n, k)``.

        Returns:
            ``(..., n, k)`` point. Deterministic; differentiable in ``x`` and ``u``.
        """
        x, u = self._pair(x, "u", u)
        cd = compute_dtype(x.dtype)
        return self._retr_impl(x.to(cd), u.to(cd)).to(x.dtype).contiguous()

    def retr_transp(
        self, x: torch.Tensor, u: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Retraction and vector transport at once: ``(R_x(u), T(v))``.

        For the rotation-based retractions (``cayley``, ``expm``, ``givens_sweep``) the point is
        ``y = Q x`` and ``v`` is carried by the same rotation, ``T(v) = Q v``: tangent at ``y`` and
        isometric for both metrics, computed in the same pass (``[x, v]`` is rotated together). For
        ``qr`` and ``polar``, ``T(v) = proju(y, v)``.

        Args:
            x: point ``(..., n, k)``; u: step ``(..., n, k)``; v: tangent vector at ``x`` ``(..., n, k)``.

        Returns:
            ``(y, v_transported)``, both ``(..., n, k)``.
        """
        x, u, v = self._triple(x, u, v)
        cd = compute_dtype(x.dtype)
        xc, uc, vc = x.to(cd), u.to(cd), v.to(cd)
        if self._rotation_based():
            k = x.shape[-1]
            both = self._apply_rotation(xc, uc, torch.cat([xc, vc], dim=-1))
            y, w = both[..., :k], both[..., k:]
        else:
            y = self._retr_impl(xc, uc)
            w = vc - y @ _sym(y.mT @ vc)
        return y.to(x.dtype).contiguous(), w.to(x.dtype).contiguous()

    def transp_follow_retr(self, x: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Transport ``v`` from ``x`` to ``R_x(u)`` (the second output of :meth:`retr_transp`)."""
        return self.retr_transp(x, u, v)[1]

    def transp(self, x: torch.Tensor, y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Vector transport by projection: ``proju(y, v)``, shapes ``(..., n, k)`` (batch dimensions
        broadcast); ``x`` is only checked."""
        _, y = self._pair(x, "y", y)
        y, v = self._pair(y, "v", v, base="y")
        return v - y @ _sym(y.mT @ v)

    def expmap(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Exact Riemannian exponential map of the chosen metric.

        Canonical metric (and the square case, where both metrics have the same geodesics):
        ``expm(A) x`` with ``A = ũxᵀ − xũᵀ``, in ``O(nk² + k³)`` for ``4k < n``. Euclidean metric, tall
        points: the Edelman–Arias–Smith formula
        ``[x, u] expm([[xᵀu, −uᵀu], [I, xᵀu]]) [expm(−xᵀu); 0]`` (``2k × 2k`` and ``k × k``
        exponentials, O(nk² + k³)). ``u`` is projected onto the tangent space first.

        Args:
            x: point ``(..., n, k)``; u: tangent vector ``(..., n, k)``.

        Returns:
            ``(..., n, k)`` point on the geodesic at time 1.
        """
        x, u = self._pair(x, "u", u)
        cd = compute_dtype(x.dtype)
        xc, uc = x.to(cd), u.to(cd)
        n, k = x.shape[-2], x.shape[-1]
        if self.canonical or n == k:
            return _expm_apply(xc, uc, xc).to(x.dtype).contiguous()
        uc = uc - xc @ _sym(xc.mT @ uc)
        a = xc.mT @ uc
        s = uc.mT @ uc
        eye = _eye(k, xc)
        top = torch.cat([a, -s], dim=-1)
        bottom = torch.cat([eye.expand_as(a), a], dim=-1)
        w = torch.linalg.matrix_exp(torch.cat([top, bottom], dim=-2))
        z = torch.cat([torch.linalg.matrix_exp(-a), torch.zeros_like(a)], dim=-2)
        y = torch.cat([xc, uc], dim=-1) @ (w @ z)
        return y.to(x.dtype).contiguous()

    def expmap_transp(
        self, x: torch.Tensor, u: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(expmap(x, u), proju(y, v))``, shapes ``(..., n, k)``."""
        y = self.expmap(x, u)
        return y, self.transp(x, y, v)

    def transp_follow_expmap(
        self, x: torch.Tensor, u: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """Transport ``v`` to ``expmap(x, u)`` by projection, shapes ``(..., n, k)``."""
        return self.expmap_transp(x, u, v)[1]

    # ------------------------------------------------------------------ sampling

    def _default_size(self, size: Sequence[Any]) -> tuple[int, ...]:
        shape = _size_tuple(size)
        if not shape:
            if self.n is None or self.k is None:
                raise ValueError(
                    f"`size` is required when the manifold dimensions are not fixed "
                    f"({self.name}({self.extra_repr()}))"
                )
            shape = (self.n, self.k)
        ok, reason = self._check_shape(shape, "size")
        if not ok:
            raise ValueError(reason)
        return shape

    def random_(
        self,
        *size: int | Sequence[int],
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> ManifoldTensor:
        """A Haar-distributed random point: ``Q·diag(sign(diag R))`` of the QR of a Gaussian matrix.

        Drawn and factorised in float64 (:func:`orthotorch._numerics.haar`), then rounded once to
        ``dtype``, so a float16/bfloat16 point passes :meth:`check_point_on_manifold` (whose tolerance
        is at least ``4·eps`` of the dtype). The result is contiguous (row-major) for every shape.

        Args:
            size: shape ``(..., n, k)`` as ints or one tuple; may be omitted when ``n`` and ``k`` are set.
            dtype: floating dtype (default: ``torch.get_default_dtype()``).
            device: device (default: the generator's device, else CPU).
            generator: source of randomness. When ``None`` a fresh, non-deterministically seeded
                generator is used (the global RNG is never touched); pass one for reproducibility.

        Returns:
            :class:`geoopt.ManifoldTensor` of shape ``size`` on this manifold. O(nk²) per item.
        """
        shape = self._default_size(size)
        dtype = torch.get_default_dtype() if dtype is None else dtype
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or dtype.is_complex:
            raise TypeError(f"`dtype` must be a real floating torch.dtype, got {dtype!r}")
        check_generator("generator", generator)
        if device is None:
            device = generator.device if generator is not None else torch.device("cpu")
        device = torch.device(device)
        if generator is None:
            generator = torch.Generator(device=device)
            generator.seed()
        elif generator.device.type != device.type:
            raise ValueError(
                f"`generator` is on {generator.device} but `device` is {device}; they must match"
            )
        n, k = shape[-2], shape[-1]
        if math.prod(shape) == 0:
            q = torch.empty(shape, dtype=dtype, device=device)
        else:
            wide = torch.float64 if device.type != "mps" else torch.float32
            q = haar(n, k, generator=generator, dtype=wide, device=device, batch=shape[:-2])
            q = self._fix_component(q).to(dtype)
        return ManifoldTensor(q.contiguous(), manifold=self)

    def random(
        self,
        *size: int | Sequence[int],
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
        **kwargs: Any,
    ) -> ManifoldTensor:
        """geoopt's sampling API; the same as :meth:`random_` (Haar measure)."""
        if kwargs:
            raise TypeError(f"unexpected keyword arguments for random: {sorted(kwargs)}")
        return self.random_(*size, dtype=dtype, device=device, generator=generator)

    random_naive = random

    def origin(
        self,
        *size: int | Sequence[int],
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        seed: int | None = 42,
    ) -> ManifoldTensor:
        """The point ``[I_k; 0]`` of shape ``size`` ``(..., n, k)`` (``seed`` is ignored, as in geoopt)."""
        shape = self._default_size(size)
        dtype = torch.get_default_dtype() if dtype is None else dtype
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or dtype.is_complex:
            raise TypeError(f"`dtype` must be a real floating torch.dtype, got {dtype!r}")
        eye = torch.eye(shape[-2], shape[-1], dtype=dtype, device=device)
        return ManifoldTensor(eye.expand(shape).clone(), manifold=self)


class OrthogonalGroup(Stiefel):
    """The orthogonal group O(d): square ``(..., d, d)`` matrices with ``XᵀX = I``.

    St(d, d); every method of :class:`Stiefel` applies. Both metrics have the same geodesics
    ``x expm(xᵀu)``; the canonical metric is half the Euclidean one and its gradient ``G − xGᵀx`` twice the
    Euclidean one. Rotation-based retractions and the sign-fixed ``qr`` retraction keep the determinant
    of a point for small steps; the optimizer cannot cross between the two components, so the
    initialisation decides which one a parameter lives in.

    Args:
        d: size, or ``None`` for any square size.
        metric, retraction: as in :class:`Stiefel`.
    """

    _square = True

    def __init__(
        self, d: int | None = None, *, metric: str = "euclidean", retraction: str = "qr"
    ) -> None:
        super().__init__(d, d, metric=metric, retraction=retraction)

    @property
    def d(self) -> int | None:
        """The matrix size, or ``None``."""
        return self.n

    def extra_repr(self) -> str:
        return f"d={self.n}, metric={self.metric!r}, retraction={self.retraction!r}"

    def _check_shape(self, shape: tuple[int, ...], name: str) -> tuple[bool, str | None]:
        shape = tuple(shape)
        if len(shape) >= 2 and shape[-1] != shape[-2]:
            return False, f"`{name}` must be square (..., d, d) for {self.name}, got {shape}"
        return super()._check_shape(shape, name)

    @property
    def manifold_dim(self) -> int | None:
        """Dimension ``d(d−1)/2``, or ``None`` when ``d`` is unset."""
        return None if self.n is None else self.n * (self.n - 1) // 2


class SpecialOrthogonalGroup(OrthogonalGroup):
    """The special orthogonal group SO(d): rotations ``(..., d, d)`` with ``XᵀX = I`` and ``det X = +1``.

    Differences from :class:`OrthogonalGroup`: :meth:`projx` returns the nearest rotation (for
    ``det(UVᵀ) = −1`` the sign of the smallest singular direction is flipped, ``U diag(1, …, 1, −1) Vᵀ``);
    :meth:`random_` samples Haar on SO(d); the ``qr`` and ``polar`` retractions flip one column when
    ``x + u`` has a negative determinant (only possible for large steps), so every retraction stays in
    SO(d); the point check also requires ``det > 0``. These use one ``d × d`` determinant (O(d³)).
    """

    def _fix_component(self, q: torch.Tensor) -> torch.Tensor:
        if q.shape[-1] == 0:
            return q
        sign = det_sign(q)
        sign = torch.where(sign == 0, torch.ones_like(sign), sign)
        return torch.cat([q[..., :1] * sign[..., None, None], q[..., 1:]], dim=-1)

    def projx(self, x: torch.Tensor) -> torch.Tensor:
        """Nearest rotation in Frobenius norm: ``U diag(1, …, 1, det(UVᵀ)) Vᵀ`` with ``x = U Σ Vᵀ``.

        Args:
            x: ``(..., d, d)``.

        Returns:
            ``(..., d, d)`` with determinant +1, even when ``det x < 0``. Cost: SVD + determinant.
        """
        x = self._point("x", x)
        cd = compute_dtype(x.dtype)
        q, u, vh = _polar(x.to(cd))
        if q.shape[-1] == 0:
            return q.to(x.dtype).contiguous()
        sign = det_sign(q)
        sign = torch.where(sign == 0, torch.ones_like(sign), sign)
        # U diag(1, …, s) Vᵀ = UVᵀ + (s − 1) u_d v_dᵀ, with u_d, v_d the smallest singular pair
        corr = (sign - 1)[..., None, None] * (u[..., :, -1:] @ vh[..., -1:, :])
        return (q + corr).to(x.dtype).contiguous()

    def _check_point_on_manifold(
        self, x: torch.Tensor, *, atol: float = 1e-5, rtol: float = 1e-5
    ) -> tuple[bool, str | None]:
        ok, reason = super()._check_point_on_manifold(x, atol=atol, rtol=rtol)
        if not ok:
            return ok, reason
        sign = det_sign(x.to(compute_dtype(x.dtype)))
        if sign.numel() and bool((sign <= 0).any()):
            return False, "`x` is orthogonal but not a rotation: det(x) < 0"
        return True, None
