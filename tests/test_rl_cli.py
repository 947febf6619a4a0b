"""`orthotorch humanoid train | eval | record | plot` on a cheap MuJoCo task (InvertedPendulum-v5)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from orthotorch.apps.cli import main

pytest.importorskip("gymnasium", reason="the rl extra (gymnasium[mujoco]) is not installed")
pytest.importorskip("mujoco", reason="the rl extra (mujoco) is not installed")

ENV = "InvertedPendulum-v5"
FAST = [
    "--env", ENV, "--num-directions", "4", "--top-directions", "2", "--step-size", "0.1",
    "--noise", "0.1", "--eval-every", "2", "--eval-episodes", "2", "--max-episode-steps", "100",
    "--backend", "serial",
]  # fmt: skip
TIMING = ("wall_s", "iteration_s")


def _train(out: Path, *extra: str) -> int:
    return main(["humanoid", "train", "--out", str(out), *FAST, *extra])


def _log(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines()]


def _strip(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("humanoid") / "run"
    assert _train(out, "--budget-steps", "1500") == 0
    return out


def test_train_logs_every_iteration_with_all_figures(run_dir):
    rows = _log(run_dir)
    assert len(rows) >= 3 and [r["iteration"] for r in rows] == list(range(1, len(rows) + 1))
    for key in ("return_mean", "return_max", "length_mean", "forward_mean", "env_steps", "wall_s"):
        assert all(key in r for r in rows), key
    steps = [r["env_steps"] for r in rows]
    assert steps == sorted(steps) and steps[-1] >= 1500 > steps[-2]
    assert any("eval_return_mean" in r for r in rows)
    doc = json.loads((run_dir / "checkpoint.json").read_text())
    assert doc["env_id"] == ENV and doc["state"]["iteration"] == len(rows)
    assert {"numpy", "gymnasium", "mujoco", "orthotorch"} <= set(doc["versions"])
    assert (
        doc["command"].startswith("orthotorch humanoid train")
        and "--budget-steps 1500" in doc["command"]
    )
    assert (run_dir / "best.json").is_file()


def test_progress_bar_stops_at_its_integer_total(tmp_path, capsys):
    # the process backend (one worker) here; the other tests run in-process
    argv = ["--budget-steps", "300", "--eval-every", "0", "--backend", "process", "--workers", "1"]
    assert _train(tmp_path / "r", *argv) == 0
    err = capsys.readouterr().err
    assert "300/300" in err and "301/300" not in err


def test_eval_json_ends_with_one_line(run_dir, capsys):
    ckpt = str(run_dir / "checkpoint.json")
    assert main(["humanoid", "eval", "--checkpoint", ckpt, "--episodes", "3", "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    res = json.loads(out[-1])
    for key in ("returns", "lengths", "forward_distances"):
        assert len(res[key]) == 3
    assert all(r in (n, n - 1) for r, n in zip(res["returns"], res["lengths"]))
    # deterministic: the same command gives the same figures
    assert main(["humanoid", "eval", "--checkpoint", ckpt, "--episodes", "3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip()) == res


def test_plot_writes_a_png(run_dir, tmp_path):
    pytest.importorskip("matplotlib", reason="plot needs the bench extra (matplotlib)")
    png = tmp_path / "curves.png"
    assert main(["humanoid", "plot", str(run_dir / "log.jsonl"), "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_record_writes_a_gif(run_dir, tmp_path, capsys):
    gif = tmp_path / "ep.gif"
    rc = main([
        "humanoid", "record", "--checkpoint", str(run_dir / "checkpoint.json"), "--out", str(gif),
        "--max-steps", "30", "--width", "64", "--height", "48", "--still", str(tmp_path / "s.png"),
    ])  # fmt: skip
    if rc == 1 and "rendering failed" in capsys.readouterr().err:
        pytest.skip("headless rendering (MUJOCO_GL=egl) is not available on this machine")
    assert rc == 0
    assert gif.read_bytes()[:6] in (b"GIF89a", b"GIF87a")
    assert (tmp_path / "s.png").is_file()


def test_record_falls_back_to_the_default_view_for_an_unknown_camera(run_dir, tmp_path, capsys):
    gif = tmp_path / "ep.gif"
    args = ["humanoid", "record", "--checkpoint", str(run_dir / "checkpoint.json"), "--out", str(gif),
            "--max-steps", "5", "--width", "32", "--height", "32"]  # fmt: skip
    rc = main([*args, "--camera", "no-such-camera"])
    err = capsys.readouterr().err
    if rc == 1 and "rendering failed" in err:
        pytest.skip("headless rendering (MUJOCO_GL=egl) is not available on this machine")
    assert rc == 0 and "no camera 'no-such-camera'" in err
    assert gif.read_bytes()[:6] in (b"GIF89a", b"GIF87a")
    assert main([*args, "--camera", ""]) == 0
    assert "no camera" not in capsys.readouterr().err


def test_resume_continues_bit_identically(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert _train(one, "--budget-steps", "1200", "--no-progress") == 0
    assert _train(two, "--budget-steps", "500", "--no-progress") == 0
    first = _log(two)
    # --resume keeps the checkpoint's hyperparameters; flags that do not change results may differ
    # (and --env is not needed: the checkpoint's is used)
    assert main(["humanoid", "train", "--out", str(two), "--resume",
                 "--budget-steps", "1200", "--no-progress", "--checkpoint-every", "2"]) == 0  # fmt: skip
    rows = _log(two)
    assert rows[: len(first)] == first
    assert _strip(rows) == _strip(_log(one))
    a = json.loads((one / "checkpoint.json").read_text())["state"]
    b = json.loads((two / "checkpoint.json").read_text())["state"]
    assert a == b
    assert rows[-1]["wall_s"] > first[-1]["wall_s"]  # wall clock accumulates across sessions


def test_ctrl_c_keeps_the_checkpoint_and_exits_130(tmp_path, monkeypatch, capsys):
    from orthotorch.rl.es import ARSTrainer

    real_step, calls = ARSTrainer.step, []

    def step(self, backend):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_step(self, backend)

    monkeypatch.setattr(ARSTrainer, "step", step)
    out = tmp_path / "r"
    assert _train(out, "--budget-steps", "100000", "--no-progress") == 130
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("interrupted") and "iteration 2" in err[0]
    assert json.loads((out / "checkpoint.json").read_text())["state"]["iteration"] == 2
    assert len(_log(out)) == 2


def _error_line(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["train", "--env", "NoSuchEnv-v0"], "--env"),
        (["train", "--env", "CartPole-v1", "--out", "/tmp/_orthotorch_never"], "--env"),  # discrete
        (["train", "--budget-steps", "-5"], "--budget-steps"),
        (["train", "--budget-steps", "0"], "--budget-steps"),
        (["train", "--time-budget", "-1"], "--time-budget"),
        (["train", "--time-budget", "nan"], "--time-budget"),
        (["train", "--workers", "0"], "--workers"),
        (["train", "--noise", "abc"], "--noise"),
        (["train", "--directions", "sobol"], "--directions"),
        (["train", "--backend", "mpi"], "--backend"),
        (["eval", "--checkpoint", "/no/such/file.json"], "--checkpoint"),
        (["eval"], "--checkpoint"),
        (["record", "--checkpoint", __file__, "--every", "0"], "--every"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(argv, flag, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["humanoid", *argv])
    assert exc.value.code == 2
    line = _error_line(capsys)
    assert "error:" in line and flag in line


def test_checkpoint_of_another_env_is_refused(run_dir, tmp_path, capsys):
    ckpt = str(run_dir / "checkpoint.json")
    with pytest.raises(SystemExit) as exc:
        main(["humanoid", "eval", "--checkpoint", ckpt, "--env", "Humanoid-v5"])
    assert exc.value.code == 2
    assert ENV in _error_line(capsys)
    with pytest.raises(SystemExit) as exc:
        main(["humanoid", "train", "--out", str(run_dir), "--resume", "--env", "Humanoid-v5"])
    assert exc.value.code == 2 and "--env" in _error_line(capsys)
    with pytest.raises(SystemExit) as exc:  # a hyperparameter that differs from the checkpoint's
        main(
            [
                "humanoid",
                "train",
                "--out",
                str(run_dir),
                "--resume",
                "--env",
                ENV,
                "--num-directions",
                "9",
            ]
        )
    assert exc.value.code == 2 and "--num-directions" in _error_line(capsys)
    with pytest.raises(SystemExit) as exc:  # an existing run without --resume
        main(["humanoid", "train", "--out", str(run_dir), "--env", ENV])
    assert exc.value.code == 2 and "--resume" in _error_line(capsys)
    with pytest.raises(SystemExit) as exc:  # --resume without a run
        main(["humanoid", "train", "--out", str(tmp_path / "none"), "--env", ENV, "--resume"])
    assert exc.value.code == 2 and "--resume" in _error_line(capsys)
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "something else"}')
    with pytest.raises(SystemExit) as exc:
        main(["humanoid", "eval", "--checkpoint", str(bad)])
    assert exc.value.code == 2 and "checkpoint" in _error_line(capsys)


def test_committed_checkpoint_loads_and_matches_its_recorded_evaluation(capsys):
    root = Path(__file__).resolve().parents[1] / "docs" / "benchmarks" / "humanoid"
    ckpt, recorded = root / "best.json", root / "eval.json"
    if not ckpt.is_file():
        pytest.skip("no committed Humanoid checkpoint yet")
    rec = json.loads(recorded.read_text())
    n = 1  # one episode keeps the test fast; the recorded file holds more
    assert (
        main(["humanoid", "eval", "--checkpoint", str(ckpt), "--episodes", str(n), "--json"]) == 0
    )
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["lengths"] == rec["lengths"][:n]
    np.testing.assert_allclose(res["returns"], rec["returns"][:n], rtol=1e-9)
    np.testing.assert_allclose(
        res["forward_distances"], rec["forward_distances"][:n], rtol=1e-9, atol=1e-12
    )


def test_world_model_command_writes_shards_and_a_table(run_dir, tmp_path, capsys):
    out = tmp_path / "wm"
    rc = main([
        "humanoid", "world-model", "--checkpoint", str(run_dir / "checkpoint.json"), "--out", str(out),
        "--episodes", "4", "--seconds", "0.3", "--hidden", "8", "--k", "1", "5", "--imagine-steps", "20",
    ])  # fmt: skip
    assert rc == 0
    res = json.loads((out / "world_model.json").read_text())
    assert [r["kind"] for r in res["rows"]] == ["orthogonal", "rnn", "lstm", "mlp"]
    orth = res["rows"][0]
    assert orth["orthogonality_error"] < 1e-5 and orth["updates"] >= 2
    assert all(r["error_k1"] is not None and r["error_k1"] >= 0 for r in res["rows"])
    from orthotorch.rl.world_model import load_shard

    eps, meta = load_shard(out / "train.npz")
    assert len(eps) == 4 and meta["env_id"] == ENV
    assert (
        meta["policy_version"]
        == json.loads((run_dir / "checkpoint.json").read_text())["state"]["iteration"]
    )
