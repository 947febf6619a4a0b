"""``orthotorch bilevel``: exact vs FOM vs UFOM meta-learning demos (digits few-shot, sinusoids).

Writes a markdown results table and PNG curves to ``--out`` (default ``runs/bilevel``) and prints the
tables. Everything runs offline (the digits ship with scikit-learn, extra ``bilevel``).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

__all__ = ["register", "run"]


def _fmt(x: float) -> str:
    if x != x:
        return "–"
    if abs(x) >= 1e4:
        return f"{x:.3g}"
    return f"{x:.4g}"


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[_fmt(c) if isinstance(c, float) else str(c) for c in r] for r in rows]
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join(out + ["| " + " | ".join(r) + " |" for r in cells])


def results_table(results: list[Any], metric: str) -> str:
    """Markdown table of :class:`~orthotorch.apps.bilevel.experiments.RunResult` rows."""
    ref = results[0].cost or 1.0
    rows = [
        [
            r.label,
            r.iterations,
            f"{r.cost:.3g}",
            f"{100 * r.cost / ref:.0f}%",
            f"{r.wall_s:.1f}",
            f"{r.metric:.2f} ± {r.ci:.2f}",
            "–" if r.q is None else f"{r.q:.3g}",
        ]
        for r in results
    ]
    return _table(
        ["method", "meta-iters", "compute (grad evals)", "vs exact", "train s", metric, "q"], rows
    )


def counterexample_table(res: Any) -> str:
    """Markdown table of a :class:`~orthotorch.apps.bilevel.experiments.CounterexampleResult`."""
    rows = []
    for m in res.final:
        th, gn = res.final[m], res.grad_norm[m]
        rows.append([m, f"{sum(th) / len(th):.4f}", f"{max(gn):.2e}", f"{sum(gn) / len(gn):.2e}"])
    return (
        f"θ* = {res.theta_star:.4f} (stationary), FOM fixed point θ_F = {res.theta_fom_fixed_point:.4f}"
        "\n\n"
        + _table(["method", "final θ (mean over seeds)", "max |F'(θ)|", "mean |F'(θ)|"], rows)
    )


def run(args: argparse.Namespace) -> int:
    """Run the experiments selected by ``args`` (see ``orthotorch bilevel --help``); return 0."""
    import torch

    from orthotorch.apps.bilevel import experiments as ex

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    quick = args.quick
    iters = args.iterations or (40 if quick else 100)
    evals = 200 if quick else 300
    q: float | str = args.q if args.q == "adaptive" else float(args.q)
    progress = not args.no_progress
    tasks = ["digits", "sinusoid", "counterexample"] if args.task == "all" else [args.task]
    md = ["# orthotorch bilevel results", ""]
    panels = []
    t0 = time.perf_counter()
    if "digits" in tasks:
        for shots in args.shots:
            res = ex.digits_experiment(
                shots=shots,
                steps=args.steps,
                inner_lr=args.inner_lr,
                exact_iterations=iters,
                ufom_q=q,
                ufom_budget_fraction=args.budget_fraction,
                eval_tasks=evals,
                class_split=args.class_split,
                ufom_coins=args.coin,
                seed=args.seed,
                progress=progress,
            )
            text = results_table(res, "test accuracy % (95% CI)")
            head = (
                f"## digits 5-way {shots}-shot (r = {args.steps}, α = {args.inner_lr}, "
                f"{args.class_split} class split)"
            )
            print(f"\n{head}\n\n{text}", flush=True)
            md += [head, "", text, ""]
            panels.append((f"digits 5-way {shots}-shot", "test accuracy %", res[:-1]))
    if "sinusoid" in tasks:
        res = ex.sinusoid_experiment(
            exact_iterations=iters,
            ufom_q=q,
            ufom_budget_fraction=args.budget_fraction,
            eval_tasks=evals,
            seed=args.seed,
            progress=progress,
        )
        text = results_table(res, "query MSE (95% CI)")
        head = "## sinusoid regression, 10-shot (r = 5)"
        print(f"\n{head}\n\n{text}", flush=True)
        md += [head, "", text, ""]
        panels.append(("sinusoid 10-shot", "query MSE", res))
    if "counterexample" in tasks:
        res_c = ex.fom_counterexample(
            sgd_steps=300 if quick else 1000, seeds=(0, 1, 2), progress=progress
        )
        text = counterexample_table(res_c)
        head = "## FOM counterexample (two tasks, SGD with one task per step)"
        print(f"\n{head}\n\n{text}", flush=True)
        md += [head, "", text, ""]
    if panels:
        try:
            ex.plot_curves(panels, str(out / "bilevel.png"))
            md.append("![curves](bilevel.png)")
        except ImportError as exc:
            print(f"(no plot: {exc})")
    (out / "results.md").write_text("\n".join(md) + "\n")
    print(f"\nwrote {out / 'results.md'} in {time.perf_counter() - t0:.0f} s")
    return 0


def _q_arg(text: str) -> str:
    if text == "adaptive":
        return text
    try:
        val = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--q must be a float in (0, 1] or 'adaptive', got {text!r}"
        ) from None
    if not (0.0 < val <= 1.0) or math.isnan(val):
        raise argparse.ArgumentTypeError(f"--q must lie in (0, 1], got {text}")
    return text


def register(subparsers: Any) -> None:
    """Add the ``bilevel`` subcommand to the ``orthotorch`` command's subparsers."""
    p = subparsers.add_parser(
        "bilevel",
        help="exact vs FOM vs UFOM hypergradients: few-shot digits, sinusoids, FOM counterexample",
        description=__doc__.splitlines()[0],
    )
    p.add_argument("--task", choices=["digits", "sinusoid", "counterexample", "all"], default="all")
    p.add_argument("--shots", type=int, nargs="+", default=[1, 5], help="digits shots (5-way)")
    p.add_argument("--steps", type=int, default=10, help="inner SGD steps r (digits)")
    p.add_argument("--inner-lr", type=float, default=0.1, help="inner step size α (digits)")
    p.add_argument(
        "--class-split",
        choices=["random", "digit"],
        default="random",
        help="digits meta-train/meta-test class split (see DigitsFewShot)",
    )
    p.add_argument(
        "--iterations",
        type=int,
        default=None,
        help="exact meta-iterations (others get a compute budget relative to it)",
    )
    p.add_argument("--q", type=_q_arg, default="0.1", help="UFOM probability or 'adaptive'")
    p.add_argument(
        "--coin",
        nargs="+",
        choices=["task", "batch"],
        default=["task", "batch"],
        help="UFOM variants (digits): a coin per task and/or one per meta-batch",
    )
    p.add_argument(
        "--budget-fraction",
        type=float,
        default=0.5,
        help="UFOM/FOM compute budget as a fraction of exact's",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.add_argument("--out", default="runs/bilevel", help="output folder for results.md and PNG")
    p.add_argument("--quick", action="store_true", help="a short smoke run")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=run)
