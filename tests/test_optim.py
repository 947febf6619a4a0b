"""Tests of orthotorch.optim: exactness against matrix_exp, descent to known optima, torch bit-identity,
state_dict round trips, samplers, errors."""

from __future__ import annotations

import copy
import io
import warnings

import geoopt
import networkx as nx
import pytest
import scipy.linalg
import torch

from conftest import orth_error
from orthotorch.graph_sampling import random_matching, round_robin_matching
from orthotorch.optim import DEFAULT_SEED, OrthogonalAdam, OrthogonalSGD, project_

DTYPES = [torch.float32, torch.float64]


def _orth(n: int, k: int | None = None, *, dtype=torch.float64, det_positive=True) -> torch.Tensor:
    """Random point of St(n, k) (SO(n) when square and det_positive), row-contiguous."""
    k = n if k is None else k
    q = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))[0]
    if det_positive and torch.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q[:, :k].contiguous().to(dtype)


def _dense_generator(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return g @ x.mT - x @ g.mT


def _expm(a: torch.Tensor) -> torch.Tensor:
    """Reference matrix exponential (scipy). torch 2.13's float64 ``matrix_exp`` loses accuracy at some
    norms (‖EᵀE − I‖ ≈ 1e-11 was seen for a 12×12 skew matrix of norm 0.1), too coarse for a 1e-12 check."""
    return torch.from_numpy(scipy.linalg.expm(a.detach().cpu().double().numpy())).to(a.dtype)


def _restricted(w: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(w)
    out[i, j] = w[i, j]
    out[j, i] = w[j, i]
    return out


# ----------------------------------------------------------------------------------------------------
# exactness of one step


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(10, 10), (12, 5), (4, 9)])
@pytest.mark.parametrize("unbiased", [False, True])
def test_one_step_equals_matrix_exp_of_sampled_generator(dtype, shape, unbiased):
    rows, cols = shape
    tall = _orth(max(shape), min(shape), dtype=torch.float64)
    w0 = tall if rows >= cols else tall.mT.contiguous()
    p = torch.nn.Parameter(w0.clone().to(dtype))
    grad = torch.randn(shape, dtype=torch.float64)
    p.grad = grad.to(dtype)
    gen = torch.Generator().manual_seed(7)
    ref_gen = torch.Generator().manual_seed(7)
    lr = 0.05
    opt = OrthogonalSGD(
        [{"params": [p], "manifold": "stiefel"}],
        lr=lr,
        unbiased=unbiased,
        generator=gen,
        matchings_per_step=1,
        sampler="random",
    )
    opt.step()
    n = max(shape)
    m = random_matching(n, generator=ref_gen)
    x, g = (w0, grad) if rows >= cols else (w0.mT, grad.mT)
    w = _restricted(_dense_generator(x, g), m.i, m.j)
    scale = 1.0 / float(m.prob[0]) if unbiased else 1.0  # 1/(n-1) even n, 1/n odd n
    expect = _expm(-lr * scale * w) @ x
    got = p.detach().double() if rows >= cols else p.detach().double().mT
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(got, expect, atol=tol, rtol=0)
    assert orth_error(got) < 10 * tol


def test_first_order_descent_equals_lr_sum_w_squared():
    # f(X) = <A, X>: G = A, f(X+) - f(X) = -lr * sum_M W_ij^2 + O(lr^2)
    n, k = 16, 6
    x0 = _orth(n, k)
    a = torch.randn(n, k, dtype=torch.float64)
    for lr in (1e-3, 1e-4):
        p = torch.nn.Parameter(x0.clone())
        p.grad = a.clone()
        opt = OrthogonalSGD(
            matchings_per_step=1,
            sampler="random",
            params=[{"params": [p], "manifold": "stiefel"}],
            lr=lr,
            generator=torch.Generator().manual_seed(3),
        )
        opt.step()
        m = random_matching(n, generator=torch.Generator().manual_seed(3))
        w = _dense_generator(x0, a)[m.i, m.j]
        decrease = float((a * x0).sum() - (a * p.detach()).sum())
        predicted = lr * float((w**2).sum())
        assert predicted > 0
        assert abs(decrease / predicted - 1) < 20 * lr  # error O(lr)


def test_momentum_buffer_is_transported_by_the_same_rotation():
    n = 8
    x0 = _orth(n)
    g1, g2 = torch.randn(n, n, dtype=torch.float64), torch.randn(n, n, dtype=torch.float64)
    mu, lr = 0.9, 0.1
    p = torch.nn.Parameter(x0.clone())
    opt = OrthogonalSGD(
        matchings_per_step=1,
        sampler="random",
        params=[{"params": [p], "manifold": "orthogonal"}],
        lr=lr,
        momentum=mu,
        generator=torch.Generator().manual_seed(11),
    )
    ref = torch.Generator().manual_seed(11)
    x, b = x0.clone(), None
    for g in (g1, g2):
        p.grad = g.clone()
        opt.step()
        b = g.clone() if b is None else mu * b + g
        m = random_matching(n, generator=ref)
        r = _expm(-lr * _restricted(_dense_generator(x, b), m.i, m.j))
        x, b = r @ x, r @ b
    torch.testing.assert_close(p.detach(), x, atol=1e-12, rtol=0)
    torch.testing.assert_close(opt.state[p]["momentum_buffer"], b, atol=1e-12, rtol=0)


# ----------------------------------------------------------------------------------------------------
# orthogonality and stabilisation


def test_orthogonality_after_ten_thousand_float32_steps():
    d = 32
    p = torch.nn.Parameter(_orth(d, dtype=torch.float32))
    grads = torch.randn(64, d, d, generator=torch.Generator().manual_seed(0))
    opt = OrthogonalSGD(
        matchings_per_step=1,
        params=[{"params": [p], "manifold": "orthogonal"}],
        lr=0.05,
        nonfinite="ignore",
    )
    for t in range(10_000):
        p.grad = grads[t % 64]
        opt.step()
    drift = orth_error(p.detach().double())
    assert drift < 1e-4, drift
    # ... and the rotations really moved the point far from the start
    assert float((p.detach() - _orth(d, dtype=torch.float32)).norm()) > 0.1


def test_stabilize_reprojects_and_keeps_the_component():
    d = 12
    x = _orth(d, dtype=torch.float32)
    noisy = x + 1e-3 * torch.randn(d, d)
    projected = project_(noisy.clone())
    assert orth_error(projected.double()) < 1e-5
    assert torch.linalg.det(projected.double()) > 0
    assert float((projected - x).abs().max()) < 1e-2
    p = torch.nn.Parameter(noisy.clone())
    opt = OrthogonalSGD([{"params": [p], "manifold": "orthogonal"}], lr=0.0, stabilize=2)
    p.grad = torch.zeros(d, d)
    opt.step()
    assert torch.equal(p.detach(), noisy)  # not yet
    opt.step()
    assert orth_error(p.detach().double()) < 1e-5


# ----------------------------------------------------------------------------------------------------
# descent on problems with known optima


def _kabsch_optimum(m: torch.Tensor, nmat: torch.Tensor) -> torch.Tensor:
    # argmin_{X in SO(d)} ||X M - N||^2 = U diag(1,..,1,det(U V^T)) V^T with N M^T = U S V^T
    u, _, vh = torch.linalg.svd(nmat @ m.mT)
    d = torch.ones(u.shape[0], dtype=u.dtype)
    d[-1] = torch.sign(torch.linalg.det(u @ vh))
    return u @ torch.diag(d) @ vh


@pytest.mark.parametrize(
    ("optim_cls", "kwargs"),
    [
        (
            OrthogonalSGD,
            {"lr": 0.3, "sampler": "random", "matchings_per_step": 4, "momentum": 0.5},
        ),
        (OrthogonalSGD, {"lr": 0.3, "sampler": "greedy", "matchings_per_step": 2}),
        (
            OrthogonalSGD,
            {
                "lr": 0.1,
                "sampler": "round_robin",
                "nesterov": True,
                "momentum": 0.5,
                "matchings_per_step": 1,
            },
        ),
        (OrthogonalSGD, {"lr": 0.3, "sampler": "full"}),
        (OrthogonalAdam, {"lr": 0.05, "sampler": "random", "matchings_per_step": 4}),
    ],
)
def test_procrustes_reaches_the_so_optimum(optim_cls, kwargs):
    d = 12
    mmat = torch.randn(d, 3 * d, dtype=torch.float64)
    nmat = _orth(d) @ mmat + 0.3 * torch.randn(d, 3 * d, dtype=torch.float64)
    x_star = _kabsch_optimum(mmat, nmat)
    f_star = float(0.5 * ((x_star @ mmat - nmat) ** 2).sum())
    p = torch.nn.Parameter(_orth(d))
    opt = optim_cls([{"params": [p], "manifold": "so"}], **kwargs)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, 0.995)  # Adam needs a decaying lr
    scale = 1.0 / float(mmat.norm() ** 2 / d)
    for _ in range(1000):
        opt.zero_grad()
        loss = 0.5 * scale * ((p @ mmat - nmat) ** 2).sum()
        loss.backward()
        opt.step()
        if optim_cls is OrthogonalAdam:
            sched.step()
    f = float(0.5 * ((p.detach() @ mmat - nmat) ** 2).sum())
    assert f - f_star < 1e-4 * f_star, (f, f_star)
    assert orth_error(p.detach()) < 1e-10
    assert torch.linalg.det(p.detach()) > 0


def test_stiefel_procrustes_reaches_the_polar_factor():
    n, k = 20, 5
    a = torch.randn(n, k, dtype=torch.float64)
    u, _, vh = torch.linalg.svd(a, full_matrices=False)
    x_star = u @ vh  # argmin ||X - A|| over St(n, k)
    p = torch.nn.Parameter(_orth(n, k))
    opt = OrthogonalSGD(
        [{"params": [p], "manifold": "stiefel"}], lr=0.1, momentum=0.5, matchings_per_step=4
    )
    for _ in range(800):
        opt.zero_grad()
        (0.5 * ((p - a) ** 2).sum()).backward()
        opt.step()
    torch.testing.assert_close(p.detach(), x_star, atol=1e-6, rtol=0)


@pytest.mark.parametrize("sampler", ["random", "greedy"])
def test_brockett_top_k_eigenspace(sampler):
    n, k = 16, 3
    q = _orth(n)
    evals = torch.linspace(0.5, 4.0, n, dtype=torch.float64)
    a = q @ torch.diag(evals) @ q.mT
    weights = torch.linspace(
        2.0, 1.0, k, dtype=torch.float64
    )  # Brockett: tr(X^T A X N), distinct N
    f_star = -float((evals.flip(0)[:k] * weights).sum())
    p = torch.nn.Parameter(_orth(n, k))
    opt = OrthogonalSGD(
        [{"params": [p], "manifold": "stiefel"}],
        lr=0.05,
        momentum=0.8,
        sampler=sampler,
        matchings_per_step=4,
    )
    for _ in range(800):
        opt.zero_grad()
        loss = -torch.trace(p.mT @ a @ p @ torch.diag(weights))
        loss.backward()
        opt.step()
    f = float(-torch.trace(p.detach().mT @ a @ p.detach() @ torch.diag(weights)))
    assert f - f_star < 1e-6 * abs(f_star), (f, f_star)
    # the columns are the top eigenvectors (up to sign)
    top = q[:, -k:].flip(1)
    torch.testing.assert_close(
        (top.mT @ p.detach()).abs(), torch.eye(k, dtype=torch.float64), atol=1e-3, rtol=0
    )


# ----------------------------------------------------------------------------------------------------
# samplers


def test_round_robin_steps_equal_one_full_sweep_bitwise():
    n = 10
    x0 = _orth(n, 4, dtype=torch.float32)
    g = torch.randn(n, 4)  # constant gradient: a linear loss
    p_rr = torch.nn.Parameter(x0.clone())
    p_full = torch.nn.Parameter(x0.clone())
    opt_rr = OrthogonalSGD(
        matchings_per_step=1,
        params=[{"params": [p_rr], "manifold": "stiefel"}],
        lr=0.1,
        sampler="round_robin",
    )
    opt_full = OrthogonalSGD([{"params": [p_full], "manifold": "stiefel"}], lr=0.1, sampler="full")
    for _ in range(n - 1):
        p_rr.grad = g.clone()
        opt_rr.step()
    p_full.grad = g.clone()
    opt_full.step()
    assert torch.equal(p_rr.detach(), p_full.detach())
    assert not torch.equal(p_full.detach(), x0)


def test_round_robin_visits_every_pair_once_per_cycle():
    n = 8
    p = torch.nn.Parameter(_orth(n))
    opt = OrthogonalSGD(
        matchings_per_step=1,
        params=[{"params": [p], "manifold": "orthogonal"}],
        lr=0.0,
        sampler="round_robin",
    )
    matchings = [opt._matchings(opt._info[p], opt.param_groups[0], p, None) for _ in range(n - 1)]
    pairs = {
        tuple(sorted((int(a), int(b)))) for ms in matchings for i, j, _ in ms for a, b in zip(i, j)
    }
    assert len(pairs) == n * (n - 1) // 2
    assert torch.equal(matchings[0][0][0], round_robin_matching(n, 0).i)


def test_greedy_matching_carries_more_than_random():
    n = 64
    x = _orth(n)
    g = torch.randn(n, n, dtype=torch.float64)
    w = _dense_generator(x, g)
    p = torch.nn.Parameter(x.clone())
    opt = OrthogonalSGD(
        matchings_per_step=1,
        params=[{"params": [p], "manifold": "orthogonal"}],
        lr=0.0,
        sampler="greedy",
    )
    ((i, j, _),) = opt._matchings(opt._info[p], opt.param_groups[0], x, g)
    greedy = float((w[i, j] ** 2).sum())
    gen = torch.Generator().manual_seed(0)
    rand = [
        float((w[m.i, m.j] ** 2).sum())
        for m in (random_matching(n, generator=gen) for _ in range(50))
    ]
    assert greedy > 3 * max(rand)


def test_colouring_sampler_moves_only_rows_of_the_graph():
    n = 10
    graph = nx.path_graph(6)  # rows 0..5 only
    p = torch.nn.Parameter(_orth(n))
    x0 = p.detach().clone()
    opt = OrthogonalSGD(
        [{"params": [p], "manifold": "orthogonal"}], lr=0.1, sampler="colouring", graph=graph
    )
    for _ in range(20):
        p.grad = torch.randn(n, n, dtype=torch.float64)
        opt.step()
    assert torch.equal(p.detach()[6:], x0[6:])
    assert not torch.equal(p.detach()[:6], x0[:6])
    assert orth_error(p.detach()) < 1e-12


def test_unbiased_scaling_matches_full_step_in_expectation():
    n = 6
    x = _orth(n)
    g = torch.randn(n, n, dtype=torch.float64)
    w = _dense_generator(x, g)
    lr, total, trials = 1e-6, torch.zeros(n, n, dtype=torch.float64), 3000
    p = torch.nn.Parameter(x.clone())
    opt = OrthogonalSGD(
        [{"params": [p], "manifold": "orthogonal"}], lr=lr, unbiased=True, matchings_per_step=2
    )
    for _ in range(trials):
        p.data.copy_(x)
        p.grad = g
        opt.step()
        total += (p.detach() - x) @ x.mT  # ≈ -lr * (estimate of W) for tiny lr
    est = -total / (trials * lr)
    err = float((est - w).norm() / w.norm())
    assert err < 0.1, err


# ----------------------------------------------------------------------------------------------------
# torch bit-identity on unconstrained parameters


@pytest.mark.parametrize(
    "kwargs",
    [
        {"lr": 0.1},
        {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-2},
        {"lr": 0.1, "momentum": 0.9, "nesterov": True},
        {"lr": 0.05, "momentum": 0.5, "dampening": 0.3, "maximize": True},
    ],
)
def test_unconstrained_params_bit_identical_to_torch_sgd(kwargs):
    shapes = [(5, 3), (7,), (4, 4, 2)]
    ours = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    q = torch.nn.Parameter(_orth(6, dtype=torch.float32))
    opt = OrthogonalSGD([{"params": ours}, {"params": [q], "manifold": "orthogonal"}], **kwargs)
    ref = torch.optim.SGD(theirs, **kwargs)
    for _ in range(5):
        for a, b in zip(ours, theirs):
            g = torch.randn(a.shape)
            a.grad, b.grad = g.clone(), g.clone()
        q.grad = torch.randn(6, 6)
        opt.step()
        ref.step()
        for a, b in zip(ours, theirs):
            assert torch.equal(a, b)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"lr": 0.01},
        {"lr": 0.01, "weight_decay": 0.1, "amsgrad": True},
        {"lr": 0.02, "betas": (0.8, 0.99), "maximize": True},
    ],
)
def test_unconstrained_params_bit_identical_to_torch_adam(kwargs):
    shapes = [(5, 3), (7,)]
    ours = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    q = torch.nn.Parameter(_orth(6, dtype=torch.float32))
    opt = OrthogonalAdam([{"params": ours}, {"params": [q], "manifold": "so"}], **kwargs)
    ref = torch.optim.Adam(theirs, **kwargs)
    for _ in range(5):
        for a, b in zip(ours, theirs):
            g = torch.randn(a.shape)
            a.grad, b.grad = g.clone(), g.clone()
        q.grad = torch.randn(6, 6)
        opt.step()
        ref.step()
        for a, b in zip(ours, theirs):
            assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------------
# geoopt parameters


@pytest.mark.parametrize("manifold", [geoopt.EuclideanStiefel(), geoopt.CanonicalStiefel()])
def test_geoopt_stiefel_parameters_are_rotated(manifold):
    n, k = 9, 3
    p = geoopt.ManifoldParameter(_orth(n, k), manifold=manifold)
    a = torch.randn(n, k, dtype=torch.float64)
    opt = OrthogonalSGD([p], lr=0.1, momentum=0.5, matchings_per_step=2)
    first = None
    for _ in range(200):
        opt.zero_grad()
        loss = 0.5 * ((p - a) ** 2).sum()
        loss.backward()
        opt.step()
        first = float(loss.detach()) if first is None else first
    assert float(loss.detach()) < 0.9 * first
    assert orth_error(p.detach()) < 1e-12
    assert "momentum_buffer" in opt.state[p]


@pytest.mark.parametrize(
    "ours_cls,ref_cls",
    [
        (OrthogonalSGD, geoopt.optim.RiemannianSGD),
        (OrthogonalAdam, geoopt.optim.RiemannianAdam),
    ],
    ids=["sgd", "adam"],
)
def test_other_geoopt_manifolds_get_the_riemannian_step(ours_cls, ref_cls):
    sphere = geoopt.Sphere()
    x0 = torch.nn.functional.normalize(torch.randn(5, dtype=torch.float64), dim=0)
    ours = geoopt.ManifoldParameter(x0.clone(), manifold=sphere)
    theirs = geoopt.ManifoldParameter(x0.clone(), manifold=sphere)
    opt = ours_cls([ours], lr=0.1)
    ref = ref_cls([theirs], lr=0.1)
    for _ in range(5):
        g = torch.randn(5, dtype=torch.float64)
        ours.grad, theirs.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    torch.testing.assert_close(ours.detach(), theirs.detach(), atol=1e-12, rtol=0)


def test_riemannian_momentum_follows_torch_conventions():
    # geoopt's RiemannianSGD seeds its buffer with the Euclidean gradient and then adds the Riemannian
    # one (first step (1+mu)*lr*g); ours starts the buffer at the first Riemannian gradient, like torch
    sphere = geoopt.Sphere()
    x = torch.nn.functional.normalize(torch.randn(5, dtype=torch.float64), dim=0)
    ours = geoopt.ManifoldParameter(x.clone(), manifold=sphere)
    opt = OrthogonalSGD([ours], lr=0.1, momentum=0.7, nesterov=True)
    buf = None
    for _ in range(5):
        g = torch.randn(5, dtype=torch.float64)
        ours.grad = g.clone()
        opt.step()
        r = sphere.egrad2rgrad(x, g)
        buf = r.clone() if buf is None else 0.7 * buf + r
        x, buf = sphere.retr_transp(x, -0.1 * (r + 0.7 * buf), buf)
    torch.testing.assert_close(ours.detach(), x, atol=1e-12, rtol=0)


# ----------------------------------------------------------------------------------------------------
# shapes: wide, batched


def test_wide_linear_weight_keeps_orthonormal_rows():
    layer = torch.nn.Linear(10, 4, dtype=torch.float64)  # weight (4, 10): wide
    torch.nn.init.orthogonal_(layer.weight)
    opt = OrthogonalSGD(
        [{"params": [layer.weight], "manifold": "stiefel"}, {"params": [layer.bias]}],
        lr=0.1,
        momentum=0.9,
    )
    x = torch.randn(32, 10, dtype=torch.float64)
    y = torch.randn(32, 4, dtype=torch.float64)
    losses = []
    for _ in range(100):
        opt.zero_grad()
        loss = ((layer(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    w = layer.weight.detach()
    torch.testing.assert_close(w @ w.mT, torch.eye(4, dtype=torch.float64), atol=1e-12, rtol=0)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("cls", [OrthogonalSGD, OrthogonalAdam])
def test_batched_weights_share_the_matching_and_stay_orthogonal(cls):
    b, n, k = 3, 8, 8
    p = torch.nn.Parameter(torch.stack([_orth(n, k, dtype=torch.float32) for _ in range(b)]))
    opt = cls([{"params": [p], "manifold": "orthogonal"}], lr=0.05)
    target = torch.stack([_orth(n, k, dtype=torch.float32) for _ in range(b)])
    for _ in range(50):
        opt.zero_grad()
        (0.5 * ((p - target) ** 2).sum()).backward()
        opt.step()
    assert orth_error(p.detach().double()) < 1e-5


# ----------------------------------------------------------------------------------------------------
# state dict


def _run(opt, p, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        opt.step()


@pytest.mark.parametrize(
    ("cls", "kwargs"),
    [
        (OrthogonalSGD, {"lr": 0.1, "momentum": 0.9}),
        (OrthogonalSGD, {"lr": 0.1, "sampler": "round_robin_shuffled", "matchings_per_step": 3}),
        (OrthogonalSGD, {"lr": 0.1, "sampler": "round_robin", "stabilize": 2}),
        (OrthogonalAdam, {"lr": 0.01, "unbiased": True}),
    ],
)
def test_state_dict_round_trip_is_bit_identical(cls, kwargs):
    n = 12
    x0 = _orth(n, dtype=torch.float32)
    p = torch.nn.Parameter(x0.clone())
    opt = cls([{"params": [p], "manifold": "orthogonal"}], **kwargs)
    _run(opt, p, 5, seed=1)
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "p": p.detach().clone()}, buf)
    _run(opt, p, 4, seed=2)
    expected = p.detach().clone()

    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    q = torch.nn.Parameter(saved["p"])
    other = cls(
        [{"params": [q], "manifold": "orthogonal"}],
        generator=torch.Generator().manual_seed(12345),
        **kwargs,
    )
    other.load_state_dict(saved["opt"])
    assert other.steps == 5
    _run(other, q, 4, seed=2)
    assert torch.equal(q.detach(), expected)


def test_default_generator_is_seeded_identically():
    a = OrthogonalSGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    b = OrthogonalSGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    assert torch.equal(a.generator.get_state(), b.generator.get_state())
    assert torch.equal(
        a.generator.get_state(), torch.Generator().manual_seed(DEFAULT_SEED).get_state()
    )


def test_optimizer_does_not_touch_the_global_rng():
    p = torch.nn.Parameter(_orth(8))
    opt = OrthogonalSGD([{"params": [p], "manifold": "orthogonal"}], lr=0.1, sampler="random")
    p.grad = torch.randn(8, 8, dtype=torch.float64)
    state = torch.get_rng_state()
    opt.step()
    assert torch.equal(state, torch.get_rng_state())


# ----------------------------------------------------------------------------------------------------
# non-finite gradients


@pytest.mark.parametrize("cls", [OrthogonalSGD, OrthogonalAdam])
def test_nonfinite_gradient_is_skipped_with_a_warning(cls):
    p = torch.nn.Parameter(_orth(6, dtype=torch.float32))
    free = torch.nn.Parameter(torch.randn(3))
    opt = cls([{"params": [p], "manifold": "orthogonal"}, {"params": [free]}], lr=0.1)
    before, free_before = p.detach().clone(), free.detach().clone()
    g = torch.randn(6, 6)
    g[2, 3] = float("nan")
    p.grad = g
    free.grad = torch.tensor([1.0, float("inf"), 0.0])
    with pytest.warns(UserWarning, match="non-finite gradient"):
        opt.step()
    assert torch.equal(p.detach(), before)
    assert torch.equal(free.detach(), free_before)
    assert len(opt.state[p]) == 0  # state untouched
    p.grad = torch.randn(6, 6)
    free.grad = torch.randn(3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
    assert torch.isfinite(p).all() and not torch.equal(p.detach(), before)


def test_nonfinite_gradient_raises_when_asked():
    p = torch.nn.Parameter(_orth(6, dtype=torch.float32))
    opt = OrthogonalSGD([{"params": [p], "manifold": "orthogonal"}], lr=0.1, nonfinite="raise")
    p.grad = torch.full((6, 6), float("inf"))
    with pytest.raises(FloatingPointError, match="non-finite"):
        opt.step()


def test_large_but_finite_gradient_is_not_flagged():
    # the cheap sum-based check overflows in float32 here; the exact fallback must clear it
    p = torch.nn.Parameter(_orth(8, dtype=torch.float32))
    opt = OrthogonalSGD([{"params": [p], "manifold": "orthogonal"}], lr=1e-38)
    p.grad = torch.full((8, 8), 1e37)
    assert not torch.isfinite(p.grad.sum())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
    assert torch.isfinite(p).all()


# ----------------------------------------------------------------------------------------------------
# bad input


def test_bad_input_raises_clear_errors():
    sq = torch.nn.Parameter(_orth(4))
    with pytest.raises(ValueError, match="lr"):
        OrthogonalSGD([sq], lr=-0.1)
    with pytest.raises(ValueError, match="sampler"):
        OrthogonalSGD([sq], lr=0.1, sampler="banana")
    with pytest.raises(ValueError, match="must be square"):
        OrthogonalSGD([{"params": [torch.nn.Parameter(torch.zeros(4, 3))], "manifold": "so"}])
    with pytest.raises(ValueError, match=r"matrix \(\.\.\., n, k\)"):
        OrthogonalSGD([{"params": [torch.nn.Parameter(torch.zeros(4))], "manifold": "stiefel"}])
    with pytest.raises(ValueError, match="manifold"):
        OrthogonalSGD([{"params": [sq], "manifold": "sphere"}])
    with pytest.raises(ValueError, match="graph"):
        OrthogonalSGD([sq], sampler="colouring")
    with pytest.raises(ValueError, match="matchings_per_step"):
        OrthogonalSGD([sq], matchings_per_step=0)
    with pytest.raises(ValueError, match="nesterov"):
        OrthogonalSGD([sq], nesterov=True)
    with pytest.raises(TypeError, match="generator"):
        OrthogonalSGD([sq], generator=0)
    with pytest.raises(ValueError, match="nonfinite"):
        OrthogonalSGD([sq], nonfinite="maybe")
    with pytest.raises(ValueError, match="betas"):
        OrthogonalAdam([sq], betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="outside the 4 rows"):
        OrthogonalSGD(
            [{"params": [sq], "manifold": "orthogonal"}],
            sampler="colouring",
            graph=nx.path_graph(6),
        )


def test_off_manifold_start_and_wrong_component_are_rejected():
    p = torch.nn.Parameter(torch.randn(5, 5))
    opt = OrthogonalSGD([{"params": [p], "manifold": "orthogonal"}], lr=0.1)
    p.grad = torch.randn(5, 5)
    with pytest.raises(ValueError, match="not on the Stiefel manifold"):
        opt.step()
    q = torch.nn.Parameter(_orth(5, det_positive=True))
    q.data[:, 0] *= -1
    opt = OrthogonalSGD([{"params": [q], "manifold": "so"}], lr=0.1)
    q.grad = torch.randn(5, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match="det"):
        opt.step()


def test_failed_add_param_group_leaves_optimizer_unchanged():
    opt = OrthogonalSGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    with pytest.raises(ValueError):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3, 2))], "manifold": "so"})
    assert len(opt.param_groups) == 1
    copy.deepcopy(opt.state_dict())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cls", [OrthogonalSGD, OrthogonalAdam])
def test_half_precision_descends_and_stabilize_bounds_the_drift(dtype, cls):
    d = 16
    p = torch.nn.Parameter(_orth(d, dtype=dtype))
    target = _orth(d, dtype=dtype)
    lr = 0.1 if cls is OrthogonalSGD else 0.01
    opt = cls([{"params": [p], "manifold": "so"}], lr=lr, stabilize=5)
    losses = []
    for _ in range(50):
        opt.zero_grad()
        loss = 0.5 * ((p.float() - target.float()) ** 2).sum()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert p.dtype == dtype
    assert losses[-1] < 0.5 * losses[0]
    assert orth_error(p.detach().double()) < 0.05
