"""Bilevel benchmark: memory/time vs inner steps r, the FOM counterexample, digits few-shot.

Writes docs/benchmarks/bilevel.md (``--quick``: bilevel.quick.md) and PNGs next to it.

1. Peak extra RSS and time of one hypergradient on a digits MAML task (64-64-64-5 tanh MLP,
   5-way 1-shot, 75 query images) for r in {10, 100, 1000}: full back-propagation through the loop
   (``method="unrolled"``, what learn2learn/higher do), our exact recursion with recomputed iterates
   (default √r checkpoints), FOM and UFOM (q = 0.1; time is the mean over draws, memory the peak over
   draws including at least one exact draw). Each configuration runs in a fresh process.
2. A two-task problem where SGD on FOM hypergradients converges to a non-stationary point of the
   meta-objective while UFOM and exact SGD reach the stationary point.
3. Digits 5-way 1-shot (and 5-shot in full mode) and sinusoid regression: exact vs UFOM and FOM at
   50% of exact's compute (and FOM at 100%).
"""

from __future__ import annotations

import argparse
import sys
import textwrap
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import DOCS, env_header, markdown_table, peak_rss_mb, write_doc

MEM_CODE = textwrap.dedent(
    """
    import resource, statistics, time, torch
    import torch.nn.functional as F
    torch.set_num_threads(1)
    from orthotorch.bilevel import hypergradient, module_params
    from orthotorch.apps.bilevel.tasks import DigitsFewShot, digits_mlp
    METHOD, R, REPEATS = {method!r}, {r}, {repeats}
    gen = torch.Generator().manual_seed(0)
    model = digits_mlp(64, 5, generator=gen)
    xs, ys, xq, yq = DigitsFewShot("train").sample(1, ways=5, shots=1, queries=15, generator=gen)
    xs, ys, xq, yq = xs[0], ys[0], xq[0], yq[0]
    fc = torch.func.functional_call
    inner = lambda p: F.cross_entropy(fc(model, p, (xs,)), ys)
    outer = lambda p: F.cross_entropy(fc(model, p, (xq,)), yq)
    theta = module_params(model)
    kw = dict(q=0.1, generator=torch.Generator().manual_seed(3)) if METHOD == "ufom" else {{}}
    hypergradient(inner, outer, theta, steps=2, lr=0.1, method=METHOD, **kw)   # warm-up
    if METHOD == "ufom":
        hypergradient(inner, outer, theta, steps=2, lr=0.1, method="exact")
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    times, exact_draws, n, stored = [], 0, 0, 0
    while n < REPEATS or (METHOD == "ufom" and exact_draws == 0):
        t0 = time.perf_counter()
        _, info = hypergradient(inner, outer, theta, steps=R, lr=0.1, method=METHOD,
                                return_info=True, **kw)
        times.append(time.perf_counter() - t0)
        exact_draws += int(info.exact_used)
        stored = max(stored, info.max_stored_iterates)
        n += 1
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    _result = dict(time_s=statistics.mean(times) if METHOD == "ufom" else statistics.median(times),
                   extra_mb=peak - base, draws=n, exact_draws=exact_draws,
                   stored=stored, grad_evals=info.grad_evals,
                   hvp_evals=info.hvp_evals)
    """
)


def memory_section(rs: list[int], quick: bool) -> str:
    rows = []
    for r in rs:
        base: dict[str, float] = {}
        for method in ("unrolled", "exact", "fom", "ufom"):
            repeats = 1 if (r >= 1000 or quick) else 3
            if method == "ufom":
                repeats = max(repeats, 10 if r < 1000 else 4)
            t0 = time.perf_counter()
            res = peak_rss_mb(
                MEM_CODE.format(method=method, r=r, repeats=repeats), env={"OMP_NUM_THREADS": "1"}
            )
            if method == "unrolled":
                base = res
            rows.append(
                [
                    r,
                    method,
                    res["extra_mb"],
                    res["time_s"],
                    res["time_s"] / base["time_s"],
                    res["extra_mb"] / max(base["extra_mb"], 1e-9),
                    res["stored"] if method in ("exact", "ufom") else "–",
                    f"{res['exact_draws']}/{res['draws']}" if method == "ufom" else "–",
                ]
            )
            print(
                f"  r={r:5d} {method:9s} {res['extra_mb']:8.1f} MB {res['time_s']:.3f} s "
                f"({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
    table = markdown_table(
        [
            "r",
            "method",
            "peak extra RSS (MB)",
            "time / hypergradient (s)",
            "time vs unrolled",
            "memory vs unrolled",
            "stored iterates",
            "UFOM exact draws",
        ],
        rows,
    )
    return (
        "## 1. Peak memory and time vs inner steps r\n\n"
        "One digits MAML task (64-64-64-5 tanh MLP, 5-way 1-shot, 75 query images, float32, "
        "α = 0.1), one thread, fresh process per row. *peak extra RSS* = peak resident set size "
        "after the call minus before it (after a warm-up). `unrolled` is full back-propagation "
        "through the loop (learn2learn/higher-style MAML); `exact` is our recursion "
        "v ← (I − αH_j)v with iterates recomputed from ⌈√r⌉-spaced checkpoints; UFOM uses q = 0.1 "
        "(time: mean over draws; memory: peak over draws that include an exact one).\n\n" + table
    )


def counterexample_section(quick: bool) -> str:
    from orthotorch.apps.bilevel.cli import counterexample_table
    from orthotorch.apps.bilevel.experiments import fom_counterexample, plot_counterexample

    res = fom_counterexample(sgd_steps=400 if quick else 1500, seeds=(0, 1, 2))
    png = ""
    name = "bilevel_counterexample.quick.png" if quick else "bilevel_counterexample.png"
    try:
        plot_counterexample(res, str(DOCS / name))
        png = f"\n\n![trajectories: mean of 3 seeds with a 95% band]({name})"
    except ImportError:
        pass
    return (
        "## 2. FOM converges to a non-stationary point; UFOM does not\n\n"
        "Two tasks, r = 5 inner steps, α = 0.1. Task 1: L_in = 0, L_out = ½(φ − 1)². Task 2: "
        "L_in = ½aφ² with (1 − αa)^5 = 0.1, L_out = ½(φ + 1)². Meta-objective F(θ) = mean over tasks "
        "of L_out(φ_r(θ)); its gradient is F'(θ) = ½Σ s_i(s_iθ − b_i) with s = (1, 0.1), b = (1, −1). "
        "The FOM direction ½Σ(s_iθ − b_i) vanishes at θ_F = 0 where |F'| = 0.45. SGD from θ = 2, "
        "one uniformly drawn task per step, step size 0.5/(1 + t/100), 3 seeds, UFOM q = 0.2; "
        "final θ = average of the last half of the iterates. The figure shows θ against the step: "
        "mean over the 3 seeds with a 95% t-interval band.\n\n" + counterexample_table(res) + png
    )


def fewshot_section(quick: bool) -> str:
    from orthotorch.apps.bilevel.cli import results_table
    from orthotorch.apps.bilevel.experiments import (
        Panel,
        digits_experiment,
        plot_results,
        sinusoid_experiment,
    )

    iters = 60 if quick else 400
    evals = 200 if quick else 1000
    parts, panels = [], []
    for shots in (1,) if quick else (1, 5):
        t0 = time.perf_counter()
        res = digits_experiment(
            shots=shots, exact_iterations=iters, eval_tasks=evals, ufom_coins=("task", "batch")
        )
        print(f"  digits {shots}-shot: {time.perf_counter() - t0:.0f} s", flush=True)
        parts.append(
            f"### digits 5-way {shots}-shot\n\n"
            + results_table(res, "meta-test accuracy % (95% CI)")
        )
        panels.append(Panel(f"digits 5-way {shots}-shot", "meta-test accuracy %", res))
    if not quick:
        t0 = time.perf_counter()
        res = sinusoid_experiment(exact_iterations=200, eval_tasks=evals)
        print(f"  sinusoid: {time.perf_counter() - t0:.0f} s", flush=True)
        parts.append(
            "### sinusoid regression, 10-shot\n\n" + results_table(res, "query MSE (95% CI)")
        )
        panels.append(Panel("sinusoid 10-shot", "query MSE", res, log_x=True))
    name = "bilevel_fewshot.quick.png" if quick else "bilevel_fewshot.png"
    try:
        plot_results(panels, str(DOCS / name))
        parts.append(
            f"![final metric of every run with its 95% confidence interval over test tasks]({name})"
        )
    except ImportError:
        pass
    return (
        "## 3. Few-shot learning at equal compute\n\n"
        "Exact runs a fixed number of meta-iterations (Adam 1e-3, meta-batch 16; digits: r = 10, "
        "α = 0.1; sinusoid: r = 5, α = 0.02); its compute C is counted in gradient evaluations "
        "(an HVP counts 2). UFOM "
        "(q = 0.1; a coin per task, and for digits also one coin per meta-batch) and FOM then "
        "train until they have spent 0.5·C; FOM also at 1.0·C. *train s* is wall-clock time. Same "
        "initialisation and task stream for every run. Digits classes are (digit, symmetry of the "
        "square) pairs, 80 in all, split at random 40/40 into meta-train and meta-test. Accuracy "
        "after r inner steps on the support set, "
        "mean over test tasks with a 95% confidence half-width. The figure shows each run's final "
        "metric with that interval (one colour per method in every panel; the sinusoid MSE on a log "
        "axis).\n\n" + "\n\n".join(parts)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fast run, writes bilevel.quick.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    DOCS.mkdir(parents=True, exist_ok=True)
    rs = [10, 100] if args.quick else [10, 100, 1000]
    sections = [
        memory_section(rs, args.quick),
        counterexample_section(args.quick),
        fewshot_section(args.quick),
    ]
    body = (
        "# Bilevel benchmark (`orthotorch.bilevel`)\n\n"
        + env_header()
        + f"- command: `python benchmarks/bilevel.py{' --quick' if args.quick else ''}`, "
        f"{time.perf_counter() - t0:.0f} s\n\n" + "\n\n".join(sections) + "\n"
    )
    path = write_doc("bilevel", body, quick=args.quick)
    print(body)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
