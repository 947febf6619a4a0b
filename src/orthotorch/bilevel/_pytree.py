"""The parameter trees of :mod:`orthotorch.bilevel`: a tensor, or a flat ``dict[str, Tensor]``.

θ, every inner iterate φ_j and every gradient share one structure: a single tensor of any shape, or a
flat mapping from names to tensors (the named parameters of a module). These helpers map a function over
the leaves of one or more trees of the same structure; they are the only place that knows the two forms.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from orthotorch._validation import FLOAT_DTYPES, describe

#: A parameter tree: a tensor or a ``dict[str, Tensor]``.
Params = Tensor | Mapping[str, Tensor]

__all__ = [
    "Params",
    "check_params",
    "detach",
    "empty_stacked",
    "leaves",
    "mean",
    "sgd_step",
    "sq_norm",
    "tmap",
]


def tmap(fn: Callable[..., Tensor], *trees: Any) -> Any:
    """``fn`` applied leaf by leaf to trees of one structure; the result has that structure."""
    first = trees[0]
    if isinstance(first, Tensor):
        return fn(*trees)
    return {k: fn(*(t[k] for t in trees)) for k in first}


def leaves(tree: Any) -> list[Tensor]:
    """The tensors of a tree, in key order for a mapping."""
    return [tree] if isinstance(tree, Tensor) else list(tree.values())


def sq_norm(tree: Any) -> Tensor:
    """Squared Euclidean norm of all leaves (a tree or a list of tensors), accumulated in float64.

    Returns a 0-dim float64 tensor on the leaves' device (no host synchronisation).
    """
    ts = tree if isinstance(tree, list) else leaves(tree)
    total = ts[0].detach().double().pow(2).sum()
    for t in ts[1:]:
        total = total + t.detach().double().pow(2).sum()
    return total


def sgd_step(x: Any, d: Any, lr: float) -> Any:
    """``x − lr·d`` leaf by leaf: the inner SGD step ``φ − α∇L(φ)`` and the reverse step ``v − αHv``."""
    return tmap(lambda a, b: a - lr * b, x, d)


def detach(tree: Any) -> Any:
    """The tree with every leaf detached (shares storage)."""
    return tmap(lambda t: t.detach(), tree)


def mean(tree: Any, n: int) -> Any:
    """Every leaf divided by ``n`` (the mean of a sum of ``n`` trees)."""
    return tmap(lambda t: t / n, tree)


def check_params(name: str, theta: object) -> Params:
    """Return ``theta`` if it is a floating tensor or a non-empty ``dict[str, Tensor]`` of them.

    Raises:
        TypeError: another type, non-str keys, non-tensor values, a non-floating dtype.
        ValueError: an empty mapping.
    """
    if isinstance(theta, Tensor):
        items: dict[str, Tensor] = {"": theta}
    elif isinstance(theta, Mapping):
        if len(theta) == 0:
            raise ValueError(f"`{name}` must contain at least one tensor, got an empty mapping")
        items = dict(theta)
        for k, v in items.items():
            if not isinstance(k, str):
                raise TypeError(f"`{name}` keys must be str, got {type(k).__name__} {k!r}")
            if not isinstance(v, Tensor):
                raise TypeError(f"`{name}[{k!r}]` must be a torch.Tensor, got {type(v).__name__}")
    else:
        raise TypeError(
            f"`{name}` must be a torch.Tensor or a dict[str, Tensor] (use "
            f"orthotorch.bilevel.module_params for an nn.Module), got {type(theta).__name__}"
        )
    for k, v in items.items():
        label = name if k == "" else f"{name}[{k!r}]"
        if v.dtype not in FLOAT_DTYPES:
            raise TypeError(f"`{label}` must have a floating dtype, got {describe(v)}")
    return theta


def empty_stacked(tree: Any, n: int) -> Any:
    """Uninitialised leaves of shape ``(n, *leaf.shape)`` (per-task results, filled by index)."""
    return tmap(lambda t: torch.empty((n, *t.shape), dtype=t.dtype, device=t.device), tree)
