"""Stochastic Givens-rotation optimizers: drop-in ``torch.optim.Optimizer`` subclasses that keep
orthogonal / Stiefel weights exactly on their manifold.

- :class:`OrthogonalSGD`: ``torch.optim.SGD`` semantics (momentum, dampening, Nesterov, weight decay,
  maximize); constrained weights move by rotations on sampled disjoint row pairs, O(nk) per matching.
- :class:`OrthogonalAdam`: ``torch.optim.Adam`` semantics; Adam's preconditioned direction drives the
  rotations.

Constrained weights are geoopt ``ManifoldParameter``\\ s on a Stiefel/O(d)/SO(d) manifold, or plain
parameters in a group with ``manifold="stiefel" | "orthogonal" | "so"`` (wide weights via their
transpose); every other parameter gets torch's own update. See docs/optim.md for which sampler and knobs
to pick.
"""

from orthotorch.optim._base import DEFAULT_SEED, MANIFOLDS, NONFINITE, SAMPLERS, project_
from orthotorch.optim.adam import OrthogonalAdam
from orthotorch.optim.sgd import OrthogonalSGD

__all__ = [
    "DEFAULT_SEED",
    "MANIFOLDS",
    "NONFINITE",
    "SAMPLERS",
    "OrthogonalAdam",
    "OrthogonalSGD",
    "project_",
]
