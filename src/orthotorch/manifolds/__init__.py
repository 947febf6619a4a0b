"""Manifolds O(d), SO(d), St(n, k) (geoopt-compatible) and the Givens/Householder primitives.

Stiefel points are tall ``(..., n, k)`` with ``XᵀX = I_k``; the library rotates rows.
"""

from orthotorch.manifolds.cwy import (
    cwy,
    cwy_columns,
    householder_product,
    householder_vectors,
    tcwy,
)
from orthotorch.manifolds.givens import (
    check_matching,
    givens_matrix,
    givens_step_,
    givens_steps_,
    pair_coefficients,
    rotate_pairs,
    rotate_pairs_,
)
from orthotorch.manifolds.stiefel import (
    METRICS,
    RETRACTIONS,
    OrthogonalGroup,
    SpecialOrthogonalGroup,
    Stiefel,
    det_sign,
    skew_generator,
)

__all__ = [
    "METRICS",
    "RETRACTIONS",
    "OrthogonalGroup",
    "SpecialOrthogonalGroup",
    "Stiefel",
    "check_matching",
    "cwy",
    "cwy_columns",
    "det_sign",
    "givens_matrix",
    "givens_step_",
    "givens_steps_",
    "householder_product",
    "householder_vectors",
    "pair_coefficients",
    "rotate_pairs",
    "rotate_pairs_",
    "skew_generator",
    "tcwy",
]
