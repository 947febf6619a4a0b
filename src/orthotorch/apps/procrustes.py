"""``orthotorch demo procrustes``: learn a hidden rotation from minibatches: ours vs geoopt vs torch's parametrization.

Orthogonal regression (the problem of ``benchmarks/optimizers.py``): data ``y = Q* x + 0.01·noise`` with a hidden ``Q* ∈ SO(d)``; each step draws a fresh
minibatch and takes one optimizer step on ``½ Σ_b ‖W x_b − y_b‖² / batch``. Every method gets the same wall-clock budget
on the same data stream; the demo prints the distance to ``Q*`` over time, the orthogonality error
``‖WᵀW − I‖_F`` and the time each method needed to reach the target distance.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from orthotorch._numerics import det_sign
from orthotorch.apps._argtypes import int_at_least, positive_real
from orthotorch.optim import OrthogonalSGD

__all__ = ["DemoResult", "register", "run_demo"]


@dataclass
class DemoResult:
    """Outcome of one method in the demo: trace of ``(seconds, relative distance)`` and summary figures."""

    name: str
    steps: int = 0
    seconds: float = 0.0
    time_to_target: float | None = None
    final_distance: float = math.nan
    orth_error: float = math.nan
    trace: list[tuple[float, float]] = field(default_factory=list)


def _problem(d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(d, d, generator=gen))[0]
    if det_sign(q) < 0:
        q[:, 0] = -q[:, 0]
    w0 = torch.linalg.qr(torch.randn(d, d, generator=gen))[0]
    if det_sign(w0) < 0:  # same component as Q*: Givens rotations keep det +1
        w0[:, 0] = -w0[:, 0]
    return q, w0


def _run(
    name: str,
    setup: Callable[[torch.Tensor], tuple[Callable[[], torch.Tensor], torch.optim.Optimizer]],
    q: torch.Tensor,
    w0: torch.Tensor,
    *,
    batch: int,
    noise: float,
    seconds: float,
    target: float,
    seed: int,
) -> DemoResult:
    d = q.shape[0]
    weight, opt = setup(w0.clone())
    gen = torch.Generator().manual_seed(seed + 1)
    d0 = float((w0 - q).norm() ** 2)
    res = DemoResult(name)
    elapsed, next_eval = 0.0, 0.0
    while elapsed < seconds:
        t0 = time.perf_counter()
        x = torch.randn(batch, d, generator=gen)
        y = x @ q.T + noise * torch.randn(batch, d, generator=gen)
        w = weight()  # a parametrization recomputes the weight here, inside the timed step
        loss = 0.5 * ((x @ w.T - y) ** 2).sum() / batch
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        elapsed += time.perf_counter() - t0  # evaluation below is not timed
        res.steps += 1
        if elapsed >= next_eval or elapsed >= seconds:
            with torch.no_grad():
                dist = float((weight() - q).norm() ** 2) / d0
            res.trace.append((elapsed, dist))
            if res.time_to_target is None and dist <= target:
                res.time_to_target = elapsed
            next_eval = elapsed + seconds / 20
    with torch.no_grad():
        w = weight()
        res.final_distance = float((w - q).norm() ** 2) / d0
        eye = torch.eye(d, dtype=w.dtype)
        res.orth_error = float((w.T @ w - eye).norm())
    res.seconds = elapsed
    return res


def _plain(w0: torch.Tensor) -> torch.nn.Parameter:
    return torch.nn.Parameter(w0)


def _geoopt_param(w0: torch.Tensor) -> torch.nn.Parameter:
    import geoopt

    return geoopt.ManifoldParameter(w0, manifold=geoopt.EuclideanStiefel())


def _torch_parametrized(w0: torch.Tensor) -> torch.nn.Module:
    from torch.nn.utils.parametrizations import orthogonal

    layer = torch.nn.Linear(w0.shape[1], w0.shape[0], bias=False)
    orthogonal(layer, "weight", orthogonal_map="cayley")
    layer.weight = w0  # right_inverse: start from the same point as the others
    return layer


def run_demo(
    d: int = 1024,
    *,
    seconds: float = 8.0,
    batch: int = 32,
    noise: float = 0.01,
    target: float = 0.2,
    seed: int = 0,
    printer: Callable[[str], None] = print,
) -> list[DemoResult]:
    """Run every method for ``seconds`` of wall clock on the same ``d × d`` problem and print a report.

    Returns the :class:`DemoResult` of each method. Learning rates are the ones
    ``benchmarks/optimizers.py`` uses (momentum 0.9 variants 0.05, Adam 0.02; not tuned per ``d``).
    """
    import geoopt

    q, w0 = _problem(d, seed)

    # The gradient of the regression loss is ≈ 2(W − Q*) at batch ≫ 1: step sizes are O(1) in d.
    def ours(w0: torch.Tensor):
        p = _plain(w0)
        return (lambda: p), OrthogonalSGD(
            [{"params": [p], "manifold": "so"}], lr=0.05, momentum=0.9
        )

    def riemannian(w0: torch.Tensor):
        p = _geoopt_param(w0)
        return (lambda: p), geoopt.optim.RiemannianSGD([p], lr=0.005, momentum=0.9)

    def parametrized(w0: torch.Tensor):
        layer = _torch_parametrized(w0)
        return (lambda: layer.weight), torch.optim.Adam(layer.parameters(), lr=0.02)

    methods = {
        "orthotorch OrthogonalSGD (defaults: round_robin, 16 matchings; momentum 0.9)": ours,
        "geoopt RiemannianSGD (EuclideanStiefel, momentum 0.9)": riemannian,
        "torch parametrizations.orthogonal (cayley) + Adam": parametrized,
    }
    printer(
        f"orthotorch demo: recover a hidden rotation Q* ∈ SO({d}) from minibatches of {batch} "
        f"(y = Q* x + {noise}·noise)\n"
        f"each method: {seconds:g} s of wall clock, fresh data every step, torch threads "
        f"{torch.get_num_threads()}; distance = ‖W − Q*‖² / ‖W₀ − Q*‖², target {target:g}\n"
    )
    results = []
    for name, make in methods.items():
        res = _run(
            name, make, q, w0, batch=batch, noise=noise, seconds=seconds, target=target, seed=seed
        )
        results.append(res)
        marks = "  ".join(
            f"{t:4.1f}s:{dist:.3f}" for t, dist in res.trace[:: max(1, len(res.trace) // 6)]
        )
        printer(f"{name}\n    distance over time  {marks}")
    printer("")
    header = (
        f"{'method':<76} {'steps':>7} {'ms/step':>8} {'t→target':>9} {'distance':>9} {'‖WᵀW−I‖':>9}"
    )
    printer(header)
    printer("-" * len(header))
    for r in results:
        ttt = f"{r.time_to_target:.2f}s" if r.time_to_target is not None else "not hit"
        printer(
            f"{r.name:<76} {r.steps:>7} {1e3 * r.seconds / max(r.steps, 1):>8.2f} {ttt:>9} "
            f"{r.final_distance:>9.4f} {r.orth_error:>9.1e}"
        )
    return results


def _cmd_demo(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        run_demo(args.dim, seconds=args.seconds, batch=args.batch, seed=args.seed)
    except KeyboardInterrupt:
        print("interrupted: the methods that finished are printed above", file=sys.stderr)
        return 130
    return 0


def register(subparsers: argparse._SubParsersAction, name: str = "procrustes") -> None:
    """Add the rotation-recovery demo as subcommand ``name`` (``orthotorch demo procrustes``)."""
    p = subparsers.add_parser(
        name,
        help="recover a hidden rotation: orthotorch vs geoopt vs torch parametrization",
        description="Recover a hidden rotation from minibatches: orthotorch vs geoopt vs torch's parametrization.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--dim", type=int_at_least(2), default=1024, help="matrix size d")
    p.add_argument(
        "--seconds", type=positive_real, default=8.0, help="wall-clock budget per method"
    )
    p.add_argument("--batch", type=int_at_least(1), default=32, help="minibatch size")
    p.add_argument(
        "--seed", type=int_at_least(0), default=0, help="seed of the problem and the data"
    )
    p.add_argument("--threads", type=int_at_least(1), default=None, help="torch.set_num_threads")
    p.set_defaults(func=_cmd_demo)
