"""The main demonstration (`orthotorch demo`) runs and its constrained methods stay on SO(d)."""

from orthotorch.apps.procrustes import run_demo


def test_demo_runs_small_and_keeps_constraints():
    lines: list[str] = []
    results = run_demo(32, seconds=0.3, batch=16, target=0.5, printer=lines.append)
    by_name = {r.name.split()[0] + " " + r.name.split()[1]: r for r in results}
    ours = by_name["orthotorch OrthogonalSGD"]
    geo = by_name["geoopt RiemannianSGD"]
    assert ours.steps > 0 and geo.steps > 0
    assert ours.orth_error < 1e-4 and geo.orth_error < 1e-4
    assert ours.final_distance < 1.0  # it made progress towards Q*
    assert any("t→target" in line for line in lines)
