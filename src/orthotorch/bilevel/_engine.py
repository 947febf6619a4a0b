"""The branches of a hypergradient for one task: FOM, the exact reverse recursion, unrolled, UFOM.

Every function here works on already validated arguments (:mod:`orthotorch.bilevel._args`) and on
losses wrapped by :func:`scalar_loss`; the public functions of :mod:`~orthotorch.bilevel.hypergrad` and
:mod:`~orthotorch.bilevel.vmap` call them, one task at a time or under ``torch.func.vmap``. Costs are
added to the :class:`~orthotorch.bilevel.HypergradInfo` passed in (Python-level counts: under ``vmap``
they are the counts of one task).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from orthotorch.bilevel._args import HypergradArgs
from orthotorch.bilevel._info import HypergradInfo
from orthotorch.bilevel._pytree import leaves, sgd_step, tmap

LossFn = Callable[[Any], Tensor]
GradFn = Callable[[Any], Any]

__all__ = [
    "LossFn",
    "exact_branch",
    "explain_func_errors",
    "fom_branch",
    "inner_loop",
    "raise_if_nonfinite",
    "scalar_loss",
    "single_task",
    "ufom_combine",
    "unrolled_branch",
]


def scalar_loss(fn: object, name: str) -> LossFn:
    """``fn`` wrapped to check that it returns a one-element tensor (reshaped to 0-dim)."""
    if not callable(fn):
        raise TypeError(f"`{name}` must be callable phi -> scalar tensor, got {type(fn).__name__}")

    def wrapped(phi: Any) -> Tensor:
        out = fn(phi)
        if not isinstance(out, Tensor):
            raise TypeError(f"`{name}` must return a scalar torch.Tensor, got {type(out).__name__}")
        if out.numel() != 1:
            raise ValueError(
                f"`{name}` must return a scalar (a tensor with one element), got shape "
                f"{tuple(out.shape)}; reduce it (e.g. .mean()) inside the loss"
            )
        return out.reshape(())

    return wrapped


@contextlib.contextmanager
def explain_func_errors() -> Iterator[None]:
    """Turn torch.func's error about old-style autograd Functions into an actionable one."""
    try:
        yield
    except RuntimeError as exc:
        if "setup_context" not in str(exc):
            raise
        raise TypeError(
            "a loss uses a custom torch.autograd.Function that torch.func cannot transform (it needs "
            "`setup_context` and, for exact/UFOM hypergradients, a twice-differentiable backward). "
            "For orthogonal weights use orthotorch.parametrize.orthogonal or "
            "torch.nn.utils.parametrizations.orthogonal. Original error: "
            f"{str(exc).splitlines()[0]}"
        ) from exc


def raise_if_nonfinite(name: str, tree: Any) -> None:
    """Raise ``FloatingPointError`` if any leaf holds NaN or inf (one host synchronisation)."""
    if not all(bool(torch.isfinite(t).all()) for t in leaves(tree)):
        raise FloatingPointError(
            f"{name} is not finite (NaN or inf); reduce `lr` or `steps`, or check the losses"
        )


def inner_loop(grad_in: GradFn, phi: Any, steps: int, lr: float) -> Any:
    """``steps`` inner SGD steps ``φ ← φ − lr·∇L_in(φ)`` from ``phi``; returns the last iterate."""
    for _ in range(steps):
        phi = sgd_step(phi, grad_in(phi), lr)
    return phi


def _make_hvp(grad_in: GradFn, mode: str) -> Callable[[Any, Any], Any]:
    """``(φ, v) -> H(φ) v`` for ``H = ∇²L_in``, reverse-over-reverse or forward-over-reverse."""
    if mode == "forward":
        return lambda phi, v: torch.func.jvp(grad_in, (phi,), (v,))[1]

    def hvp(phi: Any, v: Any) -> Any:
        vjp_fn = torch.func.vjp(grad_in, phi)[1]
        return vjp_fn(v)[0]

    return hvp


class _Counter:
    """Number of inner iterates held at once by the exact recursion, and its peak."""

    def __init__(self) -> None:
        self.stored = 0
        self.max_stored = 0

    def add(self, n: int = 1) -> None:
        self.stored += n
        self.max_stored = max(self.max_stored, self.stored)

    def remove(self, n: int = 1) -> None:
        self.stored -= n


def fom_branch(
    inner: LossFn, outer: LossFn, phi0: Any, args: HypergradArgs, info: HypergradInfo
) -> Any:
    """``∇L_out(φ_r)``: r inner gradients and one outer gradient."""
    phi = inner_loop(torch.func.grad(inner), phi0, args.steps, args.lr)
    info.grad_evals += args.steps
    info.outer_grad_evals += 1
    return torch.func.grad(outer)(phi)


def unrolled_branch(
    inner: LossFn, outer: LossFn, theta: Any, args: HypergradArgs, info: HypergradInfo
) -> Any:
    """g_exact by back-propagation through the whole loop (every step's graph is kept)."""
    grad_in = torch.func.grad(inner)

    def objective(th: Any) -> Tensor:
        return outer(inner_loop(grad_in, th, args.steps, args.lr))

    out = torch.func.grad(objective)(theta)
    info.grad_evals += args.steps
    info.outer_grad_evals += 1
    info.hvp_evals += args.steps  # reverse through each step is one HVP
    info.max_stored_iterates = args.steps
    return out


def exact_branch(
    inner: LossFn, outer: LossFn, phi0: Any, args: HypergradArgs, info: HypergradInfo
) -> tuple[Any, Any]:
    """Reverse recursion ``v ← v − αH_j v`` with recomputed iterates; returns ``(g_exact, g_fom)``.

    The forward sweep keeps φ_j at every multiple of the stride c (φ_0 = θ is held by the caller); the
    backward sweep recomputes each segment from its checkpoint and applies its HVPs in reverse. With
    c = 0 every φ_j is recomputed from φ_0 (no stored iterate, r(r − 1)/2 extra gradients).
    """
    grad_in = torch.func.grad(inner)
    hvp = _make_hvp(grad_in, args.hvp)
    steps, lr, stride = args.steps, args.lr, args.stride
    counter = _Counter()

    def step(phi: Any) -> Any:
        info.grad_evals += 1
        return sgd_step(phi, grad_in(phi), lr)

    def apply(phi_j: Any, v: Any) -> Any:  # v ← (I − αH_j) v
        info.hvp_evals += 1
        return sgd_step(v, hvp(phi_j, v), lr)

    ckpts: dict[int, Any] = {0: phi0}
    phi = phi0
    for j in range(steps):
        phi = step(phi)
        if stride > 0 and (j + 1) % stride == 0 and j + 1 < steps:
            ckpts[j + 1] = phi
            counter.add()
    g_fom = v = torch.func.grad(outer)(phi)
    info.outer_grad_evals += 1
    del phi

    if stride == 0:
        for j in reversed(range(steps)):
            phi_j = phi0
            for _ in range(j):
                phi_j = step(phi_j)
            v = apply(phi_j, v)
    else:
        seg_end = steps
        for start in sorted(ckpts, reverse=True):
            if start >= seg_end:
                continue
            segment = [ckpts.pop(start)]  # stays counted (φ_0 = θ never is)
            for _ in range(start, seg_end - 1):
                segment.append(step(segment[-1]))
                counter.add()
            while segment:
                v = apply(segment.pop(), v)
                if start > 0 or segment:
                    counter.remove()
            seg_end = start
    info.max_stored_iterates = max(info.max_stored_iterates, counter.max_stored)
    return v, g_fom


def ufom_combine(g_fom: Any, g_exact: Any, q: float) -> Any:
    """UFOM's estimate on an exact draw: ``g_FOM + (g_exact − g_FOM)/q``."""
    return tmap(lambda f, e: f + (e - f) / q, g_fom, g_exact)


def single_task(
    inner: LossFn, outer: LossFn, phi0: Any, args: HypergradArgs, info: HypergradInfo
) -> Any:
    """The hypergradient of one task by ``args.method``; fills ``info`` (UFOM flips its coin here)."""
    if args.method == "unrolled":
        out = unrolled_branch(inner, outer, phi0, args, info)
        info.exact_used, info.exact_tasks, info.g_exact = True, 1, out
        return out
    run_exact = args.method == "exact"
    if args.method == "ufom":
        assert args.generator is not None and args.q is not None  # guaranteed by resolve_args
        coin = torch.rand((), generator=args.generator, device=args.generator.device)
        run_exact = bool(coin < args.q)
    if not run_exact:
        info.g_fom = fom_branch(inner, outer, phi0, args, info)
        return info.g_fom
    g_exact, g_fom = exact_branch(inner, outer, phi0, args, info)
    info.exact_used, info.exact_tasks = True, 1
    info.g_exact, info.g_fom = g_exact, g_fom
    if args.method == "ufom":
        assert args.q is not None
        return ufom_combine(g_fom, g_exact, args.q)
    return g_exact
