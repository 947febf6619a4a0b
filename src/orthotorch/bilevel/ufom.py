"""Choosing UFOM's probability q: fixed, cost × variance optimal, or adaptive from running estimates.

Per task, UFOM costs ``C(q) = C_F + q·C_X`` (C_F: the FOM branch, C_X: the exact branch's extra cost)
and its estimate ĝ has total variance (task sampling plus coin)

    V(q) = σ² + (1/q − 1)·D,     σ² = E‖g_exact − E g_exact‖²,   D = E‖g_exact − g_FOM‖².

The product ``C(q)·V(q)`` (the variance after a fixed compute budget, up to a constant) is minimised at

    q* = sqrt(C_F·D / (C_X·(σ² − D)))   if σ² > D,    else q* = 1,

clipped to ``[floor, 1]``. All four statistics are observable from the tasks where the exact branch ran
(an unbiased subsample, since the coin is independent of the task).
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

from orthotorch._validation import check_choice, check_positive_int, check_real
from orthotorch.bilevel._info import HypergradInfo
from orthotorch.bilevel._pytree import leaves, sq_norm

__all__ = ["UFOMController", "optimal_q", "ufom_cost_variance"]


def check_q(q: object, name: str = "q") -> float:
    """UFOM's probability as a float in (0, 1] (``TypeError`` for a non-number, ``ValueError`` else)."""
    return check_real(name, q, minimum=0.0, min_inclusive=False, maximum=1.0)


def _nonneg(name: str, value: object) -> float:
    return check_real(name, value, minimum=0.0)


def ufom_cost_variance(
    q: float, *, cost_fom: float, cost_extra: float, variance_exact: float, gap_sq: float
) -> float:
    """The product ``(C_F + q·C_X)·(σ² + (1/q − 1)·D)`` that :func:`optimal_q` minimises.

    Args:
        q: UFOM probability in (0, 1].
        cost_fom: C_F, cost of the FOM branch per task (e.g. r + 1 gradient evaluations).
        cost_extra: C_X, extra cost of the exact branch per task.
        variance_exact: σ², variance of the exact hypergradient across tasks (trace, a float).
        gap_sq: D, mean of ‖g_exact − g_FOM‖² across tasks.
    """
    q = check_q(q)
    c_f, c_x = _nonneg("cost_fom", cost_fom), _nonneg("cost_extra", cost_extra)
    s2, d = _nonneg("variance_exact", variance_exact), _nonneg("gap_sq", gap_sq)
    return (c_f + q * c_x) * (s2 + (1.0 / q - 1.0) * d)


def optimal_q(
    *,
    cost_fom: float,
    cost_extra: float,
    variance_exact: float,
    gap_sq: float,
    floor: float = 0.05,
) -> float:
    """The q in ``[floor, 1]`` that minimises cost × variance of UFOM (see the module docstring).

    Args:
        cost_fom: C_F >= 0, cost of the FOM branch per task.
        cost_extra: C_X >= 0, extra cost of the exact branch per task.
        variance_exact: σ² >= 0, task variance of the exact hypergradient (sum over coordinates).
        gap_sq: D >= 0, E‖g_exact − g_FOM‖².
        floor: the smallest q returned, in (0, 1] (guards against a zero estimate of D).

    Returns:
        q* as a float. ``D = 0`` (FOM exact) gives ``floor``; ``C_X = 0`` (exact is free) or
        ``σ² <= D`` (the FOM bias dominates the task noise) gives 1.
    """
    c_f, c_x = _nonneg("cost_fom", cost_fom), _nonneg("cost_extra", cost_extra)
    s2, d = _nonneg("variance_exact", variance_exact), _nonneg("gap_sq", gap_sq)
    floor = check_q(floor, "floor")
    if d == 0.0:
        return floor
    a = s2 - d
    if c_x == 0.0 or a <= 0.0:
        return 1.0
    q = math.sqrt(c_f * d / (c_x * a))
    return float(min(1.0, max(floor, q)))


class UFOMController:
    """A small stateful chooser of UFOM's q: fixed, or adapted from running estimates with a floor.

    Pass it as ``q=`` to :func:`~orthotorch.bilevel.hypergradient` (or the batched/module forms): the
    call uses ``controller.q`` and then calls :meth:`observe` with its :class:`HypergradInfo`. In
    ``"adaptive"`` mode, each observation with the exact branch updates exponential moving averages
    of ``D = ‖g_exact − g_FOM‖²``, of ``g_exact`` and ``‖g_exact‖²`` (for σ²) and of the two costs,
    and q is set to :func:`optimal_q` of those estimates once ``min_exact`` exact draws are in.

    Args:
        q: the initial (``"adaptive"``) or permanent (``"fixed"``) probability, in (0, 1].
        mode: ``"fixed"`` or ``"adaptive"``.
        floor: smallest q in adaptive mode, in (0, 1] (default 0.05, as in the UFOM paper).
        momentum: EMA factor in (0, 1) for the running statistics (bias-corrected).
        hvp_cost: cost of one Hessian-vector product in gradient evaluations (for C_X).
        min_exact: exact draws needed before q adapts (>= 2: σ² needs two samples).

    State (``state_dict``): q, the EMAs and counts; statistics are float64 on the gradients' device.
    Updating q reads two scalars on the host (one synchronisation per exact draw).
    """

    def __init__(
        self,
        q: float = 0.2,
        *,
        mode: str = "adaptive",
        floor: float = 0.05,
        momentum: float = 0.9,
        hvp_cost: float = 2.0,
        min_exact: int = 2,
    ) -> None:
        q = check_q(q)
        check_choice("mode", mode, ("fixed", "adaptive"))
        self.floor = check_q(floor, "floor")
        momentum = check_real(
            "momentum", momentum, minimum=0.0, maximum=1.0, min_inclusive=False, max_inclusive=False
        )
        self.hvp_cost = _nonneg("hvp_cost", hvp_cost)
        self.min_exact = check_positive_int("min_exact", min_exact, minimum=2)
        if mode == "adaptive" and q < self.floor:
            raise ValueError(f"`q` ({q}) must be >= `floor` ({self.floor}) in adaptive mode")
        self._q = q
        self.mode = mode
        self.momentum = momentum
        self.n_observed = 0
        self.n_exact = 0
        self._w = 0.0  # EMA weight normaliser (bias correction)
        self._w2 = 0.0  # sum of squared EMA weights (variance bias correction)
        self._gap: Tensor | None = None
        self._gsq: Tensor | None = None
        self._gmean: list[Tensor] | None = None
        self._cost_f = 0.0
        self._cost_x = 0.0

    @property
    def q(self) -> float:
        """The probability the next UFOM draw uses."""
        return self._q

    def observe(self, info: HypergradInfo) -> None:
        """Record one UFOM evaluation (``info`` from ``hypergradient(..., return_info=True)``)."""
        if not isinstance(info, HypergradInfo):
            raise TypeError(f"`info` must be a HypergradInfo, got {type(info).__name__}")
        self.n_observed += info.tasks
        if not info.exact_used or info.g_exact is None or info.g_fom is None:
            return
        g_e, g_f = leaves(info.g_exact), leaves(info.g_fom)
        if info.tasks == 1:
            self._observe_one(g_e, g_f, info.cost_fom(), info.cost_extra(self.hvp_cost))
        else:  # stacked over the exact tasks of a vmapped call
            n = info.exact_tasks
            cost_f = info.cost_fom() / info.tasks
            cost_x = info.cost_extra(self.hvp_cost) / max(n, 1)
            for t in range(n):
                self._observe_one([e[t] for e in g_e], [f[t] for f in g_f], cost_f, cost_x)

    def _observe_one(
        self, g_e: list[Tensor], g_f: list[Tensor], cost_f: float, cost_x: float
    ) -> None:
        self.n_exact += 1
        m = self.momentum
        gap = sq_norm([e - f for e, f in zip(g_e, g_f)])
        gsq = sq_norm(g_e)
        flat = [e.detach().double() for e in g_e]
        if self._gap is None:
            self._gap, self._gsq = gap * (1 - m), gsq * (1 - m)
            self._gmean = [f * (1 - m) for f in flat]
        else:
            assert self._gsq is not None and self._gmean is not None
            self._gap = m * self._gap + (1 - m) * gap
            self._gsq = m * self._gsq + (1 - m) * gsq
            self._gmean = [m * a + (1 - m) * f for a, f in zip(self._gmean, flat)]
        self._w = m * self._w + (1 - m)
        self._w2 = m * m * self._w2 + (1 - m) ** 2
        self._cost_f = m * self._cost_f + (1 - m) * cost_f
        self._cost_x = m * self._cost_x + (1 - m) * cost_x
        if self.mode == "adaptive" and self.n_exact >= self.min_exact:
            self._q = optimal_q(**self.statistics(), floor=self.floor)

    def statistics(self) -> dict[str, float]:
        """Current estimates ``cost_fom``, ``cost_extra``, ``variance_exact``, ``gap_sq`` (floats).

        Raises:
            RuntimeError: before any exact draw has been observed.
        """
        if self._gap is None or self._gsq is None or self._gmean is None or self._w == 0.0:
            raise RuntimeError("UFOMController.statistics(): no exact draw observed yet")
        w = self._w
        mean_sq = sum((g / w).pow(2).sum() for g in self._gmean)
        raw = float(self._gsq / w - mean_sq)
        # the weighted variance of EMA samples has expectation σ²·(1 − Σ w_i²/W²): undo that factor
        shrink = 1.0 - self._w2 / (w * w)
        if shrink <= 1e-12:
            raise RuntimeError("UFOMController.statistics(): σ² needs at least two exact draws")
        var = max(raw, 0.0) / shrink
        return {
            "cost_fom": self._cost_f / w,
            "cost_extra": self._cost_x / w,
            "variance_exact": var,
            "gap_sq": float(self._gap / w),
        }

    def state_dict(self) -> dict[str, Any]:
        """Serializable state (tensors stay tensors)."""
        return {
            "q": self._q,
            "mode": self.mode,
            "floor": self.floor,
            "momentum": self.momentum,
            "hvp_cost": self.hvp_cost,
            "min_exact": self.min_exact,
            "n_observed": self.n_observed,
            "n_exact": self.n_exact,
            "w": self._w,
            "w2": self._w2,
            "gap": self._gap,
            "gsq": self._gsq,
            "gmean": self._gmean,
            "cost_f": self._cost_f,
            "cost_x": self._cost_x,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`."""
        self._q = float(state["q"])
        self.mode = state["mode"]
        self.floor = float(state["floor"])
        self.momentum = float(state["momentum"])
        self.hvp_cost = float(state["hvp_cost"])
        self.min_exact = int(state["min_exact"])
        self.n_observed = int(state["n_observed"])
        self.n_exact = int(state["n_exact"])
        self._w = float(state["w"])
        self._w2 = float(state["w2"])
        self._gap, self._gsq, self._gmean = state["gap"], state["gsq"], state["gmean"]
        self._cost_f, self._cost_x = float(state["cost_f"]), float(state["cost_x"])

    def __repr__(self) -> str:
        return (
            f"UFOMController(q={self._q:.4g}, mode={self.mode!r}, floor={self.floor}, "
            f"n_exact={self.n_exact}/{self.n_observed})"
        )
