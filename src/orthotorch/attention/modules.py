"""The attention layer's modules in one namespace, and the Stiefel helpers for their projections.

- :class:`FavorAttention` (``attention/mha.py``): FAVOR+ multi-head attention, a drop-in for
  ``nn.MultiheadAttention`` (constructor, call, ``state_dict``).
- :class:`PerformerBlock`, :class:`Performer`, :class:`PerformerLM` (``attention/performer.py``).
- :func:`stiefel_parameters`, :func:`orthogonal_init_`: put the q/k/v projection weights on the Stiefel
  manifold for an ``OrthogonalSGD`` group (or :func:`constrain_projections` to parametrize them).
"""

from __future__ import annotations

import torch
from torch import nn

from orthotorch._numerics import haar
from orthotorch._validation import check_generator
from orthotorch.attention.mha import FavorAttention, constrain_projections
from orthotorch.attention.performer import (
    Performer,
    PerformerBlock,
    PerformerLM,
    StateProvider,
    sinusoidal_positions,
)

__all__ = [
    "FavorAttention",
    "Performer",
    "PerformerBlock",
    "PerformerLM",
    "StateProvider",
    "constrain_projections",
    "orthogonal_init_",
    "sinusoidal_positions",
    "stiefel_parameters",
]


def stiefel_parameters(model: nn.Module) -> list[torch.Tensor]:
    """The q/k/v projection weights ``(E, in)`` of every :class:`FavorAttention` in ``model``.

    Put them in an ``OrthogonalSGD`` parameter group with ``manifold="stiefel"`` (wide weights are
    handled by transposing, as everywhere in the library; initialise them with :func:`orthogonal_init_`).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be an nn.Module, got {type(model).__name__}")
    out: list[torch.Tensor] = []
    for mod in model.modules():
        if isinstance(mod, FavorAttention):
            out += [mod.q_proj.weight, mod.k_proj.weight, mod.v_proj.weight]
    return out


@torch.no_grad()
def orthogonal_init_(model: nn.Module, *, generator: torch.Generator) -> None:
    """Initialise every :class:`FavorAttention` q/k/v weight ``(E, in)`` to a Haar-random point:
    orthonormal columns if tall or square, orthonormal rows if wide (``orthotorch._numerics.haar``,
    drawn in float64 from ``generator``, one weight after the other)."""
    if check_generator("generator", generator) is None:
        raise TypeError("`generator` must be a torch.Generator (the global RNG is never used)")
    for w in stiefel_parameters(model):
        rows, cols = w.shape
        q = haar(max(rows, cols), min(rows, cols), generator=generator, dtype=torch.float64)
        w.copy_(q if rows >= cols else q.T)
