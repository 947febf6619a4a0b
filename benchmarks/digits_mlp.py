"""Small networks (issue 12 §4): a scikit-learn digits MLP with one orthogonal hidden layer.

The MLP ``64 → d → d → 10`` (tanh) keeps its hidden ``d × d`` weight orthogonal; the input and output
layers and the biases are unconstrained. Each method trains it on the same minibatch stream (batch 32,
one seeded permutation per epoch) from the same initialisation for ``--steps`` steps, evaluating the test
accuracy every ``--eval-every`` steps.

The machine this runs on may be shared and loaded, so progress and cost are measured apart: progress in
steps (deterministic for a seed), cost as the time of one training step (zero_grad, forward, backward,
optimizer step) of every method timed in alternation in the same run (``_harness.interleaved_times``,
median of per-round ratios to ``torch.optim.Adam``). Time to the target accuracy is then
``steps to target × step time``; reported relative to Adam's. "acc at equal time": the test accuracy
each method reaches in the wall-clock time Adam needs for the whole step budget.

Per method: a learning-rate grid on seed 0 (best = fewest steps to the target, misses ranked by final
accuracy), then every seed at that lr. Methods: ``torch.optim.Adam`` (hidden weight free, orthogonal
init); ``OrthogonalAdam`` with ``matchings_per_step`` from ``--matchings`` (one lr for the whole model:
the drop-in use); ``OrthogonalSGD(momentum=0.9)`` (one lr); geoopt ``RiemannianAdam`` with the hidden
weight a ``ManifoldParameter`` on ``EuclideanStiefel`` — geoopt keeps one scalar second moment per
matrix, so its best lr for that weight is 0.1–10, not Adam's 1e-3: it gets its own grid up to 10 while the
other parameters use the best lr of the Adam grid of the same run.

Writes docs/benchmarks/digits_mlp.md (``--quick``: docs/benchmarks/digits_mlp.quick.md). One torch thread
by default: on a loaded 2-core machine a second OpenMP thread costs every method far more than it gains.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import env_header, fmt, interleaved_times, markdown_table, median_ratio, write_doc
from orthotorch.optim import OrthogonalAdam, OrthogonalSGD

BATCH = 32
ADAM = "torch Adam (unconstrained)"


def load_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Digits (shipped with scikit-learn, no download): a fixed stratified 80/20 split, standardised
    with the training statistics."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:  # pragma: no cover - optional dependency
        raise SystemExit(
            "benchmarks/digits_mlp.py needs scikit-learn (pip install scikit-learn)"
        ) from exc
    data = load_digits()
    xtr, xte, ytr, yte = train_test_split(
        data.data, data.target, test_size=0.2, stratify=data.target, random_state=0
    )
    xtr_t = torch.tensor(xtr, dtype=torch.float32)
    xte_t = torch.tensor(xte, dtype=torch.float32)
    mean, std = xtr_t.mean(0), xtr_t.std(0).clamp_min(1e-3)
    return (
        (xtr_t - mean) / std,
        torch.tensor(ytr, dtype=torch.int64),
        (xte_t - mean) / std,
        torch.tensor(yte, dtype=torch.int64),
    )


class MLP(nn.Module):
    """64 → d → d → 10 with tanh; ``hidden`` is the d × d weight kept orthogonal."""

    def __init__(self, d: int, seed: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.inp, self.hidden, self.out = nn.Linear(64, d), nn.Linear(d, d), nn.Linear(d, 10)
        with torch.no_grad():
            for layer in (self.inp, self.hidden, self.out):
                bound = 1 / math.sqrt(layer.in_features)
                layer.weight.uniform_(-bound, bound, generator=gen)
                layer.bias.uniform_(-bound, bound, generator=gen)
            q = torch.linalg.qr(torch.randn(d, d, generator=gen))[0]
            self.hidden.weight.copy_(q)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.hidden(torch.tanh(self.inp(x)))))

    def rest(self) -> list[torch.Tensor]:
        return [p for name, p in self.named_parameters() if name != "hidden.weight"]


@dataclass
class Method:
    name: str
    make: Callable[
        [MLP, float, float], torch.optim.Optimizer
    ]  # (model, lr, lr of the Adam grid's best)
    grid: list[float]


def _geoopt_adam(model: MLP, lr: float, lr_rest: float) -> torch.optim.Optimizer:
    import geoopt

    w = geoopt.ManifoldParameter(
        model.hidden.weight.data.clone(), manifold=geoopt.EuclideanStiefel()
    )
    model.hidden.weight = w
    return geoopt.optim.RiemannianAdam(
        [{"params": [w], "lr": lr}, {"params": model.rest(), "lr": lr_rest}], lr=lr_rest
    )


def methods(matchings: list[int], quick: bool) -> list[Method]:
    adam_grid = [1e-3, 3e-3, 1e-2, 3e-2] if quick else [3e-4, 1e-3, 3e-3, 1e-2, 3e-2]
    oadam_grid = [3e-3, 1e-2, 3e-2] if quick else [1e-3, 3e-3, 1e-2, 3e-2, 1e-1]
    out = [
        Method(
            "torch Adam (unconstrained)",
            lambda m, lr, _: torch.optim.Adam(m.parameters(), lr),
            adam_grid,
        )
    ]
    for mps in matchings:
        out.append(
            Method(
                f"OrthogonalAdam m={mps}",
                lambda m, lr, _, mps=mps: OrthogonalAdam(
                    [{"params": [m.hidden.weight], "manifold": "orthogonal"}, {"params": m.rest()}],
                    lr=lr,
                    matchings_per_step=mps,
                ),
                oadam_grid,
            )
        )
    out.append(
        Method(
            "OrthogonalSGD μ=0.9 m=16",
            lambda m, lr, _: OrthogonalSGD(
                [{"params": [m.hidden.weight], "manifold": "orthogonal"}, {"params": m.rest()}],
                lr=lr,
                momentum=0.9,
            ),
            [3e-2, 0.1, 0.3] if quick else [1e-2, 3e-2, 0.1, 0.3],
        )
    )
    out.append(
        Method(
            "geoopt RiemannianAdam (EuclideanStiefel)",
            _geoopt_adam,
            [0.1, 1.0, 10.0] if quick else [0.03, 0.1, 0.3, 1.0, 3.0, 10.0],
        )
    )
    return out


@dataclass
class Run:
    curve: list[tuple[int, float]]  # (steps done, test accuracy) every eval_every steps
    steps_to_target: float  # nan: not reached within the step budget
    orth_err: float  # ‖WᵀW − I‖_F of the hidden weight at the end

    def acc_at(self, steps: float) -> float:
        """Test accuracy at the last evaluation within ``steps`` steps (0 before the first)."""
        done = [acc for s, acc in self.curve if s <= steps]
        return done[-1] if done else 0.0


class Trainer:
    """One model + optimizer on the shared minibatch stream of a seed; ``step()`` is one training step
    (zero_grad, forward, backward, optimizer step)."""

    def __init__(self, method: Method, lr: float, lr_rest: float, d: int, seed: int, data) -> None:
        self.xtr, self.ytr, self.xte, self.yte = data
        self.model = MLP(d, seed)
        self.opt = method.make(self.model, lr, lr_rest)
        self.loss_fn = nn.CrossEntropyLoss()
        self.stream = torch.Generator().manual_seed(
            1000 + seed
        )  # the same batches for every method
        self.perm, self.pos = torch.randperm(len(self.xtr), generator=self.stream), 0
        self.loss = torch.zeros(())

    def step(self) -> None:
        if self.pos + BATCH > len(self.perm):
            self.perm, self.pos = torch.randperm(len(self.xtr), generator=self.stream), 0
        idx = self.perm[self.pos : self.pos + BATCH]
        self.pos += BATCH
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.model(self.xtr[idx]), self.ytr[idx])
        loss.backward()
        self.opt.step()
        self.loss = loss.detach()

    def accuracy(self) -> float:
        with torch.no_grad():
            return float((self.model(self.xte).argmax(-1) == self.yte).float().mean())


def train(
    method: Method, lr: float, lr_rest: float, d: int, seed: int, data, steps: int, target: float,
    eval_every: int,
) -> Run:  # fmt: skip
    tr = Trainer(method, lr, lr_rest, d, seed, data)
    curve: list[tuple[int, float]] = []
    reached = math.nan
    for done in range(eval_every, steps + 1, eval_every):
        for _ in range(eval_every):
            tr.step()
        acc = tr.accuracy() if math.isfinite(float(tr.loss)) else 0.0
        curve.append((done, acc))
        if acc >= target and math.isnan(reached):
            reached = float(done)
        if acc == 0.0:
            break  # diverged
    w = tr.model.hidden.weight.detach()
    return Run(curve, reached, float((w.mT @ w - torch.eye(d)).norm()))


def step_costs(
    chosen: dict[str, tuple[Method, float]], lr_rest: float, d: int, data, repeats: int
) -> dict[str, list[float]]:
    """Seconds per training step of each method at its chosen lr, timed in alternation (steady state:
    after 20 warm-up steps), so that every method sees the same machine load."""
    fns = {}
    for name, (method, lr) in chosen.items():
        tr = Trainer(method, lr, lr_rest, d, 0, data)
        for _ in range(20):
            tr.step()
        fns[name] = tr.step
    return interleaved_times(fns, repeats=repeats, min_time=0.05)


def _score(r: Run) -> tuple[float, float]:
    """Lower is better: steps to target, then (for misses) minus the final accuracy."""
    final = r.curve[-1][1] if r.curve else 0.0
    return (r.steps_to_target if math.isfinite(r.steps_to_target) else math.inf, -final)


def bench_width(d: int, args: argparse.Namespace, data) -> tuple[list[list[object]], list[str]]:
    rows: list[list[object]] = []
    notes: list[str] = []
    results: dict[str, tuple[Method, float, list[Run], str]] = {}
    lr_rest = 3e-3
    for method in methods(args.matchings, args.quick):
        if args.methods and method.name != ADAM and not any(w in method.name for w in args.methods):
            continue  # Adam always runs: it is the reference of every ratio
        grid = {
            lr: train(method, lr, lr_rest, d, 0, data, args.steps, args.target, args.eval_every)
            for lr in method.grid
        }
        best = min(grid, key=lambda lr: _score(grid[lr]))
        edge = " (grid edge)" if best in (method.grid[0], method.grid[-1]) else ""
        runs = [grid[best]] + [
            train(method, best, lr_rest, d, s, data, args.steps, args.target, args.eval_every)
            for s in range(1, args.seeds)
        ]
        results[method.name] = (method, best, runs, edge)
        grid_line = ", ".join(
            f"{lr:g}: {fmt(r.steps_to_target)} / {r.curve[-1][1]:.3f}" for lr, r in grid.items()
        )
        notes.append(
            f"- d = {d}, {method.name} (seed 0; steps to target / final accuracy): {grid_line}"
        )
        print(notes[-1], flush=True)
        if method.name == ADAM:
            lr_rest = best  # geoopt's unconstrained parameters use the best Adam lr
    costs = step_costs(
        {name: (m, best) for name, (m, best, _, _) in results.items()}, lr_rest, d, data,
        args.repeats,
    )  # fmt: skip
    adam_steps = statistics.mean(r.steps_to_target for r in results[ADAM][2])
    adam_ms = statistics.median(costs[ADAM]) * 1e3
    for name, (_, best, runs, edge) in results.items():
        ratio = median_ratio(costs, name, ADAM)
        ttt = [r.steps_to_target for r in runs]
        mean_steps = statistics.mean(ttt) if all(math.isfinite(t) for t in ttt) else math.nan
        # equal wall clock: the time Adam needs for the whole step budget
        affordable = args.steps / ratio
        rows.append(
            [
                f"d={d}: {name}",
                f"{best:g}{edge}" + (" (rest: Adam's lr)" if name.startswith("geoopt") else ""),
                " / ".join(fmt(t) for t in ttt),
                statistics.median(costs[name]) * 1e3,
                ratio,
                mean_steps * ratio / adam_steps,
                " / ".join(f"{r.acc_at(affordable):.3f}" for r in runs),
                max(r.orth_err for r in runs),
            ]
        )
        print(" | ".join(fmt(c) if isinstance(c, float) else str(c) for c in rows[-1]), flush=True)
    notes.append(f"- d = {d}: torch Adam step {adam_ms:.3g} ms (median, interleaved)")
    return rows, notes


def _procrustes(d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(d, d, generator=gen))[0]
    a = torch.randn(d, d, generator=gen) / math.sqrt(d)
    x0 = torch.linalg.qr(torch.randn(d, d, generator=gen))[0].contiguous()
    return x0, a, q @ a


_FAMILIES: dict[str, tuple[Callable[..., torch.optim.Optimizer], list[float]]] = {
    "OrthogonalSGD": (OrthogonalSGD, [0.25, 0.5]),
    "OrthogonalAdam": (OrthogonalAdam, [3e-3, 1e-2, 3e-2]),
}


def _procrustes_step(
    family: str, x0: torch.Tensor, a: torch.Tensor, b: torch.Tensor, lr: float, m: int
) -> Callable[[], float]:
    """One training step (returns the loss before it) of a fresh optimizer on ``‖XA − B‖²``."""
    p = nn.Parameter(x0.clone())
    opt = _FAMILIES[family][0](
        [{"params": [p], "manifold": "orthogonal"}], lr=lr, matchings_per_step=m
    )

    def step() -> float:
        opt.zero_grad()
        loss = ((p @ a - b) ** 2).sum()
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step


def bench_contrast(ds: list[int], repeats: int, max_steps: int = 3000) -> list[list[object]]:
    """The contrast case: Procrustes min ‖XA − B‖² over O(d) with exact gradients, where the constrained
    weight is the whole problem. Steps to 1e-3 of the initial loss for m = 4, 8, 16 (best lr of a small
    grid), times the step cost (interleaved)."""
    rows: list[list[object]] = []
    for d in ds:
        x0, a, b = _procrustes(d)
        f0 = float(((x0 @ a - b) ** 2).sum())
        chosen: dict[tuple[str, int], tuple[float, float]] = {}
        for family, (_, grid) in _FAMILIES.items():
            for m in (4, 8, 16):
                best = (math.inf, grid[0])
                for lr in grid:
                    step = _procrustes_step(family, x0, a, b, lr, m)
                    for s in range(1, max_steps + 1):
                        if step() / f0 < 1e-3:
                            best = min(best, (float(s), lr))
                            break
                chosen[(family, m)] = best
        fns = {
            f"{family} m={m}": _procrustes_step(family, x0, a, b, lr, m)
            for (family, m), (_, lr) in chosen.items()
        }
        costs = interleaved_times(fns, repeats=repeats, min_time=0.05)
        for (family, m), (steps, lr) in chosen.items():
            ms = statistics.median(costs[f"{family} m={m}"]) * 1e3
            steps = steps if math.isfinite(steps) else math.nan  # "–": not reached
            rows.append([f"d={d}: {family} m={m}", f"{lr:g}", steps, ms, steps * ms])
            print(
                " | ".join(fmt(c) if isinstance(c, float) else str(c) for c in rows[-1]), flush=True
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="d = 64 only, short budget, small grids")
    ap.add_argument("--d", type=int, nargs="+", default=None, help="hidden widths (default 64 256)")
    ap.add_argument("--steps", type=int, default=None, help="training steps per run (budget)")
    ap.add_argument("--repeats", type=int, default=7, help="rounds of the interleaved step timing")
    ap.add_argument("--seeds", type=int, default=2, help="seeds at the chosen lr (grid on seed 0)")
    ap.add_argument("--target", type=float, default=0.95, help="test accuracy target")
    ap.add_argument("--eval-every", type=int, default=5, help="steps between test evaluations")
    ap.add_argument(
        "--matchings", type=int, nargs="+", default=[1, 4, 16], help="OrthogonalAdam's m values"
    )
    ap.add_argument(
        "--methods", nargs="+", default=None, help="only methods whose name contains one of these"
    )
    ap.add_argument(
        "--contrast",
        action="store_true",
        help="instead: the contrast case, Procrustes over O(d) with m = 4, 8, 16 (a few minutes)",
    )
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    args = ap.parse_args(argv)
    if min(args.seeds, args.eval_every, args.repeats, args.steps or 1) < 1:
        ap.error("--seeds, --eval-every, --repeats and --steps must be >= 1")
    torch.set_num_threads(args.threads)
    widths = args.d or ([64] if args.quick else [64, 256])
    if args.steps is None:
        args.steps = 200 if args.quick else 400
    if args.contrast:
        crows = bench_contrast(widths, args.repeats)
        ctable = markdown_table(
            ["width: method", "lr", "steps to 1e-3", "step ms", "time to 1e-3 (ms)"], crows
        )
        print(ctable)
        body = (
            "# Contrast to the digits MLP: Procrustes over O(d)\n\n"
            f"Produced by `python benchmarks/digits_mlp.py --contrast` (widths {widths}). "
            "min ‖XA − B‖² with exact gradients (the constrained weight is the whole problem): steps to "
            "1e-3 of the initial loss (3000 at most; best lr of the grid), step times interleaved in the "
            "same run.\n\n" + env_header() + "\n" + ctable + "\n"
        )
        print(f"\nwritten: {write_doc('digits_mlp_contrast', body, quick=args.quick)}")
        return 0
    data = load_data()
    print(env_header(["scikit-learn"]))
    rows, notes = [], []
    for d in widths:
        r, n = bench_width(d, args, data)
        rows += r
        notes += n
    headers = [
        "width: method",
        "lr",
        f"steps to {args.target:.0%}, per seed",
        "step ms",
        "step / Adam's",
        f"time to {args.target:.0%} / Adam's",
        "test acc at equal time, per seed",
        "max ‖WᵀW − I‖",
    ]
    table = markdown_table(headers, rows)
    print()
    print(table)
    cmd = "python benchmarks/digits_mlp.py" + (" --quick" if args.quick else "")
    body = (
        "# Digits MLP with one orthogonal hidden layer\n\n"
        f"Produced by `{cmd}` (widths {widths}, {args.steps} steps per run, {args.seeds} seeds, "
        f"target {args.target:.0%} test accuracy, batch {BATCH}). See the script's docstring for the "
        "protocol: steps are deterministic, step times are interleaved within the run and only their "
        "ratios are meaningful.\n\n"
        + env_header(["scikit-learn"])
        + "\n"
        + table
        + "\n\nLearning-rate grids:\n\n"
        + "\n".join(notes)
        + "\n"
    )
    path = write_doc("digits_mlp", body, quick=args.quick)
    print(f"\nwritten: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
