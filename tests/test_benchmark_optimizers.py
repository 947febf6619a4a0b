"""The pure helpers of benchmarks/optimizers.py (the optimizer race) and a smoke run of it."""

from __future__ import annotations

import itertools
import math
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import optimizers as race

# ----------------------------------------------------------------------------------------------------
# learning-rate grid


def test_lr_grid_values_are_one_and_three_per_decade_and_invert():
    vals = [race.lr_value(j) for j in range(-12, 7)]
    assert race.lr_value(0) == 1.0 and race.lr_value(1) == 3.0 and race.lr_value(-1) == 0.3
    assert race.lr_value(-2) == pytest.approx(0.1) and race.lr_value(-5) == pytest.approx(3e-3)
    ratios = [b / a for a, b in itertools.pairwise(vals)]
    assert all(r == pytest.approx(3.0) or r == pytest.approx(10 / 3) for r in ratios)
    for j in range(-12, 7):
        assert race.lr_index(race.lr_value(j)) == j
        assert race.lr_index(race.lr_value(j) * 1.2) == j  # nearest on a log scale
    with pytest.raises(ValueError, match="lr"):
        race.lr_index(0.0)


def test_scores_rank_reached_then_unreached_then_diverged():
    fast = race.score_of(0.5, 1e-4, False)
    slow = race.score_of(2.0, 1e-4, False)
    missed_close = race.score_of(math.nan, 0.02, False)
    missed_far = race.score_of(math.nan, 0.5, False)
    diverged = race.score_of(0.1, 1e-4, True)
    nan_final = race.score_of(math.nan, math.nan, False)
    assert sorted([diverged, missed_far, slow, missed_close, fast]) == [
        fast,
        slow,
        missed_close,
        missed_far,
        diverged,
    ]
    assert nan_final == diverged == (2, math.inf)


def test_next_lr_index_widens_towards_the_edge_holding_the_best():
    s = {-3: (1, 0.5), -2: (1, 0.2), -1: (1, 0.1)}  # best at the high edge
    assert race.next_lr_index(s, max_points=6) == 0
    assert race.edge_flag(s) == "high"
    s = {-3: (0, 0.4), -2: (1, 0.2), -1: (2, math.inf)}  # best at the low edge
    assert race.next_lr_index(s, max_points=6) == -4
    assert race.edge_flag(s) == "low"
    s = {-3: (1, 0.5), -2: (0, 1.0), -1: (1, 0.1)}  # bracketed
    assert race.next_lr_index(s, max_points=6) is None
    assert race.edge_flag(s) == ""
    assert race.next_lr_index({-3: (1, 0.5), -2: (1, 0.2), -1: (1, 0.1)}, max_points=3) is None
    assert race.best_index({0: (1, 0.3), 1: (1, 0.3)}) == 0  # ties: the smaller lr
    # no step fitted in the budget at any lr: every score is the initial metric; do not widen
    flat = {-3: (1, 1.0), -2: (1, 1.0), -1: (1, 1.0)}
    assert race.next_lr_index(flat, max_points=6) is None and race.edge_flag(flat) == "flat"


@pytest.mark.parametrize("optimum", [-7, -4, 0, 3, 9])
def test_search_grid_brackets_the_optimum_of_a_unimodal_score_or_flags_the_edge(optimum):
    calls: list[int] = []

    def evaluate(j: int) -> race.Score:
        calls.append(j)
        return (1, float((j - optimum) ** 2))

    scores = race.search_grid(evaluate, -3, max_points=6)
    assert sorted(calls) == sorted(scores) and len(set(calls)) == len(calls)  # nothing run twice
    assert sorted(scores) == list(range(min(scores), max(scores) + 1))  # contiguous grid
    assert len(scores) <= 6
    best = race.best_index(scores)
    if min(scores) < optimum < max(scores) or abs(optimum + 3) <= 1:
        # reachable within the cap: the grid found it and brackets it
        assert best == optimum and race.edge_flag(scores) == ""
    else:
        # the cap stopped the widening: the best is the edge nearest the optimum and is flagged
        assert len(scores) == 6
        assert race.edge_flag(scores) == ("low" if optimum < -3 else "high")
        assert best == (min(scores) if optimum < -3 else max(scores))


# ----------------------------------------------------------------------------------------------------
# time to target and checkpoints


def test_time_to_target_interpolates_in_log_metric():
    curve = [(0.0, 1.0), (1.0, 0.1), (2.0, 0.001)]
    # between (1, 0.1) and (2, 0.001): log10 falls from −1 to −3, −2 is half way
    assert race.time_to_target(curve, 0.01) == pytest.approx(1.5)
    # 0.05 is log10 −1.301: fraction 0.1505 of the way
    expect = 1.0 + (math.log(0.1) - math.log(0.05)) / (math.log(0.1) - math.log(0.001))
    assert race.time_to_target(curve, 0.05) == pytest.approx(expect)
    assert race.time_to_target(curve, 0.1) == pytest.approx(1.0)  # hit exactly at a checkpoint
    assert race.time_to_target(curve, 2.0) == 0.0  # already there at the start
    assert math.isnan(race.time_to_target(curve, 1e-4))
    assert math.isnan(race.time_to_target([], 1.0))


def test_time_to_target_first_crossing_and_non_positive_values():
    # the metric dips below, rises and dips again: the first crossing counts
    curve = [(0.0, 1.0), (1.0, 0.01), (2.0, 0.5), (3.0, 0.001)]
    assert race.time_to_target(curve, 0.02) < 1.0
    # a gap can reach 0 (or round below it): linear interpolation there
    assert race.time_to_target([(0.0, 0.4), (2.0, -0.1)], 0.0) == pytest.approx(1.6)


def test_checkpoints_cover_the_budget_with_early_log_spaced_points():
    cps = race.checkpoints(3.0, 40, 20)
    assert all(a < b for a, b in itertools.pairwise(cps))
    assert len(cps) <= 60
    assert cps[-1] == pytest.approx(3.0) and cps[0] == pytest.approx(3.0 / 300)
    assert all(0 < t <= 3.0 + 1e-12 for t in cps)
    assert sum(t < 3.0 / 40 for t in cps) >= 6  # the log-spaced ones resolve early progress
    assert race.checkpoints(1.0, 4, 0) == pytest.approx([0.25, 0.5, 0.75, 1.0])


# ----------------------------------------------------------------------------------------------------
# problem generators


def test_brockett_optimum_is_the_weighted_sum_of_top_eigenvalues():
    inst = race.BrockettInstance(12, 3, seed=0)
    lam = np.linspace(0.0, 1.0, 12)  # the spectrum the generator builds A with
    nw = np.linspace(1.0, 0.5, 3)
    assert inst.f_star == pytest.approx(-float((lam[::-1][:3] * nw).sum()), abs=1e-12)
    # independent reference: numpy's eigh, top eigenvectors in decreasing order
    _w, v = np.linalg.eigh(inst.a64.numpy())
    x_opt = torch.from_numpy(v[:, ::-1][:, :3].copy())
    assert inst.value64(x_opt) == pytest.approx(inst.f_star, abs=1e-12)
    # the optimum is a minimum over St(12, 3) and the metric is 0 there, positive elsewhere
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        x = torch.linalg.qr(torch.randn(12, 3, generator=gen, dtype=torch.float64))[0]
        assert inst.value64(x) >= inst.f_star - 1e-12
    holder = race._Holder(x_opt.float())
    assert abs(inst.metric(holder)) < 1e-6
    assert inst.metric(race._Holder(inst.x0)) > 0
    # the float32 training loss is the same function
    assert float(inst.loss(holder, None).detach()) == pytest.approx(inst.f_star, rel=1e-5)


def test_brockett_optimum_against_a_brute_force_reference():
    # a 2×2 case by hand: A = diag(3, 1), k = 1, N = (1): f* = −3
    assert race.brockett_optimum(
        torch.diag(torch.tensor([1.0, 3.0])), torch.tensor([1.0])
    ) == pytest.approx(-3.0)
    # a rotated 3×3 with k = 2 and weights (2, 1): −(2·5 + 1·4)
    q = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64))[0]
    a = q @ torch.diag(torch.tensor([4.0, -1.0, 5.0], dtype=torch.float64)) @ q.T
    assert race.brockett_optimum(a, torch.tensor([2.0, 1.0])) == pytest.approx(-14.0)


def _orth_err(x: torch.Tensor) -> float:
    x = x.detach().double()
    return float((x.mT @ x - torch.eye(x.shape[-1], dtype=torch.float64)).abs().max())


def test_regression_instance_same_stream_for_a_seed_and_metric_scale():
    a, b = race.RegressionInstance(16, seed=3), race.RegressionInstance(16, seed=3)
    assert torch.equal(a.q_star, b.q_star) and torch.equal(a.x0, b.x0)
    for step in (0, 1, 57):
        xa, ya = a.batch(step)
        xb, yb = b.batch(step)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert xa.shape == (32, 16)
        # y = Q* x + 0.01·ε: the residual has standard deviation 0.01
        assert float((ya - xa @ a.q_star.mT).std()) == pytest.approx(0.01, rel=0.2)
    assert not torch.equal(a.batch(0)[0], a.batch(1)[0])
    assert not torch.equal(a.batch(0)[0], race.RegressionInstance(16, seed=4).batch(0)[0])
    for m in (a.q_star, a.x0):
        assert _orth_err(m) < 1e-5
        assert float(torch.linalg.det(m.double())) == pytest.approx(1.0, abs=1e-5)  # SO(d)
    assert a.metric(race._Holder(a.x0)) == pytest.approx(1.0)
    assert a.metric(race._Holder(a.q_star)) == 0.0
    # the loss is ½‖Xx − y‖² averaged over the batch (explicit loop reference)
    x, y = a.batch(0)
    ref = sum(0.5 * float(((a.x0 @ x[i] - y[i]) ** 2).sum()) for i in range(32)) / 32
    assert float(a.loss(race._Holder(a.x0), (x, y)).detach()) == pytest.approx(ref, rel=1e-5)


def test_copying_instance_is_deterministic_and_starts_near_uniform():
    a, b = (
        race.CopyingInstance(seed=0, T=10, hidden=8),
        race.CopyingInstance(seed=0, T=10, hidden=8),
    )
    ma, owner, name = a.build()
    mb, _, _ = b.build()
    assert name == "weight_hh" and _orth_err(getattr(owner, name)) < 1e-5
    for pa, pb in zip(ma.parameters(), mb.parameters()):
        assert torch.equal(pa, pb)
    xa, ya = a.batch(5)
    xb, yb = b.batch(5)
    assert torch.equal(xa, xb) and torch.equal(ya, yb) and xa.shape == (32, 30, 10)
    # an untrained model predicts ≈ uniformly over 9 classes: cross-entropy ≈ log 9
    assert a.metric(ma) * a.baseline == pytest.approx(math.log(9), rel=0.3)


@pytest.mark.parametrize("square", [True, False])
def test_every_method_starts_from_the_same_point(square):
    pr = race.regression(8, 1.0, 0.1) if square else race.brockett(3, 1.0, 0.1, n=10)
    inst = pr.instance(0)
    for m in race.methods():
        module, owner, name = inst.build()
        groups = race._groups(module, owner, name, m, 1e-3, inst.square)
        assert sum(len(g["params"]) for g in groups) == len(list(module.parameters()))
        with torch.no_grad():
            w = getattr(owner, name).detach()
        assert torch.allclose(w, inst.x0, atol=1e-5), m.key


def test_select_matches_keys_and_families():
    ms = race.methods()
    keys = [m.key for m in race.select(ms, "ours-*", "methods")]
    assert keys and all(k.startswith("ours-") for k in keys)
    prs = race.select(race.problems(False), "regression,brockett-16", "problems")
    assert [p.name for p in prs] == [
        "regression-256",
        "regression-512",
        "regression-1024",
        "regression-2048",
        "brockett-16",
    ]
    with pytest.raises(SystemExit, match="--methods"):
        race.select(ms, "nope", "methods")


def test_tables_have_no_stray_pipes():
    for pr in race.problems(False) + race.problems(True):
        assert "|" not in pr.metric_name and "|" not in pr.target_text
    assert all("|" not in m.name for m in race.methods())


def test_planned_seconds_counts_grid_widening_and_seeds():
    prs = [race.regression(256, 2.0, 0.1)]
    ms = [m for m in race.methods() if m.key in ("ours-sgd-mom", "ours-adam")]
    assert race.planned_seconds(prs, ms, 2, None, 0.5) == pytest.approx(2 * (3 + 0.5 + 1) * 2.0)
    assert race.planned_seconds(prs, ms, 1, 1.0, 0.0) == pytest.approx(2 * 3 * 1.0)


# ----------------------------------------------------------------------------------------------------
# smoke runs


def test_race_of_two_methods_on_a_tiny_problem():
    pr = race.regression(16, 0.1, 0.5)
    ms = [m for m in race.methods() if m.key in ("ours-sgd-mom", "geoopt-rsgd-mom-euc")]
    race.warm_up(ms)  # first calls (lazy imports, kernel loads) would not fit a budget this small
    results = [
        race.race_method(pr, m, seeds=2, budget=pr.budget, max_points=3, log=False) for m in ms
    ]
    for res in results:
        assert res.best in res.grid and res.seeds[0] is res.grid[res.best]
        if res.edge == "no step":  # a load spike made the first step outlast the budget
            assert len(res.grid) == 1 and len(res.seeds) == 1
        else:
            assert len(res.grid) == 3 and len(res.seeds) == 2 and res.seeds[1].seed == 1
        for r in res.seeds:
            ts = [t for t, _ in r.curve]
            assert ts == sorted(ts) and ts[0] == 0.0 and r.curve[0][1] == pytest.approx(1.0)
            assert len(r.curve) >= 2 and r.ms_per_step > 0  # at least one step ran
            assert r.final == [v for t, v in r.curve if t <= pr.budget][-1]
            assert r.steps == 0 or r.final < 1.0  # both descend at every lr of these grids
            if math.isfinite(r.time_to_target):
                assert r.time_to_target <= pr.budget and r.final <= 1.0
    table = race.problem_table(pr, results)
    assert all(m.name in table for m in ms) and table.count("\n") == 3
    rows = race.summary_rows([pr], {pr.name: results})
    assert len(rows) == 1 and "OrthogonalSGD" in " ".join(rows[0])


def test_a_slow_method_does_not_start_a_step_that_would_end_past_the_budget():
    class Slow(race.OrthogonalSGD):
        def step(self, closure=None):
            time.sleep(0.05)
            return super().step(closure)

    m = race.Method("slow", "slow", race._mark, race._ours(Slow), {"regression": 0.1})
    pr = race.regression(16, 0.3, 1e-9)
    r = race.run_once(pr, m, 0.1, 0, pr.budget)
    assert 1 <= r.steps <= 5 and r.ms_per_step >= 50
    assert all(t <= pr.budget for t, _ in r.curve)  # the step past the budget never ran
    assert r.curve[-1][0] == pytest.approx(r.steps * r.ms_per_step / 1e3)  # final state evaluated
    assert r.final == r.curve[-1][1] < 1.0


def test_a_method_whose_first_step_exceeds_the_budget_gets_one_run():
    class VerySlow(race.OrthogonalSGD):
        def step(self, closure=None):
            time.sleep(0.15)
            return super().step(closure)

    m = race.Method("veryslow", "very slow", race._mark, race._ours(VerySlow), {"regression": 0.1})
    pr = race.regression(16, 0.1, 0.5)
    res = race.race_method(pr, m, seeds=2, budget=pr.budget, max_points=6, log=False)
    assert list(res.grid) == [race.lr_index(0.1)] and res.edge == "no step"
    assert len(res.seeds) == 1 and res.seeds[0].steps == 0
    assert res.seeds[0].final == pytest.approx(1.0)
    assert "no step" in race.problem_table(pr, [res])


def test_main_writes_a_custom_report(tmp_path):
    race.main(
        [
            "--problems",
            "regression-256",
            "--methods",
            "ours-adam,tcwy-adam",
            "--budget",
            "0.03",
            "--seeds",
            "1",
            "--max-grid",
            "3",
            "--out",
            str(tmp_path),
        ]
    )
    text = (tmp_path / "optimizers.custom.md").read_text()
    assert "## Summary" in text and "OrthogonalAdam" in text and "(T-)CWY" in text
    assert "regression-256" in text and "one seed only" in text
