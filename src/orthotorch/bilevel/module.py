"""Hypergradients for ``nn.Module`` parameters through ``torch.func.functional_call``.

The inner loop runs over the module's *unconstrained* parameters (``named_parameters()``). For a
weight constrained with ``torch.nn.utils.parametrize`` (``orthotorch.parametrize.orthogonal`` or
``torch.nn.utils.parametrizations.orthogonal``) that is ``parametrizations.<name>.original``: the
functional call re-applies the parametrization, so every inner iterate's *effective* weight stays
orthogonal while the inner SGD steps move the unconstrained tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from orthotorch._validation import check_bool
from orthotorch.bilevel._args import resolve_args
from orthotorch.bilevel.hypergrad import _many_tasks, _one_task
from orthotorch.bilevel.ufom import UFOMController

__all__ = ["accumulate_grads", "module_hypergradient", "module_loss", "module_params"]


def _check_module(module: object) -> nn.Module:
    if not isinstance(module, nn.Module):
        raise TypeError(f"`module` must be a torch.nn.Module, got {type(module).__name__}")
    return module


def module_params(module: nn.Module, *, trainable_only: bool = True) -> dict[str, Tensor]:
    """The module's parameters as a ``dict[str, Tensor]`` of detached tensors (θ for the API).

    Args:
        module: any ``nn.Module``; parametrized weights appear as
            ``parametrizations.<name>.original`` (the unconstrained tensor).
        trainable_only: skip parameters with ``requires_grad=False``.

    Returns:
        ``{name: tensor}``, each tensor sharing storage with the parameter (no copy).
    """
    _check_module(module)
    out = {
        n: p.detach() for n, p in module.named_parameters() if p.requires_grad or not trainable_only
    }
    if not out:
        raise ValueError("`module` has no (trainable) parameters")
    return out


def module_loss(
    module: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Tensor | Sequence[Tensor],
    targets: Tensor,
) -> Callable[[Mapping[str, Tensor]], Tensor]:
    """``params -> loss_fn(module(inputs) evaluated with params, targets)``, for inner/outer losses.

    Args:
        module: the model; parameters not in ``params`` (and all buffers) keep their module values.
        loss_fn: e.g. ``torch.nn.functional.cross_entropy``; must return a scalar.
        inputs: a tensor ``(B, ...)`` or a tuple of positional inputs.
        targets: ``(B, ...)``, passed as the second argument of ``loss_fn``.

    Returns:
        A function of a ``dict[str, Tensor]`` (as built by :func:`module_params`).
    """
    _check_module(module)
    if not callable(loss_fn):
        raise TypeError(f"`loss_fn` must be callable, got {type(loss_fn).__name__}")
    args = (inputs,) if isinstance(inputs, Tensor) else tuple(inputs)

    def loss(params: Mapping[str, Tensor]) -> Tensor:
        return loss_fn(torch.func.functional_call(module, dict(params), args), targets)

    return loss


def module_hypergradient(
    module: nn.Module,
    inner_loss: Callable[[Mapping[str, Tensor]], Tensor] | None = None,
    outer_loss: Callable[[Mapping[str, Tensor]], Tensor] | None = None,
    *,
    tasks: Sequence[tuple[Callable, Callable]] | None = None,
    steps: int,
    lr: float,
    method: str = "exact",
    q: float | UFOMController | None = None,
    generator: torch.Generator | None = None,
    checkpoints: int | None = None,
    hvp: str = "reverse",
    check_finite: bool = True,
    accumulate: bool = False,
    return_info: bool = False,
) -> Any:
    """Hypergradient with respect to a module's parameters (one task, or the mean over ``tasks``).

    The inner loop starts from the module's current (unconstrained) parameters; see
    :func:`~orthotorch.bilevel.hypergradient` for the methods and their costs. Parametrized
    (e.g. orthogonal) weights are handled through their ``original`` tensors.

    Args:
        module: the model.
        inner_loss, outer_loss: ``params dict -> scalar`` (e.g. from :func:`module_loss`), for one
            task; or pass ``tasks`` instead.
        tasks: a sequence of ``(inner_loss, outer_loss)`` pairs; the result is their mean.
        steps, lr, method, q, generator, checkpoints, hvp, check_finite: as in
            :func:`~orthotorch.bilevel.hypergradient` (checked by the same resolver).
        accumulate: add the result to the parameters' ``.grad`` (for a ``torch.optim`` step).
        return_info: also return the :class:`~orthotorch.bilevel.HypergradInfo` (a list for tasks).

    Returns:
        ``{name: gradient}`` with the shapes of the parameters (or ``(grads, info)``).
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
    check_bool("accumulate", accumulate)
    if tasks is not None:
        if inner_loss is not None or outer_loss is not None:
            raise ValueError("pass either `inner_loss`/`outer_loss` or `tasks`, not both")
    elif inner_loss is None or outer_loss is None:
        raise ValueError("`inner_loss` and `outer_loss` are required when `tasks` is None")
    theta = module_params(module)
    info: Any
    if tasks is not None:
        grads, info = _many_tasks(tasks, theta, args)
    else:
        grads, info = _one_task(inner_loss, outer_loss, theta, args)
    if accumulate:
        accumulate_grads(module, grads)
    return (grads, info) if args.return_info else grads


def accumulate_grads(module: nn.Module, grads: Mapping[str, Tensor]) -> None:
    """Add ``grads[name]`` to ``param.grad`` for every named parameter of ``module`` in ``grads``.

    Raises:
        KeyError: a name in ``grads`` that is not a parameter of ``module``.
        ValueError: a gradient whose shape differs from its parameter's.
    """
    _check_module(module)
    params = dict(module.named_parameters())
    for name, g in grads.items():
        if name not in params:
            raise KeyError(f"`grads` has {name!r}, which is not a parameter of the module")
        p = params[name]
        if g.shape != p.shape:
            raise ValueError(
                f"`grads[{name!r}]` has shape {tuple(g.shape)}, expected {tuple(p.shape)}"
            )
        g = g.to(dtype=p.dtype, device=p.device)
        p.grad = g.clone() if p.grad is None else p.grad + g
