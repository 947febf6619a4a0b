"""The cost record of a hypergradient evaluation (:class:`HypergradInfo`).

Its own module because both the hypergradient functions (which fill it) and
:class:`~orthotorch.bilevel.UFOMController` (which learns q from it) need it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["HypergradInfo"]


@dataclass
class HypergradInfo:
    """Cost accounting and components of one hypergradient evaluation.

    Attributes:
        method: ``"exact"``, ``"fom"``, ``"ufom"`` or ``"unrolled"``.
        steps: the inner step count r.
        grad_evals: gradient evaluations of ``inner_loss`` (forward sweep plus recomputation).
        outer_grad_evals: gradient evaluations of ``outer_loss`` (1, or 0 if it was not needed).
        hvp_evals: Hessian-vector products of ``inner_loss``.
        max_stored_iterates: the largest number of inner iterates φ_j held at once by the exact
            recursion (checkpoints plus the current segment; θ itself and the running iterate are not
            counted). 0 for FOM; ``steps`` for ``"unrolled"`` (autograd keeps every step's graph).
        exact_used: whether the exact branch ran (always for ``"exact"``, ξ for ``"ufom"``).
        q: the Bernoulli probability used by UFOM (``None`` otherwise).
        g_fom: the FOM gradient ∇L_out(φ_r) (same structure as θ), when computed.
        g_exact: the exact hypergradient (same structure as θ), when computed.
        tasks: number of tasks this record covers (> 1 only for :func:`hypergradient_vmap`, whose
            counts are totals over tasks and whose ``g_fom``/``g_exact`` are stacked over the
            ``exact_tasks`` tasks that ran the exact branch, leading dimension first).
        exact_tasks: how many of those tasks ran the exact branch.
    """

    method: str
    steps: int
    grad_evals: int = 0
    outer_grad_evals: int = 0
    hvp_evals: int = 0
    max_stored_iterates: int = 0
    exact_used: bool = False
    q: float | None = None
    g_fom: Any = field(default=None, repr=False)
    g_exact: Any = field(default=None, repr=False)
    tasks: int = 1
    exact_tasks: int = 0

    def cost(self, hvp_cost: float = 2.0) -> float:
        """Compute in gradient-evaluation units: grads + outer grads + ``hvp_cost`` × HVPs."""
        return self.grad_evals + self.outer_grad_evals + hvp_cost * self.hvp_evals

    def cost_fom(self) -> float:
        """The part of :meth:`cost` the FOM branch alone would spend: r + 1 gradients per task."""
        return float((self.steps + 1) * self.tasks)

    def cost_extra(self, hvp_cost: float = 2.0) -> float:
        """The extra cost of the exact branch beyond FOM, summed over tasks (0 if it never ran)."""
        return self.cost(hvp_cost) - self.cost_fom() if self.exact_used else 0.0
