"""Perturbation directions for evolution strategies: iid Gaussian, Haar-orthogonal blocks, Givens products.

Every sampler is a pure function of ``(seed, block index)``: the directions of one ES iteration are
regenerated from the iteration's seed by any process, so only seeds and returns cross process boundaries.
Directions are numpy ``float64`` rows ``(num, dim)``; a Gaussian direction has independent ``N(0, 1)``
entries, so its norm is χ(dim)-distributed, and the orthogonal samplers give their rows χ(dim) norms too
(``norms="chi"``, unbiased for ES) or the constant ``√dim`` (``norms="fixed"``, lower variance).

- ``gaussian``: each direction from its own generator (block size 1).
- ``orthogonal``: blocks of ``min(num, dim)`` mutually orthogonal rows, Haar distributed on the Stiefel
  manifold (QR of a Gaussian matrix with sign fix, :func:`orthotorch._numerics.haar`), cost O(dim·m²) per
  block of m rows.
- ``givens``: blocks of orthogonal rows built as ``R_L ⋯ R_1 E``: ``E`` holds ``m`` distinct signed
  coordinate vectors and each ``R_l`` rotates the pairs of a uniformly random perfect matching
  (:func:`orthotorch.graph_sampling.random_matching`) by uniform angles
  (:func:`orthotorch.manifolds.givens.rotate_pairs_`); cost O(L·dim·m) = O(m·dim·log dim) for the default
  ``L = 2⌈log₂ dim⌉``. Exactly orthogonal; close to, not exactly, Haar distributed.
"""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
import torch

from orthotorch._numerics import haar
from orthotorch._validation import check_choice, check_positive_int
from orthotorch.graph_sampling import random_matching
from orthotorch.manifolds.givens import rotate_pairs_

__all__ = [
    "SAMPLERS",
    "DirectionSampler",
    "GaussianDirections",
    "GivensDirections",
    "OrthogonalDirections",
    "chi_mean_var",
    "make_sampler",
]


def _seed_sequence(seed: int, block: int, tag: int) -> np.random.SeedSequence:
    return np.random.SeedSequence([int(seed), int(block), int(tag)])


def _torch_generator(seed: int, block: int, tag: int) -> torch.Generator:
    state = _seed_sequence(seed, block, tag).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def chi_mean_var(dim: int) -> tuple[float, float]:
    """Mean and variance of the χ(dim) distribution (the norm of a standard Gaussian vector in R^dim)."""
    check_positive_int("dim", dim)
    mean = math.sqrt(2.0) * math.exp(math.lgamma((dim + 1) / 2) - math.lgamma(dim / 2))
    return mean, dim - mean * mean


class DirectionSampler:
    """Base class: directions of one ES iteration as a pure function of ``(seed, num)``.

    Args:
        dim: dimension of the parameter vector.

    Subclasses define :meth:`block_size` and :meth:`_block`; direction ``k`` of ``num`` belongs to block
    ``k // block_size(num)`` and depends only on ``(seed, num, that block)``.
    """

    name: ClassVar[str] = ""

    def __init__(self, dim: int) -> None:
        self.dim = check_positive_int("dim", dim)

    def block_size(self, num: int) -> int:
        """Rows per block when ``num`` directions are drawn."""
        raise NotImplementedError

    def _block(self, seed: int, block: int, rows: int) -> np.ndarray:
        raise NotImplementedError

    def block(self, seed: int, block: int, num: int) -> np.ndarray:
        """Rows ``block·B … min((block+1)·B, num) − 1`` of :meth:`sample`, ``(rows, dim)`` float64."""
        check_positive_int("num", num)
        size = self.block_size(num)
        start = block * size
        if not 0 <= start < num:
            raise ValueError(f"`block` must be in [0, {math.ceil(num / size)}), got {block}")
        return self._block(seed, block, min(size, num - start))

    def sample(self, seed: int, num: int) -> np.ndarray:
        """All ``num`` directions of iteration seed ``seed``, ``(num, dim)`` float64, C-contiguous."""
        check_positive_int("num", num)
        size = self.block_size(num)
        blocks = [self.block(seed, b, num) for b in range(math.ceil(num / size))]
        return np.ascontiguousarray(np.concatenate(blocks, axis=0))

    def spec(self) -> dict[str, object]:
        """JSON-serialisable description; :func:`make_sampler` rebuilds the sampler from it."""
        return {"name": self.name, "dim": self.dim}


class GaussianDirections(DirectionSampler):
    """iid ``N(0, I_dim)`` directions, each from its own generator seeded by ``(seed, index)``."""

    name = "gaussian"

    def block_size(self, num: int) -> int:
        return 1

    def _block(self, seed: int, block: int, rows: int) -> np.ndarray:
        rng = np.random.default_rng(_seed_sequence(seed, block, 0))
        return rng.standard_normal((rows, self.dim))


class _OrthogonalBase(DirectionSampler):
    def __init__(self, dim: int, *, norms: str = "chi") -> None:
        super().__init__(dim)
        self.norms = str(check_choice("norms", norms, ("chi", "fixed")))

    def block_size(self, num: int) -> int:
        return min(num, self.dim)

    def _norms(self, seed: int, block: int, rows: int) -> np.ndarray:
        if self.norms == "fixed":
            return np.full(rows, math.sqrt(self.dim))
        rng = np.random.default_rng(_seed_sequence(seed, block, 1))
        return np.sqrt(rng.chisquare(self.dim, size=rows))

    def _unit_rows(self, seed: int, block: int, rows: int) -> np.ndarray:
        raise NotImplementedError

    def _block(self, seed: int, block: int, rows: int) -> np.ndarray:
        unit = self._unit_rows(seed, block, rows)
        return np.ascontiguousarray(unit * self._norms(seed, block, rows)[:, None])

    def spec(self) -> dict[str, object]:
        return {**super().spec(), "norms": self.norms}


class OrthogonalDirections(_OrthogonalBase):
    """Blocks of ``min(num, dim)`` orthogonal directions, Haar distributed, with χ(dim) or ``√dim`` norms.

    Args:
        dim: parameter dimension.
        norms: ``"chi"`` (each row norm an independent χ(dim) draw, the marginal law of a Gaussian
            direction) or ``"fixed"`` (every row of norm ``√dim``).
    """

    name = "orthogonal"

    def _unit_rows(self, seed: int, block: int, rows: int) -> np.ndarray:
        q = haar(self.dim, rows, generator=_torch_generator(seed, block, 0), dtype=torch.float64)
        return q.T.numpy()


class GivensDirections(_OrthogonalBase):
    """Blocks of orthogonal directions from products of random disjoint Givens rotations.

    Args:
        dim: parameter dimension, ``>= 2``.
        norms: ``"chi"`` or ``"fixed"``, as for :class:`OrthogonalDirections`.
        layers: number of random matchings ``L`` (default ``2⌈log₂ dim⌉``); cost O(L·dim·m) per block of
            m rows.
    """

    name = "givens"

    def __init__(self, dim: int, *, norms: str = "chi", layers: int | None = None) -> None:
        super().__init__(dim, norms=norms)
        if dim < 2:
            raise ValueError(f"`dim` must be >= 2 for Givens directions, got {dim}")
        default = 2 * math.ceil(math.log2(dim))
        self.layers = check_positive_int("layers", layers if layers is not None else default)

    def _unit_rows(self, seed: int, block: int, rows: int) -> np.ndarray:
        gen = _torch_generator(seed, block, 0)
        coords = torch.randperm(self.dim, generator=gen)[:rows]
        signs = torch.randint(0, 2, (rows,), generator=gen, dtype=torch.float64) * 2 - 1
        x = torch.zeros(self.dim, rows, dtype=torch.float64)
        x[coords, torch.arange(rows)] = signs
        for _ in range(self.layers):
            m = random_matching(self.dim, generator=gen)
            theta = torch.rand(len(m), generator=gen, dtype=torch.float64) * (2 * math.pi)
            rotate_pairs_(x, m.i, m.j, theta)
        return x.T.numpy()

    def spec(self) -> dict[str, object]:
        return {**super().spec(), "layers": self.layers}


#: Sampler classes by name (the ``--directions`` choices of the command line).
SAMPLERS: dict[str, type[DirectionSampler]] = {
    "gaussian": GaussianDirections,
    "orthogonal": OrthogonalDirections,
    "givens": GivensDirections,
}


def make_sampler(name: str, dim: int, **options: object) -> DirectionSampler:
    """The sampler called ``name`` (``gaussian``, ``orthogonal`` or ``givens``) for ``dim`` parameters.

    ``options`` are passed on (``norms``, ``layers``); :meth:`DirectionSampler.spec` round-trips through
    ``make_sampler(**spec)``.
    """
    check_choice("name", name, tuple(SAMPLERS))
    return SAMPLERS[name](dim, **options)
