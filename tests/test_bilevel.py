"""Tests for orthotorch.bilevel: exact / FOM / UFOM hypergradients against independent references."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from orthotorch.bilevel import (
    HypergradInfo,
    UFOMController,
    accumulate_grads,
    batched_hypergradient,
    hypergradient,
    hypergradient_vmap,
    inner_adapt,
    module_hypergradient,
    module_loss,
    module_params,
    optimal_q,
    ufom_cost_variance,
)

D64 = torch.float64


def quadratic_problem(d: int = 5, seed: int = 0, dtype: torch.dtype = D64):
    """inner ½pᵀAp − cᵀp, outer ½(p − b)ᵀB(p − b), with the closed-form hypergradient."""
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(d, d, generator=g, dtype=D64)
    a = m @ m.T / d + 0.2 * torch.eye(d, dtype=D64)
    m2 = torch.randn(d, d, generator=g, dtype=D64)
    bmat = m2 @ m2.T / d + 0.1 * torch.eye(d, dtype=D64)
    c = torch.randn(d, generator=g, dtype=D64)
    b = torch.randn(d, generator=g, dtype=D64)
    theta = torch.randn(d, generator=g, dtype=D64)
    a, bmat, c, b, theta = (t.to(dtype) for t in (a, bmat, c, b, theta))

    def inner(p):
        return 0.5 * p @ a @ p - c @ p

    def outer(p):
        return 0.5 * (p - b) @ bmat @ (p - b)

    def closed_form(steps: int, lr: float):
        a64, b64, c64 = a.double(), bmat.double(), c.double()
        p_star = torch.linalg.solve(a64, c64)
        m_r = torch.linalg.matrix_power(torch.eye(d, dtype=D64) - lr * a64, steps)
        phi_r = p_star + m_r @ (theta.double() - p_star)
        g_fom = b64 @ (phi_r - b.double())
        return m_r @ g_fom, g_fom, phi_r  # (I − αA) is symmetric

    return inner, outer, theta, closed_form


# ------------------------------------------------------------------------------------------------
# exact branch


@pytest.mark.parametrize("steps", [0, 1, 2, 7, 40])
@pytest.mark.parametrize("checkpoints", [None, 0, 1, 3])
def test_exact_matches_closed_form_quadratic(steps, checkpoints):
    inner, outer, theta, closed = quadratic_problem()
    g_exact, g_fom, _ = closed(steps, 0.3)
    g, info = hypergradient(
        inner, outer, theta, steps=steps, lr=0.3, checkpoints=checkpoints, return_info=True
    )
    assert g.dtype == D64 and g.shape == theta.shape
    assert (g - g_exact).abs().max() <= 1e-10
    assert info.hvp_evals == steps and info.outer_grad_evals == 1
    if steps >= 2:  # the test problem really has second-order terms
        assert (g_exact - g_fom).norm() > 1e-2


def test_forward_mode_hvp_matches():
    inner, outer, theta, closed = quadratic_problem(seed=3)
    g = hypergradient(inner, outer, theta, steps=12, lr=0.2, hvp="forward")
    assert (g - closed(12, 0.2)[0]).abs().max() <= 1e-10


def test_fom_matches_closed_form_and_inner_adapt():
    inner, outer, theta, closed = quadratic_problem(seed=1)
    _, g_fom, phi_r = closed(9, 0.25)
    g, info = hypergradient(inner, outer, theta, steps=9, lr=0.25, method="fom", return_info=True)
    assert (g - g_fom).abs().max() <= 1e-10
    assert info.grad_evals == 9 and info.hvp_evals == 0 and info.max_stored_iterates == 0
    assert (inner_adapt(inner, theta, steps=9, lr=0.25) - phi_r).abs().max() <= 1e-10


def nonlinear_problem():
    g = torch.Generator().manual_seed(5)
    theta = {
        "w": torch.randn(4, 3, generator=g, dtype=D64),
        "b": torch.randn(3, generator=g, dtype=D64),
    }
    x = torch.randn(8, 4, generator=g, dtype=D64)
    y = torch.randn(8, 3, generator=g, dtype=D64)

    def inner(p):
        return (torch.tanh(x @ p["w"] + p["b"]) - y).pow(2).mean() + 0.1 * p["w"].pow(4).sum()

    def outer(p):
        return (torch.sin(x @ p["w"]) + p["b"]).pow(2).mean()

    return inner, outer, theta


def manual_unrolled(inner, outer, theta, steps, lr):
    """Independent reference: plain torch.autograd with create_graph (no torch.func)."""
    params = {k: v.clone().requires_grad_(True) for k, v in theta.items()}
    phi = dict(params)
    for _ in range(steps):
        grads = torch.autograd.grad(inner(phi), list(phi.values()), create_graph=True)
        phi = {k: v - lr * gk for (k, v), gk in zip(phi.items(), grads)}
    out = torch.autograd.grad(outer(phi), list(params.values()))
    return dict(zip(params, out))


@pytest.mark.parametrize("checkpoints", [None, 0, 2])
def test_exact_matches_full_backprop_nonlinear_dict(checkpoints):
    inner, outer, theta = nonlinear_problem()
    ref = manual_unrolled(inner, outer, theta, 15, 0.1)
    g = hypergradient(inner, outer, theta, steps=15, lr=0.1, checkpoints=checkpoints)
    unrolled = hypergradient(inner, outer, theta, steps=15, lr=0.1, method="unrolled")
    assert set(g) == set(theta)
    for k in theta:
        assert (g[k] - ref[k]).abs().max() <= 1e-10
        assert (unrolled[k] - ref[k]).abs().max() <= 1e-10


def test_float32_result_close_to_float64():
    inner, outer, theta, closed = quadratic_problem(dtype=torch.float32)
    g = hypergradient(inner, outer, theta, steps=10, lr=0.3)
    assert g.dtype == torch.float32
    ref = closed(10, 0.3)[0]
    assert (g.double() - ref).norm() <= 1e-5 * max(1.0, ref.norm().item())


def test_theta_is_not_modified_and_result_detached():
    inner, outer, theta, _ = quadratic_problem()
    theta = theta.clone().requires_grad_(True)
    before = theta.detach().clone()
    g = hypergradient(inner, outer, theta, steps=3, lr=0.1)
    assert torch.equal(theta.detach(), before) and not g.requires_grad and theta.grad is None


# ------------------------------------------------------------------------------------------------
# memory: stored iterates must not grow like r


@pytest.mark.parametrize("steps", [10, 100, 1000])
def test_stored_iterates_sublinear_default(steps):
    # elementwise problem so r = 1000 is cheap
    theta = torch.linspace(-1, 1, 16, dtype=D64)

    def inner(p):
        return (0.5 * p.pow(2) + 0.05 * p.pow(4)).sum()

    def outer(p):
        return (p - 0.3).pow(2).sum()

    _, info = hypergradient(inner, outer, theta, steps=steps, lr=0.05, return_info=True)
    assert info.max_stored_iterates <= 2 * math.ceil(math.sqrt(steps))
    assert info.grad_evals <= 2 * steps and info.hvp_evals == steps
    # positive control: stride 1 stores every iterate, so the counter can catch a store-all path
    _, info_all = hypergradient(
        inner, outer, theta, steps=steps, lr=0.05, checkpoints=1, return_info=True
    )
    assert info_all.max_stored_iterates == steps - 1
    _, info_ufom = hypergradient(
        inner,
        outer,
        theta,
        steps=steps,
        lr=0.05,
        method="ufom",
        q=1.0,
        generator=torch.Generator().manual_seed(0),
        return_info=True,
    )
    assert info_ufom.exact_used and info_ufom.max_stored_iterates == info.max_stored_iterates


def test_no_stored_iterates_with_checkpoints_zero():
    inner, outer, theta, closed = quadratic_problem()
    for steps in (5, 60):
        g, info = hypergradient(
            inner, outer, theta, steps=steps, lr=0.1, checkpoints=0, return_info=True
        )
        assert info.max_stored_iterates == 0
        assert info.grad_evals == steps + steps * (steps - 1) // 2
        assert (g - closed(steps, 0.1)[0]).abs().max() <= 1e-10


_RSS_CODE = textwrap.dedent(
    """
    import json, resource, torch
    torch.set_num_threads(1)
    from orthotorch.bilevel import hypergradient
    theta = torch.linspace(-1, 1, 20_000, dtype=torch.float64)   # 160 KB per iterate
    inner = lambda p: (0.5 * p.pow(2) + 0.05 * p.pow(4)).sum()
    outer = lambda p: (p - 0.3).pow(2).sum()
    gen = torch.Generator().manual_seed(0)
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from a large parent (a pytest run that has
    # loaded the whole suite), which would hide this process's own growth
    def peak():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    hypergradient(inner, outer, theta, steps=3, lr=0.01)  # warm up torch.func's lazy setup
    out = {"base": peak()}
    hypergradient(inner, outer, theta, steps=10, lr=0.01)
    out["exact_r10"] = peak()
    # the peak is monotone: each entry is the peak so far, so the growth over the previous
    # entry bounds the extra memory of that call (runs are ordered by expected memory)
    hypergradient(inner, outer, theta, steps=1000, lr=0.01)
    out["exact_r1000"] = peak()
    hypergradient(inner, outer, theta, steps=1000, lr=0.01, method="ufom", q=1.0, generator=gen)
    out["ufom_r1000"] = peak()
    hypergradient(inner, outer, theta, steps=1000, lr=0.01, checkpoints=1)  # stores all iterates
    out["store_all_r1000"] = peak()
    print(json.dumps(out))
    """
)


def test_peak_rss_flat_in_r_subprocess():
    out = subprocess.run(
        [sys.executable, "-c", _RSS_CODE],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    mb = json.loads(out.stdout.strip().splitlines()[-1])
    # storing every iterate costs ≈ 1000 × 0.16 MB = 160 MB; √r checkpointing ≈ 62 × 0.16 ≈ 10 MB
    assert mb["exact_r1000"] - mb["exact_r10"] < 25.0, mb
    assert mb["ufom_r1000"] - mb["exact_r10"] < 25.0, mb
    assert mb["store_all_r1000"] - mb["ufom_r1000"] > 80.0, mb  # the measurement catches growth


# ------------------------------------------------------------------------------------------------
# UFOM: unbiased (z-test), FOM biased


def test_ufom_unbiased_ztest_and_fom_biased():
    inner, outer, theta, closed = quadratic_problem(d=4, seed=2)
    steps, lr, q, n = 6, 0.4, 0.5, 400
    g_exact, g_fom, _ = closed(steps, lr)
    gen = torch.Generator().manual_seed(123)
    draws = torch.stack(
        [
            hypergradient(
                inner, outer, theta, steps=steps, lr=lr, method="ufom", q=q, generator=gen
            )
            for _ in range(n)
        ]
    )
    mean, se = draws.mean(0), draws.std(0) / math.sqrt(n)
    assert (se > 0).all()
    z_ufom = ((mean - g_exact) / se).abs()
    z_fom = ((g_fom - g_exact) / se).abs()
    assert z_ufom.max() < 4.0, z_ufom  # 4 coordinates, two-sided: false alarm ≈ 2.5e-4
    assert z_fom.max() > 10.0, z_fom  # FOM is measurably off
    # the variance matches (1/q − 1)‖g_exact − g_FOM‖² per coordinate, within sampling error
    var_theory = (1 / q - 1) * (g_exact - g_fom).pow(2)
    assert torch.allclose(draws.var(0), var_theory, rtol=0.25)


def test_ufom_generator_reproducible_and_q_one_is_exact():
    inner, outer, theta, closed = quadratic_problem()
    outs = []
    for _ in range(2):
        gen = torch.Generator().manual_seed(7)
        outs.append(
            torch.stack(
                [
                    hypergradient(
                        inner, outer, theta, steps=4, lr=0.2, method="ufom", q=0.3, generator=gen
                    )
                    for _ in range(10)
                ]
            )
        )
    assert torch.equal(outs[0], outs[1])
    g = hypergradient(
        inner,
        outer,
        theta,
        steps=4,
        lr=0.2,
        method="ufom",
        q=1.0,
        generator=torch.Generator().manual_seed(0),
    )
    assert (g - closed(4, 0.2)[0]).abs().max() <= 1e-10


def test_batched_ufom_mean_over_tasks_unbiased():
    tasks, exact = [], []
    for s in range(3):
        inner, outer, theta, closed = quadratic_problem(d=3, seed=10 + s)
        tasks.append((inner, outer))
        exact.append(closed(5, 0.3)[0])
    theta = quadratic_problem(d=3, seed=10)[2]
    # all tasks share theta from seed 10; recompute the references at that theta
    refs = torch.stack(
        [hypergradient(i, o, theta, steps=5, lr=0.3, method="unrolled") for i, o in tasks]
    ).mean(0)
    g_ex, infos = batched_hypergradient(tasks, theta, steps=5, lr=0.3, return_info=True)
    assert (g_ex - refs).abs().max() <= 1e-10 and len(infos) == 3
    gen = torch.Generator().manual_seed(1)
    draws = torch.stack(
        [
            batched_hypergradient(
                tasks, theta, steps=5, lr=0.3, method="ufom", q=0.5, generator=gen
            )
            for _ in range(150)
        ]
    )
    se = draws.std(0) / math.sqrt(150)
    assert (((draws.mean(0) - refs) / se).abs() < 4.0).all()


# ------------------------------------------------------------------------------------------------
# q selection


def test_optimal_q_matches_grid_search():
    cases = [
        dict(cost_fom=11.0, cost_extra=30.0, variance_exact=5.0, gap_sq=0.5),
        dict(cost_fom=101.0, cost_extra=300.0, variance_exact=2.0, gap_sq=0.01),
        dict(cost_fom=1.0, cost_extra=100.0, variance_exact=50.0, gap_sq=10.0),
    ]
    grid = torch.linspace(0.05, 1.0, 20_000, dtype=D64).tolist()
    for st in cases:
        q = optimal_q(**st, floor=0.05)
        best = min(grid, key=lambda x: ufom_cost_variance(x, **st))
        assert abs(q - best) < 1e-3, (st, q, best)
    assert optimal_q(cost_fom=1, cost_extra=1, variance_exact=1.0, gap_sq=2.0) == 1.0
    assert optimal_q(cost_fom=1, cost_extra=1, variance_exact=1.0, gap_sq=0.0, floor=0.1) == 0.1
    assert optimal_q(cost_fom=1, cost_extra=1e6, variance_exact=1.0, gap_sq=1e-9) == 0.05


def _synthetic_info(gen, mu, delta, s, q, steps=10):
    g_e = mu + s * torch.randn(mu.shape, generator=gen, dtype=D64)
    return HypergradInfo(
        method="ufom",
        steps=steps,
        grad_evals=2 * steps,
        outer_grad_evals=1,
        hvp_evals=steps,
        exact_used=True,
        q=q,
        g_exact=g_e,
        g_fom=g_e - delta,
    )


def test_controller_adaptive_estimates_statistics():
    gen = torch.Generator().manual_seed(0)
    d, s = 20, 0.5
    mu = torch.ones(d, dtype=D64)
    delta = torch.full((d,), 0.1, dtype=D64)
    ctl = UFOMController(q=0.5, momentum=0.99, floor=0.05)
    for _ in range(3000):
        ctl.observe(_synthetic_info(gen, mu, delta, s, ctl.q))
    st = ctl.statistics()
    assert abs(st["gap_sq"] - 0.2) < 1e-9  # ‖δ‖² = 20 × 0.01
    assert abs(st["variance_exact"] - d * s * s) / (d * s * s) < 0.15
    assert st["cost_fom"] == pytest.approx(11.0) and st["cost_extra"] == pytest.approx(30.0)
    truth = optimal_q(cost_fom=11, cost_extra=30, variance_exact=d * s * s, gap_sq=0.2)
    assert abs(ctl.q - truth) / truth < 0.1
    fixed = UFOMController(q=0.3, mode="fixed")
    for _ in range(10):
        fixed.observe(_synthetic_info(gen, mu, delta, s, 0.3))
    assert fixed.q == 0.3
    clone = UFOMController()
    clone.load_state_dict(ctl.state_dict())
    assert clone.q == ctl.q and clone.statistics() == ctl.statistics()


def test_controller_floor_and_in_hypergradient():
    inner, outer, theta, _ = quadratic_problem()
    ctl = UFOMController(q=0.5, floor=0.2, momentum=0.5)
    gen = torch.Generator().manual_seed(0)
    for _ in range(30):
        hypergradient(inner, outer, theta, steps=3, lr=0.1, method="ufom", q=ctl, generator=gen)
    # a single deterministic task: σ² = 0 < D, so the optimum is q = 1
    assert ctl.n_observed == 30 and ctl.n_exact >= 2 and ctl.q == 1.0
    with pytest.raises(RuntimeError):
        UFOMController().statistics()


# ------------------------------------------------------------------------------------------------
# modules


def _mlp(dtype=D64):
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)


def test_module_hypergradient_matches_manual_maml():
    model = _mlp()
    g = torch.Generator().manual_seed(0)
    xs, ys = torch.randn(6, 4, generator=g, dtype=D64), torch.randint(0, 3, (6,), generator=g)
    xq, yq = torch.randn(9, 4, generator=g, dtype=D64), torch.randint(0, 3, (9,), generator=g)
    inner = module_loss(model, F.cross_entropy, xs, ys)
    outer = module_loss(model, F.cross_entropy, xq, yq)
    grads = module_hypergradient(model, inner, outer, steps=5, lr=0.5, accumulate=True)

    # independent reference: hand-written functional MLP + autograd create_graph
    def fwd(p, x):
        return F.linear(
            torch.tanh(F.linear(x, p["0.weight"], p["0.bias"])), p["2.weight"], p["2.bias"]
        )

    params = {k: v.detach() for k, v in model.named_parameters()}
    ref = manual_unrolled(
        lambda p: F.cross_entropy(fwd(p, xs), ys),
        lambda p: F.cross_entropy(fwd(p, xq), yq),
        params,
        5,
        0.5,
    )
    for k, p in model.named_parameters():
        assert (grads[k] - ref[k]).abs().max() <= 1e-10
        assert torch.equal(p.grad, grads[k])
    tasks = [(inner, outer), (outer, inner)]
    mean = module_hypergradient(model, tasks=tasks, steps=2, lr=0.1, method="fom")
    one = module_hypergradient(model, inner, outer, steps=2, lr=0.1, method="fom")
    two = module_hypergradient(model, outer, inner, steps=2, lr=0.1, method="fom")
    assert all(torch.allclose(mean[k], (one[k] + two[k]) / 2) for k in mean)


def _check_parametrized(model):
    g = torch.Generator().manual_seed(0)
    xs, ys = torch.randn(6, 4, generator=g, dtype=D64), torch.randn(6, 4, generator=g, dtype=D64)
    xq, yq = torch.randn(6, 4, generator=g, dtype=D64), torch.randn(6, 4, generator=g, dtype=D64)
    inner = module_loss(model, F.mse_loss, xs, ys)
    outer = module_loss(model, F.mse_loss, xq, yq)
    names = list(module_params(model))
    assert any("original" in n for n in names)
    exact = module_hypergradient(model, inner, outer, steps=4, lr=0.2)
    ref = module_hypergradient(model, inner, outer, steps=4, lr=0.2, method="unrolled")
    for k in exact:
        assert torch.isfinite(exact[k]).all()
        assert (exact[k] - ref[k]).abs().max() <= 1e-10
    # the adapted effective weight is still orthogonal
    phi = inner_adapt(inner, module_params(model), steps=4, lr=0.2)
    w = torch.func.functional_call(
        model, phi, (torch.eye(4, dtype=D64),)
    ) - torch.func.functional_call(model, phi, (torch.zeros(4, dtype=D64),))
    assert (w.T @ w - torch.eye(4, dtype=D64)).abs().max() <= 1e-10
    assert exact[names[0]].abs().max() > 0


def test_module_with_torch_orthogonal_parametrization():
    from torch.nn.utils.parametrizations import orthogonal

    torch.manual_seed(0)
    model = orthogonal(nn.Linear(4, 4).double(), "weight")
    _check_parametrized(model)


# orthotorch's own parametrizations switch to plain differentiable ops under torch.func transforms, so
# exact/UFOM hypergradients (HVPs) work through every method
@pytest.mark.parametrize("method", ["matrix_exp", "cayley", "tcwy", "cwy", "givens"])
def test_module_with_orthotorch_parametrize(method):
    from orthotorch import parametrize

    torch.manual_seed(0)
    layer = nn.Linear(4, 4).double()
    parametrize.orthogonal(layer, "weight", method=method)  # in place, like torch's
    _check_parametrized(layer)


def test_accumulate_grads_errors():
    model = _mlp()
    with pytest.raises(KeyError, match="nope"):
        accumulate_grads(model, {"nope": torch.zeros(1)})
    with pytest.raises(ValueError, match="shape"):
        accumulate_grads(model, {"0.bias": torch.zeros(3, dtype=D64)})


# ------------------------------------------------------------------------------------------------
# bad input


def test_bad_input_errors():
    inner, outer, theta, _ = quadratic_problem()
    kw = dict(steps=3, lr=0.1)
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="steps"):
        hypergradient(inner, outer, theta, steps=-1, lr=0.1)
    with pytest.raises(TypeError, match="steps"):
        hypergradient(inner, outer, theta, steps=2.0, lr=0.1)
    for bad_q in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="`q`"):
            hypergradient(inner, outer, theta, **kw, method="ufom", q=bad_q, generator=gen)
    with pytest.raises(ValueError, match="`q`"):
        hypergradient(inner, outer, theta, **kw, method="ufom", generator=gen)
    with pytest.raises(TypeError, match="generator"):
        hypergradient(inner, outer, theta, **kw, method="ufom", q=0.5)
    with pytest.raises(ValueError, match=r"inner_loss.*scalar"):
        hypergradient(lambda p: p * 2, outer, theta, **kw)
    with pytest.raises(ValueError, match=r"outer_loss.*scalar"):
        hypergradient(inner, lambda p: p.pow(2), theta, **kw)
    with pytest.raises(ValueError, match=r"outer_loss.*scalar"):
        hypergradient(inner, lambda p: p.pow(2), theta, **kw, method="fom")
    with pytest.raises(TypeError, match="inner_loss"):
        hypergradient(lambda p: 1.0, outer, theta, **kw)
    with pytest.raises(ValueError, match="method"):
        hypergradient(inner, outer, theta, **kw, method="maml")
    with pytest.raises(ValueError, match="lr"):
        hypergradient(inner, outer, theta, steps=3, lr=float("nan"))
    with pytest.raises(ValueError, match="checkpoints"):
        hypergradient(inner, outer, theta, **kw, checkpoints=-2)
    with pytest.raises(TypeError, match="theta"):
        hypergradient(inner, outer, torch.arange(3), **kw)
    with pytest.raises(TypeError, match="theta"):
        hypergradient(inner, outer, [theta], **kw)
    with pytest.raises(ValueError, match="hvp"):
        hypergradient(inner, outer, theta, **kw, hvp="sideways")
    with pytest.raises(ValueError, match="tasks"):
        batched_hypergradient([], theta, **kw)
    with pytest.raises(ValueError, match="floor"):
        UFOMController(floor=0.0)
    with pytest.raises(ValueError, match="`q`"):
        UFOMController(q=1.2)
    with pytest.raises(ValueError, match="gap_sq"):
        optimal_q(cost_fom=1, cost_extra=1, variance_exact=1, gap_sq=-1)
    with pytest.raises(TypeError, match="module"):
        module_params(theta)


def test_nonfinite_result_raises():
    theta = torch.ones(3, dtype=D64)
    with pytest.raises(FloatingPointError, match="not finite"):
        hypergradient(lambda p: p.pow(4).sum(), lambda p: p.pow(2).sum(), theta, steps=60, lr=5.0)


# ------------------------------------------------------------------------------------------------
# one argument resolver: every entry point accepts and rejects the same keywords alike


def _entry_points():
    """``name -> call(**kw)`` for every public hypergradient entry point, on one small problem.

    Every loss counts its evaluations in ``calls``: a rejected argument must be caught before any.
    """
    calls = []
    theta = torch.linspace(-1.0, 1.0, 3, dtype=D64)
    target = torch.ones(2, 3, dtype=D64)

    def inner(p):
        calls.append("inner")
        return (p - 0.5).pow(2).sum()

    def outer(p):
        calls.append("outer")
        return (p + 0.5).pow(2).sum()

    def data_loss(p, d):
        calls.append("data")
        return (p - d).pow(2).sum()

    def mse(y, t):
        calls.append("module")
        return (y - t).pow(2).mean()

    model = nn.Linear(3, 1).double()
    m_inner = module_loss(model, mse, target, target[:, :1])

    points = {
        "hypergradient": lambda **kw: hypergradient(inner, outer, theta, **kw),
        "batched_hypergradient": lambda **kw: batched_hypergradient([(inner, outer)], theta, **kw),
        "hypergradient_vmap": lambda **kw: hypergradient_vmap(
            data_loss, theta, target, -target, **kw
        ),
        "module_hypergradient": lambda **kw: module_hypergradient(model, m_inner, m_inner, **kw),
        "module_hypergradient(tasks)": lambda **kw: module_hypergradient(
            model, tasks=[(m_inner, m_inner)], **kw
        ),
    }
    return points, calls


_GEN = torch.Generator().manual_seed(0)
_BAD_ARGUMENTS = [
    # (keywords, exception, a word of the message)
    (dict(q=5.0), ValueError, "`q`"),  # checked for method="exact" too (vmap used to accept it)
    (dict(q=0.0, method="fom"), ValueError, "`q`"),
    (dict(q=float("nan"), method="ufom", generator=_GEN), ValueError, "`q`"),
    (dict(q="0.5", method="ufom", generator=_GEN), TypeError, "`q`"),
    (dict(q=True, method="ufom", generator=_GEN), TypeError, "`q`"),
    (dict(generator="x"), TypeError, "generator"),  # method="exact": vmap used to accept it
    (dict(method="ufom", q=0.5), TypeError, "generator"),
    (dict(method="ufom", generator=_GEN), ValueError, "`q`"),
    (dict(method="maml"), ValueError, "method"),
    (dict(steps=-1), ValueError, "steps"),
    (dict(steps=2.0), TypeError, "steps"),
    (dict(steps="3"), TypeError, "steps"),
    (dict(lr=float("nan")), ValueError, "lr"),
    (dict(lr=float("inf")), ValueError, "lr"),
    (dict(lr=-0.1), ValueError, "lr"),
    (dict(lr="0.1"), TypeError, "lr"),
    (dict(checkpoints=-2), ValueError, "checkpoints"),
    (dict(checkpoints=1.5), TypeError, "checkpoints"),
    (dict(hvp="sideways"), ValueError, "hvp"),
    (dict(return_info="yes"), TypeError, "return_info"),
]


@pytest.mark.parametrize("entry", list(_entry_points()[0]))
@pytest.mark.parametrize(
    "bad, exc, word", _BAD_ARGUMENTS, ids=[str(b) for b, _, _ in _BAD_ARGUMENTS]
)
def test_every_entry_point_rejects_the_same_arguments(entry, bad, exc, word):
    points, calls = _entry_points()
    kw = {"steps": 2, "lr": 0.1, **bad}
    with pytest.raises(exc, match=word):
        points[entry](**kw)
    assert calls == [], "arguments must be checked before any loss is evaluated"


@pytest.mark.parametrize("entry", list(_entry_points()[0]))
def test_every_entry_point_accepts_the_same_arguments(entry):
    points, calls = _entry_points()
    ctl = UFOMController(0.5, mode="fixed")
    for kw in (
        dict(q=0.5),  # a valid q is accepted (and unused) by method="exact"
        dict(q=ctl, method="exact"),
        dict(method="ufom", q=torch.tensor(1.0), generator=torch.Generator().manual_seed(0)),
        dict(method="ufom", q=ctl, generator=torch.Generator().manual_seed(0)),
        dict(lr=torch.tensor(0.1), steps=3, checkpoints=0, hvp="forward"),
    ):
        out = points[entry](**{"steps": 2, "lr": 0.1, **kw})
        assert all(
            torch.isfinite(t).all() for t in (out.values() if isinstance(out, dict) else [out])
        )
    assert calls and ctl.n_observed >= 1


def test_inner_adapt_checks_like_the_entry_points():
    theta = torch.zeros(3, dtype=D64)
    with pytest.raises(TypeError, match="steps"):
        inner_adapt(lambda p: p.sum(), theta, steps="2", lr=0.1)
    with pytest.raises(ValueError, match="lr"):
        inner_adapt(lambda p: p.sum(), theta, steps=2, lr=float("nan"))


def test_scalar_validators_type_error_for_wrong_type():
    # a string for a number is a TypeError everywhere (UFOMController gave ValueError)
    for kw in (dict(q="0.5"), dict(floor="0.1"), dict(momentum="0.9"), dict(hvp_cost="2")):
        with pytest.raises(TypeError, match=next(iter(kw))):
            UFOMController(**kw)
    with pytest.raises(TypeError, match="min_exact"):
        UFOMController(min_exact=2.0)
    with pytest.raises(ValueError, match="min_exact"):
        UFOMController(min_exact=1)
    with pytest.raises(ValueError, match="momentum"):
        UFOMController(momentum=1.0)
    with pytest.raises(ValueError, match="mode"):
        UFOMController(mode="sometimes")
    st = dict(cost_fom=1.0, cost_extra=1.0, variance_exact=1.0, gap_sq=0.5)
    with pytest.raises(TypeError, match="cost_fom"):
        optimal_q(**{**st, "cost_fom": "1"})
    with pytest.raises(ValueError, match="variance_exact"):
        optimal_q(**{**st, "variance_exact": float("inf")})
    with pytest.raises(TypeError, match="`q`"):
        ufom_cost_variance("0.5", **st)
    with pytest.raises(ValueError, match="gap_sq"):
        ufom_cost_variance(0.5, **{**st, "gap_sq": -1.0})


def test_bilevel_modules_import_one_way():
    """The internal import order of orthotorch.bilevel (docstring of the package): no cycle between
    hypergrad and ufom (ufom used to import hypergrad, which imported ufom inside functions)."""
    import ast
    from pathlib import Path

    import orthotorch.bilevel as pkg

    order = ["_pytree", "_info", "ufom", "_args", "_engine", "vmap", "hypergrad", "module"]
    root = Path(pkg.__file__).parent
    assert sorted(p.stem for p in root.glob("*.py") if p.stem != "__init__") == sorted(order)
    for name in order:
        tree = ast.parse((root / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                "orthotorch.bilevel"
            ):
                target = node.module.rsplit(".", 1)[-1]
                assert order.index(target) < order.index(name), f"{name} imports {target}"


def test_batched_checks_every_task_before_running_any():
    calls = []

    def inner(p):
        calls.append(1)
        return p.pow(2).sum()

    theta = torch.ones(2, dtype=D64)
    with pytest.raises(TypeError, match=r"tasks\[1\]\[1\]"):
        batched_hypergradient([(inner, inner), (inner, "outer")], theta, steps=2, lr=0.1)
    with pytest.raises(TypeError, match=r"tasks\[1\]"):
        batched_hypergradient([(inner, inner), (inner,)], theta, steps=2, lr=0.1)
    assert calls == []
