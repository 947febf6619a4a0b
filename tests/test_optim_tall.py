"""The rank-2k Cayley step of tall Stiefel weights (``tall_step``, issue 12 §3): exactness against the
dense n×n Cayley transform, orthogonality over many float32 steps, convergence to the Brockett optimum
(torch.linalg.eigh), the fixed point of the Adam variant, routing by shape, state-dict round trips, wide
and batched weights, errors."""

from __future__ import annotations

import io

import geoopt
import pytest
import torch

from conftest import orth_error
from orthotorch.manifolds import Stiefel
from orthotorch.manifolds.stiefel import cayley_rotate
from orthotorch.optim import OrthogonalAdam, OrthogonalAdamW, OrthogonalSGD
from orthotorch.optim._tall import TALL_RATIO, uses_cayley

F64 = torch.float64


def _orth(n: int, k: int, *, dtype=F64, seed: int = 0, batch: tuple[int, ...] = ()) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(*batch, n, k, generator=gen, dtype=F64))[0]
    return q.contiguous().to(dtype)


def _dense_cayley(x: torch.Tensor, d: torch.Tensor, t: float) -> torch.Tensor:
    """Reference ``(I − ½tW)⁻¹(I + ½tW)`` with the dense n×n ``W = d xᵀ − x dᵀ`` (torch.linalg.solve)."""
    w = d @ x.mT - x @ d.mT
    eye = torch.eye(x.shape[-2], dtype=x.dtype).expand_as(w)
    return torch.linalg.solve(eye - 0.5 * t * w, eye + 0.5 * t * w)


def _canonical_rgrad(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return Stiefel(metric="canonical").egrad2rgrad(x, g)


def _brockett(n: int, k: int, seed: int = 0):
    """f(X) = −tr(XᵀAXN) with distinct N: minimisers are the top-k eigenvectors (up to signs)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=F64))[0]
    a = (q * torch.linspace(0.0, 2.0, n, dtype=F64)) @ q.mT
    nw = torch.linspace(2.0, 1.0, k, dtype=F64)
    evals, evecs = torch.linalg.eigh(a)
    f_star = -float((evals.flip(0)[:k] * nw).sum())
    top = evecs.flip(1)[:, :k]

    def f(x: torch.Tensor) -> torch.Tensor:
        return -((x * (a @ x)).sum(-2) * nw).sum()

    return f, f_star, top


# ----------------------------------------------------------------------------------------------------
# the rank-2k Cayley transform


@pytest.mark.parametrize("batch", [(), (3,)])
@pytest.mark.parametrize("t", [-0.3, 2.5])
def test_cayley_rotate_equals_the_dense_n_by_n_solve(batch, t):
    n, k = 13, 4
    x = _orth(n, k, batch=batch)
    gen = torch.Generator().manual_seed(1)
    d = torch.randn(*batch, n, k, generator=gen, dtype=F64)
    z = torch.randn(*batch, n, 5, generator=gen, dtype=F64)
    q = _dense_cayley(x, d, t)
    qx, qd, qz = cayley_rotate(x, d, t, [x, d, z])
    torch.testing.assert_close(qx, q @ x, atol=1e-13, rtol=0)
    torch.testing.assert_close(qd, q @ d, atol=1e-12, rtol=0)
    torch.testing.assert_close(qz, q @ z, atol=1e-12, rtol=0)
    # Q is a rotation: orthogonal with det +1
    torch.testing.assert_close(q.mT @ q, torch.eye(n, dtype=F64).expand_as(q), atol=1e-13, rtol=0)
    assert bool((torch.linalg.det(q) > 0).all())


def test_cayley_rotate_orthonormalize_squares_the_input_error():
    n, k = 30, 5
    x = _orth(n, k)
    d = torch.randn(n, k, dtype=F64)
    for eps in (1e-3, 1e-5):
        noisy = x + eps * torch.randn(n, k, dtype=F64)
        before = orth_error(noisy)
        plain = cayley_rotate(noisy, d, -0.1, [noisy])[0]
        fixed = cayley_rotate(noisy, d, -0.1, [noisy], orthonormalize=True)[0]
        assert abs(orth_error(plain) - before) < 1e-3 * before  # Q keeps the error...
        assert orth_error(fixed) < 10 * before**2  # ...the Newton–Schulz step squares it


def test_symmetric_component_of_the_direction_does_not_change_the_step():
    n, k = 12, 3
    x = _orth(n, k)
    d = torch.randn(n, k, dtype=F64)
    s = torch.randn(k, k, dtype=F64)
    shifted = d + x @ (s + s.mT)
    torch.testing.assert_close(
        cayley_rotate(x, shifted, -0.2, [x])[0],
        cayley_rotate(x, d, -0.2, [x])[0],
        atol=1e-13,
        rtol=0,
    )


def test_manifold_cayley_retraction_still_matches_its_definition():
    # Stiefel(retraction="cayley") now delegates its tall branch to cayley_rotate(x, ũ, 1)
    n, k = 11, 3
    m = Stiefel(n, k, retraction="cayley")
    x = _orth(n, k)
    u = m.proju(x, torch.randn(n, k, dtype=F64))
    ut = u - 0.5 * x @ (x.mT @ u)
    a = ut @ x.mT - x @ ut.mT
    eye = torch.eye(n, dtype=F64)
    torch.testing.assert_close(
        m.retr(x, u), torch.linalg.solve(eye - 0.5 * a, (eye + 0.5 * a) @ x), atol=1e-13, rtol=0
    )


# ----------------------------------------------------------------------------------------------------
# one optimizer step against an explicit reference


def _tall_param(n: int, k: int, dtype=F64, seed: int = 0) -> torch.nn.Parameter:
    return torch.nn.Parameter(_orth(n, k, dtype=dtype, seed=seed))


def test_sgd_steps_equal_the_dense_cayley_reference_with_a_rotated_buffer():
    n, k, lr, mu = 16, 3, 0.2, 0.8
    p = _tall_param(n, k)
    opt = OrthogonalSGD([{"params": [p], "manifold": "stiefel"}], lr=lr, momentum=mu)
    assert opt._info[p].kind == "cayley"
    gen = torch.Generator().manual_seed(5)
    x, b = p.detach().clone(), None
    for _ in range(3):
        g = torch.randn(n, k, generator=gen, dtype=F64)
        p.grad = g.clone()
        opt.step()
        b = g.clone() if b is None else mu * b + g
        q = _dense_cayley(x, b, -lr)
        x, b = q @ x, q @ b
    torch.testing.assert_close(p.detach(), x, atol=1e-12, rtol=0)
    # the stored buffer may differ from the reference by X·S (S symmetric), which has no generator
    buf = opt.state[p]["momentum_buffer"]
    w = lambda d: d @ x.mT - x @ d.mT  # noqa: E731
    torch.testing.assert_close(w(buf), w(b), atol=1e-11, rtol=0)


def test_sgd_without_momentum_and_with_nesterov_follow_their_references():
    n, k, lr, mu = 14, 4, 0.1, 0.9
    gen = torch.Generator().manual_seed(2)
    grads = [torch.randn(n, k, generator=gen, dtype=F64) for _ in range(3)]
    for kwargs in ({}, {"momentum": mu, "nesterov": True}):
        p = _tall_param(n, k)
        opt = OrthogonalSGD([{"params": [p], "manifold": "stiefel"}], lr=lr, **kwargs)
        x, b = p.detach().clone(), None
        for g in grads:
            p.grad = g.clone()
            opt.step()
            if kwargs:
                b = g.clone() if b is None else mu * b + g
                d = g + mu * b
            else:
                d = g
            q = _dense_cayley(x, d, -lr)
            x = q @ x
            b = None if b is None else q @ b
        torch.testing.assert_close(p.detach(), x, atol=1e-12, rtol=0)


def test_adam_steps_precondition_the_canonical_riemannian_gradient():
    n, k, lr = 15, 3, 0.05
    beta1, beta2, eps = 0.8, 0.9, 1e-8
    p = _tall_param(n, k)
    opt = OrthogonalAdam(
        [{"params": [p], "manifold": "stiefel"}], lr=lr, betas=(beta1, beta2), eps=eps
    )
    assert opt._info[p].kind == "cayley"
    gen = torch.Generator().manual_seed(9)
    x = p.detach().clone()
    m, v = torch.zeros(n, k, dtype=F64), torch.zeros(n, k, dtype=F64)
    for t in range(1, 4):
        g = torch.randn(n, k, generator=gen, dtype=F64) + x @ torch.randn(k, k, dtype=F64)
        p.grad = g.clone()
        opt.step()
        r = _canonical_rgrad(x, g)
        m = beta1 * m + (1 - beta1) * r
        v = beta2 * v + (1 - beta2) * r * r
        d = (m / (1 - beta1**t)) / ((v / (1 - beta2**t)).sqrt() + eps)
        q = _dense_cayley(x, d, -lr)
        x, m = q @ x, q @ m
    torch.testing.assert_close(p.detach(), x, atol=1e-12, rtol=0)
    torch.testing.assert_close(opt.state[p]["exp_avg"], m, atol=1e-12, rtol=0)
    torch.testing.assert_close(opt.state[p]["exp_avg_sq"], v, atol=1e-12, rtol=0)


def test_adam_on_a_tall_weight_keeps_the_optimum_fixed():
    # at a minimiser G = X·S (S symmetric) ≠ 0; Adam's first step is ≈ lr·m̂/√v̂ = lr·sign(·) per
    # entry, so an elementwise rescaling of G itself would move X by ≈ lr (the rejected variant)
    n, k, lr = 20, 3, 0.05
    f, _, top = _brockett(n, k)
    p = torch.nn.Parameter(top.clone().contiguous())
    opt = OrthogonalAdam([{"params": [p], "manifold": "stiefel"}], lr=lr)
    f(p).backward()
    g = p.grad.detach().clone()
    assert float(g.norm()) > 1.0  # the ambient gradient is far from zero here
    opt.step()
    assert float((p.detach() - top).norm()) < 1e-6 * lr
    # the discriminating control: the same step driven by sign(G) moves the point by O(lr)
    rejected = cayley_rotate(top, g / g.abs(), -lr, [top])[0]
    assert float((rejected - top).norm()) > 0.1 * lr


def test_adamw_takes_no_decay_on_a_tall_weight():
    n, k = 12, 3
    gen = torch.Generator().manual_seed(4)
    grads = [torch.randn(n, k, generator=gen, dtype=F64) for _ in range(3)]
    a, b = _tall_param(n, k), _tall_param(n, k)
    opt_a = OrthogonalAdamW([{"params": [a], "manifold": "stiefel"}], lr=0.05, weight_decay=0.5)
    opt_b = OrthogonalAdam([{"params": [b], "manifold": "stiefel"}], lr=0.05)
    for g in grads:
        a.grad, b.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
    assert torch.equal(a.detach(), b.detach())


# ----------------------------------------------------------------------------------------------------
# orthogonality and convergence


@pytest.mark.parametrize(
    ("dtype", "tol"), [(torch.float32, 1e-5), (F64, 1e-13)], ids=["f32", "f64"]
)
@pytest.mark.parametrize("cls", [OrthogonalSGD, OrthogonalAdam])
@pytest.mark.parametrize("steps", [1000, pytest.param(10_000, marks=pytest.mark.slow)])
def test_stays_on_the_manifold_over_many_steps(cls, dtype, tol, steps):
    # gradients with a large X·S part (as a real loss has): left in, it wrecks the float32 solve
    n, k = 24, 4
    p = _tall_param(n, k, dtype=dtype)
    kwargs = {"lr": 0.05, "momentum": 0.9} if cls is OrthogonalSGD else {"lr": 0.02}
    opt = cls([{"params": [p], "manifold": "stiefel"}], nonfinite="ignore", **kwargs)
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(64, n, k, generator=gen, dtype=dtype)
    sym = torch.randn(64, k, k, generator=gen, dtype=dtype)
    start = p.detach().clone()
    for t in range(steps):
        with torch.no_grad():
            p.grad = noise[t % 64] + 100.0 * p @ (sym[t % 64] + sym[t % 64].mT)
        opt.step()
    assert orth_error(p.detach().double()) < tol
    assert float((p.detach() - start).norm()) > 0.5  # it really moved


@pytest.mark.parametrize(
    ("cls", "kwargs"),
    [
        (OrthogonalSGD, {"lr": 0.05, "momentum": 0.9}),
        (OrthogonalSGD, {"lr": 0.2}),
        (OrthogonalAdam, {"lr": 0.02}),
        (OrthogonalAdam, {"lr": 0.02, "amsgrad": True}),
    ],
)
def test_descends_to_the_brockett_optimum(cls, kwargs):
    n, k = 24, 3
    f, f_star, top = _brockett(n, k)
    p = _tall_param(n, k, seed=3)
    opt = cls([{"params": [p], "manifold": "stiefel"}], **kwargs)
    first = float(f(p).detach())
    for _ in range(600):
        opt.zero_grad()
        f(p).backward()
        opt.step()
    value = float(f(p).detach())
    assert value < first
    assert value - f_star < 1e-9 * abs(f_star), (value, f_star)
    torch.testing.assert_close(
        (top.mT @ p.detach()).abs(), torch.eye(k, dtype=F64), atol=1e-3, rtol=0
    )
    assert orth_error(p.detach()) < 1e-13


def test_bfloat16_tall_weight_descends_with_stabilize():
    n, k = 32, 4
    a = torch.randn(n, n)
    a = a + a.mT
    p = _tall_param(n, k, dtype=torch.bfloat16)
    opt = OrthogonalAdam([{"params": [p], "manifold": "stiefel"}], lr=0.02, stabilize=5)

    def f(x: torch.Tensor) -> torch.Tensor:
        return -(x.float() * (a @ x.float())).sum()

    first = float(f(p.detach()))
    for _ in range(60):
        opt.zero_grad()
        f(p).backward()
        opt.step()
    assert p.dtype == torch.bfloat16 and opt.state[p]["exp_avg"].dtype == torch.bfloat16
    assert float(f(p.detach())) < first - 1.0
    assert orth_error(p.detach().double()) < 0.05


# ----------------------------------------------------------------------------------------------------
# routing


def test_routing_by_shape_and_option():
    square = torch.nn.Parameter(_orth(8, 8))
    tall = torch.nn.Parameter(_orth(8, 8 // TALL_RATIO))  # n = TALL_RATIO·k: the threshold
    squat = torch.nn.Parameter(_orth(8, 8 // TALL_RATIO + 1))  # n < TALL_RATIO·k
    wide = torch.nn.Parameter(_orth(9, 2).mT.contiguous())
    geo = geoopt.ManifoldParameter(_orth(9, 2), manifold=Stiefel())
    marked = torch.nn.Parameter(_orth(9, 2))
    marked._orthotorch_manifold = "stiefel"
    groups = [
        {"params": [square], "manifold": "orthogonal"},
        {"params": [tall, squat, wide], "manifold": "stiefel"},
        {"params": [geo, marked]},
    ]
    kinds = {}
    for option in ("auto", "givens", "cayley"):
        # fresh group dicts: torch writes the optimizer's defaults into the dicts it is given
        opt = OrthogonalSGD([dict(g) for g in groups], lr=0.1, tall_step=option)
        kinds[option] = [opt._info[p].kind for p in (square, tall, squat, wide, geo, marked)]
    assert kinds["auto"] == ["givens", "cayley", "givens", "cayley", "cayley", "cayley"]
    assert kinds["givens"] == ["givens"] * 6
    assert kinds["cayley"] == ["givens", "cayley", "cayley", "cayley", "cayley", "cayley"]
    # a square Stiefel weight is O(d): always the Givens step
    sq = torch.nn.Parameter(_orth(6, 6))
    opt = OrthogonalAdam([{"params": [sq], "manifold": "stiefel"}], tall_step="cayley")
    assert opt._info[sq].kind == "givens"
    # per group
    opt = OrthogonalSGD(
        [
            {"params": [tall], "manifold": "stiefel", "tall_step": "givens"},
            {"params": [wide], "manifold": "stiefel"},
        ],
        lr=0.1,
    )
    assert [opt._info[tall].kind, opt._info[wide].kind] == ["givens", "cayley"]
    assert uses_cayley("auto", "stiefel", 1024, 16) and not uses_cayley("auto", "orthogonal", 8, 8)


def test_forced_givens_is_the_old_step():
    n, k = 12, 3
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(n, k, generator=gen, dtype=F64) for _ in range(4)]
    runs = {}
    for option in ("givens", "cayley"):
        p = _tall_param(n, k)
        opt = OrthogonalSGD(
            [{"params": [p], "manifold": "stiefel"}],
            lr=0.1,
            sampler="random",
            matchings_per_step=1,
            tall_step=option,
            generator=torch.Generator().manual_seed(3),
        )
        for g in grads:
            p.grad = g.clone()
            opt.step()
        runs[option] = p.detach().clone()
    # one random matching per step moves at most n/2 pairs: rows of a pair only; the Cayley step moves
    # along the whole generator, so the two disagree
    assert not torch.allclose(runs["givens"], runs["cayley"], atol=1e-3)
    assert orth_error(runs["givens"]) < 1e-12 and orth_error(runs["cayley"]) < 1e-12


def test_contract_suite_covers_the_cayley_step():
    # tests/test_optim_contract.py runs its tall, wide and marked Stiefel weights through this route
    from test_optim_contract import _Model

    model = _Model(F64)
    opt = OrthogonalSGD(model.groups(), lr=0.1)
    kinds = [opt._info[p].kind for p in (model.tall, model.wide, model.marked, model.square)]
    assert kinds == ["cayley", "cayley", "cayley", "givens"]


# ----------------------------------------------------------------------------------------------------
# state dicts, wide and batched weights


@pytest.mark.parametrize(
    ("cls", "kwargs"),
    [
        (OrthogonalSGD, {"lr": 0.1, "momentum": 0.9, "dampening": 0.1}),
        (OrthogonalSGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True, "stabilize": 2}),
        (OrthogonalAdam, {"lr": 0.02, "amsgrad": True}),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["f32", "f64"])
def test_state_dict_round_trip_reproduces_the_next_steps_bitwise(cls, kwargs, dtype):
    n, k = 20, 3
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(n, k, generator=gen, dtype=dtype) for _ in range(6)]
    p = _tall_param(n, k, dtype=dtype)
    opt = cls([{"params": [p], "manifold": "stiefel"}], **kwargs)
    for g in grads[:3]:
        p.grad = g.clone()
        opt.step()
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "p": p.detach().clone()}, buf)
    for g in grads[3:]:
        p.grad = g.clone()
        opt.step()
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    q = _tall_param(n, k, dtype=dtype, seed=7)
    other = cls([{"params": [q], "manifold": "stiefel"}], **kwargs)
    with torch.no_grad():
        q.copy_(saved["p"])
    other.load_state_dict(saved["opt"])
    assert other._info[q].kind == "cayley"
    for g in grads[3:]:
        q.grad = g.clone()
        other.step()
    assert torch.equal(p.detach(), q.detach())


def test_givens_adam_state_is_refused_by_the_cayley_route_naming_tall_step():
    n, k = 12, 3
    p = _tall_param(n, k)
    giv = OrthogonalAdam([{"params": [p], "manifold": "stiefel"}], lr=0.01, tall_step="givens")
    p.grad = torch.randn(n, k, dtype=F64)
    giv.step()
    cay = OrthogonalAdam([{"params": [p], "manifold": "stiefel"}], lr=0.01)
    sd = giv.state_dict()
    sd["param_groups"][0]["tall_step"] = "auto"
    with pytest.raises(ValueError, match="tall_step='givens'"):
        cay.load_state_dict(sd)


def test_wide_weight_equals_its_transposed_tall_twin():
    n, k = 24, 4
    layer = torch.nn.Linear(n, k, bias=False, dtype=F64)  # weight (k, n): rows orthonormal
    x0 = _orth(n, k)
    with torch.no_grad():
        layer.weight.copy_(x0.mT)
    tall = torch.nn.Parameter(x0.clone())
    f, _, _ = _brockett(n, k)
    for cls, kwargs in (
        (OrthogonalSGD, {"lr": 0.05, "momentum": 0.9}),
        (OrthogonalAdam, {"lr": 0.02}),
    ):
        with torch.no_grad():
            layer.weight.copy_(x0.mT)
            tall.copy_(x0)
        opt_w = cls([{"params": [layer.weight], "manifold": "stiefel"}], **kwargs)
        opt_t = cls([{"params": [tall], "manifold": "stiefel"}], **kwargs)
        assert opt_w._info[layer.weight].transpose
        for _ in range(20):
            opt_w.zero_grad()
            opt_t.zero_grad()
            f(layer.weight.mT).backward()
            f(tall).backward()
            opt_w.step()
            opt_t.step()
        w = layer.weight.detach()
        torch.testing.assert_close(w @ w.mT, torch.eye(k, dtype=F64), atol=1e-13, rtol=0)
        torch.testing.assert_close(w.mT, tall.detach(), atol=1e-12, rtol=0)


@pytest.mark.parametrize("cls", [OrthogonalSGD, OrthogonalAdam])
def test_batched_weights_step_each_item_independently(cls):
    b, n, k = 3, 18, 4
    x0 = _orth(n, k, batch=(b,))
    gen = torch.Generator().manual_seed(6)
    grads = [torch.randn(b, n, k, generator=gen, dtype=F64) for _ in range(4)]
    kwargs = {"lr": 0.1, "momentum": 0.9} if cls is OrthogonalSGD else {"lr": 0.05}
    batched = torch.nn.Parameter(x0.clone())
    opt = cls([{"params": [batched], "manifold": "stiefel"}], **kwargs)
    singles = [torch.nn.Parameter(x0[i].clone()) for i in range(b)]
    opts = [cls([{"params": [s], "manifold": "stiefel"}], **kwargs) for s in singles]
    for g in grads:
        batched.grad = g.clone()
        opt.step()
        for i, (s, o) in enumerate(zip(singles, opts)):
            s.grad = g[i].clone()
            o.step()
    for i, s in enumerate(singles):
        torch.testing.assert_close(batched.detach()[i], s.detach(), atol=1e-12, rtol=0)
    assert orth_error(batched.detach()) < 1e-13


def test_stabilize_projects_a_cayley_routed_weight():
    n, k = 16, 3
    p = _tall_param(n, k)
    opt = OrthogonalSGD([{"params": [p], "manifold": "stiefel"}], lr=0.1)
    with torch.no_grad():
        p.add_(1e-4 * torch.randn(n, k, dtype=F64))
    assert orth_error(p.detach()) > 1e-6
    opt.stabilize()
    assert orth_error(p.detach()) < 1e-13


@pytest.mark.parametrize(
    ("value", "exc", "match"),
    [
        ("banana", ValueError, "tall_step"),
        (2, TypeError, "tall_step"),
        (None, TypeError, "tall_step"),
    ],
)
def test_bad_tall_step_values_raise_clearly(value, exc, match):
    p = _tall_param(12, 3)
    with pytest.raises(exc, match=match):
        OrthogonalSGD([{"params": [p], "manifold": "stiefel"}], lr=0.1, tall_step=value)
    with pytest.raises(exc, match=match):
        OrthogonalAdam([{"params": [p], "manifold": "stiefel", "tall_step": value}], lr=0.1)
