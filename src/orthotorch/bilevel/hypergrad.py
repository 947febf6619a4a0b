"""Hypergradients of r-step inner SGD: unrolled, exact constant-memory, FOM and UFOM.

The inner loop is ``φ_0 = θ``, ``φ_{j+1} = φ_j − α ∇L_in(φ_j)`` for ``j < r``; the outer objective is
``L_out(φ_r)``. Its gradient with respect to θ is

    g_exact = (I − α H_0)(I − α H_1) ⋯ (I − α H_{r−1}) ∇L_out(φ_r),     H_j = ∇²L_in(φ_j),

the first-order method (FOM) drops the Hessians, ``g_FOM = ∇L_out(φ_r)``, and UFOM returns
``g_FOM + (ξ/q)(g_exact − g_FOM)`` with ``ξ ~ Bernoulli(q)``, an unbiased estimate of ``g_exact``.

Parameters ``θ`` are a tensor or a ``dict[str, Tensor]`` (e.g. the named parameters of a module, see
:mod:`orthotorch.bilevel.module`); every gradient has the same structure as θ.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from orthotorch._validation import FLOAT_DTYPES, describe

if TYPE_CHECKING:  # pragma: no cover
    from orthotorch.bilevel.ufom import UFOMController

Params = Tensor | Mapping[str, Tensor]
LossFn = Callable[[Any], Tensor]

METHODS = ("exact", "fom", "ufom", "unrolled")

__all__ = [
    "METHODS",
    "HypergradInfo",
    "batched_hypergradient",
    "hypergradient",
    "hypergradient_vmap",
    "inner_adapt",
]


# --------------------------------------------------------------------------------------------------
# small pytree helpers (a tensor or a flat dict of tensors)


def _tmap(fn: Callable[..., Tensor], *trees: Any) -> Any:
    first = trees[0]
    if isinstance(first, Tensor):
        return fn(*trees)
    return {k: fn(*(t[k] for t in trees)) for k in first}


def _leaves(tree: Any) -> list[Tensor]:
    return [tree] if isinstance(tree, Tensor) else list(tree.values())


def _sq_norm(tree: Any) -> Tensor:
    """Squared Euclidean norm of all leaves, accumulated in float64 (0-dim tensor, no host sync)."""
    leaves = tree if isinstance(tree, list) else _leaves(tree)
    total = leaves[0].detach().double().pow(2).sum()
    for t in leaves[1:]:
        total = total + t.detach().double().pow(2).sum()
    return total


def _check_params(name: str, theta: object) -> Params:
    if isinstance(theta, Tensor):
        leaves = {"": theta}
    elif isinstance(theta, Mapping):
        if len(theta) == 0:
            raise ValueError(f"`{name}` must contain at least one tensor, got an empty mapping")
        leaves = dict(theta)
        for k, v in leaves.items():
            if not isinstance(k, str):
                raise TypeError(f"`{name}` keys must be str, got {type(k).__name__} {k!r}")
            if not isinstance(v, Tensor):
                raise TypeError(f"`{name}[{k!r}]` must be a torch.Tensor, got {type(v).__name__}")
    else:
        raise TypeError(
            f"`{name}` must be a torch.Tensor or a dict[str, Tensor] (use "
            f"orthotorch.bilevel.module_params for an nn.Module), got {type(theta).__name__}"
        )
    for k, v in leaves.items():
        label = name if k == "" else f"{name}[{k!r}]"
        if v.dtype not in FLOAT_DTYPES:
            raise TypeError(f"`{label}` must have a floating dtype, got {describe(v)}")
    return theta  # type: ignore[return-value]


def _scalar_loss(fn: object, name: str) -> Callable[[Any], Tensor]:
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


def _check_lr(lr: object) -> float:
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError(f"`lr` must be a scalar, got a tensor of shape {tuple(lr.shape)}")
        lr = float(lr)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)):
        raise TypeError(f"`lr` must be a float, got {type(lr).__name__} {lr!r}")
    if not math.isfinite(lr) or lr < 0:
        raise ValueError(f"`lr` must be a finite float >= 0, got {lr!r}")
    return float(lr)


def _check_steps(steps: object) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise TypeError(f"`steps` must be an int >= 0 (the inner step count r), got {steps!r}")
    if steps < 0:
        raise ValueError(f"`steps` must be >= 0 (the inner step count r), got {steps}")
    return steps


def _check_q(q: object) -> float:
    if isinstance(q, Tensor) and q.numel() == 1:
        q = float(q)
    if isinstance(q, bool) or not isinstance(q, (int, float)):
        raise TypeError(f"`q` must be a float in (0, 1] for method='ufom', got {q!r}")
    if not (0.0 < q <= 1.0):
        raise ValueError(f"`q` must lie in (0, 1] for method='ufom', got {q!r}")
    return float(q)


def _resolve_stride(checkpoints: object, steps: int) -> int:
    if checkpoints is None:
        return max(1, math.ceil(math.sqrt(steps))) if steps > 0 else 1
    if isinstance(checkpoints, bool) or not isinstance(checkpoints, int):
        raise TypeError(f"`checkpoints` must be None or an int >= 0, got {checkpoints!r}")
    if checkpoints < 0:
        raise ValueError(f"`checkpoints` must be None or an int >= 0, got {checkpoints}")
    return checkpoints


# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _explain_func_errors() -> Iterator[None]:
    """Turn torch.func's error about old-style autograd Functions into an actionable one."""
    try:
        yield
    except RuntimeError as exc:
        if "setup_context" not in str(exc):
            raise
        raise TypeError(
            "a loss uses a custom torch.autograd.Function that torch.func cannot transform (it needs "
            "`setup_context` and, for exact/UFOM hypergradients, a twice-differentiable backward). "
            "For orthogonal weights use orthotorch.parametrize.orthogonal(..., method='matrix_exp' "
            "or 'cayley') or torch.nn.utils.parametrizations.orthogonal. Original error: "
            f"{str(exc).splitlines()[0]}"
        ) from exc


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


class _Counter:
    def __init__(self) -> None:
        self.stored = 0
        self.max_stored = 0

    def add(self, n: int = 1) -> None:
        self.stored += n
        self.max_stored = max(self.max_stored, self.stored)

    def remove(self, n: int = 1) -> None:
        self.stored -= n


def _make_hvp(grad_in: Callable[[Any], Any], mode: str) -> Callable[[Any, Any], Any]:
    if mode == "reverse":

        def hvp(phi: Any, v: Any) -> Any:
            _, vjp_fn = torch.func.vjp(grad_in, phi)
            return vjp_fn(v)[0]

    elif mode == "forward":

        def hvp(phi: Any, v: Any) -> Any:
            return torch.func.jvp(grad_in, (phi,), (v,))[1]

    else:
        raise ValueError(f"`hvp` must be 'reverse' or 'forward', got {mode!r}")
    return hvp


def _detach(theta: Params) -> Any:
    return _tmap(lambda t: t.detach(), theta)


def inner_adapt(inner_loss: LossFn, theta: Params, *, steps: int, lr: float) -> Any:
    """Run the inner loop ``φ_{j+1} = φ_j − lr·∇L_in(φ_j)`` from ``φ_0 = θ`` and return ``φ_r``.

    Args:
        inner_loss: ``phi -> scalar tensor`` with ``phi`` of the same structure as ``theta``.
        theta: a tensor of any shape, or a ``dict[str, Tensor]``.
        steps: the number of inner steps r (>= 0).
        lr: the inner step size α.

    Returns:
        φ_r, detached, with the structure and shapes of ``theta``. Memory O(1) iterates.
    """
    theta = _check_params("theta", theta)
    steps, lr = _check_steps(steps), _check_lr(lr)
    grad_in = torch.func.grad(_scalar_loss(inner_loss, "inner_loss"))
    phi = _detach(theta)
    for _ in range(steps):
        phi = _tmap(lambda p, g: p - lr * g, phi, grad_in(phi))
    return phi


def _unrolled(
    inner_loss: LossFn, outer_loss: LossFn, theta: Any, steps: int, lr: float, info: HypergradInfo
) -> Any:
    grad_in = torch.func.grad(inner_loss)

    def objective(th: Any) -> Tensor:
        phi = th
        for _ in range(steps):
            phi = _tmap(lambda p, g: p - lr * g, phi, grad_in(phi))
        return outer_loss(phi)

    out = torch.func.grad(objective)(theta)
    info.grad_evals += steps
    info.outer_grad_evals += 1
    info.hvp_evals += steps  # reverse through each step is one HVP
    info.max_stored_iterates = steps
    return out


def _exact(
    grad_in: Callable[[Any], Any],
    grad_out: Callable[[Any], Any],
    hvp: Callable[[Any, Any], Any],
    phi0: Any,
    steps: int,
    lr: float,
    stride: int,
    info: HypergradInfo,
) -> tuple[Any, Any]:
    """Reverse recursion v ← (I − αH_j)v with recomputed iterates; returns (g_exact, g_fom)."""
    counter = _Counter()

    def step(phi: Any) -> Any:
        info.grad_evals += 1
        return _tmap(lambda p, g: p - lr * g, phi, grad_in(phi))

    # forward sweep, keeping φ_j for j = c, 2c, ... (< r); φ_0 = θ is held by the caller anyway
    ckpts: dict[int, Any] = {0: phi0}
    phi = phi0
    for j in range(steps):
        phi = step(phi)
        if stride > 0 and (j + 1) % stride == 0 and j + 1 < steps:
            ckpts[j + 1] = phi
            counter.add()
    v = grad_out(phi)
    info.outer_grad_evals += 1
    g_fom = v
    del phi

    def apply(phi_j: Any, v: Any) -> Any:
        info.hvp_evals += 1
        return _tmap(lambda a, b: a - lr * b, v, hvp(phi_j, v))

    if stride == 0:
        # O(1) iterates: recompute φ_j from φ_0 for every j (r(r−1)/2 extra gradient evaluations)
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


def _check_finite(name: str, tree: Any) -> None:
    bad = [t for t in _leaves(tree) if not bool(torch.isfinite(t).all())]
    if bad:
        raise FloatingPointError(
            f"{name} is not finite (NaN or inf); reduce `lr` or `steps`, or check the losses"
        )


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
        ValueError: ``steps < 0``, ``q`` outside (0, 1], unknown ``method``, non-scalar losses.
        TypeError: wrong argument types, integer ``theta``, missing generator for UFOM.
    """
    from orthotorch.bilevel.ufom import UFOMController

    theta = _check_params("theta", theta)
    steps, lr = _check_steps(steps), _check_lr(lr)
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {METHODS}, got {method!r}")
    stride = _resolve_stride(checkpoints, steps)
    if hvp not in ("reverse", "forward"):
        raise ValueError(f"`hvp` must be 'reverse' or 'forward', got {hvp!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"`generator` must be a torch.Generator or None, got {type(generator).__name__}"
        )
    controller: UFOMController | None = None
    q_val: float | None = None
    if method == "ufom":
        if q is None:
            raise ValueError("method='ufom' needs `q` (a float in (0, 1] or a UFOMController)")
        if isinstance(q, UFOMController):
            controller, q_val = q, q.q
        else:
            q_val = _check_q(q)
        if generator is None:
            raise TypeError(
                "method='ufom' needs `generator` (a torch.Generator): library code never draws from "
                "the global RNG"
            )
    elif q is not None and not isinstance(q, UFOMController):
        _check_q(q)  # validate even when unused, so typos surface
    inner = _scalar_loss(inner_loss, "inner_loss")
    outer = _scalar_loss(outer_loss, "outer_loss")
    phi0 = _detach(theta)
    info = HypergradInfo(method=method, steps=steps, q=q_val)
    with _explain_func_errors():
        out = _hypergradient_core(
            inner, outer, phi0, steps, lr, method, q_val, generator, stride, hvp, info
        )
    if check_finite:
        _check_finite(f"the {method} hypergradient", out)
    if controller is not None:
        controller.observe(info)
    return (out, info) if return_info else out


def _hypergradient_core(
    inner: Callable[[Any], Tensor],
    outer: Callable[[Any], Tensor],
    phi0: Any,
    steps: int,
    lr: float,
    method: str,
    q_val: float | None,
    generator: torch.Generator | None,
    stride: int,
    hvp: str,
    info: HypergradInfo,
) -> Any:
    if method == "unrolled":
        out = _unrolled(inner, outer, phi0, steps, lr, info)
        info.exact_used = True
        info.exact_tasks = 1
        info.g_exact = out
    else:
        grad_in = torch.func.grad(inner)
        grad_out = torch.func.grad(outer)
        run_exact = method == "exact"
        if method == "ufom":
            assert generator is not None and q_val is not None
            coin = torch.rand((), generator=generator, device=generator.device)
            run_exact = bool(coin < q_val)
        if run_exact:
            g_exact, g_fom = _exact(
                grad_in, grad_out, _make_hvp(grad_in, hvp), phi0, steps, lr, stride, info
            )
            info.exact_used = True
            info.exact_tasks = 1
            info.g_exact, info.g_fom = g_exact, g_fom
            if method == "ufom":
                assert q_val is not None
                out = _tmap(lambda f, e: f + (e - f) / q_val, g_fom, g_exact)
            else:
                out = g_exact
        else:
            phi = phi0
            for _ in range(steps):
                phi = _tmap(lambda p, g: p - lr * g, phi, grad_in(phi))
            info.grad_evals += steps
            out = grad_out(phi)
            info.outer_grad_evals += 1
            info.g_fom = out
    return out


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
    if isinstance(tasks, (str, bytes)) or not isinstance(tasks, Sequence):
        raise TypeError(
            f"`tasks` must be a sequence of (inner_loss, outer_loss) pairs, got "
            f"{type(tasks).__name__}"
        )
    if len(tasks) == 0:
        raise ValueError("`tasks` must contain at least one (inner_loss, outer_loss) pair, got 0")
    total: Any = None
    infos: list[HypergradInfo] = []
    for t, task in enumerate(tasks):
        if not (isinstance(task, (tuple, list)) and len(task) == 2):
            raise TypeError(f"`tasks[{t}]` must be an (inner_loss, outer_loss) pair, got {task!r}")
        g, info = hypergradient(
            task[0],
            task[1],
            theta,
            steps=steps,
            lr=lr,
            method=method,
            q=q,
            generator=generator,
            checkpoints=checkpoints,
            hvp=hvp,
            check_finite=check_finite,
            return_info=True,
        )
        total = g if total is None else _tmap(torch.add, total, g)
        infos.append(info)
    n = len(tasks)
    mean = _tmap(lambda t: t / n, total)
    return (mean, infos) if return_info else mean


# --------------------------------------------------------------------------------------------------
# tasks as data, vectorised with torch.func.vmap


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


def hypergradient_vmap(
    loss: Callable[[Any, Any], Tensor],
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
    All tasks run in one vectorised inner loop (much faster than :func:`batched_hypergradient` for
    small models). UFOM draws T coins; the FOM branch runs only on the tasks with ξ = 0 and the exact
    branch on those with ξ = 1 (one host sync to count them), so the expected cost per task is
    ``C_F + q·C_X``. Memory: T times that of one task; see :func:`hypergradient` for costs.

    With ``coin="batch"`` UFOM draws one coin for the whole meta-batch instead: still unbiased, with
    more variance (the corrections of all tasks arrive together), but a meta-iteration then costs
    either a FOM pass or an exact pass. On hardware where a vectorised pass costs about the same for
    2 tasks as for 16 (small models, per-op overhead), only the batch coin saves wall-clock time.

    Args:
        loss: ``(phi, data) -> scalar`` where ``data`` is one task's slice (a tensor or a tuple).
        theta: tensor or ``dict[str, Tensor]``, shared by all tasks.
        inner_data, outer_data: a tensor or tuple of tensors, each ``(T, ...)`` with the same T.
        steps, lr, method, q, generator, checkpoints, hvp, check_finite: as in
            :func:`hypergradient` (``method="unrolled"`` is vectorised too).
        coin: UFOM only: ``"task"`` (one coin per task, default) or ``"batch"`` (one per call).
        return_info: also return a :class:`HypergradInfo` whose counts are totals over the tasks.

    Returns:
        The mean over tasks of the per-task hypergradients (structure of ``theta``), or
        ``(mean, info)``.
    """
    from orthotorch.bilevel.ufom import UFOMController

    theta = _check_params("theta", theta)
    steps, lr = _check_steps(steps), _check_lr(lr)
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {METHODS}, got {method!r}")
    if not callable(loss):
        raise TypeError(f"`loss` must be callable (phi, data) -> scalar, got {type(loss).__name__}")
    stride = _resolve_stride(checkpoints, steps)
    if hvp not in ("reverse", "forward"):
        raise ValueError(f"`hvp` must be 'reverse' or 'forward', got {hvp!r}")
    if coin not in ("task", "batch"):
        raise ValueError(f"`coin` must be 'task' or 'batch', got {coin!r}")
    d_in, d_out = _data_leaves("inner_data", inner_data), _data_leaves("outer_data", outer_data)
    n_tasks = d_in[0].shape[0]
    for name, leaves in (("inner_data", d_in), ("outer_data", d_out)):
        for i, t in enumerate(leaves):
            if t.shape[0] != n_tasks:
                raise ValueError(
                    f"`{name}[{i}]` has {t.shape[0]} tasks (leading dim), expected "
                    f"{n_tasks} like inner_data[0]"
                )
    controller: UFOMController | None = None
    q_val: float | None = None
    if method == "ufom":
        if q is None:
            raise ValueError("method='ufom' needs `q` (a float in (0, 1] or a UFOMController)")
        if isinstance(q, UFOMController):
            controller, q_val = q, q.q
        else:
            q_val = _check_q(q)
        if not isinstance(generator, torch.Generator):
            raise TypeError(
                "method='ufom' needs `generator` (a torch.Generator), got "
                f"{type(generator).__name__}"
            )
    phi0 = _detach(theta)
    info = HypergradInfo(method=method, steps=steps, q=q_val, tasks=n_tasks)

    def losses(di: tuple[Tensor, ...], do: tuple[Tensor, ...]) -> tuple[Callable, Callable]:
        a = di[0] if isinstance(inner_data, Tensor) else di
        b = do[0] if isinstance(outer_data, Tensor) else do
        return (
            _scalar_loss(lambda p: loss(p, a), "loss(phi, inner_data[t])"),
            _scalar_loss(lambda p: loss(p, b), "loss(phi, outer_data[t])"),
        )

    def run_fom(di: tuple[Tensor, ...], do: tuple[Tensor, ...]) -> Any:
        inner, outer = losses(di, do)
        grad_in = torch.func.grad(inner)
        phi = phi0
        for _ in range(steps):
            phi = _tmap(lambda p, g: p - lr * g, phi, grad_in(phi))
        return torch.func.grad(outer)(phi)

    sub = HypergradInfo(method=method, steps=steps)

    def run_exact(di: tuple[Tensor, ...], do: tuple[Tensor, ...]) -> tuple[Any, Any]:
        inner, outer = losses(di, do)
        grad_in = torch.func.grad(inner)
        return _exact(
            grad_in, torch.func.grad(outer), _make_hvp(grad_in, hvp), phi0, steps, lr, stride, sub
        )

    def run_unrolled(di: tuple[Tensor, ...], do: tuple[Tensor, ...]) -> Any:
        inner, outer = losses(di, do)
        return _unrolled(inner, outer, phi0, steps, lr, sub)

    def vm(fn: Callable, idx: Tensor | None) -> Any:
        a = d_in if idx is None else tuple(t[idx] for t in d_in)
        b = d_out if idx is None else tuple(t[idx] for t in d_out)
        with _explain_func_errors():
            return torch.func.vmap(fn, randomness="error")(a, b)

    def add_counts(k: int) -> None:
        info.grad_evals += sub.grad_evals * k
        info.outer_grad_evals += sub.outer_grad_evals * k
        info.hvp_evals += sub.hvp_evals * k
        info.max_stored_iterates = max(info.max_stored_iterates, sub.max_stored_iterates)

    if method == "fom":
        per_task = vm(run_fom, None)
        info.grad_evals, info.outer_grad_evals = steps * n_tasks, n_tasks
        info.g_fom = per_task
    elif method in ("exact", "unrolled"):
        if method == "exact":
            per_task, g_fom = vm(run_exact, None)
            info.g_fom = g_fom
        else:
            per_task = vm(run_unrolled, None)
        add_counts(n_tasks)
        info.exact_used, info.exact_tasks, info.g_exact = True, n_tasks, per_task
    else:
        assert generator is not None and q_val is not None
        n_draw = n_tasks if coin == "task" else 1
        coins = torch.rand(n_draw, generator=generator, device=generator.device) < q_val
        coins = coins.expand(n_tasks)
        coins = coins.to(d_in[0].device)
        idx_x = torch.nonzero(coins).flatten()
        idx_f = torch.nonzero(~coins).flatten()
        n_x = int(idx_x.numel())
        per_task = _tmap(
            lambda t: torch.empty((n_tasks, *t.shape), dtype=t.dtype, device=t.device), phi0
        )
        if n_x < n_tasks:
            g_f = vm(run_fom, idx_f)
            _tmap(lambda out, g: out.index_copy_(0, idx_f, g), per_task, g_f)
            info.grad_evals += steps * (n_tasks - n_x)
            info.outer_grad_evals += n_tasks - n_x
        if n_x > 0:
            g_x, g_xf = vm(run_exact, idx_x)
            _tmap(
                lambda out, e, f: out.index_copy_(0, idx_x, f + (e - f) / q_val),
                per_task,
                g_x,
                g_xf,
            )
            add_counts(n_x)
            info.exact_used, info.exact_tasks = True, n_x
            info.g_exact, info.g_fom = g_x, g_xf
    mean = _tmap(lambda t: t.mean(0), per_task)
    if check_finite:
        _check_finite(f"the {method} hypergradient", mean)
    if controller is not None:
        controller.observe(info)
    return (mean, info) if return_info else mean
