"""The one argument resolver of every hypergradient entry point.

:func:`hypergradient`, :func:`batched_hypergradient`, :func:`hypergradient_vmap` and the module helpers
take the same keywords (``steps, lr, method, q, generator, checkpoints, hvp, check_finite,
return_info``); each
resolves them here once, before any computation, so they accept and reject exactly the same values with
the same exception types (``TypeError`` for a wrong type, ``ValueError`` for a wrong value).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from orthotorch._validation import (
    check_bool,
    check_choice,
    check_generator,
    check_positive_int,
    check_real,
)
from orthotorch.bilevel.ufom import UFOMController, check_q

METHODS = ("exact", "fom", "ufom", "unrolled")
HVP_MODES = ("reverse", "forward")
COINS = ("task", "batch")

__all__ = ["COINS", "HVP_MODES", "METHODS", "HypergradArgs", "resolve_args", "resolve_inner"]


@dataclass(frozen=True)
class HypergradArgs:
    """Validated options of one hypergradient call.

    Attributes:
        steps: the inner step count r >= 0.
        lr: the inner step size α >= 0 (finite).
        method: one of :data:`METHODS`.
        q: the probability UFOM uses for this call (``None`` unless ``method == "ufom"``).
        controller: the :class:`UFOMController` passed as ``q`` (``None`` otherwise); it observes the
            call's :class:`~orthotorch.bilevel.HypergradInfo` when ``method == "ufom"``.
        generator: the generator of UFOM's coins (required for ``"ufom"``, else may be ``None``).
        stride: checkpoint stride of the exact recursion (0: recompute every iterate from θ).
        hvp: ``"reverse"`` or ``"forward"``.
        coin: ``"task"`` or ``"batch"`` (only :func:`hypergradient_vmap` distinguishes them).
        check_finite: raise if the result is not finite.
        return_info: also return the cost record(s).
    """

    steps: int
    lr: float
    method: str
    q: float | None
    controller: UFOMController | None
    generator: torch.Generator | None
    stride: int
    hvp: str
    coin: str
    check_finite: bool
    return_info: bool


def resolve_inner(steps: object, lr: object) -> tuple[int, float]:
    """``(steps, lr)`` checked: an int >= 0 and a finite real >= 0."""
    return check_positive_int("steps", steps, minimum=0), check_real("lr", lr, minimum=0.0)


def resolve_args(
    *,
    steps: object,
    lr: object,
    method: object = "exact",
    q: object = None,
    generator: object = None,
    checkpoints: object = None,
    hvp: object = "reverse",
    coin: object = "task",
    check_finite: object = True,
    return_info: object = False,
) -> HypergradArgs:
    """Check and normalise the shared keywords (see :func:`~orthotorch.bilevel.hypergradient`).

    ``q`` is checked whatever the method (a typo surfaces even where it is unused) and must be ``None``,
    a float in (0, 1] or a :class:`UFOMController`; ``method="ufom"`` requires ``q`` and a
    ``torch.Generator``.

    Raises:
        TypeError: a wrong type for any keyword, or ``method="ufom"`` without a generator.
        ValueError: a value out of range, an unknown ``method``/``hvp``/``coin``, or
            ``method="ufom"`` without ``q``.
    """
    n_steps, step_size = resolve_inner(steps, lr)
    check_choice("method", method, METHODS)
    check_choice("hvp", hvp, HVP_MODES)
    check_choice("coin", coin, COINS)
    gen = check_generator("generator", generator)
    check_bool("check_finite", check_finite)
    check_bool("return_info", return_info)
    controller = q if isinstance(q, UFOMController) else None
    q_given = None if q is None or controller is not None else check_q(q)
    if checkpoints is None:
        stride = max(1, math.ceil(math.sqrt(n_steps))) if n_steps > 0 else 1
    else:
        stride = check_positive_int("checkpoints", checkpoints, minimum=0)
    q_used: float | None = None
    if method == "ufom":
        if q is None:
            raise ValueError("method='ufom' needs `q` (a float in (0, 1] or a UFOMController)")
        q_used = controller.q if controller is not None else q_given
        if gen is None:
            raise TypeError(
                "method='ufom' needs `generator` (a torch.Generator), got None: library code never "
                "draws from the global RNG"
            )
    return HypergradArgs(
        steps=n_steps,
        lr=step_size,
        method=str(method),
        q=q_used,
        controller=controller if method == "ufom" else None,
        generator=gen,
        stride=stride,
        hvp=str(hvp),
        coin=str(coin),
        check_finite=bool(check_finite),
        return_info=bool(return_info),
    )
