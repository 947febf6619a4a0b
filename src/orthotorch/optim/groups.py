"""Which parameters are constrained, and param groups that put them apart.

Two markings make a parameter constrained for the Givens optimizers, and both are understood by
:func:`constraint_of`, by the optimizers and by :func:`param_groups`:

1. a geoopt ``ManifoldParameter``/``ManifoldTensor`` whose manifold is a ``geoopt.manifolds.Stiefel``
   (orthotorch's :class:`~orthotorch.manifolds.OrthogonalGroup` → ``"orthogonal"``,
   :class:`~orthotorch.manifolds.SpecialOrthogonalGroup` → ``"so"``, any other Stiefel, geoopt's
   EuclideanStiefel/CanonicalStiefel included → ``"stiefel"``);
2. a plain tensor with the attribute ``p._orthotorch_manifold = "orthogonal" | "so" | "stiefel"``
   (:data:`MANIFOLD_ATTR`), which modules set on the weights they want kept orthogonal.

A param group's ``manifold`` option, when not None, overrides the attribute for the plain tensors of that
group.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import geoopt
import torch
from torch import nn

from orthotorch.manifolds.stiefel import OrthogonalGroup, SpecialOrthogonalGroup

__all__ = ["MANIFOLDS", "MANIFOLD_ATTR", "constraint_of", "param_groups"]

#: Values of the ``manifold`` param-group option and of :data:`MANIFOLD_ATTR`.
MANIFOLDS = ("stiefel", "orthogonal", "so")

#: Attribute that marks a plain ``nn.Parameter`` as constrained: ``p._orthotorch_manifold = "so"``.
MANIFOLD_ATTR = "_orthotorch_manifold"


def constraint_of(p: torch.Tensor) -> str | None:
    """The constraint a tensor carries by itself: ``"stiefel" | "orthogonal" | "so"``, or None.

    From its geoopt Stiefel-family manifold, else from :data:`MANIFOLD_ATTR`. A geoopt parameter on a
    non-Stiefel manifold (Sphere, PoincareBall, ...) and an unmarked tensor give None. An attribute value
    outside :data:`MANIFOLDS` raises ``ValueError``.
    """
    manifold = getattr(p, "manifold", None)
    if isinstance(p, (geoopt.ManifoldParameter, geoopt.ManifoldTensor)) and manifold is not None:
        if isinstance(manifold, SpecialOrthogonalGroup):
            return "so"
        if isinstance(manifold, OrthogonalGroup):
            return "orthogonal"
        if isinstance(manifold, geoopt.manifolds.Stiefel):
            return "stiefel"
        return None
    mark = getattr(p, MANIFOLD_ATTR, None)
    if mark is None:
        return None
    if not isinstance(mark, str) or mark not in MANIFOLDS:
        raise ValueError(
            f"attribute `{MANIFOLD_ATTR}` of a parameter of shape {tuple(p.shape)} must be one of "
            f"{MANIFOLDS}, got {mark!r}"
        )
    return mark


def param_groups(
    params: nn.Module | Iterable[torch.Tensor],
    *,
    constrained: dict[str, Any] | None = None,
    unconstrained: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Split a model's parameters into a constrained group and an unconstrained one.

    Args:
        params: a module (its ``parameters()``, shared ones once) or an iterable of tensors.
        constrained: extra options of the constrained group (e.g. ``{"lr": 3e-2}``).
        unconstrained: extra options of the other group (e.g. ``{"weight_decay": 1e-4}``).

    Returns:
        ``[{"params": constrained, **constrained}, {"params": others, **unconstrained}]``, leaving out a group
        with no parameter. Constrained parameters are those :func:`constraint_of` marks; the group carries
        no ``manifold`` key: each parameter's own marking tells the optimizer what it is.

    Example::

        opt = OrthogonalAdam(param_groups(model, unconstrained={"weight_decay": 1e-4}), lr=1e-2)
    """
    if isinstance(params, nn.Module):
        tensors: list[torch.Tensor] = list(params.parameters())
    elif isinstance(params, torch.Tensor):
        raise TypeError("`params` must be a module or an iterable of tensors, got a single tensor")
    else:
        tensors = list(params)
    for extra_name, extra in (("constrained", constrained), ("unconstrained", unconstrained)):
        if extra is not None and (not isinstance(extra, dict) or "params" in extra):
            raise TypeError(
                f"`{extra_name}` must be a dict of group options without 'params', got {extra!r}"
            )
    marked: list[torch.Tensor] = []
    rest: list[torch.Tensor] = []
    seen: set[int] = set()
    for index, p in enumerate(tensors):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"`params[{index}]` must be a torch.Tensor, got {type(p).__name__}")
        if id(p) in seen:
            continue
        seen.add(id(p))
        (marked if constraint_of(p) is not None else rest).append(p)
    groups: list[dict[str, Any]] = []
    if marked:
        groups.append({"params": marked, **(constrained or {})})
    if rest:
        groups.append({"params": rest, **(unconstrained or {})})
    return groups
