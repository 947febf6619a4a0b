"""``orthotorch bilevel``: exact vs FOM vs UFOM meta-learning demos (digits few-shot, sinusoids).

Writes a markdown results table and PNG figures to ``--out`` (default ``runs/bilevel``) and prints the
tables. Everything runs offline (the digits ship with scikit-learn, extra ``bilevel``). Every flag is
checked by argparse (one error line naming the flag, exit status 2); ``results.md`` is rewritten after
each finished experiment, so Ctrl-C (one line, exit status 130) keeps what was done.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from orthotorch.apps._argtypes import int_at_least, positive_real, real

__all__ = ["DESCRIPTION", "counterexample_table", "register", "results_table", "run"]

#: The subcommand's description in ``--help`` (plain text: argparse prints it as is).
DESCRIPTION = (
    "Exact vs FOM vs UFOM hypergradients on MAML-style meta-learning: few-shot digits (scikit-learn's "
    "8x8 images), sinusoid regression and a two-task problem where FOM converges to a non-stationary "
    "point. Writes results.md and PNG figures to --out and prints the tables. results.md is rewritten "
    "after each experiment; Ctrl-C stops with exit status 130 and keeps what was written."
)

#: Images of the smallest digit class (scikit-learn's digits: 174 of the digit 8). A task draws
#: ``shots + 15`` images of each class without replacement, so at most 159 shots.
_MIN_CLASS_IMAGES = 174
_QUERIES = 15
MAX_SHOTS = _MIN_CLASS_IMAGES - _QUERIES


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
    """Markdown table of a :class:`~orthotorch.apps.bilevel.experiments.CounterexampleResult`.

    (No ``|`` inside a cell: it would end the cell. Absolute values are written ``abs(...)``.)
    """
    rows = []
    for m in res.final:
        th, gn = res.final[m], res.grad_norm[m]
        rows.append([m, f"{sum(th) / len(th):.4f}", f"{max(gn):.2e}", f"{sum(gn) / len(gn):.2e}"])
    head = ["method", "final θ (mean over seeds)", "max abs F'(θ)", "mean abs F'(θ)"]
    return (
        f"θ* = {res.theta_star:.4f} (stationary), FOM fixed point θ_F = {res.theta_fom_fixed_point:.4f}"
        "\n\n" + _table(head, rows)
    )


# --------------------------------------------------------------------------------------------------
# argparse types: each raises ArgumentTypeError, which argparse prints as
# "orthotorch bilevel: error: argument --flag: <message>" and exits with status 2


def _q_arg(text: str) -> str:
    if text == "adaptive":
        return text
    try:
        val = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a probability in (0, 1] or 'adaptive', got {text!r}"
        ) from None
    if not (0.0 < val <= 1.0):  # also rejects nan
        raise argparse.ArgumentTypeError(f"must lie in (0, 1], got {text}")
    return text


def _out_dir(text: str) -> Path:
    """A directory that exists and is writable, or can be created (checked without creating it)."""
    if not text:
        raise argparse.ArgumentTypeError("expected a directory, got an empty path")
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} exists and is not a directory")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise argparse.ArgumentTypeError(f"cannot create {text}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot write to {text}: {existing} is not writable")
    return path


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show every default, except ``None`` defaults whose help says what happens instead."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None:
            return action.help or ""
        return super()._get_help_string(action) or ""


def register(subparsers: Any) -> None:
    """Add the ``bilevel`` subcommand to the ``orthotorch`` command's subparsers."""
    p = subparsers.add_parser(
        "bilevel",
        help="exact vs FOM vs UFOM hypergradients: few-shot digits, sinusoids, FOM counterexample",
        description=DESCRIPTION,
        formatter_class=_HelpFormatter,
    )
    p.add_argument(
        "--task",
        choices=["digits", "sinusoid", "counterexample", "all"],
        default="all",
        help="which experiment to run",
    )
    p.add_argument(
        "--shots",
        type=int_at_least(1, MAX_SHOTS),
        nargs="+",
        default=[1, 5],
        help=f"digits: support images per class (5-way), each in 1..{MAX_SHOTS}",
    )
    p.add_argument("--steps", type=int_at_least(0), default=10, help="digits: inner SGD steps r")
    p.add_argument("--inner-lr", type=real(0.0), default=0.1, help="digits: inner step α")
    p.add_argument(
        "--class-split",
        choices=["random", "digit"],
        default="random",
        help="digits: meta-train/meta-test split of the classes (random halves, or held-out digits)",
    )
    p.add_argument(
        "--iterations",
        type=int_at_least(1),
        default=None,
        help="exact's meta-iterations; the other methods get a compute budget relative to exact's "
        "(default: 100, or 40 with --quick)",
    )
    p.add_argument(
        "--q", type=_q_arg, default="0.1", help="UFOM probability in (0, 1], or 'adaptive'"
    )
    p.add_argument(
        "--coin",
        nargs="+",
        choices=["task", "batch"],
        default=["task", "batch"],
        help="digits: UFOM variants, a coin per task and/or one per meta-batch",
    )
    p.add_argument(
        "--budget-fraction",
        type=positive_real,
        default=0.5,
        help="compute budget of UFOM and FOM as a fraction of exact's (finite, > 0)",
    )
    p.add_argument("--seed", type=int_at_least(0), default=0, help="seed of models and tasks")
    p.add_argument(
        "--threads", type=int_at_least(0), default=0, help="torch threads (0: leave as is)"
    )
    p.add_argument(
        "--out",
        type=_out_dir,
        default="runs/bilevel",
        help="output directory for results.md and the PNG figures (created if missing)",
    )
    p.add_argument("--quick", action="store_true", help="a short smoke run")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=run)


# --------------------------------------------------------------------------------------------------


class _Report:
    """``results.md`` in ``out``, rewritten after every finished section."""

    def __init__(self, out: Path) -> None:
        self.path = out / "results.md"
        self.lines = ["# orthotorch bilevel results", ""]
        self.figure = ""  # the results figure, linked after the sections once it exists

    def add(self, head: str, text: str) -> None:
        print(f"\n{head}\n\n{text}", flush=True)
        self.lines += [head, "", text, ""]
        self.write()

    def write(self, note: str = "") -> None:
        extra = [f"![results]({self.figure})", ""] if self.figure else []
        extra += [note, ""] if note else []
        self.path.write_text("\n".join(self.lines + extra) + "\n")


def _fail(message: str) -> int:
    print(f"orthotorch bilevel: error: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    """Run the experiments selected by ``args`` (see ``orthotorch bilevel --help``).

    Returns 0, 2 if ``--out`` cannot be written, 130 on Ctrl-C (after writing what was done).
    """
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        report = _Report(out)
        report.write("(running)")
    except OSError as exc:
        return _fail(f"argument --out: cannot write to {out}: {exc.strerror or exc}")
    t0 = time.perf_counter()
    try:
        _run_sections(args, out, report)
    except KeyboardInterrupt:
        report.write("(interrupted: the sections above are complete, the rest did not run)")
        print(f"\ninterrupted: partial results in {report.path}", file=sys.stderr, flush=True)
        return 130
    report.write()
    print(f"\nwrote {report.path} in {time.perf_counter() - t0:.0f} s")
    return 0


def _run_sections(args: argparse.Namespace, out: Path, report: _Report) -> None:
    import torch

    from orthotorch.apps.bilevel import experiments as ex  # imports scikit-learn lazily

    if args.threads:
        torch.set_num_threads(args.threads)
    quick = args.quick
    iters = args.iterations if args.iterations is not None else (40 if quick else 100)
    evals = 200 if quick else 300
    q: float | str = args.q if args.q == "adaptive" else float(args.q)
    progress = not args.no_progress
    tasks = ["digits", "sinusoid", "counterexample"] if args.task == "all" else [args.task]
    panels: list[Any] = []

    def figure() -> None:
        try:
            ex.plot_results(panels, str(out / "bilevel.png"))
            report.figure = "bilevel.png"
        except ImportError as exc:
            print(f"(no plot: {exc})")

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
            panels.append(ex.Panel(f"digits 5-way {shots}-shot", "test accuracy %", res))
            figure()
            head = (
                f"## digits 5-way {shots}-shot (r = {args.steps}, α = {args.inner_lr}, "
                f"{args.class_split} class split)"
            )
            report.add(head, results_table(res, "test accuracy % (95% CI)"))
    if "sinusoid" in tasks:
        res = ex.sinusoid_experiment(
            exact_iterations=iters,
            ufom_q=q,
            ufom_budget_fraction=args.budget_fraction,
            eval_tasks=evals,
            seed=args.seed,
            progress=progress,
        )
        panels.append(ex.Panel("sinusoid 10-shot", "query MSE", res, log_x=True))
        figure()
        report.add(
            "## sinusoid regression, 10-shot (r = 5)", results_table(res, "query MSE (95% CI)")
        )
    if "counterexample" in tasks:
        res_c = ex.fom_counterexample(
            sgd_steps=300 if quick else 1000, seeds=(0, 1, 2), progress=progress
        )
        text = counterexample_table(res_c)
        try:
            ex.plot_counterexample(res_c, str(out / "bilevel_counterexample.png"))
            text += "\n\n![trajectories](bilevel_counterexample.png)"
        except ImportError as exc:
            print(f"(no plot: {exc})")
        report.add("## FOM counterexample (two tasks, SGD with one task per step)", text)
