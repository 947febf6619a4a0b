"""CWY / T-CWY: equality with explicit Householder products, orthogonality, gradients, inverse, errors."""

from __future__ import annotations

import pytest
import torch

from conftest import orth_error
from orthotorch.manifolds.cwy import (
    cwy,
    cwy_columns,
    householder_product,
    householder_vectors,
    tcwy,
)


def explicit_product(U: torch.Tensor) -> torch.Tensor:
    """Independent reference: the dense matrices I − 2uuᵀ/‖u‖² multiplied left to right."""
    d, ell = U.shape[-2:]
    q = torch.eye(d, dtype=U.dtype).expand(*U.shape[:-2], d, d)
    for i in range(ell):
        u = U[..., :, i : i + 1]
        h = torch.eye(d, dtype=U.dtype) - 2.0 * (u @ u.mT) / (u.mT @ u)
        q = q @ h
    return q


def random_orthogonal(*shape: int, dtype=torch.float64, g: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(*shape, dtype=dtype, generator=g))
    return q * torch.sign(r.diagonal(dim1=-2, dim2=-1)).unsqueeze(-2)


@pytest.mark.parametrize("d,ell", [(1, 1), (2, 1), (5, 5), (16, 3), (33, 33), (40, 17)])
@pytest.mark.parametrize("batch", [(), (3,), (2, 2)])
def test_cwy_equals_sequential_householder_product(d, ell, batch):
    U = torch.randn(*batch, d, ell, dtype=torch.float64)
    ref = explicit_product(U)
    q = cwy(U)
    assert q.shape == (*batch, d, d)
    assert (q - ref).abs().max() <= 1e-12
    assert (householder_product(U) - ref).abs().max() <= 1e-12


@pytest.mark.parametrize("n,k", [(7, 1), (30, 5), (64, 64), (100, 20)])
def test_tcwy_equals_first_columns_of_cwy(n, k):
    U = torch.randn(2, n, k, dtype=torch.float64)
    omega = tcwy(U)
    assert omega.shape == (2, n, k)
    assert (omega - cwy(U)[..., :k]).abs().max() <= 1e-12
    assert (omega - explicit_product(U)[..., :k]).abs().max() <= 1e-12
    # general m-column form
    assert (cwy_columns(U, 3) - explicit_product(U)[..., :3]).abs().max() <= 1e-12


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("shape", [(64, 64), (64, 10), (200, 32)])
def test_outputs_orthogonal(dtype, tol, shape):
    U = torch.randn(*shape, dtype=dtype)
    assert tcwy(U).dtype == dtype
    assert orth_error(tcwy(U)) <= tol
    assert orth_error(cwy(U)) <= tol


@pytest.mark.parametrize("ell", [1, 2, 5, 6])
def test_determinant_is_minus_one_to_the_L(ell):
    U = torch.randn(6, ell, dtype=torch.float64)
    assert torch.linalg.det(cwy(U)).item() == pytest.approx((-1) ** ell, abs=1e-12)


def test_scale_invariance_of_columns():
    U = torch.randn(20, 6, dtype=torch.float64)
    scales = torch.tensor([1e-6, 1.0, 3.0, 1e4, 0.5, 7.0], dtype=torch.float64)
    assert (tcwy(U * scales) - tcwy(U)).abs().max() <= 1e-12
    assert (cwy(-U) - cwy(U)).abs().max() <= 1e-12


@pytest.mark.parametrize(
    "fn,shape",
    [(cwy, (6, 6)), (cwy, (7, 3)), (tcwy, (9, 4)), (tcwy, (5, 5)), (cwy, (2, 5, 2))],
)
def test_gradcheck_float64(fn, shape):
    U = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fn, (U,))


def test_gradcheck_cwy_columns():
    U = torch.randn(2, 8, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda u: cwy_columns(u, 3), (U,))


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-4)])
@pytest.mark.parametrize("fn,shape", [(cwy, (40, 40)), (cwy, (40, 9)), (tcwy, (120, 16))])
def test_gradient_matches_autograd_through_explicit_product(dtype, tol, fn, shape):
    U = torch.randn(2, *shape, dtype=torch.float64)
    out_cols = shape[0] if fn is cwy else shape[1]
    G = torch.randn(2, shape[0], out_cols, dtype=torch.float64)
    u_ref = U.clone().requires_grad_(True)
    (explicit_product(u_ref)[..., :out_cols] * G).sum().backward()
    u = U.to(dtype).requires_grad_(True)
    fn(u).backward(G.to(dtype))
    scale = u_ref.grad.abs().max()
    assert ((u.grad.double() - u_ref.grad).abs().max() / scale) <= tol


@pytest.mark.parametrize("d", [1, 2, 5, 6, 31])
@pytest.mark.parametrize("det", [1.0, -1.0])
def test_householder_vectors_round_trip_square_both_components(d, det):
    g = torch.Generator().manual_seed(d)
    x = random_orthogonal(3, d, d, g=g)
    x[..., 0] *= torch.linalg.det(x).unsqueeze(-1) * det  # force the determinant
    U, signs = householder_vectors(x)
    assert torch.allclose(torch.linalg.vector_norm(U, dim=-2), torch.ones(3, d, dtype=x.dtype))
    assert torch.all(torch.triu(U, diagonal=1) == 0)  # u_i zero above row i
    assert (cwy(U) * signs.unsqueeze(-2) - x).abs().max() <= 1e-12
    assert (tcwy(U) * signs.unsqueeze(-2) - x).abs().max() <= 1e-12
    assert torch.all((-1) ** d * signs.prod(-1) == det)


@pytest.mark.parametrize("n,k", [(10, 1), (50, 7), (300, 64)])
def test_householder_vectors_round_trip_stiefel_random_signs(n, k):
    g = torch.Generator().manual_seed(n)
    x = random_orthogonal(2, n, k, g=g)
    x = x * torch.where(torch.rand(2, 1, k, generator=g) < 0.5, -1.0, 1.0).double()
    U, signs = householder_vectors(x)
    assert (tcwy(U) * signs.unsqueeze(-2) - x).abs().max() <= 1e-12
    x32 = x.float()
    U32, s32 = householder_vectors(x32)
    assert U32.dtype == torch.float32
    assert (tcwy(U32) * s32.unsqueeze(-2) - x32).abs().max() <= 1e-5


def test_householder_vectors_projects_non_orthonormal_input_to_positive_qr_factor():
    a = torch.randn(4, 12, 5, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    q_pos = q * torch.sign(r.diagonal(dim1=-2, dim2=-1)).unsqueeze(-2)
    U, signs = householder_vectors(a)
    assert (tcwy(U) * signs.unsqueeze(-2) - q_pos).abs().max() <= 1e-12


def test_half_precision_inputs_are_computed_in_float32():
    U = torch.randn(32, 8)
    out = tcwy(U.bfloat16())
    assert out.dtype == torch.bfloat16
    assert orth_error(out.float()) < 0.05
    assert (out.float() - tcwy(U.bfloat16().float())).abs().max() < 1e-2


def test_autocast_cpu_bfloat16_keeps_float32_accuracy():
    U = torch.randn(64, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q = cwy(U)
    assert q.dtype == torch.float32
    assert orth_error(q.detach()) <= 1e-5
    q.sum().backward()
    assert torch.isfinite(U.grad).all()


def test_empty_batch():
    assert cwy(torch.randn(0, 4, 2)).shape == (0, 4, 4)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: cwy(torch.randn(3, 4)), "L <= d"),
        (lambda: tcwy(torch.randn(3, 4)), "k <= n"),
        (lambda: cwy(torch.randn(4)), "at least 2 dimensions"),
        (lambda: tcwy(torch.randn(5, 0)), "at least one"),
        (lambda: cwy_columns(torch.randn(5, 2), 6), "`m`"),
        (lambda: householder_vectors(torch.randn(3, 5)), "tall"),
        (lambda: householder_vectors(torch.full((5, 2), float("nan"))), "finite"),
    ],
)
def test_bad_shapes_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("fn", [cwy, tcwy])
@pytest.mark.parametrize("bad", [0.0, float("nan"), float("inf")])
def test_zero_or_non_finite_column_raises_instead_of_nan(fn, bad):
    U = torch.randn(2, 6, 3, dtype=torch.float64)
    U[1, :, 2] = 0.0
    if bad != 0.0:
        U[1, 0, 2] = bad
    with pytest.raises(ValueError, match="column 2"):
        fn(U)


def test_wrong_dtype_raises_type_error():
    with pytest.raises(TypeError, match="`U`"):
        cwy(torch.ones(3, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match="`U`"):
        cwy([[1.0]])  # type: ignore[arg-type]


def test_large_L_uses_blocked_triangle_products_and_stays_exact():
    # L >= 256 exercises the row-blocked triu products in forward and backward
    U = torch.randn(300, 260, dtype=torch.float64)
    q = tcwy(U)
    assert (q - householder_product(U, 260)).abs().max() <= 1e-12
    u_ref = U.clone().requires_grad_(True)
    G = torch.randn(300, 260, dtype=torch.float64)
    un = u_ref / torch.linalg.vector_norm(u_ref, dim=-2, keepdim=True)
    s = torch.triu(un.mT @ un, diagonal=1) + 0.5 * torch.eye(260, dtype=U.dtype)
    y = torch.linalg.solve_triangular(s, un[:260].mT, upper=True)
    ((torch.eye(300, 260, dtype=U.dtype) - un @ y) * G).sum().backward()
    u = U.clone().requires_grad_(True)
    tcwy(u).backward(G)
    assert (u.grad - u_ref.grad).abs().max() <= 1e-10 * u_ref.grad.abs().max()


def test_reference_householder_product_rejects_zero_columns_and_bad_m():
    with pytest.raises(ValueError, match="column 1"):
        householder_product(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    with pytest.raises(ValueError, match="`m`"):
        householder_product(torch.randn(3, 2), 4)


# ------------------------------------------------------------------------------------------------
# issue 10: double backward (gradient penalties, Hessian-vector products, MAML)


@pytest.mark.parametrize(
    "fn,shape",
    [
        (cwy, (4, 4)),
        (cwy, (5, 2)),
        (tcwy, (6, 2)),
        (tcwy, (2, 4, 2)),
        (lambda u: cwy_columns(u, 2), (5, 3)),
    ],
)
def test_gradgradcheck_float64(fn, shape):
    """The backward was once_differentiable: create_graph=True gave a wrong second derivative."""
    U = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(fn, (U,), fast_mode=True)


@pytest.mark.parametrize("fn,m", [(cwy, None), (tcwy, 3)])
def test_hessian_vector_product_matches_sequential_householder_reference(fn, m):
    """HVP through create_graph=True against plain autograd through the sequential product."""
    g = torch.Generator().manual_seed(5)
    U = torch.randn(7, 3, dtype=torch.float64, generator=g, requires_grad=True)
    cols = 7 if m is None else m
    target = torch.randn(7, cols, dtype=torch.float64, generator=g)
    direction = torch.randn(7, 3, dtype=torch.float64, generator=g)

    def hvp(f):
        loss = (torch.sin(f(U)) * target).sum()
        (grad,) = torch.autograd.grad(loss, U, create_graph=True)
        (h,) = torch.autograd.grad((grad * direction).sum(), U)
        return grad.detach(), h

    g1, h1 = hvp(fn)
    g2, h2 = hvp(lambda u: householder_product(u, cols))
    torch.testing.assert_close(g1, g2, atol=1e-12, rtol=0)
    torch.testing.assert_close(h1, h2, atol=1e-11, rtol=0)


def test_double_backward_in_float32_and_half_inputs():
    U = torch.randn(9, 4, generator=torch.Generator().manual_seed(6))
    for dtype in (torch.float32, torch.bfloat16):
        u = U.to(dtype).requires_grad_(True)
        (grad,) = torch.autograd.grad(tcwy(u).float().pow(3).sum(), u, create_graph=True)
        (h,) = torch.autograd.grad(grad.float().pow(2).sum(), u)
        u64 = U.to(dtype).double().requires_grad_(True)
        (g64,) = torch.autograd.grad(tcwy(u64).pow(3).sum(), u64, create_graph=True)
        (h64,) = torch.autograd.grad(g64.pow(2).sum(), u64)
        tol = 1e-4 if dtype == torch.float32 else 5e-2
        torch.testing.assert_close(h.double(), h64, atol=tol * float(h64.abs().max()), rtol=0)


@pytest.mark.parametrize("fn", [cwy, tcwy])
def test_check_false_with_zero_column_gives_nan_as_documented(fn):
    """check=False skips the only guard (documented in the module and function docstrings)."""
    U = torch.randn(6, 3, dtype=torch.float64)
    U[:, 1] = 0.0
    with pytest.raises(ValueError, match="column 1"):
        fn(U)
    assert torch.isnan(fn(U, check=False)).any()
    assert "check=False" in (fn.__doc__ or "") or "unchecked" in (fn.__doc__ or "")
