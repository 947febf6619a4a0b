"""The demos: `orthotorch demo` (copying task, three models) and `orthotorch demo procrustes`."""

from __future__ import annotations

import json

import pytest

from orthotorch.apps import demo
from orthotorch.apps.cli import main
from orthotorch.apps.procrustes import run_demo as run_procrustes


def test_copying_demo_prints_the_table_and_writes_the_png(tmp_path):
    lines: list[str] = []
    rows = demo.run_demo(
        T=3, hidden=8, seconds=0.4, batch=4, out_dir=tmp_path, progress=False, printer=lines.append
    )
    assert [r.label for r in rows] == [label for label, _ in demo.DEMO_METHODS]
    text = "\n".join(lines)
    assert "no-memory baseline" in text and "copy acc" in text and "ms/it" in text
    for label, over in demo.DEMO_METHODS:  # each method's own learning rate is printed in its row
        row = next(line for line in lines if line.startswith(label))
        assert f"{over['lr']:g}" in row
    givens, cwy, lstm = rows
    assert givens.result.orth_error < 1e-4 and cwy.result.orth_error < 1e-4
    assert all(r.result.iterations > 0 for r in rows)
    assert abs(lstm.n_params - givens.n_params) / givens.n_params < 0.1  # equal parameter count
    # the verdict says what is true for every model, whichever way it went
    base = 10 * 2.0794415416798357 / 23
    for r in rows:
        assert f"- {r.label} {demo.verdict(r.eval_loss, base)}" in text
    assert demo.verdict(0.5, 1.0).startswith("beats")
    assert demo.verdict(1.2, 1.0).startswith("does NOT beat")
    assert demo.verdict(0.99, 1.0).startswith("is at")  # a tie is not called a win
    png = tmp_path / "copying_loss_vs_time.png"
    assert png.stat().st_size > 0 and str(tmp_path.resolve()) in text
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert len(summary["rows"]) == 3


def test_demo_command_line_has_the_procrustes_subcommand(capsys):
    for argv in (["demo", "--T", "0"], ["demo", "--seconds", "-1"]):
        try:
            main(argv)
        except SystemExit as e:
            assert e.code == 2
        assert "error" in capsys.readouterr().err


def test_procrustes_demo_runs_small_and_keeps_constraints():
    lines: list[str] = []
    results = run_procrustes(32, seconds=0.3, batch=16, target=0.5, printer=lines.append)
    by_name = {r.name.split()[0] + " " + r.name.split()[1]: r for r in results}
    ours = by_name["orthotorch OrthogonalSGD"]
    geo = by_name["geoopt RiemannianSGD"]
    assert ours.steps > 0 and geo.steps > 0
    assert ours.orth_error < 1e-4 and geo.orth_error < 1e-4
    assert ours.final_distance < 1.0  # it made progress towards Q*
    assert any("t→target" in line for line in lines)


@pytest.mark.parametrize(
    "flags",
    [
        ["--dim", "1"],
        ["--dim", "0"],
        ["--dim", "-4"],
        ["--threads", "-1"],
        ["--seconds", "nan"],
        ["--seconds", "0"],
        ["--batch", "0"],
    ],
)
def test_procrustes_demo_rejects_bad_flags_with_exit_2(flags, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["demo", "procrustes", *flags])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert flags[0] in err and "Traceback" not in err
