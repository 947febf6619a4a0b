"""Hypergradients of r-step inner SGD: unrolled, exact constant-memory, FOM and UFOM.

The inner loop is ``φ_0 = θ``, ``φ_{j+1} = φ_j − α ∇L_in(φ_j)`` for ``j < r``; the outer objective is
``L_out(φ_r)``. Its gradient with respect to θ is

    g_exact = (I − α H_0)(I − α H_1) ⋯ (I − α H_{r−1}) ∇L_out(φ_r),     H_j = ∇²L_in(φ_j),

the first-order method (FOM) drops the Hessians, ``g_FOM = ∇L_out(φ_r)``, and UFOM returns
``g_FOM + (ξ/q)(g_exact − g_FOM)`` with ``ξ ~ Bernoulli(q)``, an unbiased estimate of ``g_exact``.

Parameters ``θ`` are a tensor or a ``dict[str, Tensor]`` (e.g. the named parameters of a module, see
:mod:`orthotorch.bilevel.module`); every gradient has the same structure as θ. This module holds the
task-by-task entry points; the vectorised one, :func:`hypergradient_vmap`, lives in
:mod:`orthotorch.bilevel.vmap` and is re-exported here. The branches themselves are in ``_engine``, the
argument checks in ``_args``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from orthotorch.bilevel._args import METHODS, HypergradArgs, resolve_args, resolve_inner
from orthotorch.bilevel._engine import (
    LossFn,
    explain_func_errors,
    inner_loop,
    raise_if_nonfinite,
    scalar_loss,
    single_task,
)
from orthotorch.bilevel._info import HypergradInfo
from orthotorch.bilevel._pytree import Params, check_params, detach, mean, tmap
from orthotorch.bilevel.ufom import UFOMController
from orthotorch.bilevel.vmap import hypergradient_vmap

__all__ = [
    "METHODS",
    "HypergradInfo",
    "batched_hypergradient",
    "hypergradient",
    "hypergradient_vmap",
    "inner_adapt",
]


def inner_adapt(inner_loss: LossFn, theta: Params, *, steps: int, lr: float) -> Any:
    """Run the inner loop ``φ_{j+1} = φ_j − lr·∇L_in(φ_j)`` from ``φ_0 = θ`` and return ``φ_r``.

    Args:
        inner_loss: ``phi -> scalar tensor`` with ``phi`` of the same structure as ``theta``.
        theta: a tensor of any shape, or a ``dict[str, Tensor]``.
        steps: the number of inner steps r (>= 0).
        lr: the inner step size α (finite, >= 0).

    Returns:
        φ_r, detached, with the structure and shapes of ``theta``. Memory O(1) iterates.
    """
    theta = check_params("theta", theta)
    n_steps, step_size = resolve_inner(steps, lr)
    grad_in = torch.func.grad(scalar_loss(inner_loss, "inner_loss"))
    with explain_func_errors():
        return inner_loop(grad_in, detach(theta), n_steps, step_size)


def hypergradient(
    inner_loss: LossFn,
    outer_loss: LossFn,
    theta: Params,
    *,
    steps: int,
    lr: float,
    method: str = "exact",
    q: float | UFOMController | None = None,
    generator: torch.Generator | None = None,
    checkpoints: int | None = None,
    hvp: str = "reverse",
    check_finite: bool = True,
    return_info: bool = False,
) -> Any:
    """Gradient of ``outer_loss(φ_r)`` with respect to ``θ``, where φ_r is r inner SGD steps from θ.

    The inner loop is ``φ_0 = θ``, ``φ_{j+1} = φ_j − lr·∇inner_loss(φ_j)``. Methods:

    - ``"exact"``: ``(I − αH_0)⋯(I − αH_{r−1})∇L_out(φ_r)`` by the reverse recursion
      ``v ← v − α H_j v`` with Hessian-vector products (``torch.func``); the iterates are recomputed
      from sparse checkpoints instead of stored, and no autograd graph outlives one step. Equal to
      ``"unrolled"`` up to rounding.
    - ``"fom"``: ``∇L_out(φ_r)`` (second derivatives dropped): r + 1 gradient evaluations, O(1)
      iterates, biased.
    - ``"ufom"``: ``g_FOM + (ξ/q)(g_exact − g_FOM)``, ξ ~ Bernoulli(q) drawn from ``generator``:
      unbiased, expected cost ``cost_FOM + q·(cost_exact − cost_FOM)``, extra variance
      ``(1/q − 1)‖g_exact − g_FOM‖²``.
    - ``"unrolled"``: full back-propagation through the loop (the MAML/higher baseline): memory grows
      linearly with r (every step's graph is kept). Reference and benchmark baseline.

    Cost of the exact branch, counted in :class:`HypergradInfo` (c = checkpoint stride):

    ===================  ===============================  ==========================
    ``checkpoints``      stored iterates                  inner gradient evaluations
    ===================  ===============================  ==========================
    ``None`` (default)   ≤ 2⌈√r⌉ (stride c = ⌈√r⌉)        ≤ 2r
    ``c ≥ 1``            ≤ ⌈r/c⌉ + c (``1``: r − 1)       ≤ 2r
    ``0``                0 (φ_j recomputed from φ_0)      r + r(r−1)/2 (O(r²) time)
    ===================  ===============================  ==========================

    plus r Hessian-vector products and one outer gradient in every case. An iterate is one copy of θ;
    unlike ``"unrolled"``, no activations are kept across steps.

    Args:
        inner_loss: ``phi -> scalar tensor``; ``phi`` has the structure of ``theta``. Must be written
            with ``torch`` operations (it is differentiated twice by ``torch.func``).
        outer_loss: ``phi -> scalar tensor``, evaluated at φ_r.
        theta: the initial point φ_0: a floating tensor of any shape, or a ``dict[str, Tensor]``
            (for modules use :func:`orthotorch.bilevel.module_hypergradient`). Not modified;
            gradients flow to θ only through the returned value (θ is detached internally).
        steps: inner step count r >= 0 (r = 0 gives ∇L_out(θ) for every method).
        lr: inner step size α >= 0.
        method: ``"exact"``, ``"fom"``, ``"ufom"`` or ``"unrolled"``.
        q: UFOM probability in (0, 1], or a :class:`~orthotorch.bilevel.UFOMController` (its current
            ``q`` is used and it observes this evaluation). Required for ``"ufom"``.
        generator: the ``torch.Generator`` for the UFOM coin (required for ``"ufom"``; the global RNG
            is never used). The coin is read on the host: one synchronisation per call.
        checkpoints: the checkpoint stride of the exact branch (see the table); ``None`` = ⌈√r⌉.
        hvp: ``"reverse"`` (reverse-over-reverse, default, works with any differentiable op) or
            ``"forward"`` (forward-over-reverse, faster where every op supports forward AD).
        check_finite: raise ``FloatingPointError`` if the result contains NaN/inf (one host sync).
        return_info: also return a :class:`HypergradInfo`.

    Returns:
        The hypergradient with the structure, shapes and dtypes of ``theta`` (detached), or
        ``(grad, info)`` when ``return_info``.

    Raises:
        ValueError: ``steps < 0``, ``q`` outside (0, 1] (checked for every method), unknown
            ``method`` or ``hvp``, ``method="ufom"`` without ``q``, non-scalar losses.
        TypeError: wrong argument types (a string for a number, a non-generator ``generator``),
            integer ``theta``, ``method="ufom"`` without a generator.
        FloatingPointError: a non-finite result with ``check_finite``.

    Every entry point (:func:`batched_hypergradient`, :func:`hypergradient_vmap`,
    :func:`~orthotorch.bilevel.module_hypergradient`) checks these keywords the same way, before any
    loss is evaluated.
    """
    args = resolve_args(
        steps=steps,
        lr=lr,
        method=method,
        q=q,
        generator=generator,
        checkpoints=checkpoints,
        hvp=hvp,
        check_finite=check_finite,
        return_info=return_info,
    )
    out, info = _one_task(inner_loss, outer_loss, check_params("theta", theta), args)
    return (out, info) if args.return_info else out


def _one_task(
    inner_loss: object, outer_loss: object, theta: Params, args: HypergradArgs
) -> tuple[Any, HypergradInfo]:
    """:func:`hypergradient` on resolved arguments; the controller (if any) observes the result."""
    inner = scalar_loss(inner_loss, "inner_loss")
    outer = scalar_loss(outer_loss, "outer_loss")
    info = HypergradInfo(method=args.method, steps=args.steps, q=args.q)
    with explain_func_errors():
        out = single_task(inner, outer, detach(theta), args, info)
    if args.check_finite:
        raise_if_nonfinite(f"the {args.method} hypergradient", out)
    if args.controller is not None:
        args.controller.observe(info)
    return out, info


def batched_hypergradient(
    tasks: Sequence[tuple[LossFn, LossFn]],
    theta: Params,
    *,
    steps: int,
    lr: float,
    method: str = "exact",
    q: float | UFOMController | None = None,
    generator: torch.Generator | None = None,
    checkpoints: int | None = None,
    hvp: str = "reverse",
    check_finite: bool = True,
    return_info: bool = False,
) -> Any:
    """Mean hypergradient over a batch of tasks (the meta-batch of MAML-style training).

    Each task is an ``(inner_loss, outer_loss)`` pair; every task adapts from the same θ and UFOM
    flips an independent coin per task, so the mean stays unbiased for the mean exact hypergradient.
    Memory is that of one task (tasks run one after another); cost is the sum of the tasks' costs.

    Args:
        tasks: non-empty sequence of ``(inner_loss, outer_loss)`` pairs (see :func:`hypergradient`).
        theta: tensor or ``dict[str, Tensor]``, shared by all tasks.
        steps, lr, method, q, generator, checkpoints, hvp, check_finite: as in
            :func:`hypergradient`; a :class:`~orthotorch.bilevel.UFOMController` passed as ``q``
            observes every task.
        return_info: also return the list of per-task :class:`HypergradInfo`.

    Returns:
        The mean hypergradient (structure of ``theta``), or ``(mean, infos)``.
    """
    args = resolve_args(
        steps=steps,
        lr=lr,
        method=method,
        q=q,
        generator=generator,
        checkpoints=checkpoints,
        hvp=hvp,
        check_finite=check_finite,
        return_info=return_info,
    )
    g, infos = _many_tasks(tasks, check_params("theta", theta), args)
    return (g, infos) if args.return_info else g


def _check_tasks(tasks: object) -> Sequence[tuple[Any, Any]]:
    if isinstance(tasks, (str, bytes)) or not isinstance(tasks, Sequence):
        raise TypeError(
            f"`tasks` must be a sequence of (inner_loss, outer_loss) pairs, got "
            f"{type(tasks).__name__}"
        )
    if len(tasks) == 0:
        raise ValueError("`tasks` must contain at least one (inner_loss, outer_loss) pair, got 0")
    for t, task in enumerate(tasks):
        if not (isinstance(task, (tuple, list)) and len(task) == 2):
            raise TypeError(f"`tasks[{t}]` must be an (inner_loss, outer_loss) pair, got {task!r}")
        for k, fn in enumerate(task):
            if not callable(fn):
                raise TypeError(
                    f"`tasks[{t}][{k}]` must be callable phi -> scalar tensor, got "
                    f"{type(fn).__name__}"
                )
    return tasks


def _many_tasks(
    tasks: object, theta: Params, args: HypergradArgs
) -> tuple[Any, list[HypergradInfo]]:
    """:func:`batched_hypergradient` on resolved arguments."""
    checked = _check_tasks(tasks)
    total: Any = None
    infos: list[HypergradInfo] = []
    for inner_loss, outer_loss in checked:
        g, info = _one_task(inner_loss, outer_loss, theta, args)
        total = g if total is None else tmap(torch.add, total, g)
        infos.append(info)
    return mean(total, len(checked)), infos
