"""`orthotorch rnn train | eval | plot`: logging, checkpoints, bit-identical resume, argument errors, Ctrl-C."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from orthotorch.apps import rnn as app
from orthotorch.apps.cli import main
from orthotorch.apps.rnn import RunConfig, baseline, train
from orthotorch.nn import orthogonality_error


def small(**kw) -> RunConfig:
    base = dict(task="copying", T=3, hidden=8, batch=4, steps=6, checkpoint_every=3, seed=5)
    base.update(kw)
    return RunConfig(**base)  # type: ignore[arg-type]


def _log(path):
    return [json.loads(line) for line in (path / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    "over",
    [
        {"constraint": "givens", "optimizer": "orthogonal_adam"},
        {"constraint": "givens", "optimizer": "orthogonal_sgd"},
        {"constraint": "cwy", "optimizer": "rmsprop"},
        {"constraint": "matrix_exp", "optimizer": "adam"},
        {"constraint": "givens", "optimizer": "riemannian_adam"},
        {"model": "lstm", "optimizer": "adam"},
        {"task": "adding", "T": 6, "constraint": "cayley", "optimizer": "adam"},
    ],
    ids=lambda o: "-".join(str(v) for v in o.values()),
)
def test_resume_reproduces_the_uninterrupted_run_bit_for_bit(tmp_path, over):
    cfg = small(**over)
    full = train(cfg, tmp_path / "full")
    train(replace(cfg, steps=3), tmp_path / "part")
    resumed = train(cfg, tmp_path / "part", resume=True)
    a, b = _log(tmp_path / "full"), _log(tmp_path / "part")
    assert [r["iter"] for r in b] == list(range(1, 7))
    assert [r["loss"] for r in a] == [
        r["loss"] for r in b
    ]  # exact equality, including iterations 4..6
    sa, sb = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_input_init_reaches_the_model_and_the_config(tmp_path):
    k = app.build_model(small(hidden=64, input_init="kaiming"), torch.Generator().manual_seed(0))
    u = app.build_model(small(hidden=64), torch.Generator().manual_seed(0))
    w_k, w_u = k.rnn.cells[0].weight_ih.detach(), u.rnn.cells[0].weight_ih.detach()
    assert abs(float(w_k.std()) / (2 / 10) ** 0.5 - 1) < 0.1  # copying: 10 input symbols
    assert float(w_u.abs().max()) <= 64**-0.5
    train(small(input_init="kaiming", steps=1), tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["input_init"] == "kaiming"


def test_sampler_matchings_and_stabilize_reach_the_recurrent_group(tmp_path):
    cfg = small(sampler="full", matchings=3, stabilize=2, hidden=6)
    model = app.build_model(cfg, torch.Generator().manual_seed(0))
    opt = app.build_optimizer(cfg, model)
    (rec,) = [g for g in opt.param_groups if g["sampler"] == "full"]
    assert rec["matchings_per_step"] == 3 and rec["stabilize"] == 2
    assert rec["params"] == [model.rnn.cells[0].weight_hh]
    res = train(replace(cfg, steps=4), tmp_path)
    assert res.orth_error < 1e-5


def test_resume_applies_the_new_config_options(tmp_path):
    """torch's load_state_dict would silently keep the checkpoint's lr / stabilize: the config wins."""
    cfg = small(hidden=6, steps=4, optimizer="orthogonal_adam", lr=1e-3)
    train(cfg, tmp_path)
    train(replace(cfg, steps=8, lr=2e-3, lr_orth=5e-4, stabilize=3), tmp_path, resume=True)
    groups = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["optimizer"]["param_groups"]
    assert sorted(g["lr"] for g in groups) == [5e-4, 2e-3]
    assert [g["stabilize"] for g in groups if g["lr"] == 5e-4] == [3]


def test_log_fields_and_checkpoint_contents(tmp_path):
    res = train(small(steps=4, checkpoint_every=2), tmp_path)
    rows = _log(tmp_path)
    assert len(rows) == 4
    for r in rows:
        assert set(r) == {"iter", "loss", "accuracy", "wall", "orth_error", "grad_norm"}
        assert r["orth_error"] < 1e-4 and r["grad_norm"] > 0 and 0 <= r["accuracy"] <= 1
    assert [r["wall"] for r in rows] == sorted(r["wall"] for r in rows)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert (
        state["iteration"] == 4 and "orthotorch" in state["optimizer"]
    )  # the optimizer's generator
    assert isinstance(state["data_generator"], torch.Tensor)
    assert (tmp_path / "curve.png").stat().st_size > 0
    assert res.iterations == 4 and float(orthogonality_error(res.model.rnn)) < 1e-4


def test_a_short_run_gets_below_the_no_memory_baseline():
    cfg = RunConfig(
        task="copying", T=5, hidden=32, batch=32, steps=150, lr=1e-2, lr_orth=1e-2, seed=0
    )
    res = train(cfg)
    assert res.final_loss < 0.7 * baseline(cfg)  # baseline 10·log 8 / 25 = 0.83
    ev = app.evaluate(cfg, res.model, batches=2)
    assert ev["loss"] < baseline(cfg) and ev["accuracy"] > 0.5


def test_cli_train_eval_plot_and_resume(tmp_path, capsys):
    out = tmp_path / "run"
    args = [
        "rnn",
        "train",
        "--T",
        "4",
        "--hidden",
        "8",
        "--batch",
        "4",
        "--steps",
        "3",
        "--out",
        str(out),
        "--quiet",
    ]
    assert main(args) == 0
    assert "no-memory baseline" in capsys.readouterr().out
    assert len(_log(out)) == 3
    assert main([*args[:-5], "--steps", "5", "--out", str(out), "--resume", "--quiet"]) == 0
    assert [r["iter"] for r in _log(out)] == [1, 2, 3, 4, 5]
    capsys.readouterr()
    assert main(["rnn", "eval", "--out", str(out), "--batches", "1"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["iteration"] == 5 and metrics["orth_error"] < 1e-4
    png = tmp_path / "c.png"
    assert main(["rnn", "plot", str(out), str(out / "log.jsonl"), "--png", str(png)]) == 0
    assert png.stat().st_size > 0


@pytest.mark.parametrize(
    "bad, flag",
    [
        (["--T", "-3"], "--T"),
        (["--hidden", "0"], "--hidden"),
        (["--lr", "nan"], "--lr"),
        (["--lr", "abc"], "--lr"),
        (["--lr-orth", "-1"], "--lr-orth"),
        (["--steps", "1.5"], "--steps"),
        (["--seconds", "0"], "--seconds"),
        (["--momentum", "1.5"], "--momentum"),
        (["--constraint", "qr"], "--constraint"),
        (["--optimizer", "lbfgs"], "--optimizer"),
        (["--task", "mnist"], "--task"),
        (["--input-init", "normal"], "--input-init"),
        (["--sampler", "best"], "--sampler"),
        (["--matchings", "0"], "--matchings"),
        (["--stabilize", "0"], "--stabilize"),
        (
            ["--optimizer", "adam"],
            "--optimizer",
        ),  # would leave the manifold with --constraint givens
    ],
)
def test_bad_arguments_exit_2_with_one_line_naming_the_flag(bad, flag, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        code = main(["rnn", "train", "--out", str(tmp_path), *bad])
        raise SystemExit(code)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and flag in err


def test_ctrl_c_keeps_partial_results_exits_130_and_resumes_exactly(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    args = [
        "rnn",
        "train",
        "--T",
        "3",
        "--hidden",
        "8",
        "--batch",
        "4",
        "--steps",
        "5",
        "--quiet",
        "--out",
        str(out),
    ]
    calls = {"n": 0}
    real = app._grad_norm

    def interrupt_on_third(params):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(params)

    monkeypatch.setattr(app, "_grad_norm", interrupt_on_third)
    assert main(args) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "interrupted at iteration 2" in err[0]
    assert len(_log(out)) == 2
    assert torch.load(out / "checkpoint.pt", weights_only=False)["iteration"] == 2
    monkeypatch.setattr(app, "_grad_norm", real)
    assert main([*args, "--resume"]) == 0
    ref = tmp_path / "ref"
    assert main([*args[:-1], str(ref)]) == 0
    assert [r["loss"] for r in _log(out)] == [r["loss"] for r in _log(ref)]


def test_lstm_baseline_has_the_same_parameter_count():
    cfg = RunConfig(task="copying", hidden=190)
    orth = app.build_model(cfg, torch.Generator().manual_seed(0))
    lstm = app.build_model(replace(cfg, model="lstm"), torch.Generator().manual_seed(0))
    n_o = sum(p.numel() for p in orth.parameters())
    n_l = sum(p.numel() for p in lstm.parameters())
    assert abs(n_l - n_o) / n_o < 0.02


def test_an_interrupt_between_iterations_also_resumes_exactly(tmp_path):
    cfg = small()
    full = train(cfg, tmp_path / "full")

    def stop_after_third(it, wall, loss):
        if it == 3:
            raise KeyboardInterrupt  # e.g. Ctrl-C while logging, after the step completed

    part = train(cfg, tmp_path / "part", progress=stop_after_third)
    assert part.interrupted and part.iterations == 3
    train(cfg, tmp_path / "part", resume=True)
    assert [r["loss"] for r in _log(tmp_path / "full")] == [
        r["loss"] for r in _log(tmp_path / "part")
    ]
    assert full.iterations == 6


def test_train_sets_its_thread_count_and_restores_the_callers_also_on_error(tmp_path):
    before = torch.get_num_threads()
    want = 1 if before != 1 else 2
    seen: list[int] = []
    train(small(steps=1, threads=want), progress=lambda *_: seen.append(torch.get_num_threads()))
    assert seen == [want] and torch.get_num_threads() == before
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(small(threads=want), tmp_path / "empty", resume=True)
    assert torch.get_num_threads() == before
    train(small(steps=1, threads=0), progress=lambda *_: seen.append(torch.get_num_threads()))
    assert seen[-1] == before  # 0 keeps the caller's count


def test_cli_resume_takes_stabilize_and_refuses_a_changed_experiment(tmp_path, capsys):
    out = tmp_path / "run"
    base = ["rnn", "train", "--T", "4", "--hidden", "8", "--batch", "4", "--out", str(out), "--quiet"]  # fmt: skip
    assert main([*base, "--steps", "3"]) == 0
    assert main([*base, "--steps", "5", "--resume", "--stabilize", "2"]) == 0
    assert json.loads((out / "config.json").read_text())["stabilize"] == 2
    capsys.readouterr()
    assert main([*base, "--steps", "6", "--resume", "--lr", "0.01"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--lr 0.01" in err and "--stabilize" in err
    assert main([*base, "--steps", "6", "--resume"]) == 0  # the stored config, unchanged
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["stabilize"] == 2 and cfg["lr"] == 1e-3 and cfg["steps"] == 6
