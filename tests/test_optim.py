"""Tests of orthotorch.optim: exactness against matrix_exp, descent to known optima, torch bit-identity,
state_dict round trips, samplers, errors."""

from __future__ import annotations

import copy
import io
import itertools
import pickle
import warnings

import geoopt
import networkx as nx
import pytest
import scipy.linalg
import torch

from conftest import orth_error
from orthotorch._numerics import qr_sign_fixed
from orthotorch.graph_sampling import (
    ColouringSampler,
    GreedySampler,
    make_sampler,
    random_matching,
    round_robin_matching,
)
from orthotorch.manifolds import OrthogonalGroup, SpecialOrthogonalGroup
from orthotorch.optim import (
    DEFAULT_SEED,
    OrthogonalAdam,
    OrthogonalAdamW,
    OrthogonalSGD,
    constraint_of,
    param_groups,
    project_,
)

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
        tall_step="givens",  # the matching step itself (tall weights default to the Cayley step)
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
            tall_step="givens",
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
        tall_step="givens",
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
        tall_step="givens",
    )
    opt_full = OrthogonalSGD(
        [{"params": [p_full], "manifold": "stiefel"}], lr=0.1, sampler="full", tall_step="givens"
    )
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


def _twins(shapes):
    """Random unconstrained parameters of ``shapes`` (``ours``), copies of them for torch's optimizer
    (``theirs``) and a float32 (6, 6) weight ``q`` on SO(6) for a constrained group of ours."""
    ours = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    q = torch.nn.Parameter(_orth(6, dtype=torch.float32))
    return ours, theirs, q


def _assert_steps_equal_torch(our_cls, torch_cls, shapes, manifold, kwargs):
    """Five steps of ``our_cls`` (with a constrained group of ``manifold``) and ``torch_cls`` on the same
    fresh gradients: the unconstrained parameters must agree bitwise after every step."""
    ours, theirs, q = _twins(shapes)
    opt = our_cls([{"params": ours}, {"params": [q], "manifold": manifold}], **kwargs)
    ref = torch_cls(theirs, **kwargs)
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
        {"lr": 0.1},
        {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-2},
        {"lr": 0.1, "momentum": 0.9, "nesterov": True},
        {"lr": 0.05, "momentum": 0.5, "dampening": 0.3, "maximize": True},
    ],
)
def test_unconstrained_params_bit_identical_to_torch_sgd(kwargs):
    shapes = [(5, 3), (7,), (4, 4, 2)]
    _assert_steps_equal_torch(OrthogonalSGD, torch.optim.SGD, shapes, "orthogonal", kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"lr": 0.01},
        {"lr": 0.01, "weight_decay": 0.1, "amsgrad": True},
        {"lr": 0.02, "betas": (0.8, 0.99), "maximize": True},
    ],
)
def test_unconstrained_params_bit_identical_to_torch_adam(kwargs):
    _assert_steps_equal_torch(OrthogonalAdam, torch.optim.Adam, [(5, 3), (7,)], "so", kwargs)


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


# ----------------------------------------------------------------------------------------------------
# issue 14: half-precision resume, torch / older state dicts, torch's flags, tensor lr, hooks


def _grads(params, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype)


def _assert_side_by_side_equal(opt, ref, ours, theirs, q, steps):
    """``steps`` steps of ``opt`` and ``ref`` with the same seeded gradients on ``ours``/``theirs`` (a
    fresh random one on ``q``); the unconstrained parameters must then agree bitwise."""
    for s in range(steps):
        _grads(ours, s)
        _grads(theirs, s)
        q.grad = torch.randn(6, 6)
        opt.step()
        ref.step()
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)


def _save_load(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize(
    ("cls", "kwargs"),
    [
        (OrthogonalSGD, {"lr": 0.05, "momentum": 0.9}),
        (OrthogonalAdam, {"lr": 1e-2, "amsgrad": True}),
    ],
)
def test_resume_is_bit_identical_for_every_dtype(dtype, cls, kwargs):
    x0 = _orth(8, dtype=dtype)
    free0 = torch.randn(5).to(dtype)
    p, free = torch.nn.Parameter(x0.clone()), torch.nn.Parameter(free0.clone())

    def make(p, free):
        return cls([{"params": [p], "manifold": "so"}, {"params": [free]}], stabilize=3, **kwargs)

    opt = make(p, free)
    for s in range(4):
        _grads([p, free], s)
        opt.step()
    saved = _save_load(
        {"opt": opt.state_dict(), "p": p.detach().clone(), "f": free.detach().clone()}
    )
    for s in range(4, 8):
        _grads([p, free], s)
        opt.step()
    q, g = torch.nn.Parameter(saved["p"]), torch.nn.Parameter(saved["f"])
    other = make(q, g)
    other.load_state_dict(saved["opt"])
    if cls is OrthogonalAdam:
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        for key in ("row_sq", "row_count", "max_row_sq"):
            assert other.state[q][key].dtype == acc, key
        assert other.state[q]["step"].dtype == opt.state[p]["step"].dtype
    for s in range(4, 8):  # the first step after loading crashed for half precision (issue 14)
        _grads([q, g], s)
        other.step()
    assert torch.equal(q.detach(), p.detach())
    assert torch.equal(g.detach(), free.detach())


def _torch_then_ours(torch_cls, our_cls, kwargs, *, constrained=False, our_kwargs=None):
    """Run torch's optimizer 3 steps, load its state dict into ours, continue both 3 steps."""
    shapes = [(4, 3), (6,)]
    theirs = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    groups = [{"params": theirs}]
    q = torch.nn.Parameter(_orth(5, dtype=torch.float32))
    if constrained:
        groups.append({"params": [q]})
    ref = torch_cls(groups, **kwargs)
    for s in range(3):
        _grads([*theirs, q], s)
        ref.step()
    ours = [torch.nn.Parameter(p.detach().clone()) for p in theirs]
    our_groups = [{"params": ours}]
    q2 = torch.nn.Parameter(_orth(5, dtype=torch.float32))
    if constrained:
        our_groups.append({"params": [q2], "manifold": "orthogonal"})
    opt = our_cls(our_groups, **kwargs, **(our_kwargs or {}))
    opt.load_state_dict(copy.deepcopy(ref.state_dict()))
    for s in range(3, 6):
        _grads([*theirs, q], s)
        _grads([*ours, q2], s)
        ref.step()
        opt.step()
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)
    return opt, q2


@pytest.mark.parametrize(
    "kwargs", [{"lr": 0.1, "momentum": 0.9}, {"lr": 0.05, "momentum": 0.5, "nesterov": True}]
)
def test_loads_a_torch_sgd_state_dict(kwargs):
    opt, q2 = _torch_then_ours(torch.optim.SGD, OrthogonalSGD, kwargs, constrained=True)
    assert opt.param_groups[1]["manifold"] == "orthogonal"  # kept: torch's group has no such key
    assert opt.param_groups[0]["sampler"] == "round_robin"
    assert orth_error(q2.detach().double()) < 1e-5
    assert opt.param_groups[0]["lr"] == kwargs["lr"]


@pytest.mark.parametrize(
    "kwargs", [{"lr": 0.01}, {"lr": 0.02, "amsgrad": True, "weight_decay": 0.1}]
)
def test_loads_a_torch_adam_state_dict(kwargs):
    _torch_then_ours(torch.optim.Adam, OrthogonalAdam, kwargs)


def test_torch_adam_state_of_a_constrained_weight_is_refused_clearly():
    with pytest.raises(
        ValueError, match=r"param_groups\[1\]\['params'\]\[0\].*exp_avg_sq.*per-row"
    ):
        _torch_then_ours(torch.optim.Adam, OrthogonalAdam, {"lr": 0.01}, constrained=True)


def test_adam_state_loaded_into_sgd_is_refused_naming_the_key():
    p = torch.nn.Parameter(torch.randn(3))
    ref = torch.optim.Adam([p], lr=0.1)
    p.grad = torch.randn(3)
    ref.step()
    opt = OrthogonalSGD([torch.nn.Parameter(torch.randn(3))], lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="exp_avg"):
        opt.load_state_dict(ref.state_dict())
    assert opt.param_groups[0]["momentum"] == 0.9 and len(opt.state) == 0  # left unchanged


@pytest.mark.parametrize(
    ("cls", "kwargs", "drop"),
    [
        (
            OrthogonalSGD,
            {"lr": 0.1, "momentum": 0.9},
            ("maximize", "foreach", "sampler", "nonfinite"),
        ),
        (OrthogonalSGD, {"lr": 0.1}, ("nesterov", "differentiable", "fused", "stabilize", "graph")),
        (OrthogonalAdam, {"lr": 0.01}, ("maximize", "foreach", "amsgrad", "capturable")),
        (
            OrthogonalAdam,
            {"lr": 0.01},
            ("decoupled_weight_decay", "matchings_per_step", "unbiased"),
        ),
    ],
)
def test_can_load_older_state_dict(cls, kwargs, drop):
    """torch's ``test_can_load_older_state_dict`` pattern: options missing in saved groups, numeric step."""
    free = torch.nn.Parameter(torch.randn(4, 3))
    p = torch.nn.Parameter(_orth(6, dtype=torch.float32))
    opt = cls([{"params": [free]}, {"params": [p], "manifold": "orthogonal"}], **kwargs)
    for s in range(3):
        _grads([free, p], s)
        opt.step()
    sd = copy.deepcopy(opt.state_dict())
    for group in sd["param_groups"]:
        for key in drop:
            group.pop(key)
    if cls is OrthogonalAdam:
        for st in sd["state"].values():
            st["step"] = float(st["step"])  # torch < 1.12 saved a number
    free2, p2 = torch.nn.Parameter(free.detach().clone()), torch.nn.Parameter(p.detach().clone())
    other = cls([{"params": [free2]}, {"params": [p2], "manifold": "orthogonal"}], **kwargs)
    other.load_state_dict(sd)
    if cls is OrthogonalAdam:
        assert torch.is_tensor(other.state[free2]["step"])
    for s in range(3, 6):
        _grads([free, p], s)
        _grads([free2, p2], s)
        opt.step()
        other.step()
    assert torch.equal(free2, free) and torch.equal(p2, p)


@pytest.mark.parametrize("cls", [OrthogonalSGD, OrthogonalAdam])
def test_torch_flags_are_accepted_and_impossible_values_refused(cls):
    p = torch.nn.Parameter(torch.randn(3))
    cls([p], differentiable=False, fused=False, foreach=False)
    cls([p], fused=None, foreach=None)
    with pytest.raises(ValueError, match="differentiable"):
        cls([p], differentiable=True)
    with pytest.raises(TypeError, match="fused"):
        cls([p], fused="yes")
    if cls is OrthogonalAdam:
        cls([p], capturable=False, decoupled_weight_decay=True)
        with pytest.raises(ValueError, match="capturable"):
            cls([p], capturable=True)
        with pytest.raises(TypeError, match="decoupled_weight_decay"):
            cls([p], decoupled_weight_decay=1)


@pytest.mark.parametrize(
    ("cls", "ref_cls", "kwargs"),
    [
        (OrthogonalAdam, torch.optim.Adam, {"lr": 0.01, "fused": True}),
        (OrthogonalSGD, torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "fused": True}),
        (OrthogonalAdam, torch.optim.Adam, {"lr": 0.01, "foreach": True}),
    ],
)
def test_fused_and_foreach_are_forwarded_to_torch(cls, ref_cls, kwargs):
    ours, theirs, q = _twins([(5, 3), (7,)])
    opt = cls([{"params": ours}, {"params": [q], "manifold": "so"}], **kwargs)
    ref = ref_cls(theirs, **kwargs)
    _assert_side_by_side_equal(opt, ref, ours, theirs, q, 4)
    assert orth_error(q.detach().double()) < 1e-5


@pytest.mark.parametrize("amsgrad", [False, True])
def test_tensor_lr_is_kept_a_tensor_and_matches_torch_adam(amsgrad):
    ours, theirs, q = _twins([(5, 3), (7,)])
    lr = torch.tensor(0.0123)
    opt = OrthogonalAdam(
        [{"params": ours}, {"params": [q], "manifold": "so"}], lr=lr, amsgrad=amsgrad
    )
    ref = torch.optim.Adam(theirs, lr=lr.clone(), amsgrad=amsgrad)
    assert all(torch.is_tensor(g["lr"]) for g in opt.param_groups)
    # was 1 ulp off: the tensor was converted to a float
    _assert_side_by_side_equal(opt, ref, ours, theirs, q, 5)
    with pytest.raises(ValueError, match="one-element"):
        OrthogonalAdam(ours, lr=torch.tensor([0.1, 0.2]))
    with pytest.raises(ValueError, match="lr"):
        OrthogonalAdam(ours, lr=torch.tensor(-0.1))


@pytest.mark.parametrize("cls", [OrthogonalSGD, OrthogonalAdam])
def test_state_dict_hooks_see_the_whole_dict(cls):
    p = torch.nn.Parameter(_orth(6, dtype=torch.float32))
    opt = cls([{"params": [p], "manifold": "orthogonal"}], lr=0.01, sampler="random")
    _run(opt, p, 2, seed=0)
    seen = {}

    def post(optimizer, sd):
        seen["post"] = sorted(sd)

    def load_pre(optimizer, sd):
        seen["load_pre"] = sorted(sd)
        sd = dict(sd)
        sd["orthotorch"] = {**sd["orthotorch"], "steps": 41}  # a hook may rewrite our entry too
        return sd

    opt.register_state_dict_post_hook(post)
    sd = opt.state_dict()
    assert seen["post"] == ["orthotorch", "param_groups", "state"]
    other = cls(
        [{"params": [torch.nn.Parameter(p.detach().clone())], "manifold": "orthogonal"}],
        lr=0.01,
        sampler="random",
    )
    other.register_load_state_dict_pre_hook(load_pre)
    other.load_state_dict(sd)
    assert seen["load_pre"] == ["orthotorch", "param_groups", "state"]
    assert other.steps == 41
    assert torch.equal(other.generator.get_state(), opt.generator.get_state())


# ----------------------------------------------------------------------------------------------------
# issue 10: optimizers, silently wrong before


def test_load_state_dict_rejects_state_of_another_shape():
    p = torch.nn.Parameter(_orth(6, dtype=torch.float32))
    free = torch.nn.Parameter(torch.randn(4))
    opt = OrthogonalSGD(
        [{"params": [p], "manifold": "orthogonal"}, {"params": [free]}], lr=0.1, momentum=0.9
    )
    _grads([p, free], 0)
    opt.step()
    sd = opt.state_dict()
    q = torch.nn.Parameter(_orth(5, dtype=torch.float32))
    other = OrthogonalSGD(
        [
            {"params": [q], "manifold": "orthogonal"},
            {"params": [torch.nn.Parameter(torch.randn(4))]},
        ],
        lr=0.3,
        momentum=0.9,
    )
    with pytest.raises(ValueError, match=r"momentum_buffer.*\(6, 6\).*\(5, 5\)"):
        other.load_state_dict(sd)
    assert other.param_groups[0]["lr"] == 0.3 and len(other.state) == 0  # unchanged
    adam = OrthogonalAdam([{"params": [p], "manifold": "orthogonal"}], lr=0.1)
    _grads([p], 1)
    adam.step()
    other = OrthogonalAdam([{"params": [q], "manifold": "orthogonal"}], lr=0.1)
    with pytest.raises(ValueError, match="exp_avg"):
        other.load_state_dict(adam.state_dict())


def test_load_state_dict_refuses_to_unconstrain_a_group():
    p = torch.nn.Parameter(_orth(6, dtype=torch.float32))
    opt = OrthogonalSGD([p], lr=0.1)  # saved with manifold=None
    sd = opt.state_dict()
    q = torch.nn.Parameter(_orth(6, dtype=torch.float32))
    other = OrthogonalSGD([{"params": [q], "manifold": "orthogonal"}], lr=0.1)
    with pytest.raises(ValueError, match="manifold=None"):
        other.load_state_dict(sd)
    assert other.param_groups[0]["manifold"] == "orthogonal"
    q.grad = torch.randn(6, 6)
    other.step()
    assert orth_error(q.detach().double()) < 1e-5  # still constrained


def test_loaded_state_cannot_skip_the_on_manifold_check():
    p = torch.nn.Parameter(_orth(6, dtype=torch.float32))
    opt = OrthogonalSGD([{"params": [p], "manifold": "orthogonal"}], lr=0.1)
    _run(opt, p, 1, seed=0)
    sd = opt.state_dict()
    sd["orthotorch"]["checked"] = [True]  # the probe flag older versions saved and trusted
    q = torch.nn.Parameter(torch.randn(6, 6))  # off the manifold
    other = OrthogonalSGD([{"params": [q], "manifold": "orthogonal"}], lr=0.1)
    other.load_state_dict(sd)
    q.grad = torch.randn(6, 6)
    with pytest.raises(ValueError, match="not on the Stiefel manifold"):
        other.step()


@pytest.mark.parametrize("cls", [OrthogonalSGD, OrthogonalAdam])
def test_the_same_parameter_twice_in_a_group_is_refused(cls):
    p = torch.nn.Parameter(_orth(4, dtype=torch.float32))
    with pytest.raises(ValueError, match=r"\['params'\]\[1\] is the same tensor"):
        cls([{"params": [p, p], "manifold": "orthogonal"}], lr=0.1)
    opt = cls([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    with pytest.raises(ValueError, match="same tensor"):
        opt.add_param_group({"params": [p, p]})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("cls", [OrthogonalSGD, OrthogonalAdam])
def test_so_manifold_parameter_with_negative_determinant_is_refused(cls):
    x = _orth(5, dtype=torch.float32)
    x[0] = -x[0]
    p = geoopt.ManifoldParameter(x, manifold=SpecialOrthogonalGroup(5))
    opt = cls([p], lr=0.1)
    p.grad = torch.randn(5, 5)
    with pytest.raises(ValueError, match=r"SO\(d\).*det"):
        opt.step()
    marked = torch.nn.Parameter(x.clone())
    marked._orthotorch_manifold = "so"
    opt = cls([marked], lr=0.1)
    marked.grad = torch.randn(5, 5)
    with pytest.raises(ValueError, match="det"):
        opt.step()


@pytest.mark.parametrize("cls", [OrthogonalSGD, OrthogonalAdam])
def test_parameter_appended_to_a_group_by_hand_works(cls):
    free = torch.nn.Parameter(torch.randn(3))
    opt = cls([{"params": [free]}], lr=0.05)
    q = torch.nn.Parameter(_orth(6, dtype=torch.float32))
    q._orthotorch_manifold = "orthogonal"
    extra = torch.nn.Parameter(torch.randn(2))
    opt.param_groups[0]["params"].extend([q, extra])
    before = q.detach().clone()
    for s in range(3):
        _grads([free, q, extra], s)
        opt.step()
    assert not torch.equal(q.detach(), before)
    assert orth_error(q.detach().double()) < 1e-5
    assert len(opt.state_dict()["param_groups"][0]["params"]) == 3


@pytest.mark.parametrize("cls", [OrthogonalSGD, OrthogonalAdam])
@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_copied_optimizer_steps_like_the_original(cls, how):
    p = torch.nn.Parameter(_orth(6, dtype=torch.float32))
    opt = cls([{"params": [p], "manifold": "orthogonal"}], lr=0.05, sampler="random")
    _run(opt, p, 2, seed=0)
    if how == "deepcopy":
        other = copy.deepcopy(opt)
    elif how == "pickle":
        other = pickle.loads(pickle.dumps(opt))
    else:
        other = _save_load(opt)
    q = other.param_groups[0]["params"][0]
    assert q is not p and torch.equal(q, p)
    _run(opt, p, 3, seed=1)
    _run(other, q, 3, seed=1)
    assert torch.equal(q.detach(), p.detach())
    assert other.steps == opt.steps == 5


def test_sparse_gradient_with_nan_is_skipped_like_a_dense_one():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    ref_emb = copy.deepcopy(emb)
    q = torch.nn.Parameter(_orth(4, dtype=torch.float32))
    opt = OrthogonalSGD(
        [{"params": emb.parameters()}, {"params": [q], "manifold": "orthogonal"}], lr=0.1
    )
    ref = torch.optim.SGD(ref_emb.parameters(), lr=0.1)
    idx = torch.tensor([1, 4, 4, 7])
    for module in (emb, ref_emb):
        module(idx).sum().backward()
    q.grad = torch.randn(4, 4)
    opt.step()
    ref.step()
    assert torch.equal(emb.weight, ref_emb.weight)  # sparse step is torch's
    before = emb.weight.detach().clone()
    opt.zero_grad()
    (emb(idx) * float("nan")).sum().backward()
    q.grad = torch.randn(4, 4)
    with pytest.warns(UserWarning, match="non-finite gradient"):
        opt.step()
    assert torch.equal(emb.weight.detach(), before)


@pytest.mark.parametrize("cls", [OrthogonalSGD, OrthogonalAdam])
@pytest.mark.parametrize(
    ("shape", "manifold"),
    [((5, 0), "stiefel"), ((0, 5), "stiefel"), ((0, 4, 4), "so"), ((0, 0), "orthogonal")],
)
def test_constrained_weight_with_a_zero_dimension_is_a_no_op(cls, shape, manifold):
    p = torch.nn.Parameter(torch.zeros(shape))
    free = torch.nn.Parameter(torch.randn(3))
    opt = cls([{"params": [p], "manifold": manifold}, {"params": [free]}], lr=0.1)
    p.grad = torch.zeros(shape)
    free.grad = torch.ones(3)
    opt.step()
    opt.stabilize()
    assert p.shape == shape and not torch.equal(free.detach(), torch.zeros(3))


# ----------------------------------------------------------------------------------------------------
# missing pieces: AdamW, stabilize(), param_groups(model), the marking attribute


@pytest.mark.parametrize("amsgrad", [False, True])
def test_adamw_matches_torch_adamw_and_does_not_decay_constrained_weights(amsgrad):
    ours = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    q, q0 = (torch.nn.Parameter(_orth(6, dtype=torch.float32)) for _ in range(2))
    q0.data.copy_(q.data)
    opt = OrthogonalAdamW(
        [{"params": ours}, {"params": [q], "manifold": "so"}],
        lr=0.01,
        weight_decay=0.5,
        amsgrad=amsgrad,
    )
    ref = torch.optim.AdamW(theirs, lr=0.01, weight_decay=0.5, amsgrad=amsgrad)
    no_decay = OrthogonalAdam([{"params": [q0], "manifold": "so"}], lr=0.01, amsgrad=amsgrad)
    flag = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    flagged = OrthogonalAdam(
        flag, lr=0.01, weight_decay=0.5, amsgrad=amsgrad, decoupled_weight_decay=True
    )
    for s in range(5):
        for group in (ours, theirs, flag):
            _grads(group, s)
        g = torch.randn(6, 6)
        q.grad, q0.grad = g.clone(), g.clone()
        for o in (opt, ref, no_decay, flagged):
            o.step()
    for a, b, c in zip(ours, theirs, flag):
        assert torch.equal(a, b) and torch.equal(c, b)
    assert torch.equal(q, q0)  # the decay has no component along the manifold
    assert orth_error(q.detach().double()) < 1e-5
    with pytest.raises(ValueError, match="decoupled"):
        OrthogonalAdamW(ours, decoupled_weight_decay=False)


def test_riemannian_decoupled_decay_is_the_riemannian_gradient_of_the_penalty():
    x0 = geoopt.Sphere().random(6, dtype=torch.float64)
    p = geoopt.ManifoldParameter(x0.clone(), manifold=geoopt.Sphere())
    opt = OrthogonalAdamW([p], lr=0.1, weight_decay=0.3)
    p.grad = torch.zeros(6, dtype=torch.float64)
    opt.step()
    # zero gradient: the only move is the decay's Riemannian gradient, which vanishes on the sphere
    assert torch.allclose(p.detach(), x0, atol=1e-12)


@pytest.mark.parametrize("cls", [OrthogonalSGD, OrthogonalAdam])
def test_stabilize_projects_every_constrained_weight_and_keeps_the_determinant(cls):
    sq = torch.nn.Parameter(_orth(6, dtype=torch.float64))
    neg = _orth(6, dtype=torch.float64)
    neg[0] = -neg[0]
    refl = torch.nn.Parameter(neg)
    wide = torch.nn.Parameter(_orth(7, 3, dtype=torch.float64).mT.contiguous())
    sphere = geoopt.ManifoldParameter(
        torch.tensor([3.0, 4.0], dtype=torch.float64), manifold=geoopt.Sphere()
    )
    free = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
    opt = cls(
        [
            {"params": [sq], "manifold": "so"},
            {"params": [refl], "manifold": "orthogonal"},
            {"params": [wide], "manifold": "stiefel"},
            {"params": [sphere, free]},
        ],
        lr=0.1,
    )
    for p in (sq, refl, wide):
        p.data.add_(1e-3 * torch.randn(p.shape, dtype=torch.float64))
    free_before = free.detach().clone()
    expected = qr_sign_fixed(sq.detach().clone())
    opt.stabilize()
    assert torch.allclose(sq.detach(), expected, atol=1e-14)
    for p in (sq, refl):
        assert orth_error(p.detach()) < 1e-12
    assert orth_error(wide.detach().mT) < 1e-12
    assert torch.linalg.det(sq.detach()) > 0 and torch.linalg.det(refl.detach()) < 0
    assert torch.allclose(sphere.detach(), torch.tensor([0.6, 0.8], dtype=torch.float64))
    assert torch.equal(free.detach(), free_before)


class _Marked(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.rot = geoopt.ManifoldParameter(
            SpecialOrthogonalGroup(4).random(generator=torch.Generator().manual_seed(0))
        )
        self.orth = geoopt.ManifoldParameter(
            _orth(5, dtype=torch.float32), manifold=OrthogonalGroup(5)
        )
        self.tall = geoopt.ManifoldParameter(
            _orth(6, 2, dtype=torch.float32), manifold=geoopt.EuclideanStiefel()
        )
        self.mark = torch.nn.Parameter(_orth(3, dtype=torch.float32))
        self.mark._orthotorch_manifold = "so"
        self.lin = torch.nn.Linear(3, 2)
        self.sphere = geoopt.ManifoldParameter(torch.tensor([1.0, 0.0]), manifold=geoopt.Sphere())


def test_param_groups_splits_the_marked_weights():
    model = _Marked()
    groups = param_groups(model, constrained={"lr": 0.03}, unconstrained={"weight_decay": 0.1})
    assert [len(g["params"]) for g in groups] == [4, 3]
    assert {id(p) for p in groups[0]["params"]} == {
        id(model.rot),
        id(model.orth),
        id(model.tall),
        id(model.mark),
    }
    assert groups[0]["lr"] == 0.03 and groups[1]["weight_decay"] == 0.1
    assert "manifold" not in groups[0]
    assert [constraint_of(p) for p in groups[0]["params"]] == ["so", "orthogonal", "stiefel", "so"]
    opt = OrthogonalAdam(groups, lr=0.01)
    for _ in range(3):
        for p in model.parameters():
            p.grad = torch.randn(p.shape)
        opt.step()
    for p in groups[0]["params"]:
        assert orth_error(p.detach().double()) < 1e-5
    assert torch.linalg.det(model.mark.detach().double()) > 0
    assert param_groups([model.lin.weight]) == [{"params": [model.lin.weight]}]
    with pytest.raises(TypeError, match="params"):
        param_groups(model, constrained={"params": []})
    with pytest.raises(TypeError, match="single tensor"):
        param_groups(model.lin.weight)


def test_marking_attribute_is_honoured_and_checked():
    p = torch.nn.Parameter(_orth(5, 3, dtype=torch.float32))
    p._orthotorch_manifold = "stiefel"
    opt = OrthogonalSGD([p], lr=0.1)
    p.grad = torch.randn(5, 3)
    opt.step()
    assert orth_error(p.detach().double()) < 1e-5
    bad = torch.nn.Parameter(torch.zeros(3, 3))
    bad._orthotorch_manifold = "sphere"
    with pytest.raises(ValueError, match="_orthotorch_manifold"):
        OrthogonalSGD([bad], lr=0.1)
    rect = torch.nn.Parameter(torch.zeros(4, 3))
    rect._orthotorch_manifold = "so"
    with pytest.raises(ValueError, match="must be square"):
        OrthogonalSGD([rect], lr=0.1)


# ----------------------------------------------------------------------------------------------------
# issue 9: one home for the sampler names, greedy and the scalar checks


def test_coloring_spelling_is_accepted_by_the_optimizer_and_make_sampler():
    graph = nx.path_graph(6)
    assert isinstance(make_sampler("coloring", 6, graph=graph), ColouringSampler)
    p = torch.nn.Parameter(_orth(6, dtype=torch.float32))
    opt = OrthogonalSGD(
        [{"params": [p], "manifold": "orthogonal"}], sampler="coloring", graph=graph
    )
    assert opt.param_groups[0]["sampler"] == "colouring"
    with pytest.raises(ValueError, match="sampler"):
        make_sampler("colorings", 6, graph=graph)


def test_greedy_step_uses_the_greedy_sampler():
    p = torch.nn.Parameter(_orth(8))
    opt = OrthogonalSGD(
        [{"params": [p], "manifold": "orthogonal"}], lr=0.1, sampler="greedy", matchings_per_step=3
    )
    info = opt._info[p]
    assert isinstance(info.sampler, GreedySampler)
    g = torch.randn(8, 8, dtype=torch.float64)
    w = (_dense_generator(p.detach(), g)).abs()
    expected = info.sampler.sample_many(w, 3)
    got = opt._matchings(info, opt.param_groups[0], p.detach(), g)
    assert len(got) == len(expected) == 3
    for (i, j, scale), mt in zip(got, expected):
        assert torch.equal(i, mt.i) and torch.equal(j, mt.j) and scale is None


@pytest.mark.parametrize(
    ("kwargs", "exc"),
    [
        ({"lr": "0.1"}, TypeError),
        ({"lr": float("nan")}, ValueError),
        ({"momentum": "0.9"}, TypeError),
        ({"momentum": -0.5}, ValueError),
        ({"weight_decay": None}, TypeError),
        ({"nesterov": 1}, TypeError),
        ({"maximize": "no"}, TypeError),
        ({"unbiased": 0}, TypeError),
        ({"matchings_per_step": 2.0}, TypeError),
        ({"stabilize": 0}, ValueError),
        ({"sampler": 3}, TypeError),
    ],
)
def test_scalar_options_wrong_type_is_typeerror_wrong_value_valueerror(kwargs, exc):
    with pytest.raises(exc):
        OrthogonalSGD([torch.nn.Parameter(torch.zeros(2))], **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "exc"),
    [
        ({"betas": ("0.9", 0.99)}, TypeError),
        ({"betas": (0.9, -0.1)}, ValueError),
        ({"eps": 0.0}, ValueError),
        ({"amsgrad": "yes"}, TypeError),
        ({"lr": [0.1]}, TypeError),
    ],
)
def test_adam_scalar_options(kwargs, exc):
    with pytest.raises(exc):
        OrthogonalAdam([torch.nn.Parameter(torch.zeros(2))], **kwargs)


# ----------------------------------------------------------------------------------------------------
# issue 12 §3: a transported first moment with the fixed round-robin order


def _pca_gaps(cls, steps, **kwargs):
    n, k = 256, 8
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(4 * n, n, generator=gen, dtype=torch.float64)
    z = z * torch.linspace(2, 0.1, n, dtype=torch.float64)
    a = z.T @ z / (4 * n)
    best = -torch.linalg.eigvalsh(a)[-k:].sum()
    x = torch.nn.Parameter(
        torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))[0]
    )
    opt = cls([{"params": [x], "manifold": "stiefel"}], tall_step="givens", **kwargs)
    gaps = []
    for _ in range(steps):
        opt.zero_grad()
        loss = -(x * (a @ x)).sum()
        loss.backward()
        gaps.append(float((loss.detach() - best) / best.abs()))
        opt.step()
    assert orth_error(x.detach()) < 1e-10
    return gaps


@pytest.mark.parametrize(
    ("cls", "kwargs", "steps", "target"),
    [
        # before the fix, plain round robin: smoothed gap 3.4e-2, 2.2e-2, 2.4e-2, 2.3e-2, 3.2e-2, ...
        (OrthogonalSGD, {"lr": 0.05, "momentum": 0.9}, 300, 5e-3),
        # before: 2.1e-3 at step 300, then 5.1e-3, 6.0e-3, ... (climbing back)
        pytest.param(OrthogonalAdam, {"lr": 1e-2}, 600, 3e-3, marks=pytest.mark.slow),
    ],
)
def test_round_robin_with_a_moment_decreases_to_the_pca_optimum(cls, kwargs, steps, target):
    """Before the fix the default round-robin order drove the transported moment periodically and the
    loss climbed back after step ~300 (the tall-PCA limit cycle of issue 12)."""
    gaps = _pca_gaps(cls, steps, sampler="round_robin", **kwargs)
    smoothed = [min(gaps[i : i + 60]) for i in range(0, len(gaps), 60)]
    for prev, cur in itertools.pairwise(smoothed):
        assert cur <= 2.0 * prev, smoothed
    assert smoothed[-1] < target, smoothed


@pytest.mark.parametrize(
    ("cls", "kwargs", "relabels"),
    [
        (OrthogonalSGD, {"lr": 0.1}, False),
        (OrthogonalSGD, {"lr": 0.1, "momentum": 0.9}, True),
        (OrthogonalAdam, {"lr": 0.01}, True),
    ],
)
def test_round_robin_relabels_rows_each_cycle_only_with_a_moment(cls, kwargs, relabels):
    """The fix of the limit cycle above, checked fast: with a transported moment the round-robin order
    is relabelled every cycle (still every pair exactly once per cycle); without one it stays fixed."""
    n = 6
    p = torch.nn.Parameter(_orth(n))
    opt = cls([{"params": [p], "manifold": "orthogonal"}], sampler="round_robin", **kwargs)
    info = opt._info[p]
    cycles = []
    for _ in range(3):
        pairs = []
        for _ in range(n - 1):
            i, j, _ = opt._matchings(
                info, {**opt.param_groups[0], "matchings_per_step": 1}, p, None
            )[0]
            pairs.append(sorted(tuple(sorted(e)) for e in zip(i.tolist(), j.tolist())))
        cycles.append(pairs)
        flat = sorted(e for m in pairs for e in m)
        assert flat == sorted((a, b) for a in range(n) for b in range(a + 1, n))
    fixed = [
        sorted(tuple(sorted(e)) for e in zip(*(t.tolist() for t in round_robin_matching(n, r)[:2])))
        for r in range(n - 1)
    ]
    if relabels:
        assert cycles[0] != cycles[1] or cycles[1] != cycles[2]
    else:
        assert cycles == [fixed] * 3
