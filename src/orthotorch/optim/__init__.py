"""Stochastic Givens-rotation optimizers: drop-in ``torch.optim.Optimizer`` subclasses that keep
orthogonal / Stiefel weights exactly on their manifold.

- :class:`OrthogonalSGD`: ``torch.optim.SGD`` semantics (momentum, dampening, Nesterov, weight decay,
  maximize); constrained weights move by rotations on sampled disjoint row pairs, O(nk) per matching.
- :class:`OrthogonalAdam`: ``torch.optim.Adam`` semantics; Adam's preconditioned direction drives the
  rotations. :class:`OrthogonalAdamW`: the same with decoupled weight decay (``torch.optim.AdamW``).
- :func:`param_groups`: splits a model's constrained weights into their own param group.

Constrained weights are geoopt ``ManifoldParameter``\\ s on a Stiefel/O(d)/SO(d) manifold, plain
parameters marked with ``p._orthotorch_manifold = "stiefel" | "orthogonal" | "so"``, or plain parameters
in a group with ``manifold="stiefel" | "orthogonal" | "so"`` (wide weights via their transpose); every
other parameter gets torch's own update. See docs/optim.md for which sampler and knobs to pick.
"""

from orthotorch.optim._base import DEFAULT_SEED, NONFINITE, SAMPLERS, project_
from orthotorch.optim.adam import OrthogonalAdam, OrthogonalAdamW
from orthotorch.optim.groups import MANIFOLD_ATTR, MANIFOLDS, constraint_of, param_groups
from orthotorch.optim.sgd import OrthogonalSGD

__all__ = [
    "DEFAULT_SEED",
    "MANIFOLDS",
    "MANIFOLD_ATTR",
    "NONFINITE",
    "SAMPLERS",
    "OrthogonalAdam",
    "OrthogonalAdamW",
    "OrthogonalSGD",
    "constraint_of",
    "param_groups",
    "project_",
]
