"""Hypergradients of T tasks given as data, vectorised over tasks with ``torch.func.vmap``.

:func:`hypergradient_vmap` runs the same branches as :func:`~orthotorch.bilevel.hypergradient`
(``_engine``) on every task at once. The pieces: :class:`_TaskData` checks the data and selects tasks,
:class:`_Vectorised` turns one branch into a vmapped function of the task data and counts its cost,
:func:`_ufom` flips the coins and runs FOM on the tasks that drew 0 and the exact branch on those that
drew 1.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from orthotorch.bilevel._args import HypergradArgs, resolve_args
from orthotorch.bilevel._engine import (
    LossFn,
    exact_branch,
    explain_func_errors,
    fom_branch,
    raise_if_nonfinite,
    scalar_loss,
    ufom_combine,
    unrolled_branch,
)
from orthotorch.bilevel._info import HypergradInfo
from orthotorch.bilevel._pytree import Params, check_params, detach, empty_stacked, tmap
from orthotorch.bilevel.ufom import UFOMController

__all__ = ["hypergradient_vmap"]

DataLoss = Callable[[Any, Any], Tensor]
Branch = Callable[[LossFn, LossFn, Any, HypergradArgs, HypergradInfo], Any]


def _data_leaves(name: str, data: object) -> tuple[Tensor, ...]:
    leaves = (data,) if isinstance(data, Tensor) else data
    if not isinstance(leaves, (tuple, list)) or not leaves:
        raise TypeError(
            f"`{name}` must be a tensor or a non-empty tuple of tensors (T, ...), got "
            f"{type(data).__name__}"
        )
    for i, t in enumerate(leaves):
        if not isinstance(t, Tensor) or t.dim() == 0:
            raise TypeError(
                f"`{name}[{i}]` must be a tensor with a leading task dimension, got {t!r:.80}"
            )
    return tuple(leaves)


@dataclass(frozen=True)
class _TaskData:
    """The inner and outer data of T tasks, each a tuple of ``(T, ...)`` tensors.

    ``*_single`` records that the user passed one tensor (its slice is handed to ``loss`` as a
    tensor, not as a 1-tuple).
    """

    inner: tuple[Tensor, ...]
    outer: tuple[Tensor, ...]
    inner_single: bool
    outer_single: bool

    @classmethod
    def of(cls, inner_data: object, outer_data: object) -> _TaskData:
        d_in, d_out = _data_leaves("inner_data", inner_data), _data_leaves("outer_data", outer_data)
        n_tasks = d_in[0].shape[0]
        for name, leaves in (("inner_data", d_in), ("outer_data", d_out)):
            for i, t in enumerate(leaves):
                if t.shape[0] != n_tasks:
                    raise ValueError(
                        f"`{name}[{i}]` has {t.shape[0]} tasks (leading dim), expected "
                        f"{n_tasks} like inner_data[0]"
                    )
        return cls(d_in, d_out, isinstance(inner_data, Tensor), isinstance(outer_data, Tensor))

    @property
    def n_tasks(self) -> int:
        return self.inner[0].shape[0]

    @property
    def device(self) -> torch.device:
        return self.inner[0].device

    def take(self, idx: Tensor | None) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
        """The data of the tasks ``idx`` (all tasks for ``None``)."""
        if idx is None:
            return self.inner, self.outer
        return tuple(t[idx] for t in self.inner), tuple(t[idx] for t in self.outer)


class _Vectorised:
    """One task's branches as functions of its data slices, vmapped over a selection of tasks."""

    def __init__(
        self, loss: DataLoss, phi0: Any, data: _TaskData, args: HypergradArgs, info: HypergradInfo
    ) -> None:
        self.loss, self.phi0, self.data, self.args, self.info = loss, phi0, data, args, info

    def _losses(self, di: tuple[Tensor, ...], do: tuple[Tensor, ...]) -> tuple[LossFn, LossFn]:
        a = di[0] if self.data.inner_single else di
        b = do[0] if self.data.outer_single else do
        loss = self.loss
        return (
            scalar_loss(lambda p: loss(p, a), "loss(phi, inner_data[t])"),
            scalar_loss(lambda p: loss(p, b), "loss(phi, outer_data[t])"),
        )

    def run(self, branch: Branch, idx: Tensor | None = None) -> Any:
        """``branch`` on the tasks ``idx`` (all for ``None``), stacked over tasks; adds its cost."""
        one = HypergradInfo(method=self.args.method, steps=self.args.steps)  # counts of one task

        def per_task(di: tuple[Tensor, ...], do: tuple[Tensor, ...]) -> Any:
            inner, outer = self._losses(di, do)
            return branch(inner, outer, self.phi0, self.args, one)

        a, b = self.data.take(idx)
        with explain_func_errors():
            out = torch.func.vmap(per_task, randomness="error")(a, b)
        k = self.data.n_tasks if idx is None else int(idx.numel())
        self.info.grad_evals += one.grad_evals * k
        self.info.outer_grad_evals += one.outer_grad_evals * k
        self.info.hvp_evals += one.hvp_evals * k
        self.info.max_stored_iterates = max(self.info.max_stored_iterates, one.max_stored_iterates)
        return out


def _ufom(vec: _Vectorised) -> Any:
    """Per-task UFOM estimates ``(T, ...)``: FOM where ξ = 0, the corrected exact one where ξ = 1."""
    args, info = vec.args, vec.info
    assert args.generator is not None and args.q is not None  # guaranteed by resolve_args
    n_tasks, q = vec.data.n_tasks, args.q
    n_draw = n_tasks if args.coin == "task" else 1
    coins = torch.rand(n_draw, generator=args.generator, device=args.generator.device) < q
    coins = coins.expand(n_tasks).to(vec.data.device)
    idx_x, idx_f = torch.nonzero(coins).flatten(), torch.nonzero(~coins).flatten()
    n_x = int(idx_x.numel())  # the one host sync
    per_task = empty_stacked(vec.phi0, n_tasks)
    if n_x < n_tasks:
        g_f = vec.run(fom_branch, idx_f)
        tmap(lambda out, g: out.index_copy_(0, idx_f, g), per_task, g_f)
    if n_x > 0:
        g_x, g_xf = vec.run(exact_branch, idx_x)
        tmap(lambda out, g: out.index_copy_(0, idx_x, g), per_task, ufom_combine(g_xf, g_x, q))
        info.exact_used, info.exact_tasks = True, n_x
        info.g_exact, info.g_fom = g_x, g_xf
    return per_task


def hypergradient_vmap(
    loss: DataLoss,
    theta: Params,
    inner_data: Tensor | Sequence[Tensor],
    outer_data: Tensor | Sequence[Tensor],
    *,
    steps: int,
    lr: float,
    method: str = "exact",
    q: float | UFOMController | None = None,
    generator: torch.Generator | None = None,
    checkpoints: int | None = None,
    hvp: str = "reverse",
    coin: str = "task",
    check_finite: bool = True,
    return_info: bool = False,
) -> Any:
    """Mean hypergradient over T tasks given as data, vectorised over tasks with ``torch.func.vmap``.

    Task t has ``inner_loss = loss(·, inner_data[t])`` and ``outer_loss = loss(·, outer_data[t])``.
    All tasks run in one vectorised inner loop (much faster than :func:`~orthotorch.bilevel.batched_hypergradient` for
    small models). UFOM draws T coins; the FOM branch runs only on the tasks with ξ = 0 and the exact
    branch on those with ξ = 1 (one host sync to count them), so the expected cost per task is
    ``C_F + q·C_X``. Memory: T times that of one task; see :func:`~orthotorch.bilevel.hypergradient` for costs.

    With ``coin="batch"`` UFOM draws one coin for the whole meta-batch instead: still unbiased, with
    more variance (the corrections of all tasks arrive together), but a meta-iteration then costs
    either a FOM pass or an exact pass. On hardware where a vectorised pass costs about the same for
    2 tasks as for 16 (small models, per-op overhead), only the batch coin saves wall-clock time.

    Args:
        loss: ``(phi, data) -> scalar`` where ``data`` is one task's slice (a tensor or a tuple).
        theta: tensor or ``dict[str, Tensor]``, shared by all tasks.
        inner_data, outer_data: a tensor or tuple of tensors, each ``(T, ...)`` with the same T.
        steps, lr, method, q, generator, checkpoints, hvp, check_finite: as in
            :func:`~orthotorch.bilevel.hypergradient`, checked the same way (``method="unrolled"``
            is vectorised too).
        coin: UFOM only: ``"task"`` (one coin per task, default) or ``"batch"`` (one per call).
        return_info: also return a :class:`HypergradInfo` whose counts are totals over the tasks.

    Returns:
        The mean over tasks of the per-task hypergradients (structure of ``theta``), or
        ``(mean, info)``.

    Raises:
        ValueError, TypeError: as :func:`~orthotorch.bilevel.hypergradient`; also data whose
            leading (task) dimensions differ, or a ``loss`` that is not callable.
    """
    args = resolve_args(
        steps=steps,
        lr=lr,
        method=method,
        q=q,
        generator=generator,
        checkpoints=checkpoints,
        hvp=hvp,
        coin=coin,
        check_finite=check_finite,
        return_info=return_info,
    )
    theta = check_params("theta", theta)
    if not callable(loss):
        raise TypeError(f"`loss` must be callable (phi, data) -> scalar, got {type(loss).__name__}")
    data = _TaskData.of(inner_data, outer_data)
    info = HypergradInfo(method=args.method, steps=args.steps, q=args.q, tasks=data.n_tasks)
    vec = _Vectorised(loss, detach(theta), data, args, info)
    if args.method == "fom":
        per_task = info.g_fom = vec.run(fom_branch)
    elif args.method == "exact":
        per_task, info.g_fom = vec.run(exact_branch)
    elif args.method == "unrolled":
        per_task = vec.run(unrolled_branch)
    else:
        per_task = _ufom(vec)
    if args.method in ("exact", "unrolled"):
        info.exact_used, info.exact_tasks, info.g_exact = True, data.n_tasks, per_task
    mean = tmap(lambda t: t.mean(0), per_task)
    if args.check_finite:
        raise_if_nonfinite(f"the {args.method} hypergradient", mean)
    if args.controller is not None:
        args.controller.observe(info)
    return (mean, info) if args.return_info else mean
