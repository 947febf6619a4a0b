"""Bilevel optimisation: exact (constant-memory), FOM and UFOM hypergradients of r-step inner SGD.

See :mod:`orthotorch.bilevel.hypergrad` for the mathematics and ``docs/bilevel.md`` for a guide.
"""

from orthotorch.bilevel.hypergrad import (
    METHODS,
    HypergradInfo,
    batched_hypergradient,
    hypergradient,
    hypergradient_vmap,
    inner_adapt,
)
from orthotorch.bilevel.module import (
    accumulate_grads,
    module_hypergradient,
    module_loss,
    module_params,
)
from orthotorch.bilevel.ufom import UFOMController, optimal_q, ufom_cost_variance

__all__ = [
    "METHODS",
    "HypergradInfo",
    "UFOMController",
    "accumulate_grads",
    "batched_hypergradient",
    "hypergradient",
    "hypergradient_vmap",
    "inner_adapt",
    "module_hypergradient",
    "module_loss",
    "module_params",
    "optimal_q",
    "ufom_cost_variance",
]
