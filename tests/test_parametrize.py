"""orthotorch.parametrize.orthogonal: layouts, methods, right_inverse, state dicts, caching, renorm."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize as tp

from orthotorch.parametrize import CWYOrthogonal, orthogonal, renormalize_

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
    return float((x.mT @ x - eye).abs().max())


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
    from orthotorch.manifolds.givens import rotate_pairs
    from orthotorch.parametrize import GivensOrthogonal, WeightLayout

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
