"""Orthogonality constraints as ``torch.nn.utils.parametrize`` parametrizations.

:func:`orthogonal` replaces ``module.<name>`` by a function of unconstrained parameters that is always
orthogonal (square weights, O(d) or SO(d)) or has orthonormal columns (tall weights, St(n, k)).

Weight layouts (docs/design.md, "Conventions": Stiefel points are tall):

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

Every method is differentiable to any order: the analytic first-order backwards (CWY, Givens) switch to
autograd through plain ops when a graph of the gradient is requested (``create_graph=True``: gradient
penalties, Hessian-vector products, MAML) and inside ``torch.func`` transforms. float16/bfloat16 weights
are computed in float32 by every method and cast back.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn
from torch.nn.utils import parametrize as _tp

from orthotorch._compat import functorch_transforms_active, is_conv
from orthotorch._numerics import compute_dtype, det_sign, qr_sign_fixed
from orthotorch._validation import describe
from orthotorch.graph_sampling import round_robin
from orthotorch.manifolds.cwy import cwy, householder_vectors, tcwy
from orthotorch.manifolds.givens import pair_coefficients, rotate_pairs_, rotate_pairs_autograd

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


def _projected_target(weight: torch.Tensor, layout: WeightLayout, group: str) -> torch.Tensor:
    """The checked target's tall view ``(*batch, n, k)``, QR-projected (positive ``R`` diagonal); a
    square target of determinant −1 is refused for ``group="SO"``. Shared by the ``base``-buffer
    parametrizations' :meth:`right_inverse`."""
    x = qr_sign_fixed(_check_target("weight", weight, layout))
    if layout.square and group == "SO" and bool((det_sign(x) < 0).any()):
        raise ValueError(
            "`weight` must have determinant +1 for group='SO', got a target with determinant "
            f"-1 ({describe(weight)}); use group='O' to allow both components"
        )
    return x


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

    signs: torch.Tensor

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

    base: torch.Tensor

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
        """``params`` ``(*batch, n, k)`` → the weight (layout shape).

        float16/bfloat16 parameters are computed in float32 and the weight is cast back (torch's half
        ``matrix_exp`` backward gives non-finite gradients and CPU ``solve`` has no half kernel).
        """
        n, k = self.layout.n, self.layout.k
        a = _skew_from(params.to(compute_dtype(params.dtype)), n)
        if self.method == "matrix_exp":
            rot = torch.linalg.matrix_exp(a)[..., :k]
        else:
            eye = torch.eye(n, dtype=a.dtype, device=a.device)
            rot = torch.linalg.solve(eye - 0.5 * a, (eye + 0.5 * a)[..., :k])
        return self.layout.from_tall((self.base.to(rot.dtype) @ rot).to(params.dtype))

    @torch.no_grad()
    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        """Sets ``base`` to an orthogonal completion of the (QR-projected) weight, returns zeros."""
        x = _projected_target(weight, self.layout, self.group)
        n, k = self.layout.n, self.layout.k
        if self.layout.square:
            base = x
        else:
            full = torch.linalg.qr(x.to(compute_dtype(x.dtype)), mode="complete")[0]
            base = torch.cat([x, full[..., k:].to(x.dtype)], dim=-1)
        self.base.copy_(base.to(self.base.dtype))
        return x.new_zeros(*self.layout.batch, n, k)


def _givens_rounds_autograd(
    theta: torch.Tensor,
    base: torch.Tensor,
    sizes: tuple[int, ...],
    pi: torch.Tensor,
    pj: torch.Tensor,
) -> torch.Tensor:
    """``R_last(θ_last) … R_1(θ_1) @ base`` in plain differentiable ops (any order, ``torch.func``).

    ``theta`` ``(*batch, P)``, ``base`` ``(*batch, n, k)``; O(n²k) time, one copy of the point per round
    saved for backward (use :class:`_GivensRounds` for first-order training).
    """
    x = base.to(theta.dtype)
    start = 0
    for size in sizes:
        sl = slice(start, start + size)
        x = rotate_pairs_autograd(x, pi[sl], pj[sl], theta[..., sl])
        start += size
    return x


class _GivensRounds(torch.autograd.Function):
    """``R_last(θ_last) … R_1(θ_1) @ base`` with an ``O(nk)``-memory backward.

    Nothing per round is saved: the backward walks the rounds in reverse, undoing each rotation on the
    output (``x ← R(−θ) x``) and on the gradient (``g ← R(θ)ᵀ g``); for pair ``(i, j)`` of a round,
    ``∂ℓ/∂θ = ⟨g_i, x_j⟩ − ⟨x_i, g_j⟩`` evaluated after the rotation (``pair_coefficients``). With
    ``create_graph=True`` the backward differentiates :func:`_givens_rounds_autograd` instead, so
    double backward is exact (at the memory cost of plain autograd).
    """

    @staticmethod
    def forward(ctx, theta, base, sizes, pi, pj):
        x = base.to(theta.dtype).clone(memory_format=torch.contiguous_format)
        start = 0
        for size in sizes:
            stop = start + size
            rotate_pairs_(x, pi[start:stop], pj[start:stop], theta[..., start:stop])
            start = stop
        ctx.save_for_backward(theta, x, pi, pj, base)
        ctx.sizes = sizes
        return x

    @staticmethod
    def backward(ctx, gx):
        theta, x, pi, pj, base = ctx.saved_tensors
        if torch.is_grad_enabled():
            # create_graph=True: differentiate the same rounds in plain ops (exact double backward)
            with torch.enable_grad():
                leaf = theta if theta.requires_grad else theta.detach().requires_grad_(True)
                out = _givens_rounds_autograd(leaf, base, ctx.sizes, pi, pj)
                (gtheta,) = torch.autograd.grad(out, leaf, gx, create_graph=True)
            return gtheta, None, None, None, None
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

    base: torch.Tensor
    pair_i: torch.Tensor
    pair_j: torch.Tensor

    def __init__(
        self,
        layout: WeightLayout,
        *,
        group: Literal["O", "SO"] = "O",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
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
        if functorch_transforms_active():  # torch.func: plain ops, differentiable to any order
            x = _givens_rounds_autograd(theta, self.base, self._sizes, self.pair_i, self.pair_j)
            return self.layout.from_tall(x)
        x = _GivensRounds.apply(theta, self.base, self._sizes, self.pair_i, self.pair_j)
        return self.layout.from_tall(x)

    @torch.no_grad()
    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        """Sets ``base`` to the (QR-projected) weight, returns zero angles ``(*batch, n(n−1)/2)``."""
        x = _projected_target(weight, self.layout, self.group)
        self.base.copy_(x.to(self.base.dtype))
        return x.new_zeros(*self.layout.batch, self.num_angles)


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
        Any error of the parametrization itself (e.g. an unsupported device) is raised before
        ``module`` is modified: a failed call leaves the module exactly as it was.

    Copies and checkpoints: ``copy.deepcopy(module)`` gives an independent parametrized copy
    (parameters and ``signs``/``base`` buffers included). ``pickle``/``torch.save(module)`` of a
    parametrized module raise torch's ``RuntimeError`` ("only supported through state_dict()"): save
    ``module.state_dict()`` and load it into a module built the same way (``orthogonal(...)`` first,
    then ``load_state_dict``), which restores the weight exactly.
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
        tuple(weight.shape), flatten=is_conv(module) if flatten is None else flatten
    )
    dtype, device = weight.dtype, weight.device
    param: CWYOrthogonal | GivensOrthogonal | SkewOrthogonal
    if method == "cwy" or method == "tcwy":
        param = CWYOrthogonal(
            layout, method=method, group=group, check=check, dtype=dtype, device=device
        )
    elif method == "givens":
        param = GivensOrthogonal(layout, group=group, dtype=dtype, device=device)
    else:
        skew: Literal["matrix_exp", "cayley"] = "cayley" if method == "cayley" else "matrix_exp"
        param = SkewOrthogonal(layout, method=skew, group=group, dtype=dtype, device=device)
    with torch.no_grad():
        x = qr_sign_fixed(layout.to_tall(weight.detach()).to(compute_dtype(weight.dtype)))
        if layout.square and group == "SO":
            flip = det_sign(x) < 0
            x[..., -1] = torch.where(flip.unsqueeze(-1), -x[..., -1], x[..., -1])
        init = layout.from_tall(x.to(weight.dtype)).contiguous()
        # Dry run on the fresh parametrization before the module is touched: torch's
        # register_parametrization overwrites the tensor (``original.set_``) before it evaluates the
        # forward, so a method that fails for this dtype/device would leave the module half changed.
        probe = param(param.right_inverse(init))
        if probe.shape != weight.shape or not bool(torch.isfinite(probe).all()):
            raise ValueError(
                f"orthogonal(method={method!r}) cannot represent `{name}` ({describe(weight)}): "
                f"its forward gave {describe(probe)} with non-finite entries or a different shape"
            )
    saved = weight.detach().clone()
    try:
        # register_parametrization calls right_inverse on the current value of the tensor
        if isinstance(weight, nn.Parameter):
            with torch.no_grad():
                weight.copy_(init)
        else:
            setattr(module, name, init)
        _tp.register_parametrization(module, name, param)
    except BaseException:
        # leave the module exactly as it was
        if _tp.is_parametrized(module, name):
            _tp.remove_parametrizations(module, name, leave_parametrized=False)
        if isinstance(weight, nn.Parameter):
            weight.data = saved  # the same Parameter object, its original storage and shape
        else:
            setattr(module, name, saved)
        raise
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
