"""Manifolds O(d), SO(d), St(n, k) (geoopt-compatible) and the Givens/Householder primitives.

Stiefel points are tall ``(..., n, k)`` with ``XᵀX = I_k``; the library rotates rows.
"""

from orthotorch.manifolds.givens import (
    check_matching,
    givens_matrix,
    givens_step_,
    pair_coefficients,
    rotate_pairs,
    rotate_pairs_,
)

__all__ = [
    "check_matching",
    "givens_matrix",
    "givens_step_",
    "pair_coefficients",
    "rotate_pairs",
    "rotate_pairs_",
]
