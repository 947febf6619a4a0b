"""Givens primitives against dense references (matrix_exp, explicit W), on the native and torch paths."""

import pytest
import torch

from givens_reference import (
    dense_rotation,
    per_thread_count_and_layout,
    round_robin_rounds,
    with_layout,
)
from orthotorch.graph_sampling import random_matching, round_robin_matching
from orthotorch.manifolds import _native, givens
from orthotorch.manifolds.givens import (
    check_matching,
    givens_matrix,
    givens_step_,
    givens_steps_,
    pair_coefficients,
    rotate_pairs,
    rotate_pairs_,
    rotate_pairs_autograd,
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
    """f(X) = <C, X>: the matching step decreases f by lr·Σ_M W_ij² + O(lr²) (docs/design.md)."""
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


@pytest.mark.parametrize("which", ["native", pytest.param("torch", marks=pytest.mark.slow)])
def test_float32_small_angle_drift_is_not_systematic(which, monkeypatch):
    """cos θ rounds to 1 in float32 for |θ| < 2.4e-4; the plain form c·x + s·y then grows the rows by
    √(1 + θ²) per rotation (‖XᵀX − I‖ ≈ 8e-4 after 10⁴ steps at d = 256). The increment form must stay at
    the random-walk level of large angles (≈ 6e-5)."""
    if which == "native" and _native.get_lib() is None:
        pytest.skip("native kernel unavailable")
    if which == "torch":  # 10⁴ steps of the torch path: minutes on a loaded machine
        monkeypatch.setattr(_native, "get_lib", lambda: None)
    d, steps = 256, 10_000
    gen = torch.Generator().manual_seed(0)
    x = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=gen))[0].float()
    g = torch.randn(d, d, generator=gen)
    m = random_matching(d, generator=gen)
    lr = 5e-5 / float(pair_coefficients(x, g, m.i, m.j).abs().mean())
    for _ in range(steps):
        m = random_matching(d, generator=gen)
        givens_step_(x, g, m.i, m.j, lr, check=False)
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


# ----------------------------------------------------------------------------------------------------
# issue 10: checks of the public primitives


def test_expanded_tensor_raises_instead_of_writing_through_aliases(path):
    """Old behaviour: rotate_pairs_ wrote through the stride-0 memory of an expanded tensor."""
    base = torch.randn(1, 3, dtype=torch.float64)
    x = base.expand(6, 3)
    before = base.clone()
    i, j = torch.tensor([0, 2]), torch.tensor([1, 3])
    with pytest.raises(ValueError, match="overlapping memory"):
        rotate_pairs_(x, i, j, 0.3)
    with pytest.raises(ValueError, match="overlapping memory"):
        givens_step_(x, torch.randn(6, 3, dtype=torch.float64), i, j, 0.3)
    with pytest.raises(ValueError, match=r"`co_rotate`.*overlapping"):
        givens_step_(torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64),
                     i, j, 0.3, co_rotate=x)  # fmt: skip
    with pytest.raises(ValueError, match="overlapping memory"):
        givens_steps_(x, torch.randn(6, 3, dtype=torch.float64), [(i, j)], 0.3)
    with pytest.raises(ValueError, match=r"`momentum_buffer`.*overlapping"):
        givens_steps_(torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64),
                      [(i, j)], 0.3, momentum_buffer=x)  # fmt: skip
    assert torch.equal(base, before)
    # a read-only use of an expanded tensor is fine
    w = pair_coefficients(x, torch.randn(6, 3, dtype=torch.float64), i, j)
    assert w.shape == (2,)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_invalid_pairs_raise_on_public_functions(path, dtype):
    x = torch.randn(6, 3, dtype=torch.float64).to(dtype)
    g = torch.randn(6, 3, dtype=torch.float64).to(dtype)
    before = x.clone()
    same, overlap = ([0, 2], [0, 3]), ([0, 1], [1, 2])
    theta = torch.tensor([0.1, 0.2], dtype=dtype)
    calls = [
        lambda i, j: rotate_pairs_(x, i, j, theta),
        lambda i, j: pair_coefficients(x, g, i, j),
        lambda i, j: givens_step_(x, g, i, j, 0.1),
        lambda i, j: givens_step_(x, g, i, j, 0.1, co_rotate=g.clone()),
        lambda i, j: rotate_pairs(x, i, j, theta),
        lambda i, j: givens_steps_(x, g, [(i, j)], 0.1),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=r"different rows, got i == j == 0"):
            call(*same)
        with pytest.raises(ValueError, match=r"disjoint \(a matching\): row 1 appears in 2 pairs"):
            call(*overlap)
    assert torch.equal(x, before)


def test_unchecked_path_stays_for_the_optimizers(path):
    """check=False skips the matching check (the optimizers' matchings are valid by construction) but
    not the range check."""
    x = torch.randn(6, 3, dtype=torch.float64)
    g = torch.randn(6, 3, dtype=torch.float64)
    i, j = torch.tensor([0, 1]), torch.tensor([1, 2])  # not disjoint
    w = givens_step_(x, g, i, j, 0.1, check=False)
    rotate_pairs_(x, i, j, 0.1, check=False)
    assert torch.isfinite(w).all() and torch.isfinite(x).all()
    with pytest.raises(IndexError, match=r"\[0, 6\)"):
        givens_step_(x, g, torch.tensor([0, 9]), j, 0.1, check=False)


def test_co_rotate_mismatch_names_co_rotate(path):
    x = torch.randn(6, 3, dtype=torch.float64)
    g = torch.randn(6, 3, dtype=torch.float64)
    i, j = torch.tensor([0, 2]), torch.tensor([1, 3])
    with pytest.raises(ValueError, match="`co_rotate` must have the shape of `x`"):
        givens_step_(x, g, i, j, 0.1, co_rotate=torch.randn(6, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match="`co_rotate` must have the dtype of `x`"):
        givens_step_(x, g, i, j, 0.1, co_rotate=torch.randn(6, 3))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bad", [[0, 6], [-1, 2]])
def test_half_precision_out_of_range_gives_our_index_error(dtype, bad):
    """Old behaviour on this path: torch's bare "index out of range in self"."""
    x = torch.randn(6, 3).to(dtype)
    g = torch.randn(6, 3).to(dtype)
    i, j = torch.tensor(bad), torch.tensor([1, 3])
    for check in (True, False):
        with pytest.raises(IndexError, match=r"must lie in \[0, 6\)"):
            pair_coefficients(x, g, i, j, check=check)
        with pytest.raises(IndexError, match=r"must lie in \[0, 6\)"):
            rotate_pairs_(x, i, j, 0.1, check=check)
        with pytest.raises(IndexError, match=r"must lie in \[0, 6\)"):
            givens_step_(x, g, i, j, 0.1, check=check)
        with pytest.raises(IndexError, match=r"must lie in \[0, 6\)"):
            rotate_pairs(x, i, j, torch.zeros(2), check=check)


def col_major(t):
    """A fresh column-major (``.mT`` of a row-major matrix) copy of ``t`` (2-D)."""
    return torch.empty(t.shape[-1], t.shape[-2], dtype=t.dtype).copy_(t.mT).mT


@pytest.mark.parametrize("lay_x,lay_g", [("row", "col"), ("col", "row"), ("col", "col")])
def test_single_matching_mixed_layouts(path, lay_x, lay_g):
    """Mixed weight/gradient layouts give the reference result (they used to take a 10x slower loop)."""
    n, k, lr = 20, 6, 0.3
    x0 = torch.linalg.qr(torch.randn(n, k, dtype=torch.float64))[0].contiguous()
    g0 = torch.randn(n, k, dtype=torch.float64)
    y0 = torch.randn(n, k, dtype=torch.float64)
    i, j = matching(n, 1)
    w_ref = (g0 @ x0.T - x0 @ g0.T)[i, j]
    x_ref = torch.linalg.matrix_exp(dense_generator(n, i, j, -lr * w_ref)) @ x0
    y_ref = torch.linalg.matrix_exp(dense_generator(n, i, j, -lr * w_ref)) @ y0
    lay = {"row": lambda t: t.clone(), "col": col_major}
    x, g, y = lay[lay_x](x0), lay[lay_g](g0), lay[lay_x](y0)
    assert torch.allclose(pair_coefficients(x, g, i, j), w_ref, atol=1e-12)
    w = givens_step_(x, g, i, j, lr, co_rotate=y)
    assert torch.allclose(w, w_ref, atol=1e-12)
    assert torch.allclose(x, x_ref, atol=1e-12) and torch.allclose(y, y_ref, atol=1e-12)


# ----------------------------------------------------------------------------------------------------
# issue 12: the fused multi-matching step


def dense_steps(x, g, b, rounds, lr, scales, mu, tau, mode):
    """Independent reference: dense generators and rotations, in the order of optim/sgd.py."""
    x, g = x.double().clone(), g.double()
    b = None if b is None else b.double().clone()
    n = x.shape[-2]
    if b is not None:
        b = mu * b + (1 - tau) * g
    for r, sc in zip(rounds, scales):
        d = g if mode == "plain" else b
        w = (d @ x.mT - x @ d.mT)[..., r.i, r.j]
        if mode == "nesterov":
            w = (g @ x.mT - x @ g.mT)[..., r.i, r.j] + mu * (b @ x.mT - x @ b.mT)[..., r.i, r.j]
        theta = -lr * w * (1.0 if sc is None else sc.double())
        rot = dense_rotation(n, r.i, r.j, theta)
        x = rot @ x
        if b is not None:
            b = rot @ b
    return x, b


def sgd_loop(x, g, b, rounds, lr, scales, mu, tau, mode):
    """The loop of optim/sgd.py with the single-matching primitives (what givens_steps_ replaces)."""
    if b is not None:
        b.mul_(mu).add_(g, alpha=1 - tau)
    for r, sc in zip(rounds, scales):
        if mode == "plain":
            givens_step_(x, g, r.i, r.j, lr, scale=sc)
        elif mode == "nesterov":
            w = pair_coefficients(x, g, r.i, r.j) + mu * pair_coefficients(x, b, r.i, r.j)
            theta = -lr * w if sc is None else -lr * w * sc.to(w.dtype)
            rotate_pairs_(x, r.i, r.j, theta)
            rotate_pairs_(b, r.i, r.j, theta)
        else:
            givens_step_(x, b, r.i, r.j, lr, scale=sc, co_rotate=b)


@pytest.mark.parametrize("mode", ["plain", "heavy_ball", "nesterov"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n,k,batch", [(16, 5, ()), (33, 8, ()), (12, 4, (2,))])
@pytest.mark.parametrize("scaled", [False, True])
def test_fused_steps_equal_sequential_single_steps(path, mode, dtype, n, k, batch, scaled):
    gen = torch.Generator().manual_seed(n + k)
    x0 = torch.linalg.qr(torch.randn(*batch, n, k, dtype=torch.float64, generator=gen))[0]
    g = torch.randn(*batch, n, k, dtype=torch.float64, generator=gen)
    b0 = None if mode == "plain" else torch.randn(*batch, n, k, dtype=torch.float64, generator=gen)
    m, lr, mu, tau = 6, 0.05, 0.9, 0.1
    rounds = [*round_robin_rounds(n, m - 1, start=3), random_matching(n, generator=gen)]
    scales = [torch.rand(r.i.numel(), generator=gen) + 0.5 if scaled else None for r in rounds]
    x_ref, b_ref = dense_steps(x0, g, b0, rounds, lr, scales, mu, tau, mode)
    x, gg = x0.to(dtype).contiguous(), g.to(dtype)
    b = None if b0 is None else b0.to(dtype).clone()
    out = givens_steps_(
        x, gg, rounds, lr, scales=scales, momentum_buffer=b, momentum=mu, dampening=tau,
        nesterov=mode == "nesterov",
    )  # fmt: skip
    assert out is x
    x2, b2 = x0.to(dtype).contiguous(), None if b0 is None else b0.to(dtype).clone()
    sgd_loop(x2, gg, b2, rounds, lr, scales, mu, tau, mode)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    assert torch.allclose(x.double(), x_ref, atol=tol, rtol=0)
    assert torch.allclose(x, x2, atol=tol, rtol=0)
    if b is not None:
        assert torch.allclose(b.double(), b_ref, atol=tol * 10, rtol=0)
        assert torch.allclose(b, b2, atol=tol * 10, rtol=0)
    assert torch.allclose(gg, g.to(dtype))  # the gradient is read only


def test_fused_steps_without_buffer_update_and_with_tensor_rounds(path):
    """update_buffer=False (the step that initialises B = G) and rounds as an (m, P, 2) tensor."""
    n, k, lr = 10, 3, 0.2
    x0 = torch.linalg.qr(torch.randn(n, k, dtype=torch.float64))[0].contiguous()
    g = torch.randn(n, k, dtype=torch.float64)
    rounds = round_robin_rounds(n, 4)
    as_tensor = torch.stack([torch.stack([r.i, r.j], -1) for r in rounds])
    x, b = x0.clone(), g.clone()
    givens_steps_(x, g, as_tensor, lr, momentum_buffer=b, momentum=0.9, update_buffer=False)
    x_ref, b_ref = dense_steps(x0, g, g, rounds, lr, [None] * 4, 0.0, 0.0, "heavy_ball")
    assert torch.allclose(x, x_ref, atol=1e-12) and torch.allclose(b, b_ref, atol=1e-12)


def test_fused_steps_rows_outside_every_matching_still_get_the_buffer_update(path):
    n, k = 7, 3  # odd n: one row sits out of each round
    x0 = torch.linalg.qr(torch.randn(n, k, dtype=torch.float64))[0].contiguous()
    g, b0 = torch.randn(n, k, dtype=torch.float64), torch.randn(n, k, dtype=torch.float64)
    rounds = [round_robin_matching(n, 0)]
    x, b = x0.clone(), b0.clone()
    givens_steps_(x, g, rounds, 0.1, momentum_buffer=b, momentum=0.5, dampening=0.2)
    x_ref, b_ref = dense_steps(x0, g, b0, rounds, 0.1, [None], 0.5, 0.2, "heavy_ball")
    assert torch.allclose(b, b_ref, atol=1e-12) and torch.allclose(x, x_ref, atol=1e-12)


LAYOUTS = ["row", "col", "sliced", "row_strided"]


@pytest.mark.parametrize("batch", [(), (2,)])
def test_fused_steps_identical_across_layouts(path, batch):
    """Every layout of weight, gradient and buffer (contiguous, column-major, sliced, padded rows; the
    column-major kernel goes through tiles of 16 rows, so n = 37 also tests a partial tile)."""
    n, k = 37, 9
    gen = torch.Generator().manual_seed(0)
    x0 = torch.linalg.qr(torch.randn(*batch, n, k, dtype=torch.float64, generator=gen))[0]
    g0 = torch.randn(*batch, n, k, dtype=torch.float64, generator=gen)
    b0 = torch.randn(*batch, n, k, dtype=torch.float64, generator=gen)
    rounds = [*round_robin_rounds(n, 5), random_matching(n, generator=gen)]
    x_ref, b_ref = dense_steps(x0, g0, b0, rounds, 0.1, [None] * 6, 0.9, 0.0, "heavy_ball")
    for lx in LAYOUTS:
        for lg in LAYOUTS:
            for lb in ("row", "col"):
                x, g, b = with_layout(x0, lx), with_layout(g0, lg), with_layout(b0, lb)
                strides = (x.stride(), g.stride(), b.stride())
                givens_steps_(x, g, rounds, 0.1, momentum_buffer=b, momentum=0.9)
                assert (x.stride(), g.stride(), b.stride()) == strides  # layouts kept
                assert torch.allclose(x, x_ref, atol=1e-12), (lx, lg, lb)
                assert torch.allclose(b, b_ref, atol=1e-12), (lx, lg, lb)


def test_fused_steps_wide_weight_through_its_transpose(path):
    """A wide weight (k, n) stored row-major, rotated through .mT: the optimizers' wide case."""
    k, n = 5, 40
    w = torch.linalg.qr(torch.randn(n, k, dtype=torch.float64))[0].T.contiguous()
    gw, bw = torch.randn(k, n, dtype=torch.float64), torch.randn(k, n, dtype=torch.float64)
    rounds = round_robin_rounds(n, 8)
    x_ref, b_ref = dense_steps(w.mT, gw.mT, bw.mT, rounds, 0.2, [None] * 8, 0.9, 0.0, "nesterov")
    givens_steps_(w.mT, gw.mT, rounds, 0.2, momentum_buffer=bw.mT, momentum=0.9, nesterov=True)
    assert torch.allclose(w.mT, x_ref, atol=1e-12) and torch.allclose(bw.mT, b_ref, atol=1e-12)


def test_fused_steps_threads_give_bitwise_the_same_result():
    """The wavefront schedule runs each pair's arithmetic unchanged, so any thread count and any
    interleaving give the same bits (n, k, m chosen above the kernel's parallel threshold)."""
    if _native.get_lib() is None:
        pytest.skip("native kernel unavailable")
    n, k, m = 256, 64, 8
    gen = torch.Generator().manual_seed(0)
    x0 = torch.linalg.qr(torch.randn(n, k, generator=gen))[0].contiguous()
    g, b0 = torch.randn(n, k, generator=gen), torch.randn(n, k, generator=gen)
    rounds = round_robin_rounds(n, m, start=7)

    def run(lay):
        x, b = with_layout(x0, lay), with_layout(b0, lay)
        givens_steps_(x, g, rounds, 0.01, momentum_buffer=b, momentum=0.9)
        return x.contiguous(), b.contiguous()

    results = per_thread_count_and_layout(run)
    for x, b in results[1:]:
        assert torch.equal(x, results[0][0]) and torch.equal(b, results[0][1])


def test_fused_steps_bad_inputs():
    x = torch.randn(6, 3, dtype=torch.float64)
    g = torch.randn(6, 3, dtype=torch.float64)
    good = [(torch.tensor([0, 2]), torch.tensor([1, 3]))]
    with pytest.raises(ValueError, match=r"`rounds` must have shape \(m, P, 2\)"):
        givens_steps_(x, g, torch.zeros(2, 3, dtype=torch.int64), 0.1)
    with pytest.raises(TypeError, match="`rounds` must be"):
        givens_steps_(x, g, 3, 0.1)
    with pytest.raises(ValueError, match=r"rounds\[1\]"):
        givens_steps_(x, g, [good[0], ([0, 1], [1, 2])], 0.1)
    with pytest.raises(ValueError, match="`scales`"):
        givens_steps_(x, g, good, 0.1, scales=[None, None])
    with pytest.raises(ValueError, match=r"`scales\[0\]` must have shape"):
        givens_steps_(x, g, good, 0.1, scales=[torch.ones(3)])
    with pytest.raises(ValueError, match="needs a `momentum_buffer`"):
        givens_steps_(x, g, good, 0.1, nesterov=True)
    with pytest.raises(ValueError, match="must not alias `g`"):
        givens_steps_(x, g, good, 0.1, momentum_buffer=g)
    with pytest.raises(TypeError, match="`momentum_buffer` must have the dtype"):
        givens_steps_(x, g, good, 0.1, momentum_buffer=torch.zeros(6, 3))
    with pytest.raises(ValueError, match="`lr` must be finite"):
        givens_steps_(x, g, good, float("nan"))
    with pytest.raises(IndexError, match=r"\[0, 6\)"):
        givens_steps_(x, g, [([0, 7], [1, 2])], 0.1, check=False)


def test_rotate_pairs_double_backward_is_exact():
    """Second derivatives through the analytic backward (create_graph=True) are right, not silent constants."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 6, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    theta = torch.randn(2, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    i, j = torch.tensor([0, 2, 4]), torch.tensor([5, 1, 3])
    torch.autograd.gradcheck(lambda a, t: rotate_pairs(a, i, j, t), (x, theta))
    torch.autograd.gradgradcheck(lambda a, t: rotate_pairs(a, i, j, t), (x, theta))

    # a gradient penalty's derivative against the plain-ops reference
    def penalty(fn):
        y = fn(x, i, j, theta)
        gx, gt = torch.autograd.grad((y.sin() * y).sum(), (x, theta), create_graph=True)
        return torch.autograd.grad(gx.pow(2).sum() + gt.pow(2).sum(), (x, theta))

    for ours, ref in zip(penalty(rotate_pairs), penalty(rotate_pairs_autograd)):
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
