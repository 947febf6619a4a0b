"""Tests for the vectorised task form, the task samplers, the experiments and the CLI."""

from __future__ import annotations

import argparse
import math

import pytest
import torch
import torch.nn.functional as F

from orthotorch.apps.bilevel.tasks import DigitsFewShot, SinusoidTasks, digits_mlp, sinusoid_mlp
from orthotorch.bilevel import (
    UFOMController,
    batched_hypergradient,
    hypergradient_vmap,
    module_params,
)

D64 = torch.float64


def _regression_tasks(n_tasks=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    model = sinusoid_mlp(8, generator=g, dtype=D64)
    xs, ys, xq, yq = SinusoidTasks(dtype=D64).sample(n_tasks, shots=5, queries=7, generator=g)

    def loss(p, d):
        x, y = d
        return F.mse_loss(torch.func.functional_call(model, p, (x,)), y)

    closures = [
        ((lambda p, i=i: loss(p, (xs[i], ys[i]))), (lambda p, i=i: loss(p, (xq[i], yq[i]))))
        for i in range(n_tasks)
    ]
    return model, loss, (xs, ys), (xq, yq), closures


@pytest.mark.parametrize("method", ["exact", "fom", "unrolled"])
def test_vmap_matches_loop(method):
    model, loss, di, do, closures = _regression_tasks()
    theta = module_params(model)
    g_v, info = hypergradient_vmap(
        loss, theta, di, do, steps=4, lr=0.05, method=method, return_info=True
    )
    g_l = batched_hypergradient(closures, theta, steps=4, lr=0.05, method=method)
    for k in theta:
        assert (g_v[k] - g_l[k]).abs().max() <= 1e-12
    assert info.tasks == 6 and info.grad_evals >= 4 * 6
    if method == "exact":
        assert info.hvp_evals == 4 * 6 and info.exact_tasks == 6


def test_vmap_ufom_unbiased_and_cost():
    model, loss, di, do, _ = _regression_tasks(n_tasks=4, seed=1)
    theta = module_params(model)
    exact = hypergradient_vmap(loss, theta, di, do, steps=5, lr=0.1)
    fom = hypergradient_vmap(loss, theta, di, do, steps=5, lr=0.1, method="fom")
    gen = torch.Generator().manual_seed(0)
    n, q = 150, 0.5
    flat = []
    n_exact = 0
    for _ in range(n):
        g, info = hypergradient_vmap(
            loss,
            theta,
            di,
            do,
            steps=5,
            lr=0.1,
            method="ufom",
            q=q,
            generator=gen,
            return_info=True,
        )
        flat.append(torch.cat([g[k].flatten() for k in theta]))
        n_exact += info.exact_tasks
        assert info.hvp_evals == 5 * info.exact_tasks
    draws = torch.stack(flat)
    ex = torch.cat([exact[k].flatten() for k in theta])
    fo = torch.cat([fom[k].flatten() for k in theta])
    se = draws.std(0) / math.sqrt(n)
    mask = se > 1e-8 * (1 + ex.abs())  # coordinates where FOM and exact differ
    z = ((draws.mean(0) - ex) / se)[mask].abs()
    # with ~100 coordinates, max |z| of standard normals rarely exceeds 4.5
    assert z.max() < 4.5
    assert ((fo - ex) / se)[mask].abs().max() > 8.0
    assert abs(n_exact / (4 * n) - q) < 0.1
    ctl = UFOMController(0.5)
    hypergradient_vmap(loss, theta, di, do, steps=5, lr=0.1, method="ufom", q=ctl, generator=gen)
    assert ctl.n_observed == 4


def test_vmap_ufom_batch_coin_unbiased():
    model, loss, di, do, _ = _regression_tasks(n_tasks=4, seed=2)
    theta = module_params(model)
    exact = hypergradient_vmap(loss, theta, di, do, steps=5, lr=0.1)
    ex = torch.cat([exact[k].flatten() for k in theta])
    gen = torch.Generator().manual_seed(0)
    n, flat, seen = 200, [], set()
    for _ in range(n):
        g, info = hypergradient_vmap(
            loss,
            theta,
            di,
            do,
            steps=5,
            lr=0.1,
            method="ufom",
            q=0.5,
            generator=gen,
            coin="batch",
            return_info=True,
        )
        seen.add(info.exact_tasks)
        flat.append(torch.cat([g[k].flatten() for k in theta]))
    assert seen == {0, 4}  # all tasks share the coin
    draws = torch.stack(flat)
    se = draws.std(0) / math.sqrt(n)
    mask = se > 1e-8 * (1 + ex.abs())
    assert ((draws.mean(0) - ex) / se)[mask].abs().max() < 4.5


def test_vmap_bad_input():
    model, loss, di, do, _ = _regression_tasks()
    theta = module_params(model)
    with pytest.raises(ValueError, match="outer_data"):
        hypergradient_vmap(loss, theta, di, (do[0][:3], do[1][:3]), steps=2, lr=0.1)
    with pytest.raises(TypeError, match="generator"):
        hypergradient_vmap(loss, theta, di, do, steps=2, lr=0.1, method="ufom", q=0.5)
    with pytest.raises(ValueError, match="`q`"):
        hypergradient_vmap(
            loss, theta, di, do, steps=2, lr=0.1, method="ufom", q=2.0, generator=torch.Generator()
        )
    with pytest.raises(ValueError, match="steps"):
        hypergradient_vmap(loss, theta, di, do, steps=-1, lr=0.1)
    with pytest.raises(ValueError, match="coin"):
        hypergradient_vmap(loss, theta, di, do, steps=1, lr=0.1, coin="each")
    with pytest.raises(ValueError, match="scalar"):
        hypergradient_vmap(
            lambda p, d: d[0].sum(-1) * p["0.bias"].sum(), theta, di, do, steps=1, lr=0.1
        )


def test_digits_tasks_split_shapes_and_reproducibility():
    pytest.importorskip("sklearn")
    train, test = DigitsFewShot("train"), DigitsFewShot("test")
    assert len(train.classes) == 40 and len(test.classes) == 40
    assert set(train.classes).isdisjoint(test.classes)
    by_digit = DigitsFewShot("test", class_split="digit")
    assert {c for c, _ in by_digit.classes} == {5, 6, 7, 8, 9} and len(by_digit.classes) == 40
    gen = torch.Generator().manual_seed(0)
    xs, ys, xq, yq = test.sample(3, ways=5, shots=2, queries=4, generator=gen)
    assert xs.shape == (3, 10, 64) and ys.shape == (3, 10)
    assert xq.shape == (3, 20, 64) and yq.shape == (3, 20)
    assert torch.equal(ys[0], torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 4]))
    # each support image is an image of the class the query images of the same label come from
    pool = {i: c for i, c in enumerate(test.by_class)}
    for t in range(3):
        for lab in range(5):
            sup = xs[t, ys[t] == lab]
            qry = xq[t, yq[t] == lab]
            owners = [
                i for i, c in pool.items() if (c[:, None, :] == sup[None]).all(-1).any(0).all()
            ]
            assert owners and any(
                (pool[i][:, None, :] == qry[None]).all(-1).any(0).all() for i in owners
            )
    again = test.sample(3, ways=5, shots=2, queries=4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again[0], xs)
    with pytest.raises(ValueError, match="ways"):
        test.sample(1, ways=41, generator=gen)
    with pytest.raises(TypeError, match="generator"):
        test.sample(1, generator=None)
    with pytest.raises(ValueError, match="split"):
        DigitsFewShot("val")


def test_sinusoid_tasks():
    gen = torch.Generator().manual_seed(0)
    xs, ys, _xq, yq = SinusoidTasks().sample(5, shots=3, queries=4, generator=gen)
    assert xs.shape == (5, 3, 1) and yq.shape == (5, 4, 1) and xs.dtype == torch.float32
    assert xs.abs().max() <= 5 and ys.abs().max() <= 5


def test_counterexample_closed_form_matches_library():
    from orthotorch.apps.bilevel.experiments import counterexample_problem

    tasks, d_f, theta_star, theta_fom = counterexample_problem()
    for th in (-1.0, 0.0, 0.7, 2.0):
        theta = torch.tensor([th], dtype=D64)
        exact = batched_hypergradient(tasks, theta, steps=5, lr=0.1)
        fom = batched_hypergradient(tasks, theta, steps=5, lr=0.1, method="fom")
        assert abs(float(exact[0]) - d_f(th)) < 1e-12
        if th == theta_fom:
            assert abs(float(fom[0])) < 1e-12  # FOM's fixed point ...
    assert abs(d_f(theta_fom)) > 0.4  # ... is not stationary
    assert abs(d_f(theta_star)) < 1e-12


def test_counterexample_sgd_short():
    from orthotorch.apps.bilevel.experiments import fom_counterexample

    res = fom_counterexample(sgd_steps=400, seeds=(0,), q=0.3)
    assert abs(res.final["fom"][0] - res.theta_fom_fixed_point) < 0.25
    assert res.grad_norm["fom"][0] > 0.35
    assert res.grad_norm["exact"][0] < 0.02
    assert res.grad_norm["ufom"][0] < 0.1


def test_meta_train_budget_and_eval():
    from orthotorch.apps.bilevel.experiments import evaluate_regression, meta_train

    model = sinusoid_mlp(16, generator=torch.Generator().manual_seed(0))
    tasks = SinusoidTasks()

    def sample(n, gen):
        xs, ys, xq, yq = tasks.sample(n, shots=5, queries=5, generator=gen)
        return (xs, ys), (xq, yq)

    def loss(p, d):
        return F.mse_loss(torch.func.functional_call(model, p, (d[0],)), d[1])

    def ev(m):
        return evaluate_regression(
            m,
            tasks,
            shots=5,
            steps=2,
            inner_lr=0.01,
            n_tasks=50,
            generator=torch.Generator().manual_seed(1),
        )

    before = [p.detach().clone() for p in model.parameters()]
    res = meta_train(
        model,
        sample,
        loss,
        method="ufom",
        q="adaptive",
        steps=2,
        inner_lr=0.01,
        meta_batch=4,
        budget=100.0,
        generator=torch.Generator().manual_seed(2),
        evaluate=ev,
    )
    assert res.cost >= 100.0 and res.iterations >= 1 and 0.05 <= res.q <= 1.0
    assert math.isfinite(res.metric) and res.ci > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with pytest.raises(ValueError, match="iterations"):
        meta_train(
            model, sample, loss, method="fom", steps=1, inner_lr=0.1, generator=torch.Generator()
        )


def test_cli_register_and_quick_run(tmp_path, capsys):
    from orthotorch.apps.bilevel import cli

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    cli.register(sub)
    args = parser.parse_args(
        [
            "bilevel",
            "--task",
            "sinusoid",
            "--iterations",
            "2",
            "--quick",
            "--no-progress",
            "--out",
            str(tmp_path),
        ]
    )
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "sinusoid" in out and "fom (50%)" in out
    assert "| exact | 2 |" in out  # --iterations is honoured (0 used to fall back to 40)
    text = (tmp_path / "results.md").read_text()
    assert "| exact | 2 |" in text and "interrupted" not in text and "running" not in text
    with pytest.raises(SystemExit):
        parser.parse_args(["bilevel", "--q", "1.5"])


def test_digits_model_forward():
    model = digits_mlp(16, 5, generator=torch.Generator().manual_seed(0))
    assert model(torch.zeros(2, 64)).shape == (2, 5)


# ------------------------------------------------------------------------------------------------
# the command line: every flag checked by argparse, plain help, Ctrl-C


def _main(argv):
    from orthotorch.apps.cli import main

    return main(argv)


_BAD_FLAGS = [
    ["--iterations", "0"],  # used to run 40 silently
    ["--iterations", "-5"],
    ["--iterations", "2.5"],
    ["--budget-fraction", "nan"],  # used to loop forever
    ["--budget-fraction", "inf"],
    ["--budget-fraction", "0"],
    ["--budget-fraction", "-1"],
    ["--budget-fraction", "half"],
    ["--shots", "0"],
    ["--shots", "1", "1000"],
    ["--steps", "-1"],
    ["--inner-lr", "nan"],
    ["--inner-lr", "-0.1"],
    ["--q", "1.5"],
    ["--q", "nan"],
    ["--q", "often"],
    ["--seed", "-1"],
    ["--threads", "-1"],
    ["--task", "maml"],
    ["--coin", "each"],
    ["--class-split", "odd"],
]


@pytest.mark.parametrize("flags", _BAD_FLAGS, ids=[" ".join(f) for f in _BAD_FLAGS])
def test_cli_rejects_bad_flag(flags, capsys):
    with pytest.raises(SystemExit) as exc:
        _main(["bilevel", *flags])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("orthotorch bilevel: error: argument") and flags[0] in last
    assert "Traceback" not in err


def test_cli_rejects_unusable_out(tmp_path, capsys, monkeypatch):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    locked = tmp_path / "locked"
    locked.mkdir()
    for out in (a_file, a_file / "sub", ""):
        with pytest.raises(SystemExit) as exc:
            _main(["bilevel", "--out", str(out)])
        assert exc.value.code == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert "argument --out" in last, last
    # an unwritable directory (simulated: root may write anywhere)
    import os

    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda p, m: False if str(p) == str(locked) else real_access(p, m)
    )
    with pytest.raises(SystemExit) as exc:
        _main(["bilevel", "--out", str(locked / "new")])
    assert exc.value.code == 2 and "not writable" in capsys.readouterr().err


def test_cli_out_failure_at_run_time_is_one_line(tmp_path, capsys, monkeypatch):
    from pathlib import Path

    def refuse(self, *a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "mkdir", refuse)
    assert _main(["bilevel", "--task", "sinusoid", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--out" in err[0] and "Permission denied" in err[0]


def test_cli_help_plain_text_with_defaults(capsys):
    from orthotorch.apps.cli import build_parser

    with pytest.raises(SystemExit) as exc:
        _main(["bilevel", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for markup in ("``", ":func:", ":class:", ":mod:"):
        assert markup not in text
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    actions = [a for a in sub.choices["bilevel"]._actions if a.dest != "help"]
    assert all(a.help for a in actions)
    # every flag shows its default (or, where the default is None, says what happens instead)
    assert text.count("(default:") == len(actions)


def test_cli_ctrl_c_keeps_partial_results(tmp_path, capsys, monkeypatch):
    from orthotorch.apps.bilevel import experiments as ex

    done = [ex.RunResult("exact", "exact", None, 3, 30.0, 0.1, 1.5, 0.2)]
    monkeypatch.setattr(ex, "sinusoid_experiment", lambda **kw: done)

    def interrupted(**kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(ex, "fom_counterexample", interrupted)
    argv = ["bilevel", "--task", "all", "--shots", "1", "--no-progress", "--out", str(tmp_path)]
    monkeypatch.setattr(ex, "digits_experiment", lambda **kw: done)
    assert _main(argv) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "interrupted" in err[0]
    text = (tmp_path / "results.md").read_text()
    assert "## digits 5-way 1-shot" in text and "## sinusoid" in text and "| exact | 3 |" in text
    assert "interrupted" in text and "## FOM counterexample" not in text


def test_progress_bar_integer_total_stops_at_total():
    pytest.importorskip("tqdm")
    from orthotorch.apps.bilevel.experiments import _Progress

    bar = _Progress(100.4, "x", enabled=True)
    for done in (10.2, 60.7, 99.9, 130.5):  # the last meta-iteration overshoots the budget
        bar.to(done)
    assert isinstance(bar.bar.total, int) and bar.bar.total == 101 and bar.bar.n == 101
    bar.close()


def test_meta_train_rejects_unreachable_budget():
    from orthotorch.apps.bilevel.experiments import meta_train

    model = sinusoid_mlp(4, generator=torch.Generator().manual_seed(0))
    kw = dict(method="fom", steps=1, inner_lr=0.1, generator=torch.Generator())
    for budget in (float("nan"), float("inf"), 0.0, -1.0):  # NaN and inf used to loop forever
        with pytest.raises(ValueError, match="budget"):
            meta_train(model, None, None, budget=budget, **kw)
    with pytest.raises(ValueError, match="iterations"):
        meta_train(model, None, None, iterations=0, **kw)
    with pytest.raises(ValueError, match="method"):
        meta_train(model, None, None, iterations=1, **{**kw, "method": "maml"})


def test_task_samplers_type_error_for_wrong_type():
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(TypeError, match="n_tasks"):
        SinusoidTasks().sample("3", generator=gen)  # used to be a ValueError
    with pytest.raises(TypeError, match="shots"):
        SinusoidTasks().sample(2, shots=2.0, generator=gen)
    with pytest.raises(ValueError, match="queries"):
        SinusoidTasks().sample(2, queries=0, generator=gen)
    with pytest.raises(TypeError, match="generator"):
        SinusoidTasks().sample(2, generator=None)


def test_max_shots_matches_the_data():
    pytest.importorskip("sklearn")
    from orthotorch.apps.bilevel.cli import MAX_SHOTS

    test = DigitsFewShot("test")
    test.sample(1, shots=MAX_SHOTS, queries=15, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="shots"):
        test.sample(1, shots=MAX_SHOTS + 1, queries=15, generator=torch.Generator())


def test_counterexample_table_cells_have_no_bare_pipe():
    from orthotorch.apps.bilevel.cli import counterexample_table
    from orthotorch.apps.bilevel.experiments import CounterexampleResult

    res = CounterexampleResult(
        0.9, 0.0, {"fom": [0.0], "exact": [0.9]}, {"fom": [0.45], "exact": [1e-3]}, {}
    )
    rows = [r for r in counterexample_table(res).splitlines() if r.startswith("|")]
    assert len(rows) == 4 and {r.count("|") for r in rows} == {5}  # 4 columns in every row


def test_plots_fixed_colour_and_confidence_intervals(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from matplotlib.axes import Axes

    from orthotorch.apps.bilevel import experiments as ex

    drawn = []
    real = Axes.errorbar

    def spy(self, x, y, *a, **kw):
        drawn.append((self.get_title() or id(self), kw["color"], kw["xerr"]))
        return real(self, x, y, *a, **kw)

    monkeypatch.setattr(Axes, "errorbar", spy)

    def runs(labels, ci):
        return [ex.RunResult(lab, lab.split()[0], None, 1, 10.0, 0.1, 5.0, ci) for lab in labels]

    a = runs(
        ["exact", "ufom q=0.1 (50%)", "ufom q=0.1 batch coin (50%)", "fom (50%)", "fom (100%)"], 0.5
    )
    b = runs(["exact", "ufom q=0.1 (50%)", "fom (50%)", "fom (100%)"], 0.25)  # no batch coin
    ex.plot_results(
        [ex.Panel("a", "m", a), ex.Panel("b", "m", b, log_x=True)], str(tmp_path / "p.png")
    )
    assert (tmp_path / "p.png").stat().st_size > 0
    colours: dict[str, set[str]] = {}
    labels = [r.label for r in a] + [r.label for r in b]
    for label, (_, colour, xerr) in zip(labels, drawn):
        colours.setdefault(label, set()).add(colour)
        assert xerr[1][0] > 0  # every point carries its interval
    assert all(len(c) == 1 for c in colours.values())  # one colour per method across panels
    assert len({next(iter(c)) for c in colours.values()}) == 5  # and distinct methods differ
    assert ex.method_colour("ufom q=adaptive (30%)") == ex.method_colour("ufom q=0.1 (50%)")
    res = ex.fom_counterexample(sgd_steps=20, seeds=(0, 1))
    assert res.trajectories["fom"].shape == (2, 21)
    ex.plot_counterexample(res, str(tmp_path / "c.png"))
    assert (tmp_path / "c.png").stat().st_size > 0
