"""Initialisations of orthogonal recurrent matrices, each from an explicit ``torch.Generator``.

- :func:`haar_orthogonal`: Haar-distributed on O(d) (or SO(d)).
- :func:`henaff_orthogonal`: block-diagonal 2×2 rotations with angles uniform in ``[−π, π)``
  (Henaff et al. 2016, as in expRNN's ``henaff_init_``).
- :func:`cayley_orthogonal`: block-diagonal 2×2 rotations with angles ``−tan(u/2)``,
  ``u ~ U[0, π/2]`` (expRNN's ``cayley_init_``: the skew-symmetric generator ``A`` has entries
  ``−√((1 − cos u)/(1 + cos u))`` and the weight is ``expm(A)``), i.e. angles in ``[−1, 0]``.

The block-rotation inits are in SO(d) (a trailing 1 on the diagonal when ``d`` is odd). Every function
returns a contiguous ``(d, d)`` tensor and draws only from ``generator``.
"""

from __future__ import annotations

import math

import torch

from orthotorch._numerics import det_sign, haar
from orthotorch._validation import check_choice, check_generator, check_positive_int

__all__ = [
    "INITS",
    "block_rotations",
    "cayley_orthogonal",
    "haar_orthogonal",
    "henaff_orthogonal",
    "orthogonal_init",
]

#: Names accepted by :func:`orthogonal_init` (and the ``init`` argument of the RNN modules).
INITS = ("haar", "henaff", "cayley")


def block_rotations(
    angles: torch.Tensor, d: int, *, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``(d, d)`` block-diagonal matrix of 2×2 rotations ``[[cos θ, sin θ], [−sin θ, cos θ]]``.

    ``angles`` has shape ``(d // 2,)``; for odd ``d`` the last diagonal entry is 1. Equal to
    ``expm(A)`` for the skew ``A`` with ``A[2i, 2i+1] = θ_i`` (tested). Determinant +1.
    """
    d = check_positive_int("d", d)
    if angles.shape != (d // 2,):
        raise ValueError(
            f"`angles` must have shape ({d // 2},) for d={d}, got {tuple(angles.shape)}"
        )
    dtype = dtype or angles.dtype
    w = torch.eye(d, dtype=torch.float64, device=angles.device)
    a = angles.to(torch.float64)
    idx = torch.arange(0, 2 * (d // 2), 2, device=angles.device)
    c, s = torch.cos(a), torch.sin(a)
    w[idx, idx] = c
    w[idx + 1, idx + 1] = c
    w[idx, idx + 1] = s
    w[idx + 1, idx] = -s
    return w.to(dtype).contiguous()


def henaff_orthogonal(
    d: int, *, generator: torch.Generator | None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Henaff init: block-diagonal 2×2 rotations, angles ``U[−π, π)``; ``(d, d)``, in SO(d)."""
    check_generator("generator", generator)
    u = torch.rand(d // 2, generator=generator, dtype=torch.float64)
    return block_rotations((2 * u - 1) * math.pi, d, dtype=dtype)


def cayley_orthogonal(
    d: int, *, generator: torch.Generator | None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """expRNN's Cayley init: 2×2 rotations with angle ``−tan(u/2)``, ``u ~ U[0, π/2]``; ``(d, d)``, SO(d)."""
    check_generator("generator", generator)
    u = torch.rand(d // 2, generator=generator, dtype=torch.float64) * (math.pi / 2)
    angles = -torch.sqrt((1 - torch.cos(u)) / (1 + torch.cos(u)))
    return block_rotations(angles, d, dtype=dtype)


def haar_orthogonal(
    d: int,
    *,
    generator: torch.Generator | None,
    dtype: torch.dtype = torch.float32,
    group: str = "O",
) -> torch.Tensor:
    """Haar sample of O(d) (``group="O"``) or SO(d) (``group="SO"``, first column negated if det < 0)."""
    check_generator("generator", generator)
    check_choice("group", group, ("O", "SO"))
    q = haar(d, d, generator=generator, dtype=torch.float64)
    if group == "SO" and float(det_sign(q)) < 0:
        q[:, 0] = -q[:, 0]
    return q.to(dtype).contiguous()


def orthogonal_init(
    name: str,
    d: int,
    *,
    generator: torch.Generator | None,
    dtype: torch.dtype = torch.float32,
    group: str = "O",
) -> torch.Tensor:
    """Dispatch on ``name`` in :data:`INITS`; ``(d, d)``. The block inits are in SO(d) for either group."""
    check_choice("init", name, INITS)
    d = check_positive_int("d", d)
    if name == "haar":
        return haar_orthogonal(d, generator=generator, dtype=dtype, group=group)
    if name == "henaff":
        return henaff_orthogonal(d, generator=generator, dtype=dtype)
    return cayley_orthogonal(d, generator=generator, dtype=dtype)
