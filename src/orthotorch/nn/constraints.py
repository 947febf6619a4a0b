"""How a module's weight is kept orthogonal: the ``constraint`` argument shared by every ``orthotorch.nn`` layer.

- ``"givens"``: the weight stays a plain leaf tensor, a :class:`geoopt.ManifoldParameter` on
  :class:`~orthotorch.manifolds.OrthogonalGroup` / :class:`~orthotorch.manifolds.SpecialOrthogonalGroup` /
  :class:`~orthotorch.manifolds.Stiefel`, also marked with the attribute
  ``_orthotorch_manifold = "orthogonal" | "so" | "stiefel"``. :class:`~orthotorch.optim.OrthogonalSGD` and
  :class:`~orthotorch.optim.OrthogonalAdam` find it in ``model.parameters()`` and rotate it by Givens
  matchings; geoopt's Riemannian optimizers also accept it. A plain ``torch.optim`` optimizer would
  move it off the manifold: :func:`orthogonality_error` shows it.
- ``"cwy" | "tcwy" | "matrix_exp" | "cayley"``: a parametrization from :func:`orthotorch.parametrize.orthogonal`;
  any optimizer works. The layers evaluate the weight once per forward (once per sequence for RNNs).
- ``None`` (or ``"none"``): unconstrained, for baselines.
"""

from __future__ import annotations

from typing import Any

import geoopt
import torch
from torch import nn
from torch.nn.utils import parametrize as _tp

from orthotorch._numerics import det_sign, haar
from orthotorch._validation import check_choice, check_generator, describe
from orthotorch.manifolds import OrthogonalGroup, SpecialOrthogonalGroup, Stiefel
from orthotorch.parametrize import orthogonal as _parametrize_orthogonal

__all__ = [
    "CONSTRAINTS",
    "GROUPS",
    "ConstrainedModule",
    "constrain_",
    "constrained_weights",
    "is_constrained",
    "normalize_constraint",
    "orthogonality_error",
    "stiefel_init",
]

#: Values of the ``constraint`` argument (``None`` is accepted as ``"none"``).
CONSTRAINTS = ("givens", "cwy", "tcwy", "matrix_exp", "cayley", "none")
#: Values of the ``group`` argument for square weights.
GROUPS = ("O", "SO")


class ConstrainedModule(nn.Module):
    """Base of the layers with constrained weights: serves a wide Givens weight ``W`` stored tall.

    geoopt manifold points are tall, so a wide ``(k, n)`` weight under ``constraint="givens"`` is stored
    as the parameter ``<name>_t`` ``(n, k)`` (orthonormal columns); ``module.<name>`` returns its
    transpose (a view, no copy).
    """

    def __init__(self) -> None:
        super().__init__()
        self._transposed_weights: set[str] = set()

    def __getattr__(self, name: str) -> Any:
        transposed = self.__dict__.get("_transposed_weights")
        if transposed and name in transposed:
            return super().__getattr__(f"{name}_t").mT
        return super().__getattr__(name)


def normalize_constraint(constraint: str | None, name: str = "constraint") -> str:
    """Return ``constraint`` as one of :data:`CONSTRAINTS` (``None`` → ``"none"``); ``ValueError`` otherwise."""
    if constraint is None:
        return "none"
    if not isinstance(constraint, str):
        raise TypeError(
            f"`{name}` must be a str or None, got {type(constraint).__name__} {constraint!r}"
        )
    check_choice(name, constraint, CONSTRAINTS)
    return constraint


def stiefel_init(
    rows: int, cols: int, *, generator: torch.Generator | None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Haar point ``(rows, cols)`` with orthonormal columns (tall) or rows (wide), contiguous."""
    check_generator("generator", generator)
    n, k = max(rows, cols), min(rows, cols)
    x = haar(n, k, generator=generator, dtype=torch.float64)
    if rows < cols:
        x = x.T
    return x.to(dtype).contiguous()


def constrain_(
    module: nn.Module,
    name: str,
    value: torch.Tensor,
    constraint: str | None,
    *,
    square: bool,
    group: str = "O",
) -> None:
    """Register ``module.<name>`` with initial ``value`` under ``constraint``.

    Args:
        module: the owner.
        name: attribute name (must not exist yet as a parametrized tensor).
        value: initial weight ``(rows, cols)`` (``(*batch, d, d)`` allowed for square weights); it must
            already be orthogonal (square) / orthonormal (Stiefel) for a constrained weight.
        constraint: one of :data:`CONSTRAINTS` or ``None``.
        square: the weight lives on O(d)/SO(d) (``True``) or on a Stiefel manifold (``False``).
        group: ``"O"`` or ``"SO"`` (square only).

    Raises:
        ValueError: unknown constraint/group, a non-square ``value`` for O(d)/SO(d), a ``value`` that is
            not orthogonal, or det −1 for ``group="SO"``.
    """
    constraint = normalize_constraint(constraint)
    check_choice("group", group, GROUPS)
    if value.dim() < 2:
        raise ValueError(f"the initial `{name}` must be a matrix, got {describe(value)}")
    if square and value.shape[-1] != value.shape[-2]:
        raise ValueError(
            f"`{name}` on O(d)/SO(d) must be square (d, d), got {describe(value)}; a rectangular weight "
            "needs a Stiefel layer (StiefelLinear)"
        )
    value = value.detach().clone().contiguous()
    if constraint != "none":
        err = float(orthogonality_error(value))
        tol = 1e-3 if value.dtype in (torch.float16, torch.bfloat16) else 1e-4
        if not err <= tol * max(1, min(value.shape[-2:])):
            raise ValueError(
                f"the initial `{name}` must be orthogonal (‖XᵀX − I‖ = {err:.3g} for its tall view X); "
                "use orthotorch.nn.init or torch.nn.init.orthogonal_"
            )
        if square and group == "SO" and bool((det_sign(value) < 0).any()):
            raise ValueError(f"the initial `{name}` has det −1 but group='SO' was requested")
    if hasattr(module, name):
        delattr(module, name)
    if constraint == "none":
        module.register_parameter(name, nn.Parameter(value))
    elif constraint == "givens":
        if square:
            manifold: Stiefel = SpecialOrthogonalGroup() if group == "SO" else OrthogonalGroup()
            tag = "so" if group == "SO" else "orthogonal"
        else:
            manifold, tag = Stiefel(), "stiefel"
        if value.shape[-2] < value.shape[-1]:
            # geoopt points are tall: store the wide weight's transpose as `<name>_t`;
            # ConstrainedModule.__getattr__ serves `<name>` as its transposed view
            if not isinstance(module, ConstrainedModule):
                raise TypeError(
                    f"a wide Givens-constrained weight needs a ConstrainedModule, got {type(module).__name__}"
                )
            module._transposed_weights.add(name)
            name, value = f"{name}_t", value.mT.contiguous()
        p = geoopt.ManifoldParameter(value, manifold=manifold)
        p._orthotorch_manifold = tag  # read by orthotorch.optim
        module.register_parameter(name, p)
    else:
        module.register_parameter(name, nn.Parameter(value))
        _parametrize_orthogonal(module, name, method=constraint, group=group)  # type: ignore[arg-type]
        with (
            torch.no_grad()
        ):  # the parametrization's QR projection changes an orthogonal X only by rounding
            setattr(module, name, value)


def is_constrained(module: nn.Module, name: str) -> bool:
    """Whether ``module.<name>`` is kept on a manifold (Givens-marked parameter or orthogonal parametrization)."""
    if _tp.is_parametrized(module, name):
        return True
    return getattr(module._parameters.get(name), "_orthotorch_manifold", None) is not None


def constrained_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every constrained weight under ``model`` by qualified name, evaluated now (parametrizations once).

    Names are ``"<module path>.<attribute>"`` (e.g. ``"rnn.cells.0.weight_hh"``).
    """
    out: dict[str, torch.Tensor] = {}
    for mname, mod in model.named_modules():
        names = set(mod._parameters)
        plist = getattr(mod, "parametrizations", None)
        if plist is not None:
            names |= set(plist.keys())
        for pname in sorted(names):
            if pname in mod._parameters and mod._parameters[pname] is None:
                continue
            if is_constrained(mod, pname):
                out[f"{mname}.{pname}" if mname else pname] = getattr(mod, pname)
    return out


@torch.no_grad()
def orthogonality_error(x: torch.Tensor | nn.Module) -> torch.Tensor:
    """``‖XᵀX − I_k‖_F`` of the tall view ``X`` of a weight ``(..., rows, cols)`` (max over a batch).

    Given a module, the maximum over its :func:`constrained_weights` (0 if it has none). Computed in
    float64. Returns a 0-d float64 tensor.
    """
    if isinstance(x, nn.Module):
        errs = [orthogonality_error(w) for w in constrained_weights(x).values()]
        return torch.stack(errs).max() if errs else torch.zeros((), dtype=torch.float64)
    w = x.detach().to(torch.float64)
    if w.shape[-2] < w.shape[-1]:
        w = w.mT
    eye = torch.eye(w.shape[-1], dtype=torch.float64, device=w.device)
    err = torch.linalg.matrix_norm(w.mT @ w - eye)
    return err.max() if err.dim() else err
