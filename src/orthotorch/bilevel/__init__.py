"""Bilevel optimisation: exact (constant-memory), FOM and UFOM hypergradients of r-step inner SGD.

For ``φ_0 = θ``, ``φ_{j+1} = φ_j − α∇L_in(φ_j)`` (r steps), :func:`hypergradient` returns the gradient of
``L_out(φ_r)`` with respect to θ by the exact reverse recursion with recomputed iterates (memory
independent of the unrolled graph), by FOM (second derivatives dropped) or by UFOM (FOM plus a
Bernoulli(q)-gated, 1/q-weighted correction: unbiased). Submodules:

- :mod:`~orthotorch.bilevel.hypergrad`: :func:`hypergradient`, :func:`batched_hypergradient`,
  :func:`hypergradient_vmap` (tasks as data, vectorised), :class:`HypergradInfo` (cost counts).
- :mod:`~orthotorch.bilevel.ufom`: :func:`optimal_q`, :class:`UFOMController` (fixed/adaptive q).
- :mod:`~orthotorch.bilevel.module`: ``nn.Module`` helpers over ``torch.func.functional_call``.
- :mod:`orthotorch.apps.bilevel` (not imported here): few-shot digits,
  sinusoids, the FOM counterexample (behind ``orthotorch bilevel``; digits need scikit-learn).

See ``docs/bilevel.md`` for a guide and when UFOM wins or loses.
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
