"""Orthogonal RNNs on long-memory tasks: per-step overhead, constraint share, copying / adding / digits.

Sections (run one with its flag, or ``--quick`` for a small version of the timing sections and a short
copying race that prints the tables within a few minutes):

- ``--overhead``: forward+backward ms per time step vs ``torch.nn.RNN`` (C++ loop), hidden 190 and 1024,
  batch 128.
- ``--share``: the constraint's share of one training iteration at hidden 1024, T = 200 (parametrization
  forward+backward, or the Givens optimizer's extra cost over torch Adam), for every method.
- ``--demo-grid``: the learning-rate grid of the three demo models (copying T = 200, hidden 128), by loss
  after a fixed number of iterations (independent of machine load); its best lrs are the demo's.
- ``--copying``: the expRNN protocol (T = 1000, hidden 190, batch 128) for every method and lr of its grid;
  resumable in chunks (``--chunk-seconds``), logs under ``runs/bench/copying``; ``--report`` tabulates.
- ``--adding`` (T = 750) and ``--digits`` (pixel and permuted) likewise.

Without a section flag: ``--overhead --share --demo-grid``.

Every timing should run alone: ``flock /tmp/orthotorch-bench.lock nice -n 10 python benchmarks/rnn.py ...``.
Results: docs/benchmarks/rnn.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from orthotorch.apps.rnn import (
    RunConfig,
    _Data,
    _loss_acc,
    baseline,
    build_model,
    build_optimizer,
    plot_logs,
    train,
)
from orthotorch.nn import OrthogonalRNN
from orthotorch.nn import recurrence as rec

ROOT = Path(__file__).resolve().parents[1]
LOGS = ROOT / "docs" / "benchmarks" / "rnn_logs"

#: method → config overrides (hidden, task, T come from the section).
METHODS: dict[str, dict[str, object]] = {
    "givens+OrthogonalAdam": {"constraint": "givens", "optimizer": "orthogonal_adam"},
    "givens+OrthogonalSGD(m=0.9)": {"constraint": "givens", "optimizer": "orthogonal_sgd"},
    "cwy+RMSprop": {"constraint": "cwy", "optimizer": "rmsprop"},
    "cwy+Adam": {"constraint": "cwy", "optimizer": "adam"},
    "matrix_exp+RMSprop (expRNN)": {"constraint": "matrix_exp", "optimizer": "rmsprop"},
    "geoopt RiemannianAdam": {"constraint": "givens", "optimizer": "riemannian_adam"},
    "unconstrained RNN+Adam": {"constraint": "none", "optimizer": "adam"},
    "LSTM+Adam": {"model": "lstm", "optimizer": "adam"},
    # expRNN's copying recipe (its copytask.py: lr 2e-4, recurrent lr 2e-5, RMSprop, kaiming input map);
    # for Givens, every one of the d − 1 round-robin matchings per step (≈ 1 ms at d = 190).
    "matrix_exp+RMSprop (expRNN recipe)": {
        "constraint": "matrix_exp",
        "optimizer": "rmsprop",
        "input_init": "kaiming",
        "lr_orth_divisor": 10,
    },
    "givens(full)+OrthogonalAdam (expRNN recipe)": {
        "constraint": "givens",
        "optimizer": "orthogonal_adam",
        "sampler": "full",
        "input_init": "kaiming",
        "lr_orth_divisor": 10,
    },
}
#: lr grids (recurrent and other parameters share the lr unless the method sets ``lr_orth_divisor``).
GRIDS: dict[str, tuple[float, ...]] = {
    "givens+OrthogonalAdam": (3e-4, 1e-3, 3e-3),
    "givens+OrthogonalSGD(m=0.9)": (3e-3, 1e-2, 3e-2),
    "cwy+RMSprop": (1e-4, 3e-4, 1e-3),
    "cwy+Adam": (3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1),
    "matrix_exp+RMSprop (expRNN)": (1e-4, 3e-4, 1e-3),
    "geoopt RiemannianAdam": (3e-4, 1e-3, 3e-3),
    "unconstrained RNN+Adam": (3e-4, 1e-3, 3e-3),
    "LSTM+Adam": (3e-4, 1e-3, 3e-3, 1e-2, 3e-2),
    "matrix_exp+RMSprop (expRNN recipe)": (1e-4, 2e-4, 5e-4),
    "givens(full)+OrthogonalAdam (expRNN recipe)": (1e-4, 2e-4, 5e-4),
}


def _overrides(name: str) -> tuple[dict[str, object], float]:
    """``(RunConfig overrides, lr / lr_orth)`` of method ``name``."""
    over = dict(METHODS[name])
    divisor = float(over.pop("lr_orth_divisor", 1.0))  # type: ignore[arg-type]
    return over, divisor


DEMO = ("givens+OrthogonalAdam", "cwy+Adam", "LSTM+Adam")


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_").lower()


def _median_time(fn, repeats: int) -> float:
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


# ----------------------------------------------------------------------------------------------------
# timing sections


def overhead(hiddens=(190, 1024), T=100, batch=128, repeats=3) -> list[dict[str, object]]:
    """fwd+bwd ms per step of each model vs torch.nn.RNN(tanh) in the same run."""
    rows = []
    for H in hiddens:
        steps = T if H < 512 else max(10, T // 5)
        x = torch.randn(steps, batch, 10, generator=torch.Generator().manual_seed(0))

        def run(model, x=x):
            def f():
                out, _ = model(x)
                out.sum().backward()

            return f

        torch.manual_seed(0)
        ref = torch.nn.RNN(10, H)
        t_ref = _median_time(run(ref), repeats)
        models = {
            "torch.nn.RNN tanh": ref,
            "OrthogonalRNN tanh, givens": OrthogonalRNN(10, H, nonlinearity="tanh"),
            "OrthogonalRNN modrelu, givens": OrthogonalRNN(10, H),
            "OrthogonalRNN modrelu, cwy": OrthogonalRNN(10, H, constraint="cwy"),
            "OrthogonalRNN modrelu, matrix_exp": OrthogonalRNN(10, H, constraint="matrix_exp"),
            "OrthogonalRNN modrelu, python loop (reference)": None,
        }
        for name, model in models.items():
            if model is None:
                model = OrthogonalRNN(10, H)
                fast = rec._Recurrence.apply

                def slow(xp, h0, w, b, mask, on):
                    return rec.reference_recurrence(
                        xp, h0, w, "modrelu" if on else "identity", b, mask
                    )

                rec._Recurrence.apply = slow  # type: ignore[method-assign]
                try:
                    t = _median_time(run(model), repeats)
                finally:
                    rec._Recurrence.apply = fast  # type: ignore[method-assign]
            else:
                t = t_ref if model is ref else _median_time(run(model), repeats)
            rows.append(
                {
                    "hidden": H,
                    "T": steps,
                    "model": name,
                    "ms_per_step": 1e3 * t / steps,
                    "vs_torch": t / t_ref,
                }
            )
            print(
                f"  hidden {H:5d} T {steps:4d}  {name:<48} {1e3 * t / steps:8.3f} ms/step  {t / t_ref:5.2f}× nn.RNN",
                flush=True,
            )
    return rows


def share(H=1024, T=200, batch=128, repeats=2) -> list[dict[str, object]]:
    """Constraint time / iteration time at hidden H for every method (same run)."""
    rows = []
    gen = torch.Generator().manual_seed(0)
    for name in (
        "givens+OrthogonalAdam",
        "givens+OrthogonalSGD(m=0.9)",
        "cwy+Adam",
        "matrix_exp+RMSprop (expRNN)",
        "cayley+Adam",
        "geoopt RiemannianAdam",
    ):
        over = METHODS.get(name, {"constraint": "cayley", "optimizer": "adam"})
        cfg = RunConfig(task="copying", T=T, hidden=H, batch=batch, lr=1e-3, threads=None, **over)  # type: ignore[arg-type]
        model = build_model(cfg, gen)
        opt = build_optimizer(cfg, model)
        data = _Data(cfg, torch.Generator().manual_seed(1))
        x, y = data.batch()

        def iteration(model=model, x=x, y=y, cfg=cfg, opt=opt):
            out = model(x)
            loss, _ = _loss_acc(cfg, out, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        t_it = _median_time(iteration, repeats)
        cell = model.rnn.cells[0]
        if cfg.constraint == "givens":
            # the constraint's cost is the optimizer's extra over torch Adam on the same weight
            w = cell._parameters["weight_hh"]
            w.grad = torch.randn(w.shape, generator=gen) * 1e-3
            o_c = opt.__class__([w], lr=1e-6)
            plain = torch.nn.Parameter(w.detach().clone())
            plain.grad = w.grad.clone()
            o_p = torch.optim.Adam([plain], lr=1e-6)
            t_c = max(
                0.0, _median_time(o_c.step, 5 * repeats) - _median_time(o_p.step, 5 * repeats)
            )
        else:
            g = torch.randn(H, H, generator=gen)

            def constraint(cell=cell, g=g):
                w = cell.weight_hh
                torch.autograd.backward(w, g)

            t_c = _median_time(constraint, repeats)
        rows.append(
            {
                "method": name,
                "hidden": H,
                "T": T,
                "iteration_s": t_it,
                "constraint_s": t_c,
                "share": t_c / t_it,
            }
        )
        print(
            f"  {name:<32} iteration {t_it:7.3f} s  constraint {1e3 * t_c:8.1f} ms  share {100 * t_c / t_it:5.1f}%",
            flush=True,
        )
    return rows


# ----------------------------------------------------------------------------------------------------
# training sections


def race(
    task: str,
    T: int,
    hidden: int,
    methods,
    grids,
    steps: int,
    chunk_seconds: float | None,
    root: Path,
):
    """Train every (method, lr) for ``steps`` iterations, resuming where a previous call stopped.

    With ``chunk_seconds`` the chunk's time is shared equally by the unfinished runs (round robin over
    calls), so every method advances in each chunk. Returns True when every run is complete.
    """
    pending = []
    for name in methods:
        for lr in grids[name]:
            out = root / f"{_slug(name)}_lr{lr:g}"
            done = 0
            if (out / "checkpoint.pt").exists():
                done = int(torch.load(out / "checkpoint.pt", weights_only=False)["iteration"])
            if done < steps:
                pending.append((name, lr, out, done))
    if not pending:
        return True
    share_s = None if chunk_seconds is None else chunk_seconds / len(pending)
    complete = True
    for name, lr, out, done in pending:
        over, divisor = _overrides(name)
        cfg = RunConfig(
            task=task,
            T=T,
            hidden=hidden,
            batch=128,
            steps=steps,
            lr=lr,
            lr_orth=lr / divisor,
            seed=0,
            checkpoint_every=25,
            **over,
        )  # type: ignore[arg-type]
        print(
            f"  {name} lr {lr:g}: iterations {done} → {steps}"
            + ("" if share_s is None else f" (≤ {share_s:.0f} s now)"),
            flush=True,
        )
        t_stop = None if share_s is None else time.perf_counter() + share_s

        def progress(it, wall, loss, t_stop=t_stop):
            if t_stop is not None and time.perf_counter() > t_stop:
                raise KeyboardInterrupt  # a clean stop between iterations; train() checkpoints

        res = train(cfg, out, resume=done > 0, progress=progress)
        print(f"    → iteration {res.iterations}, loss {res.loss:.4g}", flush=True)
        complete = complete and res.iterations >= steps
    if not complete:
        print("chunk time used: rerun the same command to continue", flush=True)
    return complete


def report(
    task: str, T: int, methods, grids, root: Path, target: float | None = None
) -> list[dict[str, object]]:
    """One row per method: best lr by final loss (mean of the last 10% of logged iterations)."""
    rows = []
    base = baseline(RunConfig(task=task, T=T))
    for name in methods:
        best = None
        grid_summary = []
        for lr in grids[name]:
            log = root / f"{_slug(name)}_lr{lr:g}" / "log.jsonl"
            if not log.exists():
                continue
            recs = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
            if not recs:
                continue
            tail = recs[-max(1, len(recs) // 10) :]
            final = sum(r["loss"] for r in tail) / len(tail)
            acc = [r["accuracy"] for r in tail if r["accuracy"] is not None]
            below = next((r for r in recs if r["loss"] < base), None)
            hit = next((r for r in recs if target is not None and r["loss"] <= target), None)
            row = {
                "method": name,
                "lr": lr,
                "iterations": recs[-1]["iter"],
                "final_loss": final,
                "accuracy": sum(acc) / len(acc) if acc else None,
                "ms_per_iteration": 1e3 * recs[-1]["wall"] / recs[-1]["iter"],
                "first_below_baseline": below["iter"] if below else None,
                "first_at_target": hit["iter"] if hit else None,
                "orth_error": recs[-1]["orth_error"],
                "log": str(log.relative_to(ROOT)) if log.is_relative_to(ROOT) else str(log),
            }
            grid_summary.append(f"{lr:g}:{final:.4g}")
            if best is None or final < best["final_loss"]:
                best = row
        if best is not None:
            best["grid"] = " ".join(grid_summary)
            rows.append(best)
    print(f"\n{task} T={T}: baseline {base:.4g}")
    print(
        "| method | best lr (grid: lr:final loss) | iterations | final loss | accuracy | ms/it | first it < baseline | ‖WᵀW−I‖ |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        acc = "–" if r["accuracy"] is None else f"{r['accuracy']:.3f}"
        orth = "–" if r["orth_error"] is None else f"{r['orth_error']:.1e}"
        print(
            f"| {r['method']} | {r['lr']:g} ({r['grid']}) | {r['iterations']} | {r['final_loss']:.4g} | {acc} | {r['ms_per_iteration']:.0f} | {r['first_below_baseline'] or '–'} | {orth} |"
        )
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--quick", action="store_true", help="small timing sections + a short copying race"
    )
    p.add_argument("--overhead", action="store_true")
    p.add_argument("--share", action="store_true")
    p.add_argument("--demo-grid", action="store_true")
    p.add_argument("--copying", action="store_true")
    p.add_argument("--adding", action="store_true")
    p.add_argument("--digits", action="store_true")
    p.add_argument(
        "--report", action="store_true", help="tabulate the logs of the training sections"
    )
    p.add_argument("--methods", default=None, help="comma-separated subset of the methods")
    p.add_argument(
        "--steps", type=int, default=None, help="iterations per run (section default otherwise)"
    )
    p.add_argument(
        "--chunk-seconds",
        type=float,
        default=None,
        help="stop after this much time; rerun to resume",
    )
    p.add_argument(
        "--grid",
        choices=("full", "mid"),
        default="full",
        help="every lr of each grid, or only its middle one",
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--root", default=str(ROOT / "runs" / "bench"), help="run directories")
    args = p.parse_args(argv)
    if not any(
        (
            args.quick,
            args.overhead,
            args.share,
            args.demo_grid,
            args.copying,
            args.adding,
            args.digits,
        )
    ):
        # plain `python benchmarks/rnn.py` (make bench): the timing sections and the demo grid;
        # the long training sections are opt-in
        args.overhead = args.share = args.demo_grid = True
    torch.set_num_threads(args.threads)
    root = Path(args.root)
    methods = (
        list(METHODS) if args.methods is None else [m.strip() for m in args.methods.split(",")]
    )
    for m in methods:
        if m not in METHODS:
            p.error(f"--methods: unknown method {m!r}; choose from {list(METHODS)}")
    LOGS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    if args.quick:
        print(f"== quick ({stamp}, threads {args.threads})\n-- per-step overhead vs nn.RNN")
        overhead(T=40, repeats=2, hiddens=(190, 1024))
        print(
            "-- constraint share of an iteration, hidden 1024 (T = 20 here; the full section uses 200)"
        )
        share(T=20, repeats=1)
        print("-- copying T=100, hidden 64, 30 iterations per method at the middle lr of its grid")
        grids = {m: (GRIDS[m][1],) for m in methods}
        race("copying", 100, 64, methods, grids, args.steps or 30, None, root / "quick")
        report("copying", 100, methods, grids, root / "quick")
        return 0
    if args.overhead:
        rows = overhead()
        (LOGS / "overhead.json").write_text(
            json.dumps({"when": stamp, "threads": args.threads, "rows": rows}, indent=1) + "\n"
        )
    if args.share:
        rows = share()
        (LOGS / "share.json").write_text(
            json.dumps({"when": stamp, "threads": args.threads, "rows": rows}, indent=1) + "\n"
        )
    sections = []
    if args.demo_grid:
        sections.append(
            (
                "copying",
                200,
                128,
                [m for m in methods if m in DEMO] if args.methods else list(DEMO),
                args.steps or 150,
                "demo_grid",
                None,
            )
        )
    if args.copying:
        sections.append(("copying", 1000, 190, methods, args.steps or 4000, "copying", 1e-3))
    if args.adding:
        sections.append(("adding", 750, 128, methods, args.steps or 2000, "adding", 0.01))
    if args.digits:
        sections.append(("digits", 64, 128, methods, args.steps or 1000, "digits", None))
        sections.append(
            ("digits-permuted", 64, 128, methods, args.steps or 1000, "digits_permuted", None)
        )
    # "mid": the second lr of each grid (the grids' centres for the 3-point ones)
    grids = GRIDS if args.grid == "full" else {m: (g[1],) for m, g in GRIDS.items()}
    for task, T, hidden, ms, steps, name, target in sections:
        if not args.report:
            finished = race(task, T, hidden, ms, grids, steps, args.chunk_seconds, root / name)
            if not finished:
                return 0
        rows = report(task, T, ms, GRIDS, root / name, target)
        (LOGS / f"{name}.json").write_text(
            json.dumps(
                {"when": stamp, "task": task, "T": T, "hidden": hidden, "rows": rows}, indent=1
            )
            + "\n"
        )
        best_logs = [
            root / name / f"{_slug(r['method'])}_lr{r['lr']:g}" / "log.jsonl" for r in rows
        ]
        if best_logs:
            plot_logs(
                best_logs,
                ROOT / "docs" / "benchmarks" / f"rnn_{name}.png",
                labels=[f"{r['method']} lr {r['lr']:g}" for r in rows],
                baseline=baseline(RunConfig(task=task, T=T)),
                title=f"{task} T={T}, hidden {hidden}, best lr of each grid",
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
