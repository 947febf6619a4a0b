"""orthotorch.parametrize.orthogonal: layouts, methods, right_inverse, state dicts, caching, renorm."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize as tp

import orthotorch.parametrize as op
from orthotorch.manifolds.givens import rotate_pairs
from orthotorch.parametrize import (
    CWYOrthogonal,
    GivensOrthogonal,
    WeightLayout,
    orthogonal,
    renormalize_,
)

METHODS = ["tcwy", "cwy", "matrix_exp", "cayley", "givens"]


class Batched(nn.Module):
    """A module with a batch of square and a batch of tall matrices."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(*shape))


def tall(w: torch.Tensor, flatten: bool = False) -> torch.Tensor:
    """The test's own view of the weight as tall matrices (independent of WeightLayout)."""
    if flatten:
        w = w.reshape(w.shape[0], -1)
    return w.mT if w.shape[-2] < w.shape[-1] else w


def orth_err(x: torch.Tensor) -> float:
    eye = torch.eye(x.shape[-1], dtype=x.dtype)
    return float((x.detach().mT @ x.detach() - eye).abs().max())


def make(kind: str) -> tuple[nn.Module, bool]:
    if kind == "square":
        return nn.Linear(8, 8), False
    if kind == "tall":
        return nn.Linear(4, 10), False  # weight (10, 4)
    if kind == "wide":
        return nn.Linear(10, 4), False  # weight (4, 10): rows orthonormal
    if kind == "conv":
        return nn.Conv2d(3, 5, 2), True  # (5, 3, 2, 2) -> (5, 12) wide
    if kind == "batched":
        return Batched((3, 6, 4)), False
    raise AssertionError(kind)


KINDS = ["square", "tall", "wide", "conv", "batched"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_weight_is_orthonormal_after_registration_and_a_step(method, kind, dtype, tol):
    module, flat = make(kind)
    module = module.to(dtype)
    shape = module.weight.shape
    orthogonal(module, "weight", method=method)
    assert module.weight.shape == shape and module.weight.dtype == dtype
    assert orth_err(tall(module.weight.detach(), flat)) <= tol
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    before = module.weight.detach().clone()
    (module.weight * torch.randn(shape, generator=g, dtype=dtype)).sum().backward()
    opt.step()
    after = module.weight.detach()
    assert (after - before).abs().max() > 1e-4  # it moved
    assert orth_err(tall(after, flat)) <= tol
    if kind == "wide":
        assert orth_err(after.mT) <= tol  # rows orthonormal


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", KINDS)
def test_right_inverse_reproduces_orthonormal_targets_exactly(method, kind):
    module, flat = make(kind)
    module = module.double()
    orthogonal(module, "weight", method=method)
    shape = module.weight.shape
    w2d = torch.empty(shape).reshape(shape[0], -1) if flat else torch.empty(shape)
    wide = w2d.shape[-2] < w2d.shape[-1]
    g = torch.Generator().manual_seed(2)
    t_shape = w2d.mT.shape if wide else w2d.shape
    q, r = torch.linalg.qr(torch.randn(*t_shape, generator=g, dtype=torch.float64))
    q = q * torch.sign(r.diagonal(dim1=-2, dim2=-1)).unsqueeze(-2)
    q = q * torch.where(torch.rand(q.shape[-1], generator=g) < 0.5, -1.0, 1.0).double()
    target = (q.mT if wide else q).reshape(shape)
    module.weight = target
    assert (module.weight - target).abs().max() <= 1e-12


def test_initial_weight_is_positive_qr_factor_of_original():
    layer = nn.Linear(5, 9).double()
    w0 = layer.weight.detach().clone()
    orthogonal(layer, "weight", method="tcwy")
    q, r = torch.linalg.qr(w0)
    q = q * torch.sign(r.diagonal()).unsqueeze(-2)
    assert (layer.weight - q).abs().max() <= 1e-12


@pytest.mark.parametrize("method", METHODS)
def test_square_O_covers_both_components_and_SO_rejects_det_minus_one(method):
    g = torch.Generator().manual_seed(3)
    x = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))[0]
    x_neg = x if torch.linalg.det(x) < 0 else x * torch.tensor([-1.0, 1, 1, 1, 1, 1]).double()
    x_pos = x_neg * torch.tensor([-1.0, 1, 1, 1, 1, 1]).double()
    layer = orthogonal(nn.Linear(6, 6).double(), method=method, group="O")
    for target in (x_neg, x_pos, x_neg):
        layer.weight = target
        assert (layer.weight - target).abs().max() <= 1e-12
    so = orthogonal(nn.Linear(6, 6).double(), method=method, group="SO")
    assert torch.linalg.det(so.weight).item() == pytest.approx(1.0, abs=1e-12)
    so.weight = x_pos
    assert (so.weight - x_pos).abs().max() <= 1e-12
    with pytest.raises(ValueError, match="determinant"):
        so.weight = x_neg


@pytest.mark.parametrize("d", [5, 6])
def test_SO_stays_in_SO_during_training(d):
    layer = orthogonal(nn.Linear(d, d).double(), method="cwy", group="SO")
    opt = torch.optim.Adam(layer.parameters(), lr=0.05)
    for _ in range(5):
        opt.zero_grad()
        layer(torch.randn(4, d, dtype=torch.float64)).pow(3).sum().backward()
        opt.step()
        assert torch.linalg.det(layer.weight).item() == pytest.approx(1.0, abs=1e-10)


@pytest.mark.parametrize("method", METHODS)
def test_state_dict_round_trip(method):
    torch.manual_seed(4)
    a = orthogonal(nn.Linear(7, 7).double(), method=method)
    opt = torch.optim.SGD(a.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        a(torch.randn(3, 7, dtype=torch.float64)).pow(2).sum().backward()
        opt.step()
    a.weight = a.weight.detach() * torch.tensor([-1.0, 1, 1, 1, 1, 1, 1]).double()  # det flip
    b = orthogonal(nn.Linear(7, 7).double(), method=method)
    assert (b.weight - a.weight).abs().max() > 1e-3
    b.load_state_dict(a.state_dict())
    assert (b.weight - a.weight).abs().max() <= 1e-12


def test_fit_orthogonal_target_with_tcwy():
    g = torch.Generator().manual_seed(5)
    target = torch.linalg.qr(torch.randn(12, 4, generator=g, dtype=torch.float64))[0]
    layer = orthogonal(nn.Linear(4, 12, bias=False).double(), method="tcwy")
    opt = torch.optim.Adam(layer.parameters(), lr=0.05)
    first = None
    for _ in range(300):
        opt.zero_grad()
        loss = (layer.weight - target).pow(2).sum()
        first = loss.item() if first is None else first
        loss.backward()
        opt.step()
    assert loss.item() < 1e-3 * first


def test_cached_computes_the_weight_once():
    layer = orthogonal(nn.Linear(6, 6), method="tcwy")
    calls = []
    layer.parametrizations.weight[0].register_forward_hook(lambda *a: calls.append(1))
    with tp.cached():
        w1 = layer.weight
        w2 = layer.weight
        layer(torch.randn(2, 6)).sum().backward()
    assert w1 is w2
    assert len(calls) == 1
    assert layer.parametrizations.weight.original.grad is not None
    _ = layer.weight
    assert len(calls) == 2


def test_sgd_grows_householder_norms_and_renormalize_fixes_them_without_changing_weight():
    layer = orthogonal(nn.Linear(8, 8).double(), method="tcwy")
    u = layer.parametrizations.weight.original
    assert torch.allclose(torch.linalg.vector_norm(u, dim=-2), torch.ones(8, dtype=u.dtype))
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    for _ in range(20):
        opt.zero_grad()
        layer(torch.randn(16, 8, dtype=torch.float64)).pow(2).sum().backward()
        opt.step()
    norms = torch.linalg.vector_norm(u, dim=-2)
    assert norms.min() > 1.0 + 1e-6  # gradient ⟂ u, so every step can only grow ‖u‖
    w = layer.weight.detach().clone()
    assert renormalize_(layer) == 1
    assert torch.allclose(torch.linalg.vector_norm(u, dim=-2), torch.ones(8, dtype=u.dtype))
    assert (layer.weight - w).abs().max() <= 1e-12


def test_parametrization_objects_and_buffers():
    layer = orthogonal(nn.Linear(6, 6), method="cwy")
    p = layer.parametrizations.weight[0]
    assert isinstance(p, CWYOrthogonal)
    assert "parametrizations.weight.0.signs" in layer.state_dict()


def test_flatten_false_treats_conv_dims_as_batch():
    conv = nn.Conv2d(2, 3, 4)  # (3, 2, 4, 4): batch (3, 2) of 4x4
    orthogonal(conv, method="tcwy", flatten=False)
    assert orth_err(conv.weight.detach()) <= 1e-5


def test_errors():
    with pytest.raises(ValueError, match="method"):
        orthogonal(nn.Linear(3, 3), method="qr")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="group"):
        orthogonal(nn.Linear(3, 3), group="U")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no tensor attribute"):
        orthogonal(nn.Linear(3, 3), "weights")
    with pytest.raises(TypeError, match="module"):
        orthogonal(torch.randn(3, 3))  # type: ignore[arg-type]
    layer = orthogonal(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="already parametrized"):
        orthogonal(layer)
    with pytest.raises(ValueError, match="shape"):
        layer.weight = torch.eye(4)
    with pytest.raises(ValueError, match="finite"):
        layer.weight = torch.full((3, 3), float("nan"))
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        orthogonal(nn.Linear(3, 3), "bias")


@pytest.mark.parametrize("shape", [(6, 6), (7, 3), (2, 5, 4)])
def test_givens_low_memory_backward_matches_autograd_through_rotate_pairs(shape):

    p = GivensOrthogonal(WeightLayout(shape, flatten=False), dtype=torch.float64)
    p.base.copy_(torch.linalg.qr(torch.randn(*p.base.shape, dtype=torch.float64))[0])
    th = torch.randn(*shape[:-2], p.num_angles, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(p, (th,))
    x, start = p.base, 0
    for size in p._sizes:  # reference: the differentiable primitive, one round at a time
        sl = slice(start, start + size)
        x = rotate_pairs(x, p.pair_i[sl], p.pair_j[sl], th[..., sl])
        start += size
    G = torch.randn_like(x)
    (ref,) = torch.autograd.grad((x * G).sum(), th)
    out = p(th)
    (got,) = torch.autograd.grad((out * G).sum(), th)
    assert (out - x).abs().max() <= 1e-12
    assert (got - ref).abs().max() <= 1e-12


# ------------------------------------------------------------------------------------------------
# issue 10 "Parametrizations": double backward, half precision, failed calls, copies


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", [(4, 4), (2, 5)])
def test_gradgradcheck_every_method(method, shape):
    """Second derivatives of weight(params) in float64, for every method, square and wide."""
    lin = orthogonal(nn.Linear(shape[1], shape[0]).double(), "weight", method=method)
    param = lin.parametrizations.weight[0]
    p0 = lin.parametrizations.weight.original.detach()
    g = torch.Generator().manual_seed(1)
    p = (p0 + 0.3 * torch.randn(p0.shape, generator=g, dtype=torch.float64)).requires_grad_(True)
    assert torch.autograd.gradcheck(param, (p,))
    assert torch.autograd.gradgradcheck(param, (p,), fast_mode=True)


def _penalty_model(method: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    lin = orthogonal(nn.Linear(5, 5).double(), "weight", method=method)
    with torch.no_grad():  # move away from the registration point (zero angles / unit vectors)
        orig = lin.parametrizations.weight.original
        orig.add_(
            0.2 * torch.randn(orig.shape, generator=torch.Generator().manual_seed(2)).double()
        )
    x = torch.randn(7, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    return lin, x


def _penalty(lin: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A WGAN-GP-style penalty on the parameter gradients: ‖∂L/∂θ‖² (θ = original and bias)."""
    orig = lin.parametrizations.weight.original
    loss = torch.tanh(lin(x)).pow(2).sum()
    grads = torch.autograd.grad(loss, [orig, lin.bias], create_graph=True)
    return sum((g**2).sum() for g in grads)


@pytest.mark.parametrize("method", METHODS)
def test_gradient_penalty_derivative_matches_finite_differences(method):
    """tcwy gave d/d bias[0] = −93 with create_graph=True against −17537 by finite differences."""
    lin, x = _penalty_model(method)
    orig = lin.parametrizations.weight.original
    g_bias, g_orig = torch.autograd.grad(_penalty(lin, x), [lin.bias, orig])
    eps = 1e-6
    for tensor, grad, idx in ((lin.bias, g_bias, (0,)), (orig, g_orig, (1,) * orig.dim())):
        with torch.no_grad():
            tensor[idx] += eps
        up = float(_penalty(lin, x).detach())
        with torch.no_grad():
            tensor[idx] -= 2 * eps
        down = float(_penalty(lin, x).detach())
        with torch.no_grad():
            tensor[idx] += eps
        fd = (up - down) / (2 * eps)
        assert abs(float(grad[idx]) - fd) <= 1e-5 * max(1.0, abs(fd)), (
            method,
            idx,
            float(grad[idx]),
            fd,
        )


@pytest.mark.parametrize("method", ["tcwy", "cwy", "givens"])
def test_gradient_penalty_derivative_matches_torch_func(method):
    """The same second derivative by torch.func (plain ops inside transforms) and by autograd."""
    lin, x = _penalty_model(method)
    (g_bias,) = torch.autograd.grad(_penalty(lin, x), [lin.bias])
    orig = lin.parametrizations.weight.original.detach()
    param = lin.parametrizations.weight[0]

    def penalty_of(bias: torch.Tensor) -> torch.Tensor:
        def loss_of(o: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return torch.tanh(x @ param(o).mT + b).pow(2).sum()

        go, gb = torch.func.grad(loss_of, argnums=(0, 1))(orig, bias)
        return (go**2).sum() + (gb**2).sum()

    ref = torch.func.grad(penalty_of)(lin.bias.detach())
    torch.testing.assert_close(g_bias, ref, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_every_method_gives_finite_accurate_gradients(method, dtype):
    """matrix_exp: 120 of 256 gradient entries were non-finite; cayley raised lu_cpu mid-registration."""
    torch.manual_seed(0)
    ref = nn.Linear(16, 16)
    lin = orthogonal(nn.Linear(16, 16).to(dtype), "weight", method=method)
    ref = orthogonal(ref, "weight", method=method)
    ref.load_state_dict({k: v.float() for k, v in lin.state_dict().items()})
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(4))
    assert lin.weight.dtype == dtype
    assert orth_err(lin.weight.float()) < 3e-2
    lin(x.to(dtype)).float().pow(2).sum().backward()
    ref(x).pow(2).sum().backward()
    g = lin.parametrizations.weight.original.grad
    g_ref = ref.parametrizations.weight.original.grad
    assert g is not None and g.dtype == dtype and bool(torch.isfinite(g).all())
    assert float((g.float() - g_ref).norm() / g_ref.norm()) < 0.1


class _Broken(Exception):
    pass


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("where", ["forward", "right_inverse_in_register", "forward_in_register"])
def test_failed_orthogonal_call_leaves_the_module_unchanged(method, where, monkeypatch):
    cls = {"tcwy": op.CWYOrthogonal, "cwy": op.CWYOrthogonal, "givens": op.GivensOrthogonal}.get(
        method, op.SkewOrthogonal
    )
    lin = nn.Linear(6, 4)
    weight, before, kind = lin.weight, _snapshot(lin), type(lin)
    if (
        where == "forward"
    ):  # e.g. a backend without a kernel for this dtype (cayley: lu_cpu on half)
        monkeypatch.setattr(
            cls, "forward", lambda self, t: (_ for _ in ()).throw(_Broken("no kernel"))
        )
    else:  # the dry run passes, torch's register_parametrization then fails (forward: after set_())
        attr = "right_inverse" if where == "right_inverse_in_register" else "forward"
        real = getattr(cls, attr)
        calls = []

        def flaky(self, w):
            calls.append(1)
            if len(calls) > 1:
                raise _Broken("second call")
            return real(self, w)

        monkeypatch.setattr(cls, attr, flaky)
    with pytest.raises(_Broken):
        orthogonal(lin, "weight", method=method)
    assert (
        type(lin) is kind and not tp.is_parametrized(lin) and not hasattr(lin, "parametrizations")
    )
    assert lin.weight is weight and isinstance(lin.weight, nn.Parameter)
    after = _snapshot(lin)
    assert after.keys() == before.keys()
    for k in before:
        torch.testing.assert_close(after[k], before[k], atol=0, rtol=0)
    monkeypatch.undo()
    orthogonal(lin, "weight", method=method)  # and the module can still be parametrized afterwards
    assert orth_err(tall(lin.weight.detach())) < 1e-5


def test_failed_orthogonal_call_on_non_finite_weight_leaves_the_module_unchanged():
    lin = nn.Linear(5, 5)
    with torch.no_grad():
        lin.weight[0, 0] = float("nan")
    before = _snapshot(lin)
    with pytest.raises(ValueError, match="finite"):
        orthogonal(lin, "weight")
    assert not tp.is_parametrized(lin)
    assert torch.isnan(lin.weight[0, 0]) and torch.equal(lin.bias, before["bias"])
    torch.testing.assert_close(lin.weight, before["weight"], equal_nan=True, atol=0, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_deepcopy_gives_an_independent_parametrized_copy(method):
    lin = orthogonal(nn.Linear(6, 4).double(), "weight", method=method)
    twin = copy.deepcopy(lin)
    assert tp.is_parametrized(twin, "weight")
    torch.testing.assert_close(twin.weight, lin.weight, atol=0, rtol=0)
    for (k, a), (_, b) in zip(lin.state_dict().items(), twin.state_dict().items()):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
        assert a.data_ptr() != b.data_ptr(), k
    # training the copy leaves the original alone and keeps the copy on the manifold
    w0 = lin.weight.detach().clone()
    opt = torch.optim.SGD(twin.parameters(), lr=0.1)
    twin(torch.randn(3, 6, dtype=torch.float64)).pow(2).sum().backward()
    opt.step()
    torch.testing.assert_close(lin.weight, w0, atol=0, rtol=0)
    assert float((twin.weight - w0).abs().max().detach()) > 1e-6
    assert orth_err(twin.weight.detach().mT) < 1e-12
    # pickling is torch's documented limitation: the state_dict route restores the weight exactly
    with pytest.raises(RuntimeError, match="state_dict"):
        pickle.dumps(lin)
    with pytest.raises(RuntimeError, match="state_dict"):
        torch.save(lin, io.BytesIO())
    fresh = orthogonal(nn.Linear(6, 4).double(), "weight", method=method)
    fresh.load_state_dict(twin.state_dict())
    torch.testing.assert_close(fresh.weight, twin.weight, atol=1e-12, rtol=0)
