"""Bilevel optimisation: exact (constant-memory), FOM and UFOM hypergradients of r-step inner SGD.

For ``φ_0 = θ``, ``φ_{j+1} = φ_j − α∇L_in(φ_j)`` (r steps), :func:`hypergradient` returns the gradient of
``L_out(φ_r)`` with respect to θ by the exact reverse recursion with recomputed iterates (memory
independent of the unrolled graph), by FOM (second derivatives dropped) or by UFOM (FOM plus a
Bernoulli(q)-gated, 1/q-weighted correction: unbiased). Submodules:

- :mod:`~orthotorch.bilevel.hypergrad`: :func:`hypergradient`, :func:`batched_hypergradient`,
  :func:`inner_adapt`.
- :mod:`~orthotorch.bilevel.vmap`: :func:`hypergradient_vmap` (tasks as data, vectorised).
- :mod:`~orthotorch.bilevel.ufom`: :func:`optimal_q`, :class:`UFOMController` (fixed/adaptive q).
- :mod:`~orthotorch.bilevel.module`: ``nn.Module`` helpers over ``torch.func.functional_call``.
- private: ``_args`` (the one argument resolver of every entry point), ``_engine`` (the FOM, exact,
  unrolled and UFOM branches of one task), ``_info`` (:class:`HypergradInfo`, the cost record),
  ``_pytree`` (tensor / ``dict[str, Tensor]`` parameter trees).
- :mod:`orthotorch.apps.bilevel` (an application, never imported by the library): few-shot digits,
  sinusoids, the FOM counterexample (behind ``orthotorch bilevel``; digits need scikit-learn).

Imports point one way: ``_pytree``, ``_info`` → ``ufom`` → ``_args`` → ``_engine`` → ``vmap`` →
``hypergrad`` → ``module``.

See docs/bilevel.md for a guide and when UFOM wins or loses.
"""

from orthotorch.bilevel._args import METHODS
from orthotorch.bilevel._info import HypergradInfo
from orthotorch.bilevel.hypergrad import batched_hypergradient, hypergradient, inner_adapt
from orthotorch.bilevel.module import (
    accumulate_grads,
    module_hypergradient,
    module_loss,
    module_params,
)
from orthotorch.bilevel.ufom import UFOMController, optimal_q, ufom_cost_variance
from orthotorch.bilevel.vmap import hypergradient_vmap

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
