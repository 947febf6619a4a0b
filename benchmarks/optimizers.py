"""Benchmark of the stochastic Givens optimizers (issue 4) against torch SGD, geoopt and parametrizations.

Part 1, step cost: one optimizer step with the gradient given, square d×d and tall n×k weights, against
torch.optim.SGD (the floor), geoopt RiemannianSGD/RiemannianAdam (EuclideanStiefel and CanonicalStiefel)
and torch's orthogonal parametrization + SGD (forward of the weight + backward + SGD step).

Part 2, time to target: wall clock and steps until a relative suboptimality target on
- Procrustes (nearest orthogonal matrix): f(X) = ½‖X − A‖² over SO(d), A = U diag(s) Vᵀ, s ∈ [0.5, 1];
- minibatch orthogonal regression: y = Q* x + noise, batch 32, fresh data each step, square d;
- Brockett / top-k eigenspace: f(X) = −tr(XᵀAXN) over St(n, k).
Every problem is scaled so that the Riemannian Hessian has norm ≈ 1, so one learning rate per method
family serves all sizes (listed in the output). The clock runs only during optimizer work (gradient +
step); evaluations of the metric are excluded. Same seeds for every method.

    python benchmarks/optimizers.py --quick      # < 2 min, docs/benchmarks/optimizers.quick.md
    python benchmarks/optimizers.py              # full, docs/benchmarks/optimizers.md + PNG
"""

from __future__ import annotations

import argparse
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import geoopt
import networkx as nx
import torch

from _harness import DOCS, env_header, markdown_table, median_time, write_doc
from orthotorch.optim import OrthogonalAdam, OrthogonalSGD

warnings.filterwarnings("ignore", category=UserWarning)
DTYPE = torch.float32


def _orth(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    q = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))[0]
    if torch.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q[:, :k].contiguous().to(DTYPE)


# ====================================================================================================
# Part 1: step cost


def _step_fns(n: int, k: int) -> dict[str, Callable[[], None] | None]:
    gen = torch.Generator().manual_seed(0)
    x0 = _orth(n, k, gen)
    g = 1e-3 * torch.randn(n, k, generator=gen, dtype=DTYPE)
    fns: dict[str, Callable[[], None] | None] = {}

    def plain(opt_factory):
        p = torch.nn.Parameter(x0.clone())
        p.grad = g.clone()
        opt = opt_factory([p])
        return opt.step

    def ours(cls, **kw):
        p = torch.nn.Parameter(x0.clone())
        p.grad = g.clone()
        opt = cls([{"params": [p], "manifold": "stiefel"}], **kw)
        return opt.step

    def geo(manifold, cls, **kw):
        p = geoopt.ManifoldParameter(x0.clone(), manifold=manifold)
        p.grad = g.clone()
        opt = cls([p], **kw)

        def step():
            p.grad.copy_(g)  # geoopt adds weight decay to the gradient in place
            opt.step()

        return step

    def param_sgd():
        lin = torch.nn.Linear(k, n, bias=False)
        omap = "cayley" if n == k else "householder"
        torch.nn.utils.parametrizations.orthogonal(lin, "weight", orthogonal_map=omap)
        opt = torch.optim.SGD(lin.parameters(), lr=1e-3)

        def step():
            opt.zero_grad(set_to_none=False)
            lin.weight.backward(g)
            opt.step()

        return step

    fns["torch SGD"] = plain(lambda ps: torch.optim.SGD(ps, lr=1e-3))
    fns["torch SGD μ=0.9"] = plain(lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9))
    fns["ours random m=1"] = ours(OrthogonalSGD, lr=1e-3, matchings_per_step=1)
    fns["ours random m=1 μ=0.9"] = ours(OrthogonalSGD, lr=1e-3, momentum=0.9, matchings_per_step=1)
    fns["ours random m=16"] = ours(OrthogonalSGD, lr=1e-3, matchings_per_step=16)
    fns["ours random m=16 μ=0.9"] = ours(
        OrthogonalSGD, lr=1e-3, momentum=0.9, matchings_per_step=16
    )
    fns["ours greedy m=1"] = ours(OrthogonalSGD, lr=1e-3, sampler="greedy", matchings_per_step=1)
    fns["ours Adam random m=1"] = ours(OrthogonalAdam, lr=1e-3, matchings_per_step=1)
    fns["geoopt RSGD Euclidean"] = geo(
        geoopt.EuclideanStiefel(), geoopt.optim.RiemannianSGD, lr=1e-3
    )
    fns["geoopt RSGD Canonical"] = geo(
        geoopt.CanonicalStiefel(), geoopt.optim.RiemannianSGD, lr=1e-3
    )
    fns["geoopt RAdam Euclidean"] = geo(
        geoopt.EuclideanStiefel(), geoopt.optim.RiemannianAdam, lr=1e-3
    )
    fns["param (cayley/householder) + SGD"] = param_sgd()
    return fns


# how each method's cost grows when n doubles (to skip sizes predicted to take too long)
_GROWTH_SQUARE = {"greedy": 8, "geoopt": 8, "param": 8}


def step_cost(shapes: list[tuple[int, int]], max_seconds: float) -> tuple[str, dict]:
    """Median step times; a method whose previous square size predicts more than ``max_seconds`` per step
    (cost × 8 per doubling for O(n³) methods, × 4 otherwise) is skipped; one slower than max_seconds/4
    is timed once."""
    rows, results = [], {}
    last: dict[str, float] = {}
    for n, k in shapes:
        fns = _step_fns(n, k)
        times: dict[str, float] = {}
        for name, fn in fns.items():
            growth = next((v for key, v in _GROWTH_SQUARE.items() if key in name), 4)
            prev = last.get(name) if n == k else None
            if prev is not None and prev * growth > max_seconds:
                times[name] = float("nan")
                last[name] = prev * growth
                continue
            t0 = time.perf_counter()
            fn()
            once = time.perf_counter() - t0
            if once > max_seconds / 4:
                t = once
            else:
                t = median_time(fn, repeats=5 if once < 0.05 else 3, warmup=1, min_time=0.05)
            times[name] = t
            if n == k:
                last[name] = t
        base = times["torch SGD"]
        geo = [t for m, t in times.items() if m.startswith("geoopt") and t == t]
        geo_best = min(geo) if geo else float("nan")
        for name, t in times.items():
            rows.append([f"{n}×{k}", name, t * 1e3, t / base, geo_best / t])
        results[(n, k)] = times
        print(
            f"  step cost {n}×{k}: " + ", ".join(f"{m}={t * 1e3:.2f}ms" for m, t in times.items())
        )
    table = markdown_table(
        ["shape", "method", "ms/step", "× torch SGD", "fastest geoopt ÷ this"], rows
    )
    return table, results


# ====================================================================================================
# Part 2: time to target


@dataclass
class Problem:
    name: str
    n: int
    k: int
    x0: torch.Tensor
    loss: Callable[[torch.Tensor], torch.Tensor]  # differentiable training loss (may sample data)
    metric: Callable[[torch.Tensor], float]  # relative suboptimality in [0, 1] (1 at x0)
    target: float
    budget: float  # seconds of optimizer clock
    square: bool


def procrustes(d: int, budget: float, target: float) -> Problem:
    gen = torch.Generator().manual_seed(100 + d)
    u, v = _orth(d, d, gen), _orth(d, d, gen)
    s = torch.linspace(0.5, 1.0, d, dtype=DTYPE)
    a = (u * s) @ v.mT
    f_star = -float(s.sum())
    x0 = _orth(d, d, gen)
    f0 = float(-(a * x0).sum())

    def loss(x):  # ½‖X − A‖² = const − tr(AᵀX) on the manifold
        return -(a * x).sum()

    def metric(x):
        return (float(-(a * x).sum()) - f_star) / (f0 - f_star)

    return Problem(f"Procrustes d={d}", d, d, x0, loss, metric, target, budget, True)


def regression(d: int, budget: float, target: float, batch: int = 32) -> Problem:
    gen = torch.Generator().manual_seed(200 + d)
    q_star = _orth(d, d, gen)
    x0 = _orth(d, d, gen)
    data = torch.Generator().manual_seed(300 + d)
    d0 = float(((x0 - q_star) ** 2).sum())

    def loss(x):
        inp = torch.randn(batch, d, generator=data, dtype=DTYPE)
        out = inp @ q_star.mT + 0.01 * torch.randn(batch, d, generator=data, dtype=DTYPE)
        return 0.5 * ((inp @ x.mT - out) ** 2).sum() / batch

    def metric(x):
        return float(((x - q_star) ** 2).sum()) / d0

    return Problem(f"regression d={d} B={batch}", d, d, x0, loss, metric, target, budget, True)


def brockett(n: int, k: int, budget: float, target: float) -> Problem:
    gen = torch.Generator().manual_seed(400 + n + k)
    q = _orth(n, n, gen)
    lam = torch.linspace(0.0, 1.0, n, dtype=DTYPE)
    a = (q * lam) @ q.mT
    nw = torch.linspace(1.0, 0.5, k, dtype=DTYPE)
    f_star = -float((lam.flip(0)[:k] * nw).sum())
    x0 = _orth(n, k, gen)

    def f(x):
        return -((x.mT @ a @ x).diagonal(dim1=-2, dim2=-1) * nw).sum() / 2

    f0 = float(f(x0))

    def metric(x):
        return (float(f(x)) - f_star / 2) / (f0 - f_star / 2)

    return Problem(f"Brockett n={n} k={k}", n, k, x0, f, metric, target, budget, False)


@dataclass
class Method:
    name: str
    build: Callable[
        [torch.Tensor, Problem], tuple[torch.Tensor, object, Callable[[], torch.Tensor]]
    ]
    family: str = "ours"
    when: Callable[[Problem], bool] = field(default=lambda pr: True)


def _ours(cls, **kw):
    def build(x0, pr):
        p = torch.nn.Parameter(x0.clone())
        kwargs = dict(kw)
        if kwargs.get("sampler") == "colouring":
            kwargs["graph"] = _graph(pr.n)
        opt = cls([{"params": [p], "manifold": "stiefel"}], nonfinite="ignore", **kwargs)
        return p, opt, lambda: p

    return build


def _graph(n: int) -> nx.Graph:
    """Sparse allowed-pair graph: a cycle plus two random perfect matchings (degree ≤ 4, ≤ 5 colours)."""
    g = nx.cycle_graph(n)
    gen = torch.Generator().manual_seed(n)
    for _ in range(2):
        perm = torch.randperm(n, generator=gen).tolist()
        g.add_edges_from(zip(perm[0::2], perm[1::2]))
    g.remove_edges_from(nx.selfloop_edges(g))
    return g


def _geo(manifold_cls, opt_cls, **kw):
    def build(x0, pr):
        p = geoopt.ManifoldParameter(x0.clone(), manifold=manifold_cls())
        opt = opt_cls([p], **kw)
        return p, opt, lambda: p

    return build


def _param_adam(lr):
    def build(x0, pr):
        lin = torch.nn.Linear(pr.k, pr.n, bias=False)
        omap = "cayley" if pr.square else "householder"
        torch.nn.utils.parametrizations.orthogonal(lin, "weight", orthogonal_map=omap)
        with torch.no_grad():
            lin.weight = x0.clone()
        opt = torch.optim.Adam(lin.parameters(), lr=lr)
        return None, opt, lambda: lin.weight

    return build


LR_SGD, LR_MOM, LR_ADAM = 0.5, 0.05, 0.02


def methods(quick: bool) -> list[Method]:
    """The configurations compared; the quick run keeps a representative subset."""
    out: list[Method] = []

    def ours(name, cls=OrthogonalSGD, when=None, **kw):
        out.append(Method(name, _ours(cls, **kw), when=when or (lambda pr: True)))

    if quick:
        for m in (1, 16):
            ours(f"ours random m={m}", lr=LR_SGD, matchings_per_step=m)
        ours("ours round_robin m=16", lr=LR_SGD, sampler="round_robin", matchings_per_step=16)
        ours("ours greedy m=4", lr=LR_SGD, sampler="greedy", matchings_per_step=4)
        ours("ours colouring m=4", lr=LR_SGD, sampler="colouring", matchings_per_step=4)
        ours("ours full sweep", lr=LR_SGD, sampler="full")
        ours("ours random m=16 μ=0.9", lr=LR_MOM, momentum=0.9, matchings_per_step=16)
        ours("ours Adam random m=16", OrthogonalAdam, lr=LR_ADAM, matchings_per_step=16)
    else:
        for sampler in ("random", "round_robin", "greedy"):
            for m in (1, 4, 16):
                ours(f"ours {sampler} m={m}", lr=LR_SGD, sampler=sampler, matchings_per_step=m)
        ours(
            "ours colouring m=4",
            lr=LR_SGD,
            sampler="colouring",
            matchings_per_step=4,
            when=lambda pr: pr.n <= 1024,
        )
        ours("ours full sweep", lr=LR_SGD, sampler="full")
        for m in (1, 4, 16):
            ours(f"ours random m={m} μ=0.9", lr=LR_MOM, momentum=0.9, matchings_per_step=m)
        ours(
            "ours round_robin m=16 μ=0.9",
            lr=LR_MOM,
            momentum=0.9,
            sampler="round_robin",
            matchings_per_step=16,
        )
        ours(
            "ours greedy m=4 μ=0.9", lr=LR_MOM, momentum=0.9, sampler="greedy", matchings_per_step=4
        )
        ours("ours Adam random m=16", OrthogonalAdam, lr=LR_ADAM, matchings_per_step=16)
        ours(
            "ours Adam greedy m=4",
            OrthogonalAdam,
            lr=LR_ADAM,
            sampler="greedy",
            matchings_per_step=4,
        )
    out.append(
        Method(
            "geoopt RSGD Euclidean μ=0.9",
            _geo(geoopt.EuclideanStiefel, geoopt.optim.RiemannianSGD, lr=LR_MOM, momentum=0.9),
            "baseline",
        )
    )
    if not quick:
        out.append(
            Method(
                "geoopt RSGD Canonical μ=0.9",
                _geo(geoopt.CanonicalStiefel, geoopt.optim.RiemannianSGD, lr=LR_MOM, momentum=0.9),
                "baseline",
            )
        )
    out.append(
        Method(
            "geoopt RAdam Euclidean",
            _geo(geoopt.EuclideanStiefel, geoopt.optim.RiemannianAdam, lr=LR_ADAM),
            "baseline",
        )
    )
    out.append(Method("param (cayley/householder) + Adam", _param_adam(LR_ADAM), "baseline"))
    return out


def run(method: Method, pr: Problem, max_evals: int = 150) -> dict:
    torch.manual_seed(0)  # baselines that touch the global RNG (none should) stay reproducible
    _, opt, weight = method.build(pr.x0, pr)
    clock, steps, curve = 0.0, 0, []
    hit_time = hit_steps = math.nan
    next_eval = 0.0
    value = pr.metric(weight().detach())
    curve.append((0.0, value))
    while clock < pr.budget:
        t0 = time.perf_counter()
        opt.zero_grad()
        pr.loss(weight()).backward()
        opt.step()
        clock += time.perf_counter() - t0
        steps += 1
        if clock >= next_eval or clock >= pr.budget:
            with torch.no_grad():
                value = pr.metric(weight().detach())
            curve.append((clock, value))
            next_eval = clock + pr.budget / max_evals
            if not math.isfinite(value):
                break
            if value <= pr.target and math.isnan(hit_time):
                hit_time, hit_steps = clock, steps
                break
    return {
        "time": hit_time,
        "steps": hit_steps,
        "final": value,
        "total_steps": steps,
        "ms_per_step": 1e3 * clock / max(steps, 1),
        "curve": curve,
    }


def time_to_target(problems: list[Problem], quick: bool) -> tuple[str, dict]:
    sections, results = [], {}
    for pr in problems:
        rows = []
        res_pr = {}
        for m in methods(quick):
            if not m.when(pr):
                continue
            r = run(m, pr)
            res_pr[m.name] = r
            rows.append(
                [
                    _rank(r),
                    m.name,
                    r["time"],
                    r["steps"] if r["steps"] == r["steps"] else "–",
                    r["final"] if math.isnan(r["time"]) else f"≤ {pr.target:g}",
                    r["ms_per_step"],
                ]
            )
            print(
                f"  {pr.name:28s} {m.name:36s} t={r['time']:.3g}s steps={r['steps']} "
                f"final={r['final']:.3g} ms/step={r['ms_per_step']:.3g}"
            )
        best = min(
            ((r["time"], name) for name, r in res_pr.items() if not math.isnan(r["time"])),
            default=(math.nan, "none"),
        )
        rows = [row[1:] for row in sorted(rows, key=lambda row: row[0])]
        table = markdown_table(
            ["method", "time to target (s)", "steps", "final metric", "ms/step"], rows
        )
        sections.append(
            f"### {pr.name}: target {pr.target:g} (budget {pr.budget:g} s); fastest: {best[1]}\n\n"
            + table
        )
        results[pr.name] = res_pr
    return "\n\n".join(sections), results


def _rank(r: dict) -> tuple[float, float]:
    """Order runs: those that reached the target by time, then the others by their final metric."""
    return (0.0, r["time"]) if r["time"] == r["time"] else (1.0, r["final"])


def plot(results: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names = list(results)
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4 * rows), squeeze=False)
    for ax, pname in zip(axes.flat, names):
        res = results[pname]
        ours = sorted((_rank(r), n) for n, r in res.items() if n.startswith("ours"))[:4]
        keep = {n for _, n in ours} | {n for n in res if not n.startswith("ours")}
        keep |= {"ours random m=1", "ours round_robin m=16"} & set(res)
        for name in sorted(keep):
            curve = res[name]["curve"]
            ts = [max(t, 1e-4) for t, _ in curve]
            vs = [max(v, 1e-8) for _, v in curve]
            style = "-" if name.startswith("ours") else "--"
            ax.plot(ts, vs, style, label=name, linewidth=1.2)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(pname)
        ax.set_xlabel("wall clock (s, optimizer work only)")
        ax.set_ylabel("relative suboptimality")
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fast run (< 2 min)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    quick = args.quick
    t_start = time.perf_counter()
    if quick:
        shapes = [(256, 256), (1024, 1024), (1024, 64)]
        problems = [
            procrustes(64, 0.5, 1e-3),
            procrustes(256, 1.5, 1e-3),
            regression(512, 2.5, 0.05),
        ]
        max_seconds = 0.5
    else:
        shapes = [(256, 256), (512, 512), (1024, 1024), (2048, 2048), (4096, 4096)]
        shapes += [(1024, 16), (4096, 64), (4096, 256)]
        problems = [
            procrustes(64, 1.5, 1e-3),
            procrustes(256, 3.0, 1e-3),
            procrustes(1024, 6.0, 1e-3),
            regression(512, 5.0, 0.05),
            regression(2048, 12.0, 0.05),
            brockett(1024, 16, 4.0, 1e-2),
            brockett(1024, 64, 4.0, 1e-2),
        ]
        max_seconds = 3.0
    print("== step cost")
    cost_table, cost = step_cost(shapes, max_seconds)
    print("== time to target")
    ttt_table, ttt = time_to_target(problems, quick)
    area = "optimizers"
    png = DOCS / (f"{area}.quick.png" if quick else f"{area}.png")
    DOCS.mkdir(parents=True, exist_ok=True)
    have_png = plot(ttt, png)
    headline = ""
    if (2048, 2048) in cost:
        c = cost[(2048, 2048)]
        geo = min(
            (v for name, v in c.items() if name.startswith("geoopt") and v == v), default=math.nan
        )
        ours = c["ours random m=1"]
        headline = (
            f"**Targets at d = 2048 (square, float32):** ours (random, m=1) = "
            f"{ours / c['torch SGD']:.2f}× torch SGD (target ≤ 5×); fastest geoopt ÷ ours = "
            f"{geo / ours:.0f}× (target ≥ 20×).\n\n"
        )
    body = (
        f"# Optimizers benchmark ({'quick' if quick else 'full'})\n\n"
        + env_header()
        + f"- command: `python benchmarks/optimizers.py{' --quick' if quick else ''}`"
        + (f" --threads {args.threads}" if args.threads else "")
        + f"; total run time {time.perf_counter() - t_start:.0f} s\n"
        f"- float32; learning rates (problems scaled to Riemannian Hessian norm ≈ 1, not tuned per size): "
        f"plain Givens SGD {LR_SGD}, momentum 0.9 variants and geoopt RSGD {LR_MOM}, Adam variants "
        f"{LR_ADAM}.\n\n"
        "## 1. Step cost (gradient given; median ms per optimizer step)\n\n"
        + headline
        + "`–`: skipped, predicted to exceed the per-call time cap. Parametrization: forward of the weight +"
        " backward of a given gradient + SGD step (cayley for square, householder for tall).\n\n"
        + cost_table
        + "\n\n## 2. Time to target (wall clock of gradient + step; metric evaluations excluded)\n\n"
        "Relative suboptimality: (f − f*)/(f(X₀) − f*) for Procrustes/Brockett, ‖X − Q*‖²/‖X₀ − Q*‖² for "
        "regression. Rows sorted: runs that reached the target by time, then the rest by the metric at the end of the budget. `–`: target not reached within the budget (final metric shown). Steps are counted at "
        "the evaluation that first saw the target (evaluations every budget/150 s).\n\n"
        + ttt_table
        + "\n"
        + (f"\n![loss vs wall clock]({png.name})\n" if have_png else "")
    )
    path = write_doc(area, body, quick=quick)
    print(body)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
