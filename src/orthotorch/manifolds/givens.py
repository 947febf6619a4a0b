"""Givens-rotation primitives on disjoint row pairs: the hot path of the library.

A set of disjoint row pairs ``(i[p], j[p])`` (a matching) defines commuting plane rotations. For tall
points ``x`` of shape ``(..., n, k)`` the library rotates rows (docs/design.md):

    x_i ← c·x_i + s·x_j,   x_j ← −s·x_i + c·x_j,   c = cos θ, s = sin θ,

which is ``torch.linalg.matrix_exp(θ (E_ij − E_ji)) @ x``. For a Euclidean gradient ``g`` the skew generator
``W = g xᵀ − x gᵀ`` has entries ``W_ij = ⟨g_i, x_j⟩ − ⟨x_i, g_j⟩`` (O(k) each, no n×n matrix formed), and the
descent step restricted to the matching is the rotation with θ = −lr·W_ij.

Every function costs O(P·k) for P pairs. On CPU, float32/float64 run in a native OpenMP kernel (built on first
use, see :mod:`orthotorch.manifolds._native`); other dtypes and devices use a vectorised torch path with
angles and dot products in float32 (bfloat16/float16) or the input dtype.

The public functions check that the pairs form a matching (in range, ``i ≠ j``, no row in two pairs; O(P + n),
in C on CPU) and refuse to write into tensors with overlapping memory (e.g. ``expand``-ed ones). The optimizers
pass ``check=False`` (their matchings are valid by construction); indices are range-checked on every path, so
a bad index raises ``IndexError`` instead of corrupting memory. :func:`givens_steps_` fuses the ``m``
matchings of one optimizer step (and the momentum update) into one pass over the rows, and
:func:`givens_adam_steps_` does the same for ``OrthogonalAdam`` (first moment, per-row second moments).
"""

from __future__ import annotations

import ctypes
import itertools
import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from orthotorch._compat import functorch_transforms_active
from orthotorch._validation import check_bool, check_floating, check_matrix, check_real, describe
from orthotorch.graph_sampling.matching import MatchingBlock
from orthotorch.manifolds import _native

__all__ = [
    "check_matching",
    "functorch_active",
    "givens_adam_steps_",
    "givens_matrix",
    "givens_step_",
    "givens_steps_",
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


_INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _index(name: str, idx: IndexLike, device: torch.device) -> torch.Tensor:
    if (
        type(idx) is torch.Tensor
        and idx.dtype == torch.int64
        and idx.dim() == 1
        and idx.device == device
        and idx.is_contiguous()
    ):
        return idx  # the optimizers' case: nothing to convert
    if not isinstance(idx, torch.Tensor):
        idx = torch.as_tensor(list(idx), dtype=torch.int64)
    if idx.dtype not in _INDEX_DTYPES:
        raise TypeError(f"`{name}` must be an integer tensor of row indices, got dtype {idx.dtype}")
    if idx.dim() != 1:
        raise ValueError(f"`{name}` must be 1-D (P,), got shape {tuple(idx.shape)}")
    return idx.to(device=device, dtype=torch.int64).contiguous()


def _range_error(ii: torch.Tensor, jj: torch.Tensor, n: int, where: str = "") -> IndexError:
    both = torch.cat([ii, jj])
    lo, hi = int(both.min()), int(both.max())
    return IndexError(
        f"pair indices `i`/`j`{where} must lie in [0, {n}) (the rows of `x`), got range [{lo}, {hi}]"
    )


def _pair_error(rc: int, ii: torch.Tensor, jj: torch.Tensor, n: int, where: str = "") -> Exception:
    """The exception for a failed pair check (``rc`` as returned by the kernels)."""
    if rc == -1:
        return _range_error(ii, jj, n, where)
    if rc == -3:
        p = int(torch.nonzero(ii == jj)[0, 0])
        return ValueError(
            f"a pair (i, j){where} must join two different rows, got i == j == {int(ii[p])} at "
            f"position {p}; rows paired with themselves are not rotations"
        )
    if rc == -4:
        both = torch.cat([ii, jj]).cpu()
        counts = torch.bincount(both, minlength=n)
        row = int(torch.nonzero(counts > 1)[0, 0])
        return ValueError(
            f"pairs `i`, `j`{where} must be disjoint (a matching): row {row} appears in "
            f"{int(counts[row])} pairs"
        )
    if rc == -2:
        return MemoryError("native Givens kernel: out of memory")
    return RuntimeError(f"native Givens kernel failed with code {rc}")


def _check_pairs(
    ii: torch.Tensor, jj: torch.Tensor, n: int, *, full: bool, where: str = ""
) -> None:
    """Raise unless the pairs are in range (always) and, when ``full``, distinct and disjoint."""
    if ii.numel() == 0:
        return
    if ii.device.type == "cpu" and _native.get_lib() is not None:
        rc = _call_plain("ot_check_pairs", ii, jj, ii.numel(), n, int(full))
    else:  # a few tensor ops and one host sync
        both = torch.cat([ii, jj])
        lo, hi = torch.aminmax(both)
        stats = [lo, hi]
        if full:
            stats.append(torch.bincount(both.clamp(0, max(n - 1, 0)), minlength=n).max())
        vals = torch.stack(stats).tolist()
        rc = 0
        if vals[0] < 0 or vals[1] >= n:
            rc = -1
        elif full and vals[2] > 1:  # a row twice: in one pair (i == j) or in two pairs
            rc = -3 if bool((ii == jj).any()) else -4
    if rc:
        raise _pair_error(rc, ii, jj, n, where)


def _pairs(
    x: torch.Tensor, i: IndexLike, j: IndexLike, check: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    ii, jj = _index("i", i, x.device), _index("j", j, x.device)
    if ii.shape != jj.shape:
        raise ValueError(
            f"`i` and `j` must have the same length, got {ii.numel()} and {jj.numel()}"
        )
    if check:
        _check_pairs(ii, jj, x.shape[-2], full=True)
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


def _overlaps(t: torch.Tensor) -> bool:
    """Whether two elements of ``t`` may share memory (e.g. an ``expand``-ed tensor, stride 0).

    Sufficient test for the absence of overlap: ordered by stride, every dimension's stride exceeds the
    extent spanned by the smaller ones. Layouts that fail it are refused for in-place writes."""
    dims = sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz > 1)
    span = 0
    for st, sz in dims:
        if st <= span:
            return True
        span += (sz - 1) * st
    return False


def _check_pair_inputs(
    x: torch.Tensor, other: torch.Tensor | None = None, name: str = "g", *, writes: bool = False
) -> None:
    check_matrix("x", x)
    check_floating("x", x)
    if writes and _overlaps(x):
        raise ValueError(
            f"`x` is written in place but has internally overlapping memory (strides {x.stride()}, "
            f"e.g. an expanded tensor); pass `x.clone()` or `x.contiguous()`"
        )
    if other is None:
        return
    check_matrix(name, other)
    if other.shape != x.shape:
        raise ValueError(
            f"`{name}` must have the shape of `x` {tuple(x.shape)}, got {tuple(other.shape)}"
        )
    if other.dtype != x.dtype:
        raise TypeError(f"`{name}` must have the dtype of `x` ({x.dtype}), got {other.dtype}")
    if other.device != x.device:
        raise ValueError(f"`{name}` must be on the device of `x` ({x.device}), got {other.device}")


def _batched_view(t: torch.Tensor) -> tuple[int, int, int, int] | None:
    """``(B, batch stride, row stride, column stride)`` of ``t`` viewed as ``(B, n, k)`` without a copy,
    or ``None`` if impossible."""
    if t.dim() == 2:
        return 1, 0, t.stride(0), t.stride(1)
    try:
        v = t.view(-1, t.shape[-2], t.shape[-1])
    except RuntimeError:
        return None
    return v.shape[0], v.stride(0), v.stride(1), v.stride(2)


def _use_native(*tensors: torch.Tensor) -> bool:
    if any(
        t.device.type != "cpu" or t.dtype not in (torch.float32, torch.float64) for t in tensors
    ):
        return False
    return _native.get_lib() is not None


def _convert(arg: object) -> object:
    if isinstance(arg, torch.Tensor):
        return ctypes.c_void_p(arg.data_ptr())
    if arg is None:
        return ctypes.c_void_p(0)
    return arg


def _call(name: str, dtype: torch.dtype, *args: object) -> int:
    """Call the native kernel ``ot_<name>_f32|f64`` for ``dtype``; the signature table of
    :mod:`orthotorch.manifolds._native` fixes the argument count and types (tensors and ``None`` are
    passed as data pointers; the thread count is appended)."""
    sig = _native.SIGNATURES[name]
    if len(args) + 1 != len(sig):
        raise TypeError(f"kernel {name} takes {len(sig) - 1} arguments, got {len(args)}")
    fn = _native.kernel(name, "f32" if dtype == torch.float32 else "f64")
    return int(fn(*(_convert(a) for a in args), torch.get_num_threads()))


def _call_plain(name: str, *args: object) -> int:
    sig = _native.PLAIN_SIGNATURES[name]
    if len(args) != len(sig):
        raise TypeError(f"kernel {name} takes {len(sig)} arguments, got {len(args)}")
    return int(_native.kernel(name)(*(_convert(a) for a in args)))


def _flat_param(t: torch.Tensor, x: torch.Tensor, num_pairs: int) -> tuple[torch.Tensor, int]:
    """Angles/scales as a contiguous ``(B, P)`` (batch stride P) or shared ``(P,)`` (stride 0) tensor."""
    t = t.to(dtype=x.dtype)
    if t.dim() == 1:
        return t.contiguous(), 0
    return t.reshape(-1, num_pairs).contiguous(), num_pairs


def _raise_rc(rc: int, ii: torch.Tensor, jj: torch.Tensor, n: int) -> None:
    if rc != 0:
        raise _pair_error(rc, ii, jj, n)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _like_layout(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``t`` in the loop order of ``ref`` (rows or columns contiguous), copied only when they differ:
    the strided kernels are fast for matching layouts and about 10x slower for mixed ones."""
    if ref.stride(-1) == 1 and t.stride(-1) != 1:
        return t.contiguous()
    if ref.stride(-1) != 1 and ref.stride(-2) == 1 and t.stride(-2) != 1:
        return t.mT.contiguous().mT
    return t


# ----------------------------------------------------------------------------------------------------
# torch path (any device, any dtype, any strides)


def _torch_coefficients(
    x: torch.Tensor, g: torch.Tensor, i: torch.Tensor, j: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_i, x_j, W)`` on the pairs; the gathered rows are reused by the fused step's rotation."""
    acc = _acc_dtype(x.dtype)
    xi, xj = x.index_select(-2, i).to(acc), x.index_select(-2, j).to(acc)
    gi, gj = g.index_select(-2, i).to(acc), g.index_select(-2, j).to(acc)
    return xi, xj, torch.linalg.vecdot(gi, xj) - torch.linalg.vecdot(xi, gj)


def _torch_rotate_(
    x: torch.Tensor,
    i: torch.Tensor,
    j: torch.Tensor,
    theta: torch.Tensor,
    xi: torch.Tensor | None = None,
    xj: torch.Tensor | None = None,
) -> None:
    acc = _acc_dtype(x.dtype)
    if xi is None or xj is None:
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
# native path (CPU, float32/float64): each returns False when the layout needs the torch path


def _native_coefficients(
    x: torch.Tensor, g: torch.Tensor, ii: torch.Tensor, jj: torch.Tensor
) -> torch.Tensor | None:
    g = _like_layout(g, x)
    bx, bg = _batched_view(x), _batched_view(g)
    if bx is None or bg is None:
        return None
    batch, n, num_pairs = bx[0], x.shape[-2], ii.numel()
    out = torch.empty(batch, num_pairs, dtype=x.dtype)
    rc = _call(
        "coeffs", x.dtype, x, *bx[1:], g, *bg[1:], ii, jj, batch, n, num_pairs, x.shape[-1], out
    )
    _raise_rc(rc, ii, jj, n)
    return out.view(*x.shape[:-2], num_pairs)


def _native_rotate_(x: torch.Tensor, ii: torch.Tensor, jj: torch.Tensor, th: torch.Tensor) -> bool:
    bx = _batched_view(x)
    if bx is None:
        return False
    batch, n, num_pairs = bx[0], x.shape[-2], ii.numel()
    flat, tbs = _flat_param(th, x, num_pairs)
    rc = _call("rotate", x.dtype, x, *bx[1:], ii, jj, batch, n, num_pairs, x.shape[-1], flat, tbs)
    _raise_rc(rc, ii, jj, n)
    return True


def _native_step_(
    x: torch.Tensor,
    g: torch.Tensor,
    ii: torch.Tensor,
    jj: torch.Tensor,
    lr: float,
    sc: torch.Tensor | None,
    y: torch.Tensor | None,
) -> torch.Tensor | None:
    """Fused coefficient + rotation (+ rotation of ``y`` by the same angles); ``None`` if the layout
    does not allow it."""
    g = _like_layout(g, x)
    bx, bg = _batched_view(x), _batched_view(g)
    if bx is None or bg is None:
        return None
    batch, n, num_pairs, k = bx[0], x.shape[-2], ii.numel(), x.shape[-1]
    w = torch.empty(batch, num_pairs, dtype=x.dtype)
    sflat, sbs = (None, 0) if sc is None else _flat_param(sc, x, num_pairs)
    if y is None:
        rc = _call(
            "step", x.dtype, x, *bx[1:], g, *bg[1:], ii, jj, batch, n, num_pairs, k,
            float(lr), sflat, sbs, w,
        )  # fmt: skip
    else:
        by = _batched_view(y)
        if by is None or bx[3] != 1 or by[3] != 1:
            return None
        rc = _call(
            "step2", x.dtype, x, bx[1], bx[2], g, *bg[1:], y, by[1], by[2], ii, jj, batch, n,
            num_pairs, k, float(lr), sflat, sbs, w,
        )  # fmt: skip
    _raise_rc(rc, ii, jj, n)
    return w.view(*x.shape[:-2], num_pairs)


# ----------------------------------------------------------------------------------------------------
# public primitives


@torch.no_grad()
def pair_coefficients(
    x: torch.Tensor, g: torch.Tensor, i: IndexLike, j: IndexLike, *, check: bool = True
) -> torch.Tensor:
    """Entries of the skew generator ``W = g xᵀ − x gᵀ`` on the given row pairs.

    Args:
        x: point, shape ``(..., n, k)`` (tall Stiefel convention; pass ``weight.mT`` for wide weights).
        g: Euclidean gradient (or any matrix) of the same shape, dtype and device.
        i, j: int64 ``(P,)`` row indices of disjoint pairs.
        check: verify that the pairs form a matching (``i[p] ≠ j[p]``, no row twice; O(P + n), one
            host sync off CPU). Indices are always range-checked (``IndexError``).

    Returns:
        ``(..., P)``: ``W[..., p] = ⟨g_i, x_j⟩ − ⟨x_i, g_j⟩`` with ``i = i[p]``, ``j = j[p]``; float32 for
        half-precision inputs, else the dtype of ``x``. Cost O(P·k); no n×n matrix is formed.
    """
    _check_pair_inputs(x, g)
    ii, jj = _pairs(x, i, j, check)
    if _use_native(x, g):
        out = _native_coefficients(x, g, ii, jj)
        if out is not None:
            return out
    _check_pairs(ii, jj, x.shape[-2], full=False)
    return _torch_coefficients(x, g, ii, jj)[2]


@torch.no_grad()
def rotate_pairs_(
    x: torch.Tensor,
    i: IndexLike,
    j: IndexLike,
    theta: torch.Tensor | float,
    *,
    check: bool = True,
) -> torch.Tensor:
    """Rotate the row pairs of ``x`` in place: ``x ← expm(Σ_p θ_p (E_ij − E_ji)) x``.

    Args:
        x: ``(..., n, k)``, modified in place (any strides without internal overlap; an expanded
            tensor raises ``ValueError``; contiguous rows or columns are fastest).
        i, j: int64 ``(P,)`` indices of disjoint row pairs.
        theta: angles, ``(P,)`` shared over the batch or ``(..., P)`` per batch item (a float is broadcast).
        check: verify that the pairs form a matching (see :func:`pair_coefficients`); ``False`` skips
            it (indices are still range-checked). Overlapping pairs break orthogonality silently.

    Returns:
        ``x`` itself. For pair (i, j): ``x_i ← cos θ·x_i + sin θ·x_j``, ``x_j ← −sin θ·x_i + cos θ·x_j``.
        Not differentiable; see :func:`rotate_pairs`.
    """
    _check_pair_inputs(x, writes=True)
    ii, jj = _pairs(x, i, j, check)
    th = _angles("theta", theta, x, ii.numel())
    if _use_native(x) and _native_rotate_(x, ii, jj, th):
        return x
    _check_pairs(ii, jj, x.shape[-2], full=False)
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
    check: bool = True,
) -> torch.Tensor:
    """Fused descent step on a matching: ``W = pair_coefficients(x, g, i, j)``, then rotate ``x`` in place
    by ``θ = −lr·W·scale``, i.e. ``x ← expm(−lr·W_M) x`` with ``W_M`` the generator restricted to the pairs.

    Args:
        x: ``(..., n, k)`` point, modified in place (no internal overlap).
        g: ``(..., n, k)`` Euclidean gradient (same dtype/device as ``x``).
        i, j: int64 ``(P,)`` disjoint row pairs.
        lr: step size.
        scale: optional per-pair multipliers ``(P,)`` or ``(..., P)`` (e.g. ``1/p_e`` for the unbiased
            estimate of the full step).
        co_rotate: optional ``(..., n, k)`` tensor (e.g. a momentum buffer; may be ``g`` itself) rotated
            in place by the same angles, in the same pass on CPU when rows are contiguous.
        check: verify that the pairs form a matching (see :func:`pair_coefficients`).

    Returns:
        ``W`` on the pairs, ``(..., P)`` (computed before the rotation). One pass over the rows on CPU.
        For several matchings driven by one gradient, :func:`givens_steps_` does them in one pass.
    """
    _check_pair_inputs(x, g, writes=True)
    if co_rotate is not None:
        _check_pair_inputs(x, co_rotate, "co_rotate")
        if _overlaps(co_rotate):
            raise ValueError(
                f"`co_rotate` is written in place but has internally overlapping memory (strides "
                f"{co_rotate.stride()}); pass a clone"
            )
    ii, jj = _pairs(x, i, j, check)
    n, num_pairs = x.shape[-2], ii.numel()
    sc = None if scale is None else _angles("scale", scale, x, num_pairs)
    if _use_native(x, g):
        w = _native_step_(x, g, ii, jj, lr, sc, co_rotate)
        if w is not None:
            return w
        if co_rotate is g and (sc is None or sc.dim() == 1):
            # the optimizers' case (the driver rotated with x) in a layout the one-pass kernel above
            # does not walk (e.g. the .mT of a wide weight): the fused kernel's tiles, one pass
            return _fused_single_(x, g, ii, jj, lr, sc)
        if co_rotate is not None:  # layout without a one-pass kernel: two passes
            w = givens_step_(x, g, ii, jj, lr, scale=sc, check=False)
            theta = -lr * w if sc is None else -lr * w * sc.to(w.dtype)
            rotate_pairs_(co_rotate, ii, jj, theta, check=False)
            return w
    _check_pairs(ii, jj, n, full=False)
    xi, xj, w = _torch_coefficients(x, g, ii, jj)
    theta = -lr * w if sc is None else -lr * w * sc.to(w.dtype)
    _torch_rotate_(x, ii, jj, theta, xi, xj)
    if co_rotate is not None:
        _torch_rotate_(co_rotate, ii, jj, theta)
    return w


def _fused_single_(
    x: torch.Tensor,
    y: torch.Tensor,
    ii: torch.Tensor,
    jj: torch.Tensor,
    lr: float,
    sc: torch.Tensor | None,
) -> torch.Tensor:
    """``givens_step_(x, y, i, j, lr, scale=sc, co_rotate=y)`` through the fused kernel (m = 1, heavy
    ball without buffer update); returns ``W``."""
    xw, sx = _kernel_layout(x)
    yw, sy = _kernel_layout(y)
    n, num_pairs, batch = x.shape[-2], ii.numel(), math.prod(x.shape[:-2])
    off = torch.tensor([0, num_pairs], dtype=torch.int64)
    scale = None if sc is None else sc.to(x.dtype).contiguous()
    w = torch.empty(batch, num_pairs, dtype=x.dtype)
    rc = _call(
        "steps", x.dtype, xw, *sx, yw, *sy, yw, *sy, ii, jj, off, 1, batch, n, x.shape[-1],
        float(lr), scale, 1, 0, 0.0, 1.0, w,
    )  # fmt: skip
    _raise_rc(rc, ii, jj, n)
    _copy_back((x, xw), (y, yw))
    return w.view(*x.shape[:-2], num_pairs)


# ----------------------------------------------------------------------------------------------------
# several matchings in one pass


def _rounds(rounds: object, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``rounds`` as a list of ``(i, j)`` int64 index tensors."""
    if isinstance(rounds, MatchingBlock):
        i, j = _block_indices(rounds, device)
        return list(zip(i.unbind(0), j.unbind(0)))
    if isinstance(rounds, torch.Tensor):
        if rounds.dim() != 3 or rounds.shape[-1] != 2:
            raise ValueError(
                f"`rounds` must have shape (m, P, 2) (m matchings of P pairs), got {tuple(rounds.shape)}"
            )
        return [(_index("i", r[:, 0], device), _index("j", r[:, 1], device)) for r in rounds]
    if not isinstance(rounds, Sequence):
        raise TypeError(
            f"`rounds` must be an (m, P, 2) integer tensor or a sequence of (i, j) pairs, got "
            f"{type(rounds).__name__}"
        )
    out = []
    for s, r in enumerate(rounds):
        if hasattr(r, "i") and hasattr(r, "j"):  # a graph_sampling.Matching
            r = (r.i, r.j)
        if not isinstance(r, (tuple, list)) or len(r) != 2:
            raise TypeError(
                f"`rounds[{s}]` must be a pair (i, j) of index tensors, got {type(r).__name__}"
            )
        ii, jj = _index(f"rounds[{s}][0]", r[0], device), _index(f"rounds[{s}][1]", r[1], device)
        if ii.shape != jj.shape:
            raise ValueError(
                f"`rounds[{s}]`: `i` and `j` must have the same length, got {ii.numel()} and {jj.numel()}"
            )
        out.append((ii, jj))
    return out


def _scales(
    scales: object, mats: list[tuple[torch.Tensor, torch.Tensor]], x: torch.Tensor
) -> list[torch.Tensor | None]:
    if scales is None:
        return [None] * len(mats)
    if isinstance(scales, torch.Tensor):
        scales = list(scales) if scales.dim() == 2 else [scales]
    if not isinstance(scales, Sequence) or len(scales) != len(mats):
        raise ValueError(
            f"`scales` must be None, an (m, P) tensor or a sequence of m = {len(mats)} tensors/None, got "
            f"{type(scales).__name__} of length {len(scales) if isinstance(scales, Sequence) else '-'}"
        )
    out: list[torch.Tensor | None] = []
    for s, (sc, (ii, _)) in enumerate(zip(scales, mats)):
        if sc is None:
            out.append(None)
            continue
        if not isinstance(sc, torch.Tensor) or not sc.is_floating_point():
            raise TypeError(f"`scales[{s}]` must be a floating tensor or None, got {sc!r}")
        if sc.shape != (ii.numel(),):
            raise ValueError(
                f"`scales[{s}]` must have shape (P,) = ({ii.numel()},) (shared over the batch), got "
                f"{tuple(sc.shape)}"
            )
        out.append(sc.to(x.device))
    return out


def _check_rounds(mats: list[tuple[torch.Tensor, torch.Tensor]], n: int, *, full: bool) -> None:
    """:func:`_check_pairs` on every matching, the failing one named (``rounds[s]``) in the message."""
    for s, (ii, jj) in enumerate(mats):
        _check_pairs(ii, jj, n, full=full, where=f" of rounds[{s}]")


def _steps_torch(
    x: torch.Tensor,
    g: torch.Tensor,
    mats: list[tuple[torch.Tensor, torch.Tensor]],
    scs: list[torch.Tensor | None],
    lr: float,
    buf: torch.Tensor | None,
    mu: float,
    dampening: float,
    nesterov: bool,
    update_buffer: bool,
) -> None:
    """Reference: the sequential loop of ``optim/sgd.py`` (one :func:`givens_step_` per matching)."""
    if buf is not None and update_buffer:
        buf.mul_(mu).add_(g, alpha=1 - dampening)
    for (ii, jj), sc in zip(mats, scs):
        if buf is None:
            givens_step_(x, g, ii, jj, lr, scale=sc, check=False)
        elif nesterov:
            w = pair_coefficients(x, g, ii, jj, check=False) + mu * pair_coefficients(
                x, buf, ii, jj, check=False
            )
            theta = -lr * w if sc is None else -lr * w * sc.to(w.dtype)
            rotate_pairs_(x, ii, jj, theta, check=False)
            rotate_pairs_(buf, ii, jj, theta, check=False)
        else:
            givens_step_(x, buf, ii, jj, lr, scale=sc, co_rotate=buf, check=False)


def _kernel_layout(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """``t`` (or, for layouts the fused kernel cannot walk, one row-major copy) and its ``(batch, row,
    column)`` strides. The kernel walks rows with column stride 1 directly and column-contiguous
    matrices (e.g. the ``.mT`` of a wide weight) through cache-resident tiles; anything else (batched
    column-major, doubly strided slices) is copied."""
    view = _batched_view(t)
    if view is not None:
        batch, bs, rs, cs = view
        if cs == 1 or (rs == 1 and batch == 1):
            return t, (bs, rs, cs)
    c = t.contiguous()
    view = _batched_view(c)
    assert view is not None
    return c, view[1:]


class _Flat(NamedTuple):
    """The ``m`` matchings as the fused kernels take them: ``i``, ``j`` the ``(ΣP,)`` concatenated pairs,
    ``off`` ``(m + 1,)`` int64 where matching ``s`` starts (``off[m] = ΣP``), ``scale`` ``(ΣP,)`` in the
    weight's dtype (ones for matchings without scales; ``None`` when none has)."""

    off: torch.Tensor
    i: torch.Tensor
    j: torch.Tensor
    scale: torch.Tensor | None

    @property
    def m(self) -> int:
        return self.off.numel() - 1

    def matchings(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The matchings one by one (for error messages)."""
        bounds = self.off.tolist()
        return [(self.i[a:b], self.j[a:b]) for a, b in itertools.pairwise(bounds)]


def _flat_rounds(
    mats: list[tuple[torch.Tensor, torch.Tensor]], scs: list[torch.Tensor | None], x: torch.Tensor
) -> _Flat:
    """:class:`_Flat` of a list of matchings (and their optional scales)."""
    off = torch.tensor(
        list(itertools.accumulate((ii.numel() for ii, _ in mats), initial=0)), dtype=torch.int64
    )
    if len(mats) == 1:
        ii_all, jj_all = mats[0]
    else:
        ii_all = torch.cat([ii for ii, _ in mats]) if mats else torch.zeros(0, dtype=torch.int64)
        jj_all = torch.cat([jj for _, jj in mats]) if mats else torch.zeros(0, dtype=torch.int64)
    scale = None
    if any(sc is not None for sc in scs):
        scale = torch.cat(
            [
                torch.ones(ii.numel(), dtype=x.dtype) if sc is None else sc.to(x.dtype)
                for sc, (ii, _) in zip(scs, mats)
            ]
        )
    return _Flat(off, ii_all, jj_all, scale)


def _block_indices(block: MatchingBlock, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A block's ``(m, P)`` index tensors, checked (integer, 2-D, the same shape), int64 on ``device``."""
    out = []
    for name, t in (("rounds.i", block.i), ("rounds.j", block.j)):
        if not isinstance(t, torch.Tensor) or t.dtype not in _INDEX_DTYPES:
            what = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise TypeError(f"`{name}` must be an integer tensor of row indices, got {what}")
        if t.dim() != 2:
            raise ValueError(f"`{name}` must be 2-D (m, P), got shape {tuple(t.shape)}")
        out.append(t.to(device=device, dtype=torch.int64).contiguous())
    if out[0].shape != out[1].shape:
        raise ValueError(
            f"`rounds.i` and `rounds.j` must have the same shape, got {tuple(out[0].shape)} and "
            f"{tuple(out[1].shape)}"
        )
    return out[0], out[1]


def _flat_block(block: MatchingBlock, scales: object, x: torch.Tensor) -> _Flat:
    """:class:`_Flat` of a :class:`MatchingBlock` without one tensor per matching (the optimizers'
    default path: its per-matching Python work dominated the step of small layers)."""
    i, j = _block_indices(block, x.device)
    m, pairs = i.shape
    scale = None
    if scales is not None:
        if not isinstance(scales, torch.Tensor) or tuple(scales.shape) != (m, pairs):
            got = tuple(scales.shape) if isinstance(scales, torch.Tensor) else type(scales).__name__
            raise ValueError(
                f"`scales` of a MatchingBlock must be None or an (m, P) = {(m, pairs)} tensor, got {got}"
            )
        scale = scales.to(device=x.device, dtype=x.dtype).reshape(-1).contiguous()
    off = torch.arange(m + 1, dtype=torch.int64) * pairs
    return _Flat(off, i.reshape(-1), j.reshape(-1), scale)


def _rounds_error(rc: int, flat: _Flat, n: int) -> Exception:
    """The exception for a fused kernel's failed pair check (the kernel wrote nothing): the per-matching
    check raises first where it can name the failing matching, else :func:`_pair_error` on all pairs."""
    _check_rounds(flat.matchings(), n, full=True)
    return _pair_error(rc, flat.i, flat.j, n)


def _copy_back(*pairs: tuple[torch.Tensor | None, torch.Tensor | None]) -> None:
    """Write each kernel working copy back into its caller's tensor, for the ``(dst, src)`` pairs where
    :func:`_kernel_layout` had to copy (``src is not dst``; ``None`` entries are skipped)."""
    for dst, src in pairs:
        if dst is not None and src is not None and src is not dst:
            dst.copy_(src)


def _steps_native(
    x: torch.Tensor,
    g: torch.Tensor,
    flat: _Flat,
    lr: float,
    buf: torch.Tensor | None,
    mu: float,
    dampening: float,
    nesterov: bool,
    update_buffer: bool,
) -> None:
    xw, sx = _kernel_layout(x)
    gw, sg = _kernel_layout(g)
    bw, sb = (None, (0, 0, 1)) if buf is None else _kernel_layout(buf)
    batch = math.prod(x.shape[:-2])
    mode = 0 if bw is None else (2 if nesterov else 1)
    rc = _call(
        "steps", x.dtype, xw, *sx, gw, *sg, bw, *sb, flat.i, flat.j, flat.off, flat.m, batch,
        x.shape[-2], x.shape[-1], float(lr), flat.scale, mode, int(update_buffer and bw is not None),
        float(mu), float(1 - dampening), None,
    )  # fmt: skip
    if rc:
        raise _rounds_error(rc, flat, x.shape[-2])
    _copy_back((x, xw), (buf, bw))


@torch.no_grad()
def givens_steps_(
    x: torch.Tensor,
    g: torch.Tensor,
    rounds: torch.Tensor | Sequence[object],
    lr: float,
    *,
    scales: torch.Tensor | Sequence[torch.Tensor | None] | None = None,
    momentum_buffer: torch.Tensor | None = None,
    momentum: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    update_buffer: bool = True,
    check: bool = True,
) -> torch.Tensor:
    """``m`` successive Givens descent steps driven by one gradient, fused into one pass over the rows.

    The result equals (up to float rounding; bitwise for the same per-pair arithmetic) the sequential
    loop of ``OrthogonalSGD`` over the matchings ``M_1 … M_m`` of ``rounds`` with the single-matching
    :func:`givens_step_` (that loop is the torch fallback used off CPU, for half precision, or without
    the native kernel):

    - no ``momentum_buffer``: for ``s = 1…m``, ``W⁽ˢ⁾_ij = ⟨g_i, x_j⟩ − ⟨x_i, g_j⟩`` on the current ``x``
      and ``x ← expm(−lr·W⁽ˢ⁾_{M_s}) x`` (``g`` is fixed: ``givens_step_(x, g, i, j, lr, scale=…)``);
    - heavy ball (``momentum_buffer=B``, ``nesterov=False``): first, if ``update_buffer``,
      ``B ← μB + (1 − τ)G`` (``μ = momentum``, ``τ = dampening``; pass ``update_buffer=False`` on the
      step that initialises ``B = G``); then for each ``s``: ``W⁽ˢ⁾`` from ``(x, B)`` and both ``x`` and
      ``B`` rotated by ``θ = −lr·W⁽ˢ⁾·scale`` (``givens_step_(x, B, i, j, lr, scale=…, co_rotate=B)``:
      the buffer is transported by every rotation);
    - Nesterov: the same buffer update, then ``W⁽ˢ⁾ = W(x, G) + μ·W(x, B)`` (``G`` not rotated) and
      ``x``, ``B`` rotated by ``θ = −lr·W⁽ˢ⁾·scale``.

    Every step uses the rows as left by the previous one, so this is *not* one rotation by ``Σ_s W⁽ˢ⁾``.
    ``OrthogonalAdam``'s step (per-pair scales from per-row second moments refreshed between matchings
    from ``W(x, G)`` on the current rows) is fused the same way by :func:`givens_adam_steps_`.

    Args:
        x: ``(..., n, k)`` point, modified in place (any layout without internal overlap; the kernel
            works on rows, so a tensor whose rows are not contiguous, such as the ``.mT`` of a wide
            weight, is processed through one row-major copy per call).
        g: ``(..., n, k)`` Euclidean gradient (same shape/dtype/device as ``x``); read only.
        rounds: the ``m`` matchings: a ``graph_sampling.MatchingBlock`` (``(m, P)`` index tensors, e.g.
            ``RoundRobinSampler.sample_block``: the cheapest form, no tensor per matching), an
            ``(m, P, 2)`` integer tensor (``rounds[s, p] = (i, j)``) or a sequence of ``(i, j)`` index
            pairs (or ``Matching`` objects), possibly of different lengths. Batched ``x`` shares the
            matchings over the batch.
        lr: step size ``η``.
        scales: optional per-pair multipliers: an ``(m, P)`` tensor or a sequence of ``(P_s,)`` tensors /
            ``None`` (e.g. ``1/(m·p_e)`` of an unbiased sampler), shared over the batch.
        momentum_buffer: optional ``(..., n, k)`` buffer ``B`` (same shape/dtype/device), updated and
            rotated in place. May not alias ``g``.
        momentum, dampening: ``μ`` and ``τ`` of the buffer update (torch.optim.SGD's convention).
        nesterov: use ``W(x, G) + μ·W(x, B)`` as the driving coefficients (needs ``momentum_buffer``).
        update_buffer: apply ``B ← μB + (1 − τ)G`` before the matchings.
        check: verify that every round is a matching of ``[0, n)`` (``i ≠ j``, no row twice). The native
            kernel always verifies this (O(mP)) before writing anything; ``check=False`` only skips the
            separate check of the torch path (indices are still range-checked there).

    Returns:
        ``x``. Cost O(m·P·k) work; on CPU (float32/float64) x, g and B are read and written about once
        (rows stay in cache across the matchings for the round-robin schedule; OpenMP threads). The
        kernel validates every round before writing anything. Column-major operands go through tiles of
        16 rows from a per-thread scratch pool (kept between calls, up to ``3·n·(k + 16)`` elements; for
        the round-robin schedule only a few tiles are touched).
    """
    _check_pair_inputs(x, g, writes=True)
    lr = check_real("lr", lr)
    mu = check_real("momentum", momentum, minimum=0.0)
    tau = check_real("dampening", dampening)
    check_bool("nesterov", nesterov)
    check_bool("update_buffer", update_buffer)
    check_bool("check", check)
    buf = momentum_buffer
    if buf is not None:
        _check_pair_inputs(x, buf, "momentum_buffer")
        if _overlaps(buf):
            raise ValueError("`momentum_buffer` has internally overlapping memory; pass a clone")
        if buf.data_ptr() == g.data_ptr() and buf.numel() > 0:
            raise ValueError(
                "`momentum_buffer` must not alias `g` (the buffer is rotated, `g` is not)"
            )
    elif nesterov:
        raise ValueError("`nesterov=True` needs a `momentum_buffer`")
    n = x.shape[-2]
    if isinstance(rounds, MatchingBlock) and x.numel() > 0 and _use_native(x, g):
        _steps_native(
            x, g, _flat_block(rounds, scales, x), lr, buf, mu, tau, nesterov, update_buffer
        )
        return x
    mats = _rounds(rounds, x.device)
    scs = _scales(scales, mats, x)
    if x.numel() == 0:
        _check_rounds(mats, n, full=check)
        return x
    if _use_native(x, g):
        flat = _flat_rounds(mats, scs, x)
        _steps_native(x, g, flat, lr, buf, mu, tau, nesterov, update_buffer)
        return x
    _check_rounds(mats, n, full=check)
    _steps_torch(x, g, mats, scs, lr, buf, mu, tau, nesterov, update_buffer)
    return x


def _row_state(
    name: str, t: object, shape: tuple[int, ...], x: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """Check one of the Adam step's per-row state tensors (written in place)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"`{name}` must be a tensor of shape {shape}, got {type(t).__name__}")
    if tuple(t.shape) != shape:
        raise ValueError(f"`{name}` must have shape {shape}, got {tuple(t.shape)}")
    if t.dtype != dtype:
        raise TypeError(
            f"`{name}` must have dtype {dtype} (float32 for half-precision weights, else the weight's "
            f"dtype), got {t.dtype}"
        )
    if t.device != x.device:
        raise ValueError(f"`{name}` must be on the device of `x` ({x.device}), got {t.device}")
    if _overlaps(t):
        raise ValueError(f"`{name}` has internally overlapping memory (strides {t.stride()})")
    return t


def _adam_steps_torch(
    x: torch.Tensor,
    g: torch.Tensor,
    m: torch.Tensor,
    mats: list[tuple[torch.Tensor, torch.Tensor]],
    scs: list[torch.Tensor | None],
    step_size: float,
    row_sq: torch.Tensor,
    count: torch.Tensor,
    max_sq: torch.Tensor | None,
    beta1: float,
    beta2: float,
    eps: float,
    update: bool,
) -> None:
    """Reference and fallback: one :func:`givens_step_` per matching, the row state refreshed between
    them from ``W(x, G)`` on the current rows (the loop ``OrthogonalAdam`` ran before the fused kernel)."""
    if update:
        m.lerp_(g, 1 - beta1)
    acc = row_sq.dtype
    for (i, j), scale in zip(mats, scs):
        # second moment per row from this matching's coefficients of the fresh gradient
        wg = pair_coefficients(x, g, i, j, check=False).to(acc) ** 2
        both = torch.cat([i, j])
        count[both] += 1
        row_sq[..., both] = beta2 * row_sq[..., both] + (1 - beta2) * torch.cat([wg, wg], -1)
        bc2 = 1 - beta2 ** count[both]
        v = row_sq[..., both]
        if max_sq is not None:
            max_sq[..., both] = torch.maximum(max_sq[..., both], v)
            v = max_sq[..., both]
        v = v / bc2
        num_pairs = i.numel()
        pair_v = 0.5 * (v[..., :num_pairs] + v[..., num_pairs:])
        inv = 1.0 / (pair_v.sqrt() + eps)
        if scale is not None:
            inv = inv * scale.to(acc)
        # one pass: coefficients from the first moment, rotate the weight and the moment
        givens_step_(x, m, i, j, step_size, scale=inv, co_rotate=m, check=False)


def _adam_steps_native(
    x: torch.Tensor,
    g: torch.Tensor,
    m: torch.Tensor,
    flat: _Flat,
    step_size: float,
    row_sq: torch.Tensor,
    count: torch.Tensor,
    max_sq: torch.Tensor | None,
    beta1: float,
    beta2: float,
    eps: float,
    update: bool,
) -> None:
    xw, sx = _kernel_layout(x)
    gw, sg = _kernel_layout(g)
    mw, sm = _kernel_layout(m)
    rows = [
        t if t is None or t.is_contiguous() else t.contiguous() for t in (row_sq, count, max_sq)
    ]
    n, batch = x.shape[-2], math.prod(x.shape[:-2])
    rc = _call(
        "adam_steps", x.dtype, xw, *sx, gw, *sg, mw, *sm, flat.i, flat.j, flat.off, flat.m, batch, n,
        x.shape[-1], float(step_size), flat.scale, int(update), float(1 - beta1), *rows,
        float(beta2), float(1 - beta2), float(eps),
    )  # fmt: skip
    if rc:
        raise _rounds_error(rc, flat, n)
    _copy_back((x, xw), (m, mw), (row_sq, rows[0]), (count, rows[1]), (max_sq, rows[2]))


@torch.no_grad()
def givens_adam_steps_(
    x: torch.Tensor,
    g: torch.Tensor,
    exp_avg: torch.Tensor,
    rounds: torch.Tensor | Sequence[object],
    step_size: float,
    *,
    row_sq: torch.Tensor,
    row_count: torch.Tensor,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    max_row_sq: torch.Tensor | None = None,
    scales: torch.Tensor | Sequence[torch.Tensor | None] | None = None,
    update_moment: bool = True,
    check: bool = True,
) -> torch.Tensor:
    """``OrthogonalAdam``'s constrained step: ``m`` Givens matchings driven by Adam's first moment and
    per-row second moments, fused into one pass over the rows (as :func:`givens_steps_` for SGD).

    With ``M = exp_avg``, ``v = row_sq``, ``c = row_count``, ``(β₁, β₂) = betas``:

    - first, if ``update_moment``, ``M ← M + (1 − β₁)(G − M)`` (``torch.lerp_``, i.e. ``β₁M + (1 − β₁)G``);
    - then for each matching ``s`` and each of its pairs ``(i, j)``, on the rows as left by the previous
      matchings: ``W_ij = ⟨g_i, x_j⟩ − ⟨x_i, g_j⟩`` (fresh gradient) and ``W̃_ij = ⟨m_i, x_j⟩ − ⟨x_i, m_j⟩``;
      ``c_i ← c_i + 1``, ``v_i ← β₂v_i + (1 − β₂)W_ij²`` (with ``max_row_sq``: ``v̄_i ← max(v̄_i, v_i)``,
      used in place of ``v_i`` below), ``v̂_i = v_i / (1 − β₂^{c_i})``, the same for ``j``;
      ``θ = −step_size · W̃_ij · scale / (√((v̂_i + v̂_j)/2) + ε)``; rows ``i, j`` of ``x`` and ``M``
      rotated by ``θ``. Rows outside every matching keep their ``v`` and count.

    The result equals the sequential loop over the matchings (one :func:`givens_step_` with
    ``co_rotate=M`` per matching, the row state refreshed in between: the torch fallback used off CPU,
    for half precision or without the native kernel) up to float rounding: the kernel does the scalar
    arithmetic of the row state in the same order and rounding as the loop's torch ops, so that the two
    agree bitwise when the dot products, ``β₂^c`` and the moment update round alike (on CPU with the
    moment already updated and an exactly representable ``β₂^c``; otherwise within a few ulps).

    Args:
        x: ``(..., n, k)`` point, modified in place (any layout without internal overlap, as
            :func:`givens_steps_`).
        g: ``(..., n, k)`` Euclidean gradient (same shape/dtype/device as ``x``); read only.
        exp_avg: ``(..., n, k)`` first moment ``M`` (same shape/dtype/device), updated and rotated in
            place. May not alias ``x`` or ``g``.
        rounds: the ``m`` matchings (as :func:`givens_steps_`), shared over the batch.
        step_size: ``lr / (1 − β₁ᵗ)`` (Adam's bias-corrected step size).
        row_sq: ``x.shape[:-2] + (n,)`` per-row second moments ``v``, updated in place; dtype float32 for
            float16/bfloat16 weights, else the weight's dtype.
        row_count: ``(n,)`` per-row update counts (shared over the batch; same dtype as ``row_sq``),
            updated in place.
        betas: ``(β₁, β₂)`` in ``[0, 1)``.
        eps: ``ε ≥ 0`` added to the denominator.
        max_row_sq: optional running maximum of ``v`` (amsgrad; like ``row_sq``), updated in place.
        scales: optional per-pair multipliers (as :func:`givens_steps_`).
        update_moment: apply the first-moment update before the matchings (False when the caller has
            already updated ``M``, e.g. to read greedy matchings off it).
        check: verify that every round is a matching of ``[0, n)`` (the native kernel always does, before
            writing anything).

    Returns:
        ``x``. Cost O(m·P·k) work; on CPU (float32/float64) x, g and M are read and written about once
        (rows stay in cache across the round-robin matchings; OpenMP threads), plus O(n) row state.
        The kernel validates every round and argument before writing anything.
    """
    _check_pair_inputs(x, g, writes=True)
    _check_pair_inputs(x, exp_avg, "exp_avg")
    if _overlaps(exp_avg):
        raise ValueError("`exp_avg` has internally overlapping memory; pass a clone")
    if exp_avg.numel() > 0 and exp_avg.data_ptr() in (g.data_ptr(), x.data_ptr()):
        raise ValueError("`exp_avg` must not alias `x` or `g` (it is updated and rotated in place)")
    step_size = check_real("step_size", step_size)
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"`betas` must be a pair (beta1, beta2), got {betas!r}")
    beta1, beta2 = (
        check_real(name, b, minimum=0.0, maximum=1.0, max_inclusive=False)
        for name, b in zip(("betas[0]", "betas[1]"), betas)
    )
    eps = check_real("eps", eps, minimum=0.0)
    check_bool("update_moment", update_moment)
    check_bool("check", check)
    n, acc = x.shape[-2], _acc_dtype(x.dtype)
    rows_shape = (*x.shape[:-2], n)
    _row_state("row_sq", row_sq, rows_shape, x, acc)
    _row_state("row_count", row_count, (n,), x, acc)
    if max_row_sq is not None:
        _row_state("max_row_sq", max_row_sq, rows_shape, x, acc)
    args = (step_size, row_sq, row_count, max_row_sq, beta1, beta2, eps, update_moment)
    if isinstance(rounds, MatchingBlock) and x.numel() > 0 and _use_native(x, g):
        _adam_steps_native(x, g, exp_avg, _flat_block(rounds, scales, x), *args)
        return x
    mats = _rounds(rounds, x.device)
    scs = _scales(scales, mats, x)
    if x.numel() > 0 and _use_native(x, g):
        _adam_steps_native(x, g, exp_avg, _flat_rounds(mats, scs, x), *args)
        return x
    _check_rounds(mats, n, full=check)
    _adam_steps_torch(x, g, exp_avg, mats, scs, *args)
    return x


class _RotatePairs(torch.autograd.Function):
    """y = R(θ) x on disjoint pairs. Backward: dx = R(−θ) dy, dθ_p = ⟨dy_i, y_j⟩ − ⟨y_i, dy_j⟩.

    When a graph of the gradient is requested (``create_graph=True``: gradient penalties, Hessian-vector
    products) the same formulas run through differentiable ops; the saved output ``y`` carries the
    dependence on ``x`` and ``θ`` back through this Function, so derivatives of any order are exact.
    """

    @staticmethod
    def forward(ctx, x, theta, i, j):
        y = x.detach().clone(memory_format=torch.contiguous_format)
        rotate_pairs_(y, i, j, theta.detach(), check=False)
        ctx.save_for_backward(y, theta, i, j)
        return y

    @staticmethod
    def backward(ctx, gy):
        y, theta, i, j = ctx.saved_tensors
        gx = gtheta = None
        if torch.is_grad_enabled():  # double backward requested: differentiable ops
            if ctx.needs_input_grad[0]:
                gx = rotate_pairs_autograd(gy, i, j, -theta)
            if ctx.needs_input_grad[1]:
                gtheta = _torch_coefficients(y, gy, i, j)[2].to(theta.dtype)
        else:
            gy = gy.contiguous()
            if ctx.needs_input_grad[0]:
                gx = rotate_pairs_(gy.clone(), i, j, -theta, check=False)
            if ctx.needs_input_grad[1]:
                gtheta = pair_coefficients(y, gy, i, j, check=False).to(theta.dtype)
        if gtheta is not None and theta.dim() < gtheta.dim():
            gtheta = gtheta.sum_to_size(theta.shape)
        return gx, gtheta, None, None


def functorch_active() -> bool:
    """True inside ``torch.func`` transforms (grad, vjp, jvp, vmap), where custom autograd Functions
    without ``setup_context`` cannot run and higher-order derivatives are needed: the library then uses
    plain differentiable torch ops instead of its analytic backward passes."""
    return functorch_transforms_active()


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
    x: torch.Tensor,
    i: IndexLike,
    j: IndexLike,
    theta: torch.Tensor | float,
    *,
    check: bool = True,
) -> torch.Tensor:
    """Differentiable, out-of-place :func:`rotate_pairs_`: returns ``expm(Σ_p θ_p (E_ij − E_ji)) x``.

    Args:
        x: ``(..., n, k)``.
        i, j: int64 ``(P,)`` disjoint row pairs.
        theta: ``(P,)`` or ``(..., P)`` angles; gradients flow to ``x`` and ``theta``, to any order
            (the analytic backward switches to differentiable ops when ``create_graph=True``); inside
            ``torch.func`` transforms (e.g. bilevel hypergradients) plain differentiable ops are used
            throughout (:func:`rotate_pairs_autograd`).
        check: verify that the pairs form a matching (see :func:`pair_coefficients`).

    Returns:
        ``(..., n, k)`` rotated copy. Memory: one copy of ``x`` saved for backward.
    """
    _check_pair_inputs(x)
    ii, jj = _pairs(x, i, j, check)
    _check_pairs(ii, jj, x.shape[-2], full=False)
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
