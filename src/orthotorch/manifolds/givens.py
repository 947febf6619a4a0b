"""Givens-rotation primitives on disjoint row pairs: the hot path of the library.

A set of disjoint row pairs ``(i[p], j[p])`` (a matching) defines commuting plane rotations. For tall
points ``x`` of shape ``(..., n, k)`` the library rotates rows (DESIGN.md):

    x_i ← c·x_i + s·x_j,   x_j ← −s·x_i + c·x_j,   c = cos θ, s = sin θ,

which is ``torch.linalg.matrix_exp(θ (E_ij − E_ji)) @ x``. For a Euclidean gradient ``g`` the skew generator
``W = g xᵀ − x gᵀ`` has entries ``W_ij = ⟨g_i, x_j⟩ − ⟨x_i, g_j⟩`` (O(k) each, no n×n matrix formed), and the
descent step restricted to the matching is the rotation with θ = −lr·W_ij.

Every function costs O(P·k) for P pairs. On CPU, float32/float64 run in a native OpenMP kernel (built on first
use, see :mod:`orthotorch.manifolds._native`); other dtypes and devices use a vectorised torch path with
angles and dot products in float32 (bfloat16/float16) or the input dtype.

Pairs must be disjoint; the hot path does not check that (use :func:`check_matching`), but indices are
range-checked, so a bad index raises instead of corrupting memory.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import torch

from orthotorch._validation import check_floating, check_matrix, describe
from orthotorch.manifolds import _native

__all__ = [
    "check_matching",
    "functorch_active",
    "givens_matrix",
    "givens_step_",
    "native_status",
    "pair_coefficients",
    "rotate_pairs",
    "rotate_pairs_",
    "rotate_pairs_autograd",
]

IndexLike = torch.Tensor | Sequence[int]


def native_status() -> str:
    """State of the native CPU kernel, e.g. ``"loaded (...)"`` or why the torch path is used."""
    return _native.status()


# ----------------------------------------------------------------------------------------------------
# argument handling


def _index(name: str, idx: IndexLike, device: torch.device) -> torch.Tensor:
    if not isinstance(idx, torch.Tensor):
        idx = torch.as_tensor(list(idx), dtype=torch.int64)
    if idx.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"`{name}` must be an integer tensor of row indices, got dtype {idx.dtype}")
    if idx.dim() != 1:
        raise ValueError(f"`{name}` must be 1-D (P,), got shape {tuple(idx.shape)}")
    return idx.to(device=device, dtype=torch.int64).contiguous()


def _pairs(x: torch.Tensor, i: IndexLike, j: IndexLike) -> tuple[torch.Tensor, torch.Tensor]:
    ii, jj = _index("i", i, x.device), _index("j", j, x.device)
    if ii.shape != jj.shape:
        raise ValueError(
            f"`i` and `j` must have the same length, got {ii.numel()} and {jj.numel()}"
        )
    return ii, jj


def _angles(
    name: str, theta: torch.Tensor | float, x: torch.Tensor, num_pairs: int
) -> torch.Tensor:
    """``theta`` as a tensor of shape ``(P,)`` or ``x.shape[:-2] + (P,)``."""
    if not isinstance(theta, torch.Tensor):
        theta = torch.full((num_pairs,), float(theta), device=x.device)
    if not theta.is_floating_point():
        raise TypeError(f"`{name}` must be a floating tensor, got {describe(theta)}")
    if theta.dim() == 0:
        theta = theta.expand(num_pairs)
    if theta.shape[-1] != num_pairs:
        raise ValueError(
            f"`{name}` must have last dimension P={num_pairs} (one angle per pair), got "
            f"shape {tuple(theta.shape)}"
        )
    batch = x.shape[:-2]
    if theta.dim() > 1 and theta.shape[:-1] != batch:
        try:
            theta = theta.expand(*batch, num_pairs)
        except RuntimeError:
            raise ValueError(
                f"`{name}` must have shape (P,) or x.shape[:-2] + (P,) = {(*batch, num_pairs)}, got "
                f"{tuple(theta.shape)}"
            ) from None
    return theta.to(x.device)


def _check_pair_inputs(x: torch.Tensor, g: torch.Tensor | None = None) -> None:
    check_matrix("x", x)
    check_floating("x", x)
    if g is not None:
        check_matrix("g", g)
        if g.shape != x.shape:
            raise ValueError(
                f"`g` must have the shape of `x` {tuple(x.shape)}, got {tuple(g.shape)}"
            )
        if g.dtype != x.dtype:
            raise TypeError(f"`g` must have the dtype of `x` ({x.dtype}), got {g.dtype}")
        if g.device != x.device:
            raise ValueError(f"`g` must be on the device of `x` ({x.device}), got {g.device}")


def _batched_view(t: torch.Tensor) -> tuple[torch.Tensor, int, int, int, int] | None:
    """``t`` viewed as ``(B, n, k)`` without a copy plus its strides, or ``None`` if impossible."""
    n, k = t.shape[-2], t.shape[-1]
    if t.dim() == 2:
        return t, 1, 0, t.stride(0), t.stride(1)
    try:
        v = t.view(-1, n, k)
    except RuntimeError:
        return None
    return v, v.shape[0], v.stride(0), v.stride(1), v.stride(2)


def _use_native(*tensors: torch.Tensor) -> bool:
    if any(
        t.device.type != "cpu" or t.dtype not in (torch.float32, torch.float64) for t in tensors
    ):
        return False
    return _native.get_lib() is not None


def _kernel(name: str, x: torch.Tensor):
    """The native function ``ot_<name>_f32`` or ``ot_<name>_f64`` for the dtype of ``x``."""
    sfx = "f32" if x.dtype == torch.float32 else "f64"
    return getattr(_native.get_lib(), f"ot_{name}_{sfx}")


def _ptr(t: torch.Tensor | None) -> ctypes.c_void_p:
    return ctypes.c_void_p(0 if t is None else t.data_ptr())


def _flat_param(t: torch.Tensor, x: torch.Tensor, num_pairs: int) -> tuple[torch.Tensor, int]:
    """Angles/scales as a contiguous ``(B, P)`` (batch stride P) or shared ``(P,)`` (stride 0) tensor."""
    t = t.to(dtype=x.dtype)
    if t.dim() == 1:
        return t.contiguous(), 0
    return t.reshape(-1, num_pairs).contiguous(), num_pairs


def _raise_index(rc: int, n: int) -> None:
    if rc == -1:
        raise IndexError(f"pair indices `i`/`j` must lie in [0, {n}) (the rows of `x`)")
    if rc != 0:
        raise RuntimeError(f"native Givens kernel failed with code {rc}")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


# ----------------------------------------------------------------------------------------------------
# torch path (any device, any dtype, any strides)


def _torch_coefficients(x, g, i, j) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_i, x_j, W)`` on the pairs; the gathered rows are reused by the fused step's rotation."""
    acc = _acc_dtype(x.dtype)
    xi, xj = x.index_select(-2, i).to(acc), x.index_select(-2, j).to(acc)
    gi, gj = g.index_select(-2, i).to(acc), g.index_select(-2, j).to(acc)
    return xi, xj, torch.linalg.vecdot(gi, xj) - torch.linalg.vecdot(xi, gj)


def _torch_rotate_(x, i, j, theta, xi=None, xj=None) -> None:
    acc = _acc_dtype(x.dtype)
    if xi is None:
        xi, xj = x.index_select(-2, i).to(acc), x.index_select(-2, j).to(acc)
    theta = theta.to(acc)
    # increment form with c − 1 = −2 sin²(θ/2): cos θ rounds to 1 for small θ, and c·x + s·y would then
    # scale the rows by sqrt(1 + θ²) each step (systematic float32 drift)
    cm1 = (-2.0 * torch.sin(0.5 * theta) ** 2).unsqueeze(-1)
    s = torch.sin(theta).unsqueeze(-1)
    new_i = (xi + (cm1 * xi + s * xj)).to(x.dtype)
    new_j = (xj + (cm1 * xj - s * xi)).to(x.dtype)
    x.index_copy_(-2, i, new_i.expand(*x.shape[:-2], *new_i.shape[-2:]))
    x.index_copy_(-2, j, new_j.expand(*x.shape[:-2], *new_j.shape[-2:]))


# ----------------------------------------------------------------------------------------------------
# public primitives


@torch.no_grad()
def pair_coefficients(x: torch.Tensor, g: torch.Tensor, i: IndexLike, j: IndexLike) -> torch.Tensor:
    """Entries of the skew generator ``W = g xᵀ − x gᵀ`` on the given row pairs.

    Args:
        x: point, shape ``(..., n, k)`` (tall Stiefel convention; pass ``weight.mT`` for wide weights).
        g: Euclidean gradient (or any matrix) of the same shape, dtype and device.
        i, j: int64 ``(P,)`` row indices of disjoint pairs.

    Returns:
        ``(..., P)``: ``W[..., p] = ⟨g_i, x_j⟩ − ⟨x_i, g_j⟩`` with ``i = i[p]``, ``j = j[p]``; float32 for
        half-precision inputs, else the dtype of ``x``. Cost O(P·k); no n×n matrix is formed.
    """
    _check_pair_inputs(x, g)
    ii, jj = _pairs(x, i, j)
    n, num_pairs = x.shape[-2], ii.numel()
    if _use_native(x, g):
        bx, bg = _batched_view(x), _batched_view(g)
        if bx is not None and bg is not None:
            _, batch, xbs, xrs, xcs = bx
            _, _, gbs, grs, gcs = bg
            out = torch.empty(batch, num_pairs, dtype=x.dtype)
            fn = _kernel("coeffs", x)
            rc = fn(
                _ptr(x),
                xbs,
                xrs,
                xcs,
                _ptr(g),
                gbs,
                grs,
                gcs,
                _ptr(ii),
                _ptr(jj),
                batch,
                n,
                num_pairs,
                x.shape[-1],
                _ptr(out),
                torch.get_num_threads(),
            )
            _raise_index(rc, n)
            return out.view(*x.shape[:-2], num_pairs)
    return _torch_coefficients(x, g, ii, jj)[2]


@torch.no_grad()
def rotate_pairs_(
    x: torch.Tensor, i: IndexLike, j: IndexLike, theta: torch.Tensor | float
) -> torch.Tensor:
    """Rotate the row pairs of ``x`` in place: ``x ← expm(Σ_p θ_p (E_ij − E_ji)) x``.

    Args:
        x: ``(..., n, k)``, modified in place (any strides; contiguous rows or columns are fastest).
        i, j: int64 ``(P,)`` indices of disjoint row pairs.
        theta: angles, ``(P,)`` shared over the batch or ``(..., P)`` per batch item (a float is broadcast).

    Returns:
        ``x`` itself. For pair (i, j): ``x_i ← cos θ·x_i + sin θ·x_j``, ``x_j ← −sin θ·x_i + cos θ·x_j``.
        Not differentiable; see :func:`rotate_pairs`.
    """
    _check_pair_inputs(x)
    ii, jj = _pairs(x, i, j)
    n, num_pairs = x.shape[-2], ii.numel()
    th = _angles("theta", theta, x, num_pairs)
    if _use_native(x):
        bx = _batched_view(x)
        if bx is not None:
            _, batch, xbs, xrs, xcs = bx
            flat, tbs = _flat_param(th, x, num_pairs)
            fn = _kernel("rotate", x)
            rc = fn(
                _ptr(x),
                xbs,
                xrs,
                xcs,
                _ptr(ii),
                _ptr(jj),
                batch,
                n,
                num_pairs,
                x.shape[-1],
                _ptr(flat),
                tbs,
                torch.get_num_threads(),
            )
            _raise_index(rc, n)
            return x
    _check_range(ii, jj, n)
    _torch_rotate_(x, ii, jj, th)
    return x


@torch.no_grad()
def givens_step_(
    x: torch.Tensor,
    g: torch.Tensor,
    i: IndexLike,
    j: IndexLike,
    lr: float,
    *,
    scale: torch.Tensor | None = None,
    co_rotate: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fused descent step on a matching: ``W = pair_coefficients(x, g, i, j)``, then rotate ``x`` in place
    by ``θ = −lr·W·scale``, i.e. ``x ← expm(−lr·W_M) x`` with ``W_M`` the generator restricted to the pairs.

    Args:
        x: ``(..., n, k)`` point, modified in place.
        g: ``(..., n, k)`` Euclidean gradient (same dtype/device as ``x``).
        i, j: int64 ``(P,)`` disjoint row pairs.
        lr: step size.
        scale: optional per-pair multipliers ``(P,)`` or ``(..., P)`` (e.g. ``1/p_e`` for the unbiased
            estimate of the full step).
        co_rotate: optional ``(..., n, k)`` tensor (e.g. a momentum buffer; may be ``g`` itself) rotated
            in place by the same angles, in the same pass on CPU when rows are contiguous.

    Returns:
        ``W`` on the pairs, ``(..., P)`` (computed before the rotation). One pass over the rows on CPU.
    """
    _check_pair_inputs(x, g)
    ii, jj = _pairs(x, i, j)
    n, num_pairs = x.shape[-2], ii.numel()
    sc = None if scale is None else _angles("scale", scale, x, num_pairs)
    if co_rotate is not None:
        _check_pair_inputs(x, co_rotate)
        w = _step_co_rotate(x, g, co_rotate, ii, jj, lr, sc)
        if w is not None:
            return w
        w = givens_step_(x, g, ii, jj, lr, scale=sc)
        theta = -lr * w if sc is None else -lr * w * sc.to(w.dtype)
        rotate_pairs_(co_rotate, ii, jj, theta)
        return w
    if _use_native(x, g):
        bx, bg = _batched_view(x), _batched_view(g)
        if bx is not None and bg is not None:
            _, batch, xbs, xrs, xcs = bx
            _, _, gbs, grs, gcs = bg
            w = torch.empty(batch, num_pairs, dtype=x.dtype)
            sflat, sbs = (None, 0) if sc is None else _flat_param(sc, x, num_pairs)
            fn = _kernel("step", x)
            rc = fn(
                _ptr(x),
                xbs,
                xrs,
                xcs,
                _ptr(g),
                gbs,
                grs,
                gcs,
                _ptr(ii),
                _ptr(jj),
                batch,
                n,
                num_pairs,
                x.shape[-1],
                float(lr),
                _ptr(sflat),
                sbs,
                _ptr(w),
                torch.get_num_threads(),
            )
            _raise_index(rc, n)
            return w.view(*x.shape[:-2], num_pairs)
    _check_range(ii, jj, n)
    xi, xj, w = _torch_coefficients(x, g, ii, jj)
    theta = -lr * w if sc is None else -lr * w * sc.to(w.dtype)
    _torch_rotate_(x, ii, jj, theta, xi, xj)
    return w


def _step_co_rotate(x, g, y, ii, jj, lr, sc) -> torch.Tensor | None:
    """Native one-pass step that also rotates ``y``; ``None`` when the layout does not allow it."""
    if not _use_native(x, g, y) or y.dtype != x.dtype:
        return None
    bx, bg, by = _batched_view(x), _batched_view(g), _batched_view(y)
    if bx is None or bg is None or by is None or bx[4] != 1 or by[4] != 1:
        return None
    _, batch, xbs, xrs, _ = bx
    _, _, gbs, grs, gcs = bg
    _, _, ybs, yrs, _ = by
    n, num_pairs = x.shape[-2], ii.numel()
    w = torch.empty(batch, num_pairs, dtype=x.dtype)
    sflat, sbs = (None, 0) if sc is None else _flat_param(sc, x, num_pairs)
    fn = _kernel("step2", x)
    rc = fn(
        _ptr(x),
        xbs,
        xrs,
        _ptr(g),
        gbs,
        grs,
        gcs,
        _ptr(y),
        ybs,
        yrs,
        _ptr(ii),
        _ptr(jj),
        batch,
        n,
        num_pairs,
        x.shape[-1],
        float(lr),
        _ptr(sflat),
        sbs,
        _ptr(w),
        torch.get_num_threads(),
    )
    _raise_index(rc, n)
    return w.view(*x.shape[:-2], num_pairs)


def _check_range(i: torch.Tensor, j: torch.Tensor, n: int) -> None:
    # index_select raises on CPU but not always clearly on accelerators; this costs one small reduction
    both = torch.cat([i, j])
    if both.numel() and (both.min() < 0 or both.max() >= n):
        raise IndexError(f"pair indices `i`/`j` must lie in [0, {n}) (the rows of `x`)")


class _RotatePairs(torch.autograd.Function):
    """y = R(θ) x on disjoint pairs. Backward: dx = R(−θ) dy, dθ_p = ⟨dy_i, y_j⟩ − ⟨y_i, dy_j⟩."""

    @staticmethod
    def forward(ctx, x, theta, i, j):  # type: ignore[override]
        y = x.detach().clone(memory_format=torch.contiguous_format)
        rotate_pairs_(y, i, j, theta.detach())
        ctx.save_for_backward(y, theta, i, j)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):  # type: ignore[override]
        y, theta, i, j = ctx.saved_tensors
        gx = gtheta = None
        gy = gy.contiguous()
        if ctx.needs_input_grad[0]:
            gx = rotate_pairs_(gy.clone(), i, j, -theta)
        if ctx.needs_input_grad[1]:
            gtheta = pair_coefficients(y, gy, i, j).to(theta.dtype)
            if theta.dim() < gtheta.dim():
                gtheta = gtheta.sum_to_size(theta.shape)
        return gx, gtheta, None, None


def functorch_active() -> bool:
    """True inside ``torch.func`` transforms (grad, vjp, jvp, vmap), where custom autograd Functions
    without ``setup_context`` cannot run and higher-order derivatives are needed: the library then uses
    plain differentiable torch ops instead of its analytic backward passes."""
    return bool(torch._C._are_functorch_transforms_active())


def rotate_pairs_autograd(
    x: torch.Tensor, i: torch.Tensor, j: torch.Tensor, theta: torch.Tensor
) -> torch.Tensor:
    """:func:`rotate_pairs` through plain torch ops (``index_select``/``index_copy``): differentiable to any
    order and under ``torch.func`` transforms; slower and saves more for backward."""
    acc = _acc_dtype(x.dtype)
    xi, xj = x.index_select(-2, i).to(acc), x.index_select(-2, j).to(acc)
    th = theta.to(acc)
    c, s = torch.cos(th).unsqueeze(-1), torch.sin(th).unsqueeze(-1)
    new_i, new_j = (c * xi + s * xj).to(x.dtype), (c * xj - s * xi).to(x.dtype)
    shape = (*torch.broadcast_shapes(x.shape[:-2], new_i.shape[:-2]), *x.shape[-2:])
    out = x.expand(shape)
    out = out.index_copy(-2, i, new_i.expand(*shape[:-2], *new_i.shape[-2:]))
    return out.index_copy(-2, j, new_j.expand(*shape[:-2], *new_j.shape[-2:]))


def rotate_pairs(
    x: torch.Tensor, i: IndexLike, j: IndexLike, theta: torch.Tensor | float
) -> torch.Tensor:
    """Differentiable, out-of-place :func:`rotate_pairs_`: returns ``expm(Σ_p θ_p (E_ij − E_ji)) x``.

    Args:
        x: ``(..., n, k)``.
        i, j: int64 ``(P,)`` disjoint row pairs.
        theta: ``(P,)`` or ``(..., P)`` angles; gradients flow to ``x`` and ``theta``. The analytic
            backward is first order; inside ``torch.func`` transforms (e.g. bilevel hypergradients)
            plain differentiable ops are used instead (:func:`rotate_pairs_autograd`).

    Returns:
        ``(..., n, k)`` rotated copy. Memory: one copy of ``x`` saved for backward.
    """
    _check_pair_inputs(x)
    ii, jj = _pairs(x, i, j)
    th = _angles("theta", theta, x, ii.numel())
    if not th.is_floating_point() or th.dtype != x.dtype:
        th = th.to(x.dtype) if x.dtype in (torch.float32, torch.float64) else th.float()
    if functorch_active():
        return rotate_pairs_autograd(x, ii, jj, th)
    return _RotatePairs.apply(x, th, ii, jj)


def givens_matrix(
    n: int,
    i: IndexLike,
    j: IndexLike,
    theta: torch.Tensor,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Dense rotation ``expm(Σ_p θ_p (E_ij − E_ji))`` of shape ``(..., n, n)`` for ``theta`` ``(..., P)``.

    A reference for tests and small problems: O(n²) memory. ``R[i, i] = R[j, j] = cos θ``,
    ``R[i, j] = sin θ``, ``R[j, i] = −sin θ``.
    """
    if not isinstance(theta, torch.Tensor):
        theta = torch.as_tensor(theta)
    dtype = dtype or (theta.dtype if theta.is_floating_point() else torch.get_default_dtype())
    device = device or theta.device
    ii, jj = _index("i", i, torch.device(device)), _index("j", j, torch.device(device))
    theta = theta.to(dtype=dtype, device=device)
    eye = torch.eye(n, dtype=dtype, device=device).expand(*theta.shape[:-1], n, n).clone()
    c, s = torch.cos(theta), torch.sin(theta)
    eye[..., ii, ii] = c
    eye[..., jj, jj] = c
    eye[..., ii, jj] = s
    eye[..., jj, ii] = -s
    return eye


def check_matching(i: IndexLike, j: IndexLike, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate disjoint row pairs for ``n`` rows and return them as int64 tensors.

    Raises ``ValueError`` naming the problem: unequal lengths, indices outside ``[0, n)``, ``i == j`` or a
    row used by two pairs.
    """
    ii, jj = _index("i", i, torch.device("cpu")), _index("j", j, torch.device("cpu"))
    if ii.shape != jj.shape:
        raise ValueError(
            f"`i` and `j` must have the same length, got {ii.numel()} and {jj.numel()}"
        )
    both = torch.cat([ii, jj])
    if both.numel() and (int(both.min()) < 0 or int(both.max()) >= n):
        raise ValueError(
            f"pair indices must lie in [0, {n}), got range [{int(both.min())}, {int(both.max())}]"
        )
    if bool((ii == jj).any()):
        raise ValueError("a pair (i, j) must join two different rows, got i == j")
    if torch.unique(both).numel() != both.numel():
        raise ValueError("pairs must be disjoint (a matching): some row appears in two pairs")
    return ii, jj
