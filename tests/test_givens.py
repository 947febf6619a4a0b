"""Givens primitives against dense references (matrix_exp, explicit W), on the native and torch paths."""

import pytest
import torch

from orthotorch.graph_sampling import random_matching
from orthotorch.manifolds import _native, givens
from orthotorch.manifolds.givens import (
    check_matching,
    givens_matrix,
    givens_step_,
    pair_coefficients,
    rotate_pairs,
    rotate_pairs_,
)


@pytest.fixture(params=["native", "torch"])
def path(request, monkeypatch):
    if request.param == "native":
        if _native.get_lib() is None:
            pytest.skip("native kernel unavailable")
    else:
        monkeypatch.setattr(_native, "get_lib", lambda: None)
    return request.param


def dense_generator(n, i, j, theta, dtype=torch.float64):
    a = torch.zeros(*theta.shape[:-1], n, n, dtype=dtype)
    a[..., i, j] = theta.to(dtype)
    a[..., j, i] = -theta.to(dtype)
    return a


def matching(n, seed):
    m = random_matching(n, generator=torch.Generator().manual_seed(seed))
    return m.i, m.j


@pytest.mark.parametrize("n,k", [(8, 8), (9, 4), (33, 5), (64, 64)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rotate_matches_matrix_exp(path, n, k, seed):
    """Pins the sign convention: rotate_pairs_(x, i, j, θ) == expm(θ(E_ij − E_ji)) @ x."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, dtype=torch.float64, generator=gen)
    i, j = matching(n, seed)
    theta = torch.randn(i.numel(), dtype=torch.float64, generator=gen)
    ref = torch.linalg.matrix_exp(dense_generator(n, i, j, theta)) @ x
    out = rotate_pairs_(x.clone(), i, j, theta)
    assert torch.allclose(out, ref, atol=1e-12, rtol=0)
    assert torch.allclose(givens_matrix(n, i, j, theta) @ x, ref, atol=1e-12, rtol=0)


def test_sign_convention_single_pair(path):
    x = torch.eye(2, dtype=torch.float64)
    out = rotate_pairs_(x.clone(), [0], [1], torch.tensor([0.3], dtype=torch.float64))
    c, s = torch.cos(torch.tensor(0.3)).item(), torch.sin(torch.tensor(0.3)).item()
    expected = torch.tensor([[c, s], [-s, c]], dtype=torch.float64)
    assert torch.allclose(out, expected, atol=1e-15)


@pytest.mark.parametrize("batch", [(3,), (2, 3)])
def test_batched_angles(path, batch):
    n, k = 10, 4
    x = torch.randn(*batch, n, k, dtype=torch.float64)
    i, j = matching(n, 0)
    theta = torch.randn(*batch, i.numel(), dtype=torch.float64)
    ref = torch.linalg.matrix_exp(dense_generator(n, i, j, theta)) @ x
    assert torch.allclose(rotate_pairs_(x.clone(), i, j, theta), ref, atol=1e-12)
    shared = theta.reshape(-1, i.numel())[0]
    ref_shared = torch.linalg.matrix_exp(dense_generator(n, i, j, shared)) @ x
    assert torch.allclose(rotate_pairs_(x.clone(), i, j, shared), ref_shared, atol=1e-12)


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced"])
def test_pair_coefficients_dense_reference(path, layout):
    n, k = 12, 7
    x = torch.randn(n, k, dtype=torch.float64)
    g = torch.randn(n, k, dtype=torch.float64)
    if layout == "transposed":  # a wide weight stored (k, n), used through .mT
        x, g = x.T.contiguous().T, g.T.contiguous().T
    elif layout == "sliced":
        x = torch.randn(n, 2 * k, dtype=torch.float64)[:, ::2]
        g = torch.randn(n, 2 * k, dtype=torch.float64)[:, ::2]
    i, j = matching(n, 3)
    w = g @ x.T - x @ g.T
    assert torch.allclose(pair_coefficients(x, g, i, j), w[i, j], atol=1e-12)


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("scaled", [False, True])
def test_fused_step_is_exp_of_restricted_generator(path, layout, scaled):
    n, k, lr = 16, 6, 0.7
    x = torch.linalg.qr(torch.randn(n, k, dtype=torch.float64))[0]
    g = torch.randn(n, k, dtype=torch.float64)
    if layout == "transposed":
        x, g = x.T.contiguous().T, g.T.contiguous().T
    i, j = matching(n, 5)
    scale = torch.rand(i.numel(), dtype=torch.float64) + 0.5 if scaled else None
    w_full = g @ x.T - x @ g.T
    theta = -lr * w_full[i, j] * (1 if scale is None else scale)
    ref = torch.linalg.matrix_exp(dense_generator(n, i, j, theta)) @ x
    y = x.clone()
    if layout == "transposed":
        y = y.T.contiguous().T
    w = givens_step_(y, g, i, j, lr, scale=scale)
    assert torch.allclose(w, w_full[i, j], atol=1e-12)
    assert torch.allclose(y, ref, atol=1e-12)


def test_step_is_descent_to_first_order(path):
    """f(X) = <C, X>: the matching step decreases f by lr·Σ_M W_ij² + O(lr²) (DESIGN.md)."""
    n, k = 20, 5
    x = torch.linalg.qr(torch.randn(n, k, dtype=torch.float64))[0]
    c = torch.randn(n, k, dtype=torch.float64)
    i, j = matching(n, 1)
    for lr in (1e-3, 1e-4):
        y = x.clone()
        w = givens_step_(y, c, i, j, lr)
        decrease = (c * x).sum() - (c * y).sum()
        assert decrease > 0
        assert torch.isclose(decrease, lr * (w**2).sum(), rtol=20 * lr * 10)


def test_determinant_and_orthogonality_preserved(path):
    n = 31
    x = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))[0]
    det0 = torch.linalg.det(x)
    g = torch.randn(n, n, dtype=torch.float64)
    for s in range(20):
        i, j = matching(n, s)
        givens_step_(x, g, i, j, 0.1)
    assert torch.isclose(torch.linalg.det(x), det0, atol=1e-12)
    assert (x.T @ x - torch.eye(n, dtype=torch.float64)).norm() < 1e-12


def test_native_equals_torch_path(monkeypatch):
    if _native.get_lib() is None:
        pytest.skip("native kernel unavailable")
    x = torch.randn(2, 40, 9, dtype=torch.float64)
    g = torch.randn(2, 40, 9, dtype=torch.float64)
    i, j = matching(40, 7)
    a = x.clone()
    wa = givens_step_(a, g, i, j, 0.3)
    monkeypatch.setattr(_native, "get_lib", lambda: None)
    b = x.clone()
    wb = givens_step_(b, g, i, j, 0.3)
    assert torch.allclose(a, b, atol=1e-13) and torch.allclose(wa, wb, atol=1e-13)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_close_to_float64(path, dtype):
    n, k = 64, 16
    x64 = torch.linalg.qr(torch.randn(n, k, dtype=torch.float64))[0]
    g64 = torch.randn(n, k, dtype=torch.float64)
    i, j = matching(n, 2)
    ref = x64.clone()
    givens_step_(ref, g64, i, j, 0.2)
    x = x64.to(dtype)
    w = givens_step_(x, g64.to(dtype), i, j, 0.2)
    assert w.dtype == torch.float32  # coefficients of half-precision inputs are float32
    tol = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}[dtype]
    assert (x.double() - ref).abs().max() < tol
    assert torch.isfinite(x).all()


def test_rotate_pairs_gradcheck():
    n, k = 9, 3
    x = torch.randn(2, n, k, dtype=torch.float64, requires_grad=True)
    i, j = matching(n, 0)
    theta_shared = torch.randn(i.numel(), dtype=torch.float64, requires_grad=True)
    theta_batched = torch.randn(2, i.numel(), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, t: rotate_pairs(a, i, j, t), (x, theta_shared))
    assert torch.autograd.gradcheck(lambda a, t: rotate_pairs(a, i, j, t), (x, theta_batched))


def test_rotate_pairs_grad_matches_dense_autograd():
    n, k = 10, 4
    x = torch.randn(n, k, dtype=torch.float64, requires_grad=True)
    theta = torch.randn(5, dtype=torch.float64, requires_grad=True)
    i, j = matching(n, 4)
    c = torch.randn(n, k, dtype=torch.float64)
    (rotate_pairs(x, i, j, theta) * c).sum().backward()
    gx, gt = x.grad.clone(), theta.grad.clone()
    x2 = x.detach().clone().requires_grad_()
    t2 = theta.detach().clone().requires_grad_()
    (torch.linalg.matrix_exp(dense_generator(n, i, j, t2)) @ x2 * c).sum().backward()
    assert torch.allclose(gx, x2.grad, atol=1e-12) and torch.allclose(gt, t2.grad, atol=1e-12)


def test_bad_inputs():
    x = torch.randn(6, 3)
    i, j = torch.tensor([0, 2]), torch.tensor([1, 3])
    with pytest.raises(ValueError, match="`g` must have the shape"):
        pair_coefficients(x, torch.randn(6, 4), i, j)
    with pytest.raises(TypeError, match="`g` must have the dtype"):
        pair_coefficients(x, torch.randn(6, 3, dtype=torch.float64), i, j)
    with pytest.raises(TypeError, match="`x` must have a floating dtype"):
        rotate_pairs_(torch.zeros(6, 3, dtype=torch.int64), i, j, 0.1)
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        rotate_pairs_(torch.randn(6), i, j, 0.1)
    with pytest.raises(ValueError, match="P=2"):
        rotate_pairs_(x, i, j, torch.zeros(3))
    with pytest.raises(ValueError, match="same length"):
        rotate_pairs_(x, i, torch.tensor([1]), 0.1)
    with pytest.raises(TypeError, match="integer tensor"):
        rotate_pairs_(x, i.float(), j, 0.1)
    before = x.clone()
    with pytest.raises(IndexError, match=r"\[0, 6\)"):
        rotate_pairs_(x, torch.tensor([0, 7]), j, 0.1)
    assert torch.equal(x, before)  # nothing written
    with pytest.raises(IndexError):
        givens_step_(x, torch.randn(6, 3), torch.tensor([-1, 2]), j, 0.1)


def test_check_matching():
    check_matching([0, 2], [1, 3], 4)
    with pytest.raises(ValueError, match="disjoint"):
        check_matching([0, 1], [1, 2], 4)
    with pytest.raises(ValueError, match="different rows"):
        check_matching([0], [0], 4)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        check_matching([0], [4], 4)


def test_native_status_reports():
    assert isinstance(givens.native_status(), str) and givens.native_status()


def test_float32_small_angle_drift_is_not_systematic(path):
    """cos θ rounds to 1 in float32 for |θ| < 2.4e-4; the plain form c·x + s·y then grows the rows by
    √(1 + θ²) per rotation (‖XᵀX − I‖ ≈ 8e-4 after 10⁴ steps at d = 256). The increment form must stay at
    the random-walk level of large angles (≈ 6e-5)."""
    d, steps = 256, 10_000
    gen = torch.Generator().manual_seed(0)
    x = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=gen))[0].float()
    g = torch.randn(d, d, generator=gen)
    m = random_matching(d, generator=gen)
    lr = 5e-5 / float(pair_coefficients(x, g, m.i, m.j).abs().mean())
    for _ in range(steps):
        m = random_matching(d, generator=gen)
        givens_step_(x, g, m.i, m.j, lr)
    err = float((x.double().T @ x.double() - torch.eye(d, dtype=torch.float64)).norm())
    assert err < 2e-4, err


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("alias", [False, True])
def test_step_co_rotate_equals_separate_rotation(path, layout, alias):
    """co_rotate turns a second tensor (a momentum buffer, possibly the driver itself) by the same angles."""
    n, k, lr = 14, 5, 0.4
    x = torch.linalg.qr(torch.randn(n, k, dtype=torch.float64))[0]
    g = torch.randn(n, k, dtype=torch.float64)
    y = g.clone() if alias else torch.randn(n, k, dtype=torch.float64)
    if layout == "transposed":
        x, g, y = (t.T.contiguous().T for t in (x, g, y))
    i, j = matching(n, 2)
    scale = torch.rand(i.numel(), dtype=torch.float64) + 0.5
    w_ref = (g @ x.T - x @ g.T)[i, j]
    theta = -lr * w_ref * scale
    x_ref = rotate_pairs_(x.clone(), i, j, theta)
    y_ref = rotate_pairs_(y.clone(), i, j, theta)
    x2 = x.clone() if layout == "contiguous" else x.T.contiguous().T
    if alias:
        drv = y.clone() if layout == "contiguous" else y.T.contiguous().T
        w = givens_step_(x2, drv, i, j, lr, scale=scale, co_rotate=drv)
        y2 = drv
    else:
        y2 = y.clone() if layout == "contiguous" else y.T.contiguous().T
        w = givens_step_(x2, g, i, j, lr, scale=scale, co_rotate=y2)
    assert torch.allclose(w, w_ref, atol=1e-12)
    assert torch.allclose(x2, x_ref, atol=1e-12) and torch.allclose(y2, y_ref, atol=1e-12)
