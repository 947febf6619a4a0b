"""Tests for orthotorch.manifolds.stiefel: St(n, k), O(d), SO(d) as geoopt manifolds.

References are independent of the code under test: scipy.linalg.polar / expm, dense matrices built
here from the formulas, geoopt's own EuclideanStiefel, closed forms (nearest 2-D rotation), and
defining identities (metric duality of the gradient, geodesic equation).
"""

from __future__ import annotations

import copy
import pickle

import geoopt
import numpy as np
import pytest
import scipy.linalg
import torch

import orthotorch.manifolds.stiefel as st
from orthotorch.graph_sampling import round_robin
from orthotorch.manifolds.stiefel import (
    METRICS,
    RETRACTIONS,
    OrthogonalGroup,
    SpecialOrthogonalGroup,
    Stiefel,
    skew_generator,
)

SEEDS = [0, 1, 2]
# (n, k): tall with 4k < n (low-rank Cayley and expm paths), tall with 2k >= n (dense paths), square
SHAPES = [(12, 2), (7, 3), (5, 5)]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def orth_err(x: torch.Tensor) -> float:
    eye = torch.eye(x.shape[-1], dtype=x.dtype)
    return float((x.mT @ x - eye).abs().max())


def tangent_err(x: torch.Tensor, u: torch.Tensor) -> float:
    s = x.mT @ u
    return float((s + s.mT).abs().max())


def make(n: int, k: int, **kw) -> Stiefel:
    if n == k:
        return OrthogonalGroup(n, **kw)
    return Stiefel(n, k, **kw)


def point_and_tangent(m: Stiefel, shape, seed: int, dtype=torch.float64, scale: float = 1.0):
    g = gen(seed)
    x = m.random_(*shape, dtype=dtype, generator=g).as_subclass(torch.Tensor)
    u = m.proju(x, scale * torch.randn(shape, generator=g, dtype=dtype))
    return x, u, g


def dense_a(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """A = ũxᵀ − xũᵀ with ũ = u − ½x(xᵀu), written out independently of the library."""
    ut = u - 0.5 * x @ x.mT @ u
    return ut @ x.mT - x @ ut.mT


# ------------------------------------------------------------------------------------------------
# construction, geoopt integration


def test_is_geoopt_stiefel_and_pickles():
    for m in (Stiefel(6, 2), OrthogonalGroup(4), SpecialOrthogonalGroup(3, retraction="cayley")):
        assert isinstance(m, geoopt.Stiefel)
        m2 = pickle.loads(pickle.dumps(m))
        m3 = copy.deepcopy(m)
        for mm in (m2, m3):
            assert type(mm) is type(m)
            assert (mm.n, mm.k, mm.metric, mm.retraction) == (m.n, m.k, m.metric, m.retraction)
    assert "retraction='cayley'" in repr(SpecialOrthogonalGroup(3, retraction="cayley"))
    assert Stiefel(5, 2).manifold_dim == 5 * 2 - 3
    assert SpecialOrthogonalGroup(4).manifold_dim == 6
    assert Stiefel().manifold_dim is None


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(n=2, k=3), ValueError, "n >= k"),
        (dict(n=0, k=None), ValueError, "`n`"),
        (dict(n=3.0, k=None), TypeError, "`n`"),
        (dict(n=True, k=None), TypeError, "`n`"),
        (dict(n=3, k=2, metric="riemann"), ValueError, "`metric`"),
        (dict(n=3, k=2, retraction="exp"), ValueError, "`retraction`"),
    ],
)
def test_constructor_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        Stiefel(**kwargs)


def test_manifold_parameter_shape_check():
    m = Stiefel(5, 2)
    p = geoopt.ManifoldParameter(m.origin(), manifold=m)
    assert p.shape == (5, 2)
    with pytest.raises(ValueError, match="n=5"):
        geoopt.ManifoldParameter(torch.zeros(6, 2), manifold=m)
    with pytest.raises(ValueError, match="square"):
        geoopt.ManifoldParameter(torch.zeros(4, 3), manifold=OrthogonalGroup())


# ------------------------------------------------------------------------------------------------
# projx, proju, metric, gradient


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n, k", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_projx_is_polar_factor(seed, n, k, dtype):
    m = make(n, k)
    a = torch.randn(3, n, k, generator=gen(seed), dtype=torch.float64)
    q = m.projx(a.to(dtype))
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    for b in range(3):
        ref, _ = scipy.linalg.polar(a[b].numpy())
        np.testing.assert_allclose(q[b].double().numpy(), ref, atol=tol * 10)
        # batched equals per item
        torch.testing.assert_close(m.projx(a[b].to(dtype)), q[b], atol=tol, rtol=0)
    assert orth_err(q) <= tol
    torch.testing.assert_close(m.projx(q), q, atol=tol * 10, rtol=0)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n, k", SHAPES)
@pytest.mark.parametrize("metric", METRICS)
def test_proju_tangent_idempotent_orthogonal(seed, n, k, metric):
    m = make(n, k, metric=metric)
    x, _, g = point_and_tangent(m, (2, n, k), seed)
    z = torch.randn(2, n, k, generator=g, dtype=torch.float64)
    pu = m.proju(x, z)
    assert tangent_err(x, pu) < 1e-12
    torch.testing.assert_close(m.proju(x, pu), pu, atol=1e-12, rtol=0)
    # z − Pz is Euclidean-orthogonal to every tangent vector (true orthogonal projection)
    v = m.proju(x, torch.randn(2, n, k, generator=g, dtype=torch.float64))
    assert float(((z - pu) * v).sum(dim=(-2, -1)).abs().max()) < 1e-12
    # normal space {x S : S symmetric} is annihilated
    s = torch.randn(2, k, k, generator=g, dtype=torch.float64)
    assert float(m.proju(x, x @ (s + s.mT)).abs().max()) < 1e-12


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n, k", SHAPES)
@pytest.mark.parametrize("metric", METRICS)
def test_egrad2rgrad_is_riesz_representer(seed, n, k, metric):
    """⟨rgrad, v⟩_x (in the chosen metric) equals the directional derivative ⟨G, v⟩ for tangent v."""
    m = make(n, k, metric=metric)
    x, v, g = point_and_tangent(m, (3, n, k), seed)
    grad = torch.randn(3, n, k, generator=g, dtype=torch.float64)
    rg = m.egrad2rgrad(x, grad)
    assert tangent_err(x, rg) < 1e-12
    lhs = m.inner(x, rg, v)
    rhs = (grad * v).sum(dim=(-2, -1))
    torch.testing.assert_close(lhs, rhs, atol=1e-11, rtol=0)
    if metric == "canonical":
        w = grad @ x.mT - x @ grad.mT  # docs/design.md: canonical gradient = W x
        torch.testing.assert_close(rg, w @ x, atol=1e-12, rtol=0)


@pytest.mark.parametrize("n, k", SHAPES)
def test_inner_matches_dense_formula(n, k):
    for metric in METRICS:
        m = make(n, k, metric=metric)
        x, u, g = point_and_tangent(m, (2, n, k), 3)
        v = m.proju(x, torch.randn(2, n, k, generator=g, dtype=torch.float64))
        if metric == "euclidean":
            ref = torch.einsum("bij,bij->b", u, v)
        else:
            mid = torch.eye(n, dtype=torch.float64) - 0.5 * x @ x.mT
            ref = torch.einsum("bij,bjk->bik", u.mT, mid @ v).diagonal(dim1=-2, dim2=-1).sum(-1)
        torch.testing.assert_close(m.inner(x, u, v), ref, atol=1e-12, rtol=0)
        assert m.inner(x, u, v, keepdim=True).shape == (2, 1, 1)
        torch.testing.assert_close(m.inner(x, u), m.inner(x, u, u))
        torch.testing.assert_close(m.norm(x, u) ** 2, m.inner(x, u))


def test_square_canonical_gradient_is_twice_euclidean():
    x, _, g = point_and_tangent(OrthogonalGroup(4), (4, 4), 0)
    grad = torch.randn(4, 4, generator=g, dtype=torch.float64)
    e = OrthogonalGroup(4).egrad2rgrad(x, grad)
    c = OrthogonalGroup(4, metric="canonical").egrad2rgrad(x, grad)
    torch.testing.assert_close(c, 2 * e, atol=1e-12, rtol=0)


# ------------------------------------------------------------------------------------------------
# retractions


@pytest.mark.parametrize("retraction", RETRACTIONS)
@pytest.mark.parametrize("n, k", SHAPES)
def test_retraction_properties(retraction, n, k):
    m = make(n, k, retraction=retraction)
    for seed in SEEDS:
        x, u, _ = point_and_tangent(m, (3, n, k), seed)
        y = m.retr(x, u)
        assert y.shape == x.shape and y.dtype == x.dtype
        assert orth_err(y) <= 1e-10, (retraction, seed)
        # batched equals per item
        for b in range(3):
            torch.testing.assert_close(m.retr(x[b], u[b]), y[b], atol=1e-12, rtol=0)
        # deterministic
        torch.testing.assert_close(m.retr(x, u), y, atol=0, rtol=0)
        # R_x(0) = x
        torch.testing.assert_close(m.retr(x, torch.zeros_like(u)), x, atol=1e-12, rtol=0)
        # dR_x(0) = id by central differences
        h = 1e-5
        d = (m.retr(x, h * u) - m.retr(x, -h * u)) / (2 * h)
        torch.testing.assert_close(d, u, atol=1e-7, rtol=0)


@pytest.mark.parametrize("n, k", [(12, 2), (7, 3), (4, 4)])
def test_cayley_matches_dense_reference(n, k):
    m = make(n, k, retraction="cayley")
    x, u, _ = point_and_tangent(m, (2, n, k), 5, scale=1.5)
    a = dense_a(x, u)
    eye = torch.eye(n, dtype=torch.float64)
    ref = torch.linalg.solve(eye - 0.5 * a, (eye + 0.5 * a) @ x)
    torch.testing.assert_close(m.retr(x, u), ref, atol=1e-12, rtol=0)


@pytest.mark.parametrize("n, k", [(12, 2), (7, 3), (4, 4)])
def test_expm_retraction_matches_scipy(n, k):
    m = make(n, k, retraction="expm", metric="canonical")
    x, u, _ = point_and_tangent(m, (2, n, k), 6, scale=1.5)
    y = m.retr(x, u)
    for b in range(2):
        a = dense_a(x[b], u[b]).numpy()
        ref = scipy.linalg.expm(a) @ x[b].numpy()
        np.testing.assert_allclose(y[b].numpy(), ref, atol=1e-12)
        torch.testing.assert_close(torch.linalg.matrix_exp(torch.from_numpy(a)) @ x[b], y[b])
    # canonical metric: retraction "expm" is the exact exponential map
    torch.testing.assert_close(m.expmap(x, u), y, atol=1e-12, rtol=0)


@pytest.mark.parametrize("d", [3, 6])
def test_expmap_square_is_x_expm_xtu(d):
    for metric in METRICS:
        for cls in (OrthogonalGroup, SpecialOrthogonalGroup):
            m = cls(d, metric=metric)
            x, u, _ = point_and_tangent(m, (d, d), 7, scale=2.0)
            ref = x.numpy() @ scipy.linalg.expm((x.mT @ u).numpy())
            np.testing.assert_allclose(m.expmap(x, u).numpy(), ref, atol=1e-11)


@pytest.mark.parametrize("n, k", [(9, 2), (5, 3)])
def test_euclidean_expmap_is_geodesic(n, k):
    m = Stiefel(n, k)
    x, u, _ = point_and_tangent(m, (n, k), 8, scale=0.5)
    y = m.expmap(x, u)
    assert orth_err(y) < 1e-12
    # independent implementation: geoopt's EuclideanStiefel
    torch.testing.assert_close(y, geoopt.EuclideanStiefel().expmap(x, u), atol=1e-11, rtol=0)
    # geodesic equation of the embedded metric: Y'' + Y (Y'ᵀY') = 0, speed constant, Y'(0) = u
    h = 2e-4

    def curve(t):
        return m.expmap(x, t * u)

    t = 0.4
    y0, yp, ym = curve(t), curve(t + h), curve(t - h)
    vel = (yp - ym) / (2 * h)
    acc = (yp - 2 * y0 + ym) / h**2
    assert float(acc.abs().max()) > 0.1  # a genuinely curved path, so the check has teeth
    assert float((acc + y0 @ (vel.mT @ vel)).abs().max()) < 1e-6
    torch.testing.assert_close(vel.norm(), u.norm(), atol=1e-6, rtol=0)
    torch.testing.assert_close((curve(h) - curve(-h)) / (2 * h), u, atol=1e-6, rtol=0)


def test_skew_generator_identity():
    for n, k in SHAPES:
        m = make(n, k)
        x, u, g = point_and_tangent(m, (2, n, k), 9)
        a = skew_generator(x, u)
        torch.testing.assert_close(a, -a.mT, atol=0, rtol=0)
        torch.testing.assert_close(a @ x, u, atol=1e-12, rtol=0)  # A x = u for tangent u
        z = torch.randn(2, n, k, generator=g, dtype=torch.float64)
        torch.testing.assert_close(skew_generator(x, z) @ x, m.proju(x, z), atol=1e-12, rtol=0)


@pytest.mark.parametrize("n, k", [(6, 2), (7, 3), (5, 5)])
def test_givens_sweep_matches_dense_product(n, k):
    m = make(n, k, retraction="givens_sweep")
    x, u, _ = point_and_tangent(m, (n, k), 10)
    a = dense_a(x, u)
    ref = x.clone()
    for match in round_robin(n):
        for i, j in zip(match.i.tolist(), match.j.tolist()):
            e = torch.zeros(n, n, dtype=torch.float64)
            e[i, j], e[j, i] = 1.0, -1.0
            ref = (
                torch.linalg.matrix_exp(a[i, j] * e) @ ref
            )  # angle A_ij, sign: expm(θ(E_ij − E_ji))
    torch.testing.assert_close(m.retr(x, u), ref, atol=1e-9, rtol=0)


def test_givens_sweep_is_first_order_expm():
    m = Stiefel(8, 3, retraction="givens_sweep")
    e = Stiefel(8, 3, retraction="expm")
    x, u, _ = point_and_tangent(m, (8, 3), 11)
    errs = [float((m.retr(x, t * u) - e.retr(x, t * u)).norm()) for t in (0.1, 0.05)]
    assert 3.0 < errs[0] / errs[1] < 5.0  # second-order agreement: error ∝ t²


@pytest.mark.parametrize("d", [3, 5])
def test_so_retractions_keep_det_one(d):
    x_o, _, g = point_and_tangent(OrthogonalGroup(d), (4, d, d), 12)
    for r in RETRACTIONS:
        so = SpecialOrthogonalGroup(d, retraction=r)
        o = OrthogonalGroup(d, retraction=r)
        x, u, _ = point_and_tangent(so, (4, d, d), 13, scale=3.0)
        assert float((torch.linalg.det(x) - 1).abs().max()) < 1e-12
        y = so.retr(x, u)
        assert float((torch.linalg.det(y) - 1).abs().max()) < 1e-10, r
        # O(d) retractions preserve the component of a det −1 point
        uo = o.proju(x_o, torch.randn(4, d, d, generator=g, dtype=torch.float64))
        torch.testing.assert_close(
            torch.linalg.det(o.retr(x_o, uo)), torch.linalg.det(x_o), atol=1e-10, rtol=0
        )
    # a (non-tangent) step with det(x + u) < 0: the sign-fixed QR/polar factor has det −1 for odd d
    x = torch.eye(3, dtype=torch.float64)
    for r in ("qr", "polar"):
        assert float(torch.linalg.det(OrthogonalGroup(3, retraction=r).retr(x, -2 * x))) < 0
        y = SpecialOrthogonalGroup(3, retraction=r).retr(x, -2 * x)
        assert abs(float(torch.linalg.det(y)) - 1) < 1e-12 and orth_err(y) < 1e-12


# ------------------------------------------------------------------------------------------------
# transports


@pytest.mark.parametrize("retraction", RETRACTIONS)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("n, k", SHAPES)
def test_transports_land_in_tangent_space(retraction, metric, n, k):
    m = make(n, k, retraction=retraction, metric=metric)
    x, u, g = point_and_tangent(m, (2, n, k), 14)
    v = m.proju(x, torch.randn(2, n, k, generator=g, dtype=torch.float64))
    y, w = m.retr_transp(x, u, v)
    torch.testing.assert_close(y, m.retr(x, u), atol=1e-12, rtol=0)
    assert tangent_err(y, w) < 1e-11
    torch.testing.assert_close(m.transp_follow_retr(x, u, v), w, atol=1e-12, rtol=0)
    if retraction in ("cayley", "expm", "givens_sweep"):
        # rotation transport: isometric in both metrics
        torch.testing.assert_close(m.inner(y, w), m.inner(x, v), atol=1e-11, rtol=0)
    else:
        torch.testing.assert_close(w, m.proju(y, v), atol=1e-12, rtol=0)
    wt = m.transp(x, y, v)
    assert tangent_err(y, wt) < 1e-12
    torch.testing.assert_close(m.transp(x, y, wt), wt, atol=1e-12, rtol=0)
    ye, we = m.expmap_transp(x, u, v)
    assert tangent_err(ye, we) < 1e-11
    torch.testing.assert_close(ye, m.expmap(x, u), atol=0, rtol=0)


# ------------------------------------------------------------------------------------------------
# SO(d) projection


def test_so_projx_two_by_two_closed_form():
    so = SpecialOrthogonalGroup(2)
    a = torch.randn(50, 2, 2, generator=gen(15), dtype=torch.float64)
    r = so.projx(a)
    # the nearest rotation maximises tr(RᵀA): angle atan2(a10 − a01, a00 + a11)
    th = torch.atan2(a[:, 1, 0] - a[:, 0, 1], a[:, 0, 0] + a[:, 1, 1])
    ref = torch.stack(
        [torch.stack([th.cos(), -th.sin()], -1), torch.stack([th.sin(), th.cos()], -1)], -2
    )
    torch.testing.assert_close(r, ref, atol=1e-12, rtol=0)
    assert bool((torch.linalg.det(a) < 0).any())  # the sample exercises the det −1 branch


@pytest.mark.parametrize("seed", SEEDS)
def test_so_projx_from_det_minus_one(seed):
    d = 4
    so = SpecialOrthogonalGroup(d)
    g = gen(seed)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    if torch.linalg.det(a) > 0:
        a[0] = -a[0]
    assert float(torch.linalg.det(a)) < 0
    r = so.projx(a)
    assert orth_err(r) < 1e-12 and abs(float(torch.linalg.det(r)) - 1) < 1e-12
    # flipping the smallest singular direction, via numpy's SVD
    uu, _, vt = np.linalg.svd(a.numpy())
    ref = uu @ np.diag([1.0] * (d - 1) + [-1.0]) @ vt
    np.testing.assert_allclose(r.numpy(), ref, atol=1e-12)
    # local optimality on SO(d): no nearby rotation is closer to a
    dist = float((r - a).norm())
    for _ in range(20):
        w = torch.randn(d, d, generator=g, dtype=torch.float64)
        q = r @ torch.linalg.matrix_exp(1e-3 * (w - w.mT))
        assert float((q - a).norm()) >= dist - 1e-12
    # for det > 0 inputs it is the plain polar factor
    b = -a if d % 2 == 1 else torch.cat([-a[:1], a[1:]])
    torch.testing.assert_close(so.projx(b), OrthogonalGroup(d).projx(b), atol=1e-12, rtol=0)


# ------------------------------------------------------------------------------------------------
# sampling


def test_random_is_reproducible_and_on_manifold():
    m = Stiefel(6, 3)
    a = m.random_(4, 6, 3, generator=gen(0), dtype=torch.float64)
    b = m.random_((4, 6, 3), generator=gen(0), dtype=torch.float64)
    c = m.random_(4, 6, 3, generator=gen(1), dtype=torch.float64)
    assert isinstance(a, geoopt.ManifoldTensor) and a.manifold is m
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert float((a - c).abs().max()) > 0.1
    assert orth_err(a) < 1e-12
    assert m.random_(generator=gen(0)).shape == (6, 3)  # default size from (n, k)
    assert m.random(6, 3).shape == (6, 3)  # geoopt API, no generator
    assert m.random_(6, 3, dtype=torch.float32, generator=gen(0)).dtype == torch.float32
    with pytest.raises(ValueError, match="size"):
        Stiefel().random_(generator=gen(0))
    with pytest.raises(ValueError, match="n >= k"):
        Stiefel().random_(2, 3, generator=gen(0))
    with pytest.raises(TypeError, match="generator"):
        m.random_(6, 3, generator=0)
    with pytest.raises(TypeError, match="dtype"):
        m.random_(6, 3, dtype=torch.int64, generator=gen(0))


def test_random_is_haar():
    """Moments of the Haar measure; an unfixed LAPACK QR gives Q[0, 0] < 0 always and fails here."""
    n = 3
    x = OrthogonalGroup(n).random_(4000, n, n, generator=gen(1), dtype=torch.float64)
    assert abs(float(x[:, 0, 0].mean())) < 0.05
    torch.testing.assert_close(
        (x**2).mean(0), torch.full((n, n), 1.0 / n, dtype=torch.float64), atol=0.03, rtol=0
    )
    dets = torch.linalg.det(x)
    assert 0.45 < float((dets > 0).double().mean()) < 0.55
    # SO(3) Haar: E[tr R] = 0 and E[(tr R)²] = 1
    r = SpecialOrthogonalGroup(3).random_(4000, 3, 3, generator=gen(2), dtype=torch.float64)
    assert float((torch.linalg.det(r) - 1).abs().max()) < 1e-12
    tr = r.diagonal(dim1=-2, dim2=-1).sum(-1)
    assert abs(float(tr.mean())) < 0.06
    assert abs(float((tr**2).mean()) - 1.0) < 0.08


def test_origin():
    x = Stiefel(5, 2).origin(3, 5, 2, dtype=torch.float64)
    assert x.shape == (3, 5, 2)
    torch.testing.assert_close(x[1], torch.eye(5, 2, dtype=torch.float64))
    assert SpecialOrthogonalGroup(3).check_point_on_manifold(SpecialOrthogonalGroup(3).origin())


# ------------------------------------------------------------------------------------------------
# geoopt optimizers


def _procrustes(m: Stiefel, target: torch.Tensor, opt_name: str, steps: int, seed: int):
    x0 = m.random_(*target.shape, generator=gen(seed), dtype=target.dtype)
    p = geoopt.ManifoldParameter(x0, manifold=m)
    if opt_name == "sgd":
        opt = geoopt.optim.RiemannianSGD([p], lr=0.05, momentum=0.9, stabilize=10)
    else:
        opt = geoopt.optim.RiemannianAdam([p], lr=0.05, stabilize=5)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = ((p - target) ** 2).sum()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return p.detach(), losses


@pytest.mark.parametrize("retraction", RETRACTIONS)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_geoopt_optimizers_solve_procrustes(retraction, metric, opt_name):
    n, k = 6, 3
    m = Stiefel(n, k, metric=metric, retraction=retraction)
    target = torch.randn(n, k, generator=gen(20), dtype=torch.float64)
    best = torch.from_numpy(scipy.linalg.polar(target.numpy())[0])
    opt_loss = float(((best - target) ** 2).sum())
    x, losses = _procrustes(m, target, opt_name, 300, seed=21)
    assert orth_err(x) < 1e-10
    assert losses[-1] < losses[0]
    assert float(((x - target) ** 2).sum()) - opt_loss < 1e-3 * max(1.0, opt_loss)
    torch.testing.assert_close(x, best, atol=2e-2, rtol=0)


@pytest.mark.parametrize("retraction", ["qr", "cayley", "givens_sweep"])
def test_so_optimizer_stays_in_so_with_det_minus_one_target(retraction):
    d = 4
    so = SpecialOrthogonalGroup(d, retraction=retraction)
    target = OrthogonalGroup(d).random_(generator=gen(30), dtype=torch.float64)
    target = torch.cat([-target[:1], target[1:]]) if torch.linalg.det(target) > 0 else target
    x, losses = _procrustes(so, target, "adam", 200, seed=31)
    assert float((torch.linalg.det(x) - 1).abs()) < 1e-10 and orth_err(x) < 1e-10
    best = so.projx(target)  # nearest rotation
    assert losses[-1] < losses[0]
    assert float(((x - target) ** 2).sum()) <= float(((best - target) ** 2).sum()) + 1e-3


def test_float32_optimizer_and_retractions():
    m = Stiefel(10, 4, retraction="cayley")
    target = torch.randn(10, 4, generator=gen(40))
    x, losses = _procrustes(m, target, "adam", 100, seed=41)
    assert x.dtype == torch.float32 and orth_err(x) < 1e-5 and losses[-1] < losses[0]
    for r in RETRACTIONS:
        mm = Stiefel(10, 4, retraction=r)
        x, u, _ = point_and_tangent(mm, (2, 10, 4), 42, dtype=torch.float32)
        y = mm.retr(x, u)
        assert y.dtype == torch.float32 and orth_err(y) < 5e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_is_computed_in_float32(dtype):
    for r in RETRACTIONS:
        m = Stiefel(8, 3, retraction=r)
        x, u, _ = point_and_tangent(m, (8, 3), 43, dtype=torch.float32)
        y = m.retr(x.to(dtype), u.to(dtype))
        assert y.dtype == dtype
        assert orth_err(y.float()) < 3e-2
        assert m.projx(y).dtype == dtype
    # geoopt's Adam runs on a half-precision parameter (geoopt's own Stiefel fails in LAPACK here)
    m = Stiefel(12, 3, retraction="cayley")
    p = geoopt.ManifoldParameter(m.random_(generator=gen(45), dtype=dtype), manifold=m)
    target = torch.randn(12, 3, generator=gen(46)).to(dtype)
    opt = geoopt.optim.RiemannianAdam([p], lr=0.05, stabilize=10)
    losses = []
    for _ in range(40):
        opt.zero_grad()
        loss = ((p.float() - target.float()) ** 2).sum()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert p.dtype == dtype and losses[-1] < 0.8 * losses[0]
    assert orth_err(p.detach().float()) < 3e-2


# ------------------------------------------------------------------------------------------------
# autograd through the retractions


@pytest.mark.parametrize("retraction", ["cayley", "expm", "givens_sweep", "qr"])
@pytest.mark.parametrize("n, k", [(9, 2), (4, 3)])
def test_retraction_gradcheck(retraction, n, k):
    m = Stiefel(n, k, retraction=retraction)
    x, u, _ = point_and_tangent(m, (n, k), 44)
    x.requires_grad_(True)
    u = u.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: m.retr(a, b), (x, u))


# ------------------------------------------------------------------------------------------------
# bad input


def test_bad_inputs_raise_clear_errors():
    m = Stiefel(5, 2)
    x = m.origin(dtype=torch.float64)
    u = torch.zeros(5, 2, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"`x`.*floating"):
        m.retr(torch.zeros(5, 2, dtype=torch.int64), u)
    with pytest.raises(TypeError, match=r"`u`.*floating"):
        m.proju(x, torch.zeros(5, 2, dtype=torch.int32))
    with pytest.raises(TypeError, match=r"`x` must be a torch.Tensor"):
        m.projx([[1.0, 0.0]])
    with pytest.raises(ValueError, match=r"`x`.*at least 2 dims"):
        Stiefel().projx(torch.ones(3))
    with pytest.raises(ValueError, match=r"`x`.*n >= k"):
        Stiefel().retr(torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="`x` must have n=5"):
        m.egrad2rgrad(torch.zeros(4, 2), torch.zeros(4, 2))
    with pytest.raises(ValueError, match=r"`u` must have the shape of `x`.*broadcast"):
        m.retr(x.expand(3, 5, 2), torch.zeros(2, 5, 2, dtype=torch.float64))
    with pytest.raises(TypeError, match="`u` must have the same dtype"):
        m.retr(x, torch.zeros(5, 2, dtype=torch.float32))
    with pytest.raises(ValueError, match="`v` must have the shape of `x`"):
        m.inner(x, u, torch.zeros(5, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="`y` must have the shape of `x`"):
        Stiefel().transp(x, torch.zeros(6, 2, dtype=torch.float64), torch.zeros(6, 2).double())
    with pytest.raises(TypeError, match="`v` must have the same dtype as `y`"):
        Stiefel().transp(x, x, torch.zeros(5, 2))
    with pytest.raises(ValueError, match="square"):
        OrthogonalGroup().retr(torch.zeros(4, 3), torch.zeros(4, 3))
    with pytest.raises(ValueError, match="`u` must have the same shape"):
        skew_generator(x, torch.zeros(5, 3, dtype=torch.float64))


def test_point_and_tangent_checks():
    m = Stiefel(5, 2)
    x = m.random_(generator=gen(50), dtype=torch.float64)
    m.assert_point(x)  # passes
    with pytest.raises(ValueError, match=r"`x`.*off the manifold"):
        m.assert_point(2 * x)
    with pytest.raises(ValueError, match=r"`x`.*non-finite"):
        m.assert_point(torch.full_like(x, float("nan")))
    assert not m.check_point_on_manifold(1.01 * x)
    u = m.proju(x, torch.randn(5, 2, generator=gen(51), dtype=torch.float64))
    m.assert_tangent(x, u)
    with pytest.raises(ValueError, match=r"`u`.*not tangent"):
        m.assert_tangent(x, u + x)
    with pytest.raises(TypeError, match="`u`"):
        m.assert_tangent(x, u.long())
    so = SpecialOrthogonalGroup(3)
    refl = torch.diag(torch.tensor([-1.0, 1.0, 1.0], dtype=torch.float64))
    OrthogonalGroup(3).assert_point(refl)
    with pytest.raises(ValueError, match="not a rotation"):
        so.assert_point(refl)


def test_givens_sweep_angle_paths_agree(monkeypatch):
    """The dense-GEMM angles (small n) and the pair_coefficients angles (large n) give the same sweep."""
    m = Stiefel(9, 3, retraction="givens_sweep")
    x, u, g = point_and_tangent(m, (2, 9, 3), 60)
    v = m.proju(x, torch.randn(2, 9, 3, generator=g, dtype=torch.float64))
    y, w = m.retr_transp(x, u, v)
    monkeypatch.setattr(st, "_DENSE_GENERATOR_LIMIT", 0)
    y2, w2 = m.retr_transp(x, u, v)
    torch.testing.assert_close(y2, y, atol=1e-13, rtol=0)
    torch.testing.assert_close(w2, w, atol=1e-13, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_paths():
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    for r in RETRACTIONS:
        for m in (Stiefel(40, 4, retraction=r), SpecialOrthogonalGroup(6, retraction=r)):
            x = m.random_(3, m.n, m.k, generator=g, dtype=torch.float64)
            assert x.device.type == "cuda"
            x = x.as_subclass(torch.Tensor)
            u = m.proju(x, torch.randn(x.shape, generator=g, device=dev, dtype=torch.float64))
            y, w = m.retr_transp(x, u, u)
            assert y.device.type == "cuda" and orth_err(y.cpu()) < 1e-10
            assert tangent_err(y, w) < 1e-10
            cpu = type(m)(*((m.n, m.k) if type(m) is Stiefel else (m.n,)), retraction=r)
            torch.testing.assert_close(y.cpu(), cpu.retr(x.cpu(), u.cpu()), atol=1e-10, rtol=0)
            assert y.is_contiguous() and w.is_contiguous() and m.projx(x.mT.mT).is_contiguous()
    # low-rank expm in float32 on the device: on the manifold for a huge step, with and without autograd
    m = Stiefel(64, 4, retraction="expm")
    x = m.random_(generator=g, dtype=torch.float32).as_subclass(torch.Tensor)
    u = m.proju(x, torch.randn(x.shape, generator=g, device=dev))
    u = 1e4 * u / torch.linalg.matrix_norm(u)
    assert orth_err(m.retr(x, u).cpu()) < 2e-6
    assert orth_err(m.retr(x, u.clone().requires_grad_(True)).detach().cpu()) < 1e-3
    for dtype in (torch.float16, torch.bfloat16):
        assert m.check_point_on_manifold(m.random_(generator=g, dtype=dtype))


def test_so_component_correct_at_large_d_float32():
    """torch.linalg.det of a float32 orthogonal matrix underflows to ±0 from d ≈ 512: the SO(d) class
    must still see the sign (projx, random_, point check)."""
    d = 768
    gen = torch.Generator().manual_seed(0)
    m = SpecialOrthogonalGroup(d)
    q = torch.linalg.qr(torch.randn(d, d, generator=gen))[0]
    if torch.linalg.slogdet(q)[0] > 0:
        q[:, 0] = -q[:, 0]  # a reflection, det −1
    p = m.projx(q)
    assert torch.linalg.slogdet(p.double())[0] > 0
    assert torch.linalg.slogdet(m.random_(d, d, generator=gen).double())[0] > 0
    ok, _ = m._check_point_on_manifold(q, atol=1e-4, rtol=1e-4)
    assert not ok


# ------------------------------------------------------------------------------------------------
# issue 12 §1: memory layout of everything we create


ALL_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
LAYOUT_CASES = [
    (Stiefel, (6, 3), (6, 3)),
    (Stiefel, (6, 3), (2, 6, 3)),
    (Stiefel, (None, None), (4, 9, 2)),
    (OrthogonalGroup, (5,), (5, 5)),
    (OrthogonalGroup, (None,), (3, 4, 4)),
    (SpecialOrthogonalGroup, (5,), (5, 5)),
    (SpecialOrthogonalGroup, (None,), (2, 3, 3)),
]


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("cls, args, shape", LAYOUT_CASES)
def test_random_and_projx_return_row_major_contiguous(cls, args, shape, dtype):
    """OrthogonalGroup(d).random() and Stiefel(n, k).random() were column-major (LAPACK's Q)."""
    m = cls(*args)
    fixed = args[0] is not None and len(shape) == 2
    draws = [m.random_(*shape, dtype=dtype, generator=gen(0)), m.random(shape, dtype=dtype)]
    if fixed:
        draws += [m.random_(dtype=dtype, generator=gen(1)), m.random(dtype=dtype)]
    draws.append(m.origin(*shape, dtype=dtype))
    for x in draws:
        assert x.shape == shape and x.dtype == dtype
        assert x.is_contiguous() and x.stride(-1) == 1, (cls.__name__, x.stride())
    # projx of every input layout: contiguous, column-major (transposed storage), sliced
    base = torch.randn(*shape[:-2], shape[-1], shape[-2], generator=gen(2)).to(dtype).mT
    sliced = torch.randn(*shape[:-1], 2 * shape[-1], generator=gen(3)).to(dtype)[..., ::2]
    for z in (base.contiguous(), base, sliced):
        p = m.projx(z)
        assert p.is_contiguous(), (cls.__name__, z.stride(), p.stride())
        torch.testing.assert_close(p.float(), m.projx(z.contiguous()).float(), atol=0, rtol=0)
    # retractions and transports of a column-major point are contiguous as well
    x = draws[0].as_subclass(torch.Tensor)
    xt = x.mT.contiguous().mT  # same values, column-major storage
    u = m.proju(xt, torch.randn(shape, generator=gen(4)).to(dtype))
    for r in RETRACTIONS:
        mm = cls(*args, retraction=r)
        assert mm.retr(xt, u).is_contiguous(), r
        y, w = mm.retr_transp(xt, u, u)
        assert y.is_contiguous() and w.is_contiguous(), r


# ------------------------------------------------------------------------------------------------
# issue 10 "Manifolds": half precision points, expm on tall points, wide ManifoldParameter


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "m, shape",
    [
        (Stiefel(8, 3), (8, 3)),
        (Stiefel(256, 16), (256, 16)),
        (Stiefel(), (4, 64, 64)),
        (OrthogonalGroup(3), (3, 3)),
        (OrthogonalGroup(128), (128, 128)),
        (SpecialOrthogonalGroup(5), (6, 5, 5)),
    ],
)
def test_half_precision_random_passes_its_own_point_check(m, shape, dtype):
    """The tolerance was fixed at 2e-5; a float16 (bfloat16) Haar point is off by ~3e-4 (3e-3)."""
    for seed in SEEDS:
        x = m.random_(*shape, dtype=dtype, generator=gen(seed))
        assert m.check_point_on_manifold(x), (m, dtype, seed)
        m.assert_check_point_on_manifold(x)
        geoopt.ManifoldParameter(x, manifold=m)  # geoopt's own construction path
        # the dtype-aware tolerance still rejects points that are clearly off the manifold
        assert not m.check_point_on_manifold((1.05 * x.float()).to(dtype))
        u = m.proju(x, torch.randn(shape, generator=gen(seed + 10)).to(dtype))
        assert m.check_vector_on_tangent(x, u)
        assert not m.check_vector_on_tangent(x, (u.float() + x.float()).to(dtype))
    # float32 keeps the tight default tolerance
    x = m.random_(*shape, dtype=torch.float32, generator=gen(0))
    assert not m.check_point_on_manifold(x * (1 + 1e-4))


STEPS = [1.0, 10.0, 100.0, 1e3, 1e4, 1e6]


@pytest.mark.parametrize("n, k", [(9, 2), (100, 5), (512, 16)])
def test_expm_lowrank_float32_stays_on_manifold_for_huge_steps(n, k):
    """4k < n: the old φ(VᵀU) formula left the manifold like |u|² (1e-4 at 100, 1e-2 at 1000, 0.5+
    for St(9, 2) at 1e4); the basis form is exact for every step, the autograd form drifts like eps·|u|."""
    m = Stiefel(n, k, retraction="expm")
    x = m.random_(generator=gen(70), dtype=torch.float32).as_subclass(torch.Tensor)
    u = m.proju(x, torch.randn(n, k, generator=gen(71)))
    u = u / torch.linalg.matrix_norm(u)
    for step in STEPS:
        y = m.retr(x, step * u)
        assert orth_err(y) < 2e-6, (step, orth_err(y))
        y, w = m.retr_transp(x, step * u, u)
        assert orth_err(y) < 2e-6 and tangent_err(y, w) < 5e-6, step
        torch.testing.assert_close(
            torch.linalg.matrix_norm(w), torch.tensor(1.0), atol=1e-5, rtol=0
        )
    # under autograd (differentiable to any order): eps·|u|/10 or better
    for step in STEPS[:5]:
        ug = (step * u).requires_grad_(True)
        y = m.retr(x, ug)
        assert orth_err(y.detach()) < max(2e-6, 3e-8 * step), (step, orth_err(y.detach()))


@pytest.mark.parametrize("n, k", [(9, 2), (30, 3)])
def test_expm_lowrank_matches_scipy_across_step_sizes_float64(n, k):
    m = Stiefel(n, k, retraction="expm")
    x, u, g = point_and_tangent(m, (n, k), 72)
    v = m.proju(x, torch.randn(n, k, generator=g, dtype=torch.float64))
    u = u / torch.linalg.matrix_norm(u)
    for step in STEPS:
        rot = scipy.linalg.expm(dense_a(x, step * u).numpy())
        tol = 1e-13 * (10 + step)
        y, w = m.retr_transp(x, step * u, v)
        np.testing.assert_allclose(y.numpy(), rot @ x.numpy(), atol=tol, rtol=0)
        np.testing.assert_allclose(w.numpy(), rot @ v.numpy(), atol=tol, rtol=0)
        assert orth_err(y) < tol
        # the autograd path computes the same map
        yg = m.retr(x, (step * u).requires_grad_(True)).detach()
        np.testing.assert_allclose(yg.numpy(), rot @ x.numpy(), atol=10 * tol, rtol=0)


def test_expm_lowrank_autograd_path_is_smooth_at_zero_and_twice_differentiable():
    """The exact (QR) path's backward is singular at u = 0; the autograd path must not be."""
    m = Stiefel(9, 2, retraction="expm")
    x, u, _ = point_and_tangent(m, (9, 2), 73)
    x.requires_grad_(True)
    for uu in (torch.zeros_like(u), x.detach() @ torch.tensor([[0.0, 1.0], [-1.0, 0.0]]).double()):
        uu = uu.clone().requires_grad_(True)
        assert torch.autograd.gradcheck(lambda a, b: m.retr(a, b), (x, uu))
    small = Stiefel(5, 1, retraction="expm")  # still the low-rank branch (4k < n)
    x, _, _ = point_and_tangent(small, (5, 1), 74)
    for uu in (torch.zeros_like(x), small.proju(x, torch.randn(5, 1, generator=gen(75)).double())):
        uu = uu.clone().requires_grad_(True)
        assert torch.autograd.gradgradcheck(lambda b: small.retr(x, b), (uu,))


def test_wide_manifold_parameter_gives_our_message():
    with pytest.raises(ValueError, match="transpose wide weights") as info:
        geoopt.ManifoldParameter(torch.randn(3, 8), manifold=Stiefel())
    assert "seems to be not valid" not in str(info.value)
    with pytest.raises(ValueError, match=r"n >= k.*Stiefel"):
        geoopt.ManifoldTensor(torch.randn(2, 3, 8), manifold=Stiefel(retraction="cayley"))
    with pytest.raises(ValueError, match="square"):
        geoopt.ManifoldParameter(torch.randn(4, 3), manifold=OrthogonalGroup())


# ------------------------------------------------------------------------------------------------
# issue 14: geoopt conventions (broadcasting, reversible retractions, samplers)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("n, k", SHAPES)
def test_u_broadcasts_against_batched_x_as_in_geoopt(n, k, metric):
    """geoopt broadcasts ``u`` against a batched ``x`` (and back); we raised a shape error."""
    ref = geoopt.EuclideanStiefel()  # its proju is the orthogonal projection, as ours
    for r in RETRACTIONS:
        m = make(n, k, metric=metric, retraction=r)
        x, _, g = point_and_tangent(m, (3, n, k), 74)
        w = torch.randn(n, k, generator=g, dtype=torch.float64)
        wb = torch.randn(3, n, k, generator=g, dtype=torch.float64)
        # batched x with unbatched u, and unbatched x with batched u: the explicit loop over items
        for xx, ww in ((x, w), (x[1], wb)):
            xe, we = xx.expand(3, n, k), ww.expand(3, n, k)
            pu = m.proju(xx, ww)
            assert pu.shape == (3, n, k)
            torch.testing.assert_close(pu, ref.proju(xx, ww), atol=1e-12, rtol=0)
            eg = m.egrad2rgrad(xx, ww)
            torch.testing.assert_close(
                eg, torch.stack([m.egrad2rgrad(xe[b], we[b]) for b in range(3)])
            )
            # a small step of the unbatched argument (not tangent everywhere: retr accepts any u)
            uu = 0.3 * ww
            y = m.retr(xx, uu)
            yy, vv = m.retr_transp(xx, uu, ww)
            for b in range(3):
                torch.testing.assert_close(
                    y[b], m.retr(xe[b], uu.expand(3, n, k)[b]), atol=1e-12, rtol=0
                )
                y_ref, v_ref = m.retr_transp(xe[b], uu.expand(3, n, k)[b], we[b])
                torch.testing.assert_close(yy[b], y_ref, atol=1e-12, rtol=0)
                torch.testing.assert_close(vv[b], v_ref, atol=1e-12, rtol=0)
            torch.testing.assert_close(
                m.inner(xx, ww), torch.stack([m.inner(xe[b], we[b]) for b in range(3)])
            )
            torch.testing.assert_close(
                m.inner(xx, ww, 2 * ww, keepdim=True),
                torch.stack([m.inner(xe[b], we[b], 2 * we[b], keepdim=True) for b in range(3)]),
            )
            torch.testing.assert_close(
                m.transp(xx, y, ww), torch.stack([m.transp(xe[b], y[b], we[b]) for b in range(3)])
            )
        # the unbatched point with a batched target point in transp
        torch.testing.assert_close(m.transp(x[0], x, wb), m.proju(x, wb))


@pytest.mark.parametrize("retraction", RETRACTIONS)
@pytest.mark.parametrize("n, k", [(12, 2), (7, 3), (5, 5)])
def test_reversible_flag_matches_the_retraction(retraction, n, k):
    """reversible=True exactly for cayley and expm: R_y(−T(u)) = x and T(T(v)) back = v."""
    m = make(n, k, retraction=retraction)
    assert m.reversible is (retraction in ("cayley", "expm"))
    x, u, g = point_and_tangent(m, (2, n, k), 75, scale=2.0)
    v = m.proju(x, torch.randn(2, n, k, generator=g, dtype=torch.float64))
    y, tu = m.retr_transp(x, u, u)
    _, tv = m.retr_transp(x, u, v)
    x2, v2 = m.retr_transp(y, -tu, tv)
    err = max(float((x2 - x).abs().max()), float((v2 - v).abs().max()))
    if m.reversible:
        assert err < 1e-12, err
    else:
        assert err > 1e-6, err  # a non-reversible retraction is not declared reversible by accident


@pytest.mark.parametrize("sampler", ["RHMC", "SGRHMC", "RSGLD"])
@pytest.mark.parametrize("retraction", ["cayley", "expm"])
def test_geoopt_samplers_accept_rotation_retractions(sampler, retraction):
    m = Stiefel(6, 2, retraction=retraction)
    target = torch.randn(6, 2, generator=gen(76), dtype=torch.float64)
    p = geoopt.ManifoldParameter(m.random_(generator=gen(77), dtype=torch.float64), manifold=m)
    cls = getattr(geoopt.samplers, sampler)
    s = cls([p], epsilon=1e-2)
    s.burnin = False
    np.random.seed(0)  # RHMC's accept/reject draws from numpy's global RNG
    torch.manual_seed(0)  # geoopt's samplers draw their momenta from torch's global RNG
    for _ in range(20):
        s.step(lambda: -((p - target) ** 2).sum())
    assert orth_err(p.detach()) < 1e-10
    if sampler == "RHMC":
        assert s.rejection_rate < 0.5
    with pytest.raises(ValueError, match="reversible"):
        qr_m = Stiefel(6, 2, retraction="qr")
        q = geoopt.ManifoldParameter(qr_m.random_(generator=gen(78)), manifold=qr_m)
        cls([q], epsilon=1e-2)


@pytest.mark.parametrize("retraction", RETRACTIONS)
@pytest.mark.parametrize("n, k", [(5, 1), (4, 2)])
def test_retraction_double_backward(retraction, n, k):
    """Second derivatives through every retraction (MAML-style inner steps): givens_sweep went through
    the first-order rotate_pairs Function and gave a silently wrong second derivative."""
    m = make(n, k, retraction=retraction)
    x, u, _ = point_and_tangent(m, (n, k), 80, scale=0.5)
    u = u.clone().requires_grad_(True)
    assert torch.autograd.gradgradcheck(lambda b: m.retr(x, b), (u,), fast_mode=True)
    xg = x.clone().requires_grad_(True)
    assert torch.autograd.gradgradcheck(lambda a: m.retr(a, u.detach()), (xg,), fast_mode=True)
    # the autograd path computes the same point as the no-grad path, batched and broadcast
    xb, ub, _ = point_and_tangent(m, (2, n, k), 81)
    torch.testing.assert_close(
        m.retr(xb, ub.requires_grad_(True)).detach(), m.retr(xb, ub.detach())
    )
    torch.testing.assert_close(
        m.retr(xb[0], ub.detach().requires_grad_(True)).detach(),
        m.retr(xb[0].expand_as(ub), ub.detach()),
    )
