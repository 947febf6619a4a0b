"""Orthogonality constraints as ``torch.nn.utils.parametrize`` parametrizations.

:func:`orthogonal` replaces ``module.<name>`` by a function of unconstrained parameters that is always
orthogonal (square weights, O(d) or SO(d)) or has orthonormal columns (tall weights, St(n, k)).

Weight layouts (DESIGN.md: Stiefel points are tall):

- square ``(d, d)``: an element of O(d) (``group="O"``) or SO(d) (``group="SO"``);
- tall ``(n, k)``, ``n > k``: orthonormal columns;
- wide ``(k, n)``, ``k < n`` (e.g. ``nn.Linear(in_features=n, out_features=k)``): handled by
  transposing, so the weight has orthonormal *rows*;
- conv kernels ``(out, in, *kernel)``: flattened to ``(out, in·prod(kernel))``, then the rules above;
- other tensors with more than two dimensions: leading dimensions are a batch of independent matrices.

Methods:

- ``"tcwy"`` (default): truncated compact-WY product of ``k`` Householder reflections, ``O(nk² + k³)``,
  never forms ``n × n``; for square weights it is the full CWY product.
- ``"cwy"``: the same reflections but the full ``n × n`` product is formed and sliced (``O(n²k)``); equal
  to ``"tcwy"`` for square weights; provided for comparison.
- ``"matrix_exp"`` / ``"cayley"``: ``base @ f(A)[:, :k]`` with ``A`` skew ``n × n`` built from the
  parameters (``O(n³)``, inflates tall weights to ``n × n`` like torch's own parametrization).
- ``"givens"``: ``R(θ) @ base`` with ``R(θ)`` the product of the ``n−1`` (``n`` for odd ``n``) rounds of
  the round-robin 1-factorisation of the rows, one angle per row pair (``n(n−1)/2`` angles,
  ``O(n²k)`` time, one sequential round at a time).

Components of O(d): a CWY product of ``d`` reflections has determinant ``(−1)^d``; the CWY
parametrizations multiply by a fixed column-sign vector (buffer ``signs``) chosen by
``right_inverse``, and the other methods by a fixed ``base`` buffer; either way the component of the
initial weight is kept for the whole training run. ``group="O"`` accepts targets of either determinant
(the component is set by the last ``right_inverse``); ``group="SO"`` rejects determinant −1 targets and,
at registration, flips the sign of the last column when the projected initial weight has det −1.

``right_inverse`` (called at registration, on ``module.weight = X`` and by ``load_state_dict`` through the
stored parameters and buffers) maps ``X`` to parameters whose image is exactly ``X`` when ``X`` is
orthogonal / has orthonormal columns; any other ``X`` is first replaced by the ``Q`` factor of its QR
decomposition with a positive ``R`` diagonal (as torch's own ``orthogonal`` does). Everything cooperates
with ``torch.nn.utils.parametrize.cached()``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn
from torch.nn.utils import parametrize as _tp

from orthotorch._validation import describe
from orthotorch.manifolds.cwy import cwy, householder_vectors, tcwy
from orthotorch.manifolds.stiefel import det_sign

__all__ = [
    "CWYOrthogonal",
    "GivensOrthogonal",
    "SkewOrthogonal",
    "WeightLayout",
    "orthogonal",
    "renormalize_",
]

Method = Literal["cwy", "tcwy", "givens", "matrix_exp", "cayley"]
_METHODS = ("cwy", "tcwy", "givens", "matrix_exp", "cayley")
_GROUPS = ("O", "SO")


class WeightLayout:
    """Maps a weight of any supported shape to a tall batch of matrices ``(*batch, n, k)`` and back.

    Args:
        shape: the weight's shape (at least 2-D).
        flatten: flatten dimensions ``1..`` into one (conv kernels) instead of treating leading
            dimensions as a batch.
    """

    def __init__(self, shape: tuple[int, ...], *, flatten: bool) -> None:
        shape = tuple(int(s) for s in shape)
        if len(shape) < 2:
            raise ValueError(f"the weight must have at least 2 dimensions, got shape {shape}")
        if any(s == 0 for s in shape):
            raise ValueError(f"the weight must not be empty, got shape {shape}")
        self.shape = shape
        self.flatten = bool(flatten) and len(shape) > 2
        rows, cols = (shape[0], math.prod(shape[1:])) if self.flatten else shape[-2:]
        self.batch: tuple[int, ...] = () if self.flatten else shape[:-2]
        self.transpose = rows < cols
        self.n, self.k = (cols, rows) if self.transpose else (rows, cols)

    @property
    def square(self) -> bool:
        """Whether the matrices are square (O(d)/SO(d) rather than a Stiefel manifold)."""
        return self.n == self.k

    def to_tall(self, w: torch.Tensor) -> torch.Tensor:
        """``(*shape)`` → ``(*batch, n, k)`` (a view when possible)."""
        if tuple(w.shape) != self.shape:
            raise ValueError(f"expected a weight of shape {self.shape}, got {describe(w)}")
        if self.flatten:
            w = w.reshape(self.shape[0], -1)
        return w.mT if self.transpose else w

    def from_tall(self, x: torch.Tensor) -> torch.Tensor:
        """``(*batch, n, k)`` → ``(*shape)``."""
        if self.transpose:
            x = x.mT
        return x.reshape(self.shape) if self.flatten else x


def _project(x: torch.Tensor) -> torch.Tensor:
    """Q factor (positive R diagonal) of a tall batch ``(..., n, k)``; orthonormal input is unchanged
    up to rounding. ``O(nk²)``."""
    q, r = torch.linalg.qr(x.to(_compute_dtype(x.dtype)))
    s = torch.where(r.diagonal(dim1=-2, dim2=-1) < 0, -1.0, 1.0).to(q.dtype)
    return (q * s.unsqueeze(-2)).to(x.dtype)


def _check_target(name: str, x: torch.Tensor, layout: WeightLayout) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"`{name}` must be a floating tensor, got {describe(x)}")
    if tuple(x.shape) != layout.shape:
        raise ValueError(f"`{name}` must have the weight's shape {layout.shape}, got {describe(x)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"`{name}` must be finite, got non-finite entries in {describe(x)}")
    return layout.to_tall(x)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


class CWYOrthogonal(nn.Module):
    """CWY / T-CWY parametrization: weight = ``layout(product(U) * signs)``.

    The parameter is ``U`` ``(*batch, n, k)``: ``k`` Householder vectors (columns, normalised inside the
    forward, so their scale does not change the weight). ``signs`` ``(*batch, k)`` is a ±1 buffer set
    by :meth:`right_inverse`; for square weights ``det = (−1)^k · prod(signs)`` is therefore fixed.

    Args:
        layout: how the weight maps to tall matrices (see :class:`WeightLayout`).
        method: ``"tcwy"`` (never forms ``n × n``) or ``"cwy"`` (forms the ``n × n`` product, slices).
        group: ``"O"`` or ``"SO"`` (square weights only; ignored for Stiefel).
        check: validate that no Householder vector is zero / non-finite at every forward (one host
            sync per forward).
    """

    def __init__(
        self,
        layout: WeightLayout,
        *,
        method: Literal["cwy", "tcwy"] = "tcwy",
        group: Literal["O", "SO"] = "O",
        check: bool = True,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.layout = layout
        self.method = method
        self.group = group
        self.check = check
        self.register_buffer(
            "signs", torch.ones(*layout.batch, layout.k, dtype=dtype, device=device)
        )

    def forward(self, U: torch.Tensor) -> torch.Tensor:
        """``U`` ``(*batch, n, k)`` → the weight (layout shape)."""
        if self.method == "tcwy" or self.layout.square:
            x = tcwy(U, check=self.check)
        else:
            x = cwy(U, check=self.check)[..., : self.layout.k]
        return self.layout.from_tall(x * self.signs.unsqueeze(-2).to(x.dtype))

    @torch.no_grad()
    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight → unit Householder vectors ``U`` ``(*batch, n, k)`` (Householder QR), setting
        ``signs`` so that ``forward(U)`` reproduces the (QR-projected) weight. ``O(nk²)``."""
        x = _check_target("weight", weight, self.layout)
        u, signs = householder_vectors(x)
        if self.group == "SO" and self.layout.square:
            det = (1 - 2 * (self.layout.k % 2)) * signs.prod(dim=-1)
            if bool((det < 0).any()):
                raise ValueError(
                    "`weight` must have determinant +1 for group='SO' (the parametrization covers "
                    f"SO(d) only), got a target with determinant -1 ({describe(weight)}); use "
                    "group='O' to allow both components"
                )
        self.signs.copy_(signs.to(self.signs.dtype))
        return u


def _skew_from(params: torch.Tensor, n: int) -> torch.Tensor:
    """``(..., n, k)`` → skew ``(..., n, n)`` from the strict lower triangle of the first ``k`` columns."""
    k = params.shape[-1]
    low = torch.tril(params, diagonal=-1)
    if k < n:
        low = torch.cat([low, low.new_zeros(*low.shape[:-1], n - k)], dim=-1)
    return low - low.mT


class SkewOrthogonal(nn.Module):
    """``matrix_exp`` / ``cayley`` parametrization: weight = ``layout(base @ f(A)[:, :k])``.

    ``A`` ``(*batch, n, n)`` is skew-symmetric, built from the strict lower triangle of the parameter's
    first ``k`` columns (``nk − k(k+1)/2`` free entries, the dimension of St(n, k)); ``f`` is
    ``matrix_exp`` or the Cayley map ``(I − A/2)⁻¹(I + A/2)``. ``base`` ``(*batch, n, n)`` is an
    orthogonal buffer set by :meth:`right_inverse` (which returns zero parameters). Cost ``O(n³)``
    per forward even for tall weights.
    """

    def __init__(
        self,
        layout: WeightLayout,
        *,
        method: Literal["matrix_exp", "cayley"] = "matrix_exp",
        group: Literal["O", "SO"] = "O",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.layout = layout
        self.method = method
        self.group = group
        n = layout.n
        base = torch.eye(n, dtype=dtype, device=device).expand(*layout.batch, n, n).clone()
        self.register_buffer("base", base)

    def forward(self, params: torch.Tensor) -> torch.Tensor:
        """``params`` ``(*batch, n, k)`` → the weight (layout shape)."""
        n, k = self.layout.n, self.layout.k
        a = _skew_from(params, n)
        if self.method == "matrix_exp":
            rot = torch.linalg.matrix_exp(a)[..., :k]
        else:
            eye = torch.eye(n, dtype=a.dtype, device=a.device)
            rot = torch.linalg.solve(eye - 0.5 * a, (eye + 0.5 * a)[..., :k])
        return self.layout.from_tall(self.base.to(rot.dtype) @ rot)

    @torch.no_grad()
    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        """Sets ``base`` to an orthogonal completion of the (QR-projected) weight, returns zeros."""
        x = _project(_check_target("weight", weight, self.layout))
        n, k = self.layout.n, self.layout.k
        if self.layout.square:
            if self.group == "SO" and bool((det_sign(x) < 0).any()):
                raise ValueError(
                    "`weight` must have determinant +1 for group='SO', got a target with "
                    f"determinant -1 ({describe(weight)}); use group='O' to allow both components"
                )
            base = x
        else:
            full = torch.linalg.qr(x.to(_compute_dtype(x.dtype)), mode="complete")[0]
            base = torch.cat([x, full[..., k:].to(x.dtype)], dim=-1)
        self.base.copy_(base.to(self.base.dtype))
        return x.new_zeros(*self.layout.batch, n, k)


class _GivensRounds(torch.autograd.Function):
    """``R_last(θ_last) … R_1(θ_1) @ base`` with an ``O(nk)``-memory backward.

    Nothing per round is saved: the backward walks the rounds in reverse, undoing each rotation on the
    output (``x ← R(−θ) x``) and on the gradient (``g ← R(θ)ᵀ g``); for pair ``(i, j)`` of a round,
    ``∂ℓ/∂θ = ⟨g_i, x_j⟩ − ⟨x_i, g_j⟩`` evaluated after the rotation (``pair_coefficients``).
    """

    @staticmethod
    def forward(ctx, theta, base, sizes, pi, pj):  # type: ignore[override]
        from orthotorch.manifolds.givens import rotate_pairs_

        x = base.to(theta.dtype).clone(memory_format=torch.contiguous_format)
        start = 0
        for size in sizes:
            stop = start + size
            rotate_pairs_(x, pi[start:stop], pj[start:stop], theta[..., start:stop])
            start = stop
        ctx.save_for_backward(theta, x, pi, pj)
        ctx.sizes = sizes
        return x

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gx):  # type: ignore[override]
        from orthotorch.manifolds.givens import pair_coefficients, rotate_pairs_

        theta, x, pi, pj = ctx.saved_tensors
        x = x.clone()
        g = gx.to(x.dtype).clone(memory_format=torch.contiguous_format)
        gtheta = torch.empty_like(theta)
        stop = theta.shape[-1]
        for size in reversed(ctx.sizes):
            start = stop - size
            i, j, th = pi[start:stop], pj[start:stop], theta[..., start:stop]
            gtheta[..., start:stop] = pair_coefficients(x, g, i, j)
            rotate_pairs_(x, i, j, -th)
            rotate_pairs_(g, i, j, -th)
            stop = start
        return gtheta, None, None, None, None


class GivensOrthogonal(nn.Module):
    """Givens parametrization: weight = ``layout(R(θ) @ base)``.

    ``R(θ) = R_last(θ_last) … R_1(θ_1)`` where round ``r`` rotates the disjoint row pairs of round ``r``
    of the round-robin 1-factorisation of ``n`` rows (``orthotorch.graph_sampling.round_robin``), each
    pair by its own angle (``n(n−1)/2`` angles in all, det +1). ``base`` ``(*batch, n, k)`` is a buffer
    set by :meth:`right_inverse` (which returns zero angles). Cost: ``n−1`` sequential rounds of
    ``O(nk)`` each, ``O(n²k)`` in all, forward and backward; memory ``O(nk)`` (the backward undoes the
    rotations instead of saving one copy of the weight per round).
    """

    def __init__(
        self,
        layout: WeightLayout,
        *,
        group: Literal["O", "SO"] = "O",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        from orthotorch.graph_sampling import round_robin

        self.layout = layout
        self.group = group
        n, k = layout.n, layout.k
        if n < 2:
            raise ValueError(
                f"method='givens' needs at least 2 rows, got a weight of shape {layout.shape}"
            )
        rounds = round_robin(n, device=device)
        self._sizes = tuple(len(m) for m in rounds)
        self.register_buffer("pair_i", torch.cat([m.i for m in rounds]), persistent=False)
        self.register_buffer("pair_j", torch.cat([m.j for m in rounds]), persistent=False)
        self.num_angles = int(self.pair_i.numel())
        base = torch.eye(n, k, dtype=dtype, device=device).expand(*layout.batch, n, k).clone()
        self.register_buffer("base", base)

    def forward(self, theta: torch.Tensor) -> torch.Tensor:
        """``theta`` ``(*batch, n(n−1)/2)`` → the weight (layout shape)."""
        from orthotorch.manifolds.givens import functorch_active, rotate_pairs_autograd

        if functorch_active():  # torch.func transforms: plain ops, differentiable to any order
            x = self.base.to(theta.dtype)
            start = 0
            for size in self._sizes:
                sl = slice(start, start + size)
                x = rotate_pairs_autograd(x, self.pair_i[sl], self.pair_j[sl], theta[..., sl])
                start += size
            return self.layout.from_tall(x)
        x = _GivensRounds.apply(theta, self.base, self._sizes, self.pair_i, self.pair_j)
        return self.layout.from_tall(x)

    @torch.no_grad()
    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        """Sets ``base`` to the (QR-projected) weight, returns zero angles ``(*batch, n(n−1)/2)``."""
        x = _project(_check_target("weight", weight, self.layout))
        if self.layout.square and self.group == "SO" and bool((det_sign(x) < 0).any()):
            raise ValueError(
                "`weight` must have determinant +1 for group='SO', got a target with determinant "
                f"-1 ({describe(weight)}); use group='O' to allow both components"
            )
        self.base.copy_(x.to(self.base.dtype))
        return x.new_zeros(*self.layout.batch, self.num_angles)


def _is_conv(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.conv._ConvNd)


def orthogonal(
    module: nn.Module,
    name: str = "weight",
    *,
    method: Method = "tcwy",
    group: Literal["O", "SO"] = "O",
    flatten: bool | None = None,
    check: bool = True,
) -> nn.Module:
    """Constrain ``module.<name>`` to be orthogonal / to have orthonormal columns (or rows).

    Square weights ``(d, d)`` become elements of O(d) or SO(d); tall ``(n, k)`` weights get orthonormal
    columns (St(n, k)); wide ``(k, n)`` weights (``nn.Linear(in_features=n, out_features=k)``, ``k < n``)
    are handled by transposing, i.e. get orthonormal rows. Conv kernels ``(out, in, *kernel)`` are
    flattened to ``(out, in·prod(kernel))``; other weights with more than two dimensions are a batch of
    matrices over their leading dimensions. The initial weight is the QR-projected current weight
    (for ``group="SO"`` its last column is negated if needed to make det +1).

    Args:
        module: the module holding the weight.
        name: the parameter's name.
        method: ``"tcwy"`` (default), ``"cwy"``, ``"givens"``, ``"matrix_exp"`` or ``"cayley"`` (see the
            module docstring for costs).
        group: ``"O"`` (the component of the initial weight; either determinant accepted by
            ``right_inverse``) or ``"SO"`` (determinant +1 only). Matters for square weights only.
        flatten: flatten dims ``1..`` (default: ``True`` for conv modules, else leading dims are a batch).
        check: CWY methods only: validate the Householder vectors at every forward (a host sync).

    Returns:
        ``module``, with ``module.parametrizations.<name>`` registered; the parametrization module is
        ``module.parametrizations.<name>[0]`` and its parameter ``...<name>.original``.

    Raises:
        TypeError / ValueError: unknown ``method``/``group``, missing or non-floating parameter.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"`module` must be a torch.nn.Module, got {type(module).__name__}")
    if method not in _METHODS:
        raise ValueError(f"`method` must be one of {_METHODS}, got {method!r}")
    if group not in _GROUPS:
        raise ValueError(f"`group` must be one of {_GROUPS}, got {group!r}")
    weight = getattr(module, name, None)
    if not isinstance(weight, torch.Tensor):
        raise ValueError(
            f"`name`: module {type(module).__name__} has no tensor attribute {name!r} "
            f"(got {type(weight).__name__})"
        )
    if not weight.is_floating_point():
        raise TypeError(f"`{name}` must be a floating tensor, got {describe(weight)}")
    if _tp.is_parametrized(module, name):
        raise ValueError(f"`{name}` of {type(module).__name__} is already parametrized")
    layout = WeightLayout(
        tuple(weight.shape), flatten=_is_conv(module) if flatten is None else flatten
    )
    kw = {"dtype": weight.dtype, "device": weight.device}
    if method in ("cwy", "tcwy"):
        param: nn.Module = CWYOrthogonal(layout, method=method, group=group, check=check, **kw)
    elif method == "givens":
        param = GivensOrthogonal(layout, group=group, **kw)
    else:
        param = SkewOrthogonal(layout, method=method, group=group, **kw)
    with torch.no_grad():
        x = _project(layout.to_tall(weight.detach()).to(_compute_dtype(weight.dtype)))
        if layout.square and group == "SO":
            flip = det_sign(x) < 0
            x[..., -1] = torch.where(flip.unsqueeze(-1), -x[..., -1], x[..., -1])
        init = layout.from_tall(x.to(weight.dtype)).contiguous()
    # register_parametrization calls right_inverse on the current value of the tensor
    if isinstance(weight, nn.Parameter):
        with torch.no_grad():
            weight.copy_(init)
    else:
        setattr(module, name, init)
    _tp.register_parametrization(module, name, param)
    return module


@torch.no_grad()
def renormalize_(module: nn.Module) -> int:
    """Rescale every CWY/T-CWY Householder vector under ``module`` to unit norm, in place.

    The weight is unchanged (each reflection depends only on the direction of its vector). Why: the
    gradient with respect to a vector ``v`` is orthogonal to ``v`` and scales like ``1/‖v‖``, so plain
    SGD steps grow ``‖v‖² ← ‖v‖² + η²‖g‖²`` and the effective learning rate decays like ``1/‖v‖²``.
    Call this every few hundred optimizer steps (or after ``load_state_dict`` of a checkpoint trained
    elsewhere); optimizer state such as Adam's moments stays valid up to that rescaling.

    Args:
        module: any module; all submodules are visited.

    Returns:
        The number of parameter tensors rescaled.
    """
    count = 0
    for mod in module.modules():
        plist = getattr(mod, "parametrizations", None)
        if plist is None:
            continue
        for entry in plist.values():
            if any(isinstance(p, CWYOrthogonal) for p in entry):
                u = entry.original
                u.div_(torch.linalg.vector_norm(u, dim=-2, keepdim=True).clamp_min(1e-30))
                count += 1
    return count
