"""orthotorch.nn: orthogonal RNN cells and layers against explicit references."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from orthotorch.nn import (
    ModReLU,
    OrthogonalLinear,
    OrthogonalRNN,
    OrthogonalRNNCell,
    StiefelGRU,
    StiefelLinear,
    constrained_weights,
    orthogonality_error,
)
from orthotorch.nn import init as oinit
from orthotorch.nn.recurrence import _Recurrence, reference_recurrence
from orthotorch.optim import OrthogonalAdam, OrthogonalSGD

CONSTRAINTS = ["givens", "cwy", "tcwy", "matrix_exp", "cayley"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny per-step ops: a second OpenMP thread only adds synchronisation (10× slower on a busy CPU)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


NONLIN = ["modrelu", "tanh", "relu", "identity"]


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _rnn64(input_size, hidden_size, seed, **kwargs):
    """A float64 ``OrthogonalRNN`` initialised from ``gen(seed)`` (the reference comparisons' setup)."""
    return OrthogonalRNN(
        input_size, hidden_size, dtype=torch.float64, generator=gen(seed), **kwargs
    )


def _optimizer(model, constraint, lr=0.05):
    if constraint == "givens":
        return OrthogonalAdam(model.parameters(), lr=lr)
    return torch.optim.Adam(model.parameters(), lr=lr)


def _reference_rnn(rnn, x, h0=None, lengths=None):
    """Explicit per-step loop over the layers of an OrthogonalRNN; time-major x (T, B, F)."""
    T, B = x.shape[:2]
    inp, finals = x, []
    mask = None
    if lengths is not None:
        mask = torch.arange(T).unsqueeze(1) < torch.as_tensor(lengths)
    for layer, cell in enumerate(rnn.cells):
        xp = torch.nn.functional.linear(inp, cell.weight_ih, cell.bias)
        h = torch.zeros(B, rnn.hidden_size, dtype=x.dtype) if h0 is None else h0[layer]
        b = cell.activation.bias if cell.activation is not None else None
        hs = reference_recurrence(xp, h, cell.weight_hh, cell.nonlinearity, b, mask)
        finals.append(hs[-1])
        inp = hs
    out = inp if mask is None else inp * mask.unsqueeze(-1)
    return out, torch.stack(finals)


# ----------------------------------------------------------------------------------------------------
# forward and backward equal the explicit loop


@pytest.mark.parametrize("constraint", [*CONSTRAINTS, None])
@pytest.mark.parametrize("nonlinearity", NONLIN)
def test_forward_and_gradients_equal_explicit_loop(constraint, nonlinearity):
    rnn = _rnn64(5, 6, 1, num_layers=2, nonlinearity=nonlinearity, constraint=constraint)
    x = torch.randn(9, 3, 5, dtype=torch.float64, generator=gen(2))
    h0 = torch.randn(2, 3, 6, dtype=torch.float64, generator=gen(3))
    out, h_n = rnn(x, h0)
    ref_out, ref_h = _reference_rnn(rnn, x, h0)
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h_n, ref_h, rtol=1e-12, atol=1e-12)
    w = torch.randn(out.shape, dtype=torch.float64, generator=gen(4))
    params = [p for p in rnn.parameters()]
    g = torch.autograd.grad((out * w).sum() + h_n.sum(), params)
    g_ref = torch.autograd.grad((ref_out * w).sum() + ref_h.sum(), params)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("nonlinearity", NONLIN)
def test_lengths_and_packed_sequences_match_the_masked_reference(nonlinearity):
    rnn = _rnn64(4, 5, 5, num_layers=2, nonlinearity=nonlinearity, batch_first=True)
    x = torch.randn(3, 7, 4, dtype=torch.float64, generator=gen(6))
    lengths = [7, 2, 5]
    out, h_n = rnn(x, lengths=lengths)
    ref_out, ref_h = _reference_rnn(rnn, x.transpose(0, 1), lengths=lengths)
    torch.testing.assert_close(out, ref_out.transpose(0, 1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h_n, ref_h, rtol=1e-12, atol=1e-12)
    # each sequence alone gives the same final state: padding never leaks in
    for b, n in enumerate(lengths):
        _, hb = rnn(x[b : b + 1, :n])
        torch.testing.assert_close(h_n[:, b], hb[:, 0], rtol=1e-12, atol=1e-12)
    packed = pack_padded_sequence(x, torch.tensor(lengths), batch_first=True, enforce_sorted=False)
    pout, ph = rnn(packed)
    padded, plens = pad_packed_sequence(pout, batch_first=True, total_length=7)
    assert plens.tolist() == lengths
    torch.testing.assert_close(padded, out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ph, h_n, rtol=1e-12, atol=1e-12)


def test_fast_recurrence_passes_gradcheck_with_mask():
    T, B, H = 5, 3, 4
    xp = torch.randn(T, B, H, dtype=torch.float64, generator=gen(0), requires_grad=True)
    h0 = torch.randn(B, H, dtype=torch.float64, generator=gen(1), requires_grad=True)
    W = torch.randn(H, H, dtype=torch.float64, generator=gen(2), requires_grad=True)
    b = (0.3 * torch.randn(H, dtype=torch.float64, generator=gen(3))).requires_grad_()
    mask = torch.arange(T).unsqueeze(1) < torch.tensor([5, 2, 1])
    for m in (None, mask):
        assert torch.autograd.gradcheck(
            lambda a, c, w, bb, m=m: _Recurrence.apply(a, c, w, bb, m, True), (xp, h0, W, b)
        )
        assert torch.autograd.gradcheck(
            lambda a, c, w, m=m: _Recurrence.apply(a, c, w, xp.new_zeros(0), m, False), (xp, h0, W)
        )


def test_layouts_unbatched_batch_first_and_noncontiguous_agree():
    rnn = OrthogonalRNN(4, 6, generator=gen(7), dtype=torch.float64)
    x = torch.randn(8, 3, 4, dtype=torch.float64, generator=gen(8))
    out, h = rnn(x)
    bf = OrthogonalRNN(4, 6, batch_first=True, generator=gen(7), dtype=torch.float64)
    out_bf, h_bf = bf(x.transpose(0, 1))  # a non-contiguous (B, T, F) view
    torch.testing.assert_close(out_bf.transpose(0, 1), out)
    torch.testing.assert_close(h_bf, h)
    o1, h1 = rnn(x[:, 1])  # unbatched (T, F)
    torch.testing.assert_close(o1, out[:, 1])
    torch.testing.assert_close(h1, h[:, 1])
    cell = rnn.cells[0]
    torch.testing.assert_close(cell(x[0, 1]), out[0, 1])
    # float32 gives the float64 answer to float32 accuracy
    r32 = OrthogonalRNN(4, 6, generator=gen(7))
    torch.testing.assert_close(r32(x.float())[0].double(), out, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# orthogonality is kept by training, for every constraint


@pytest.mark.parametrize("constraint", CONSTRAINTS)
@pytest.mark.parametrize("group", ["O", "SO"])
def test_recurrent_matrix_stays_orthogonal_during_training(constraint, group):
    rnn = OrthogonalRNN(3, 8, constraint=constraint, group=group, init="haar", generator=gen(9))
    opt = _optimizer(rnn, constraint)
    w0 = rnn.cells[0].weight_hh.detach().clone()
    det0 = torch.linalg.det(w0.double()).sign()
    for step in range(10):
        x = torch.randn(12, 4, 3, generator=gen(100 + step))
        out, _ = rnn(x)
        loss = (out[-1] - 1.0).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    w = rnn.cells[0].weight_hh.detach()
    assert (w - w0).abs().max() > 1e-2  # it trained
    assert float(orthogonality_error(w)) < 1e-5
    assert float(orthogonality_error(rnn)) < 1e-5
    assert torch.linalg.det(w.double()).sign() == det0  # the component is kept
    if group == "SO":
        assert det0 > 0


def test_orthogonal_sgd_and_geoopt_find_the_givens_weight_without_param_groups():
    import geoopt

    for make in (
        lambda p: OrthogonalSGD(p, lr=0.05, momentum=0.9),
        lambda p: OrthogonalAdam(p, lr=0.05),
        lambda p: geoopt.optim.RiemannianAdam(p, lr=0.05),
    ):
        rnn = OrthogonalRNN(3, 8, generator=gen(10))
        opt = make(rnn.parameters())
        for step in range(5):
            out, _ = rnn(torch.randn(6, 2, 3, generator=gen(step)))
            opt.zero_grad()
            out.pow(2).sum().backward()
            opt.step()
        assert float(orthogonality_error(rnn)) < 1e-5
    # a plain torch optimizer does leave the manifold: the constraint is the optimizer's job
    rnn = OrthogonalRNN(3, 8, generator=gen(10))
    opt = torch.optim.Adam(rnn.parameters(), lr=0.05)
    out, _ = rnn(torch.randn(6, 2, 3, generator=gen(0)))
    out.pow(2).sum().backward()
    opt.step()
    assert float(orthogonality_error(rnn)) > 1e-2
    assert rnn.cells[0].weight_hh._orthotorch_manifold == "orthogonal"


# ----------------------------------------------------------------------------------------------------
# gradients through 1000 steps


def _grad_ratio(rnn: OrthogonalRNN, T: int) -> float:
    """‖∂L/∂h_0‖ / ‖∂L/∂h_T‖ for L = <c, h_T>: how a gradient survives T steps back."""
    x = torch.zeros(T, 4, rnn.input_size, dtype=torch.float64)
    h0 = torch.randn(1, 4, rnn.hidden_size, dtype=torch.float64, generator=gen(11)).requires_grad_()
    _, h_n = rnn(x, h0)
    c = torch.randn(h_n.shape, dtype=torch.float64, generator=gen(12))
    (g,) = torch.autograd.grad((h_n * c).sum(), h0)
    return float(g.norm() / c.norm())


def test_gradient_norm_through_1000_steps_orthogonal_vs_unconstrained():
    T, d = 1000, 32
    orth = _rnn64(2, d, 13, nonlinearity="modrelu", constraint="givens", init="haar")
    with torch.no_grad():
        orth.cells[0].activation.bias.zero_()  # modReLU with b = 0 is sign(z)|z|: norm preserving
    plain = _rnn64(2, d, 13, nonlinearity="modrelu", constraint=None, init="haar")
    with torch.no_grad():  # a standard unconstrained init: W ~ N(0, 1/d)
        plain.cells[0].weight_hh.copy_(
            torch.randn(d, d, dtype=torch.float64, generator=gen(14)) / math.sqrt(d)
        )
        plain.cells[0].activation.bias.zero_()
    r_orth = _grad_ratio(orth, T)
    r_plain = _grad_ratio(plain, T)
    assert abs(r_orth - 1.0) < 1e-6  # exactly preserved by an orthogonal Jacobian
    assert r_plain < 1e-3 or r_plain > 1e3  # vanishes (or explodes) without the constraint
    # the default modReLU bias (±0.01) and tanh keep it within a few orders, not 1e-3 … 1e3 of drift
    orth_b = _rnn64(2, d, 15, nonlinearity="modrelu", constraint="cwy", init="henaff")
    assert 0.05 < _grad_ratio(orth_b, T) < 20


# ----------------------------------------------------------------------------------------------------
# initialisations


def test_block_rotations_equal_the_exponential_of_the_skew_generator():
    angles = torch.tensor([0.3, -2.0, 1.1], dtype=torch.float64)
    a = torch.zeros(7, 7, dtype=torch.float64)
    for i, t in enumerate(angles):
        a[2 * i, 2 * i + 1] = t
    a = a - a.T
    torch.testing.assert_close(oinit.block_rotations(angles, 7), torch.linalg.matrix_exp(a))


def test_inits_are_orthogonal_reproducible_and_in_their_ranges():
    for name in oinit.INITS:
        for group in ("O", "SO"):
            w = oinit.orthogonal_init(name, 9, generator=gen(0), group=group, dtype=torch.float64)
            assert float(orthogonality_error(w)) < 1e-12
            if group == "SO" or name != "haar":
                assert torch.linalg.det(w) > 0
            torch.testing.assert_close(
                w,
                oinit.orthogonal_init(name, 9, generator=gen(0), group=group, dtype=torch.float64),
            )
    h = oinit.henaff_orthogonal(400, generator=gen(1), dtype=torch.float64)
    ang = torch.atan2(h[0::2, 1::2].diagonal(), h[0::2, 0::2].diagonal())
    assert ang.min() < -2.5 and ang.max() > 2.5  # uniform over (−π, π)
    c = oinit.cayley_orthogonal(400, generator=gen(1), dtype=torch.float64)
    ang = torch.atan2(c[0::2, 1::2].diagonal(), c[0::2, 0::2].diagonal())
    assert ang.min() >= -1.0 - 1e-12 and ang.max() <= 1e-12 and ang.min() < -0.9


def test_modules_never_touch_the_global_rng():
    state = torch.random.get_rng_state()
    OrthogonalRNN(3, 6, num_layers=2, init="haar", input_constraint="tcwy")
    StiefelGRU(3, 6, constraint="givens")
    OrthogonalLinear(5, constraint="givens")
    StiefelLinear(5, 3)
    ModReLU(4)
    assert torch.equal(state, torch.random.get_rng_state())
    a = OrthogonalRNN(3, 6, generator=gen(3)).state_dict()
    b = OrthogonalRNN(3, 6, generator=gen(3)).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------------------------------
# gated variant and linear layers


@pytest.mark.parametrize("constraint", ["tcwy", "givens"])
def test_stiefel_gru_equals_nn_gru_and_keeps_every_gate_block_orthogonal(constraint):
    gru = StiefelGRU(
        3, 5, num_layers=2, constraint=constraint, dtype=torch.float64, generator=gen(16)
    )
    ref = torch.nn.GRU(3, 5, num_layers=2, dtype=torch.float64)
    with torch.no_grad():
        for layer in range(2):
            for name in ("weight_ih", "bias_ih", "bias_hh"):
                getattr(ref, f"{name}_l{layer}").copy_(getattr(gru, f"{name}_l{layer}"))
            ref.__getattr__(f"weight_hh_l{layer}").copy_(
                getattr(gru, f"weight_hh_l{layer}").reshape(15, 5)
            )
    x = torch.randn(6, 2, 3, dtype=torch.float64, generator=gen(17))
    out, h = gru(x)
    rout, rh = ref(x)
    torch.testing.assert_close(out, rout)
    torch.testing.assert_close(h, rh)
    _, h_l = gru(x, lengths=[6, 3])
    torch.testing.assert_close(h_l[:, 1], gru(x[:3, 1:2])[1][:, 0])
    opt = _optimizer(gru, constraint)
    for step in range(5):
        out, _ = gru(torch.randn(6, 2, 3, dtype=torch.float64, generator=gen(step)))
        opt.zero_grad()
        out.pow(2).sum().backward()
        opt.step()
    for layer in range(2):
        w = getattr(gru, f"weight_hh_l{layer}")
        assert w.shape == (3, 5, 5)
        assert float(orthogonality_error(w)) < 1e-10  # every block (max over the batch)


@pytest.mark.parametrize("constraint", ["tcwy", "cwy", "givens", "cayley", "matrix_exp"])
def test_linear_layers_keep_their_constraint(constraint):
    model = torch.nn.Sequential(
        StiefelLinear(8, 3, constraint=constraint, generator=gen(1)),  # wide: orthonormal rows
        StiefelLinear(3, 6, constraint=constraint, generator=gen(2)),  # tall: orthonormal columns
        OrthogonalLinear(6, constraint=constraint, group="SO", generator=gen(3)),
    )
    opt = _optimizer(model, constraint, lr=0.1)
    for step in range(5):
        opt.zero_grad()
        model(torch.randn(4, 8, generator=gen(step))).pow(2).sum().backward()
        opt.step()
    assert model[0].weight.shape == (3, 8)
    assert len(constrained_weights(model)) == 3
    w0 = model[0].weight.detach()
    torch.testing.assert_close(w0 @ w0.T, torch.eye(3), atol=1e-5, rtol=0)
    w1 = model[1].weight.detach()
    torch.testing.assert_close(w1.T @ w1, torch.eye(3), atol=1e-5, rtol=0)
    assert float(orthogonality_error(model)) < 1e-5
    assert torch.linalg.det(model[2].weight.detach().double()) > 0


# ----------------------------------------------------------------------------------------------------
# bad input


def test_bad_input_gives_clear_errors():
    rnn = OrthogonalRNN(4, 6, num_layers=2)
    with pytest.raises(ValueError, match=r"4 features"):
        rnn(torch.randn(5, 2, 3))
    with pytest.raises(ValueError, match=r"h_0.*\(2, 2, 6\)"):
        rnn(torch.randn(5, 2, 4), torch.zeros(1, 2, 6))
    with pytest.raises(ValueError, match="input"):
        rnn(torch.randn(5))
    with pytest.raises(ValueError, match="lengths"):
        rnn(torch.randn(5, 2, 4), lengths=[6, 1])
    with pytest.raises(TypeError, match="dtype"):
        rnn(torch.randn(5, 2, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="constraint"):
        OrthogonalRNN(4, 6, constraint="qr")
    with pytest.raises(ValueError, match="nonlinearity"):
        OrthogonalRNN(4, 6, nonlinearity="sigmoid")
    with pytest.raises(ValueError, match="init"):
        OrthogonalRNN(4, 6, init="eye")
    with pytest.raises(ValueError, match="square"):
        OrthogonalRNNCell(4, 6, init=torch.linalg.qr(torch.randn(6, 4))[0])
    with pytest.raises(ValueError, match="orthogonal"):
        OrthogonalRNNCell(4, 6, init=torch.randn(6, 6))
    with pytest.raises(ValueError, match="det"):
        OrthogonalRNNCell(4, 2, group="SO", init=torch.tensor([[1.0, 0.0], [0.0, -1.0]]))
    with pytest.raises(ValueError, match="square"):
        OrthogonalLinear(4, 5)
    with pytest.raises(ValueError, match=r"hx"):
        OrthogonalRNNCell(4, 6)(torch.randn(2, 4), torch.zeros(3, 6))
    with pytest.raises(ValueError, match="features"):
        StiefelGRU(3, 4)(torch.randn(2, 1, 5))
    with pytest.raises(TypeError, match="generator"):
        OrthogonalRNN(4, 6, generator=0)


@pytest.mark.parametrize("input_constraint", ["givens", "tcwy"])
def test_stiefel_input_map_wide_and_tall(input_constraint):
    for n_in, d in ((20, 5), (3, 8)):  # wide (5, 20): orthonormal rows; tall (8, 3): columns
        rnn = OrthogonalRNN(n_in, d, input_constraint=input_constraint, generator=gen(20))
        opt = _optimizer(rnn, input_constraint)
        w0 = rnn.cells[0].weight_ih.detach().clone()
        for step in range(4):
            out, _ = rnn(torch.randn(5, 2, n_in, generator=gen(step)))
            opt.zero_grad()
            out.pow(2).sum().backward()
            opt.step()
        w = rnn.cells[0].weight_ih.detach()
        assert w.shape == (d, n_in) and (w - w0).abs().max() > 1e-3
        assert float(orthogonality_error(w)) < 1e-5
        assert len(constrained_weights(rnn)) == 2


def test_input_init_scales_and_default():
    """kaiming: N(0, 2/input_size) (expRNN); uniform (default): U[-1/sqrt(d), 1/sqrt(d)] (nn.RNN)."""
    n_in, d = 40, 300
    w_k = OrthogonalRNNCell(n_in, d, input_init="kaiming", generator=gen(3)).weight_ih.detach()
    assert abs(float(w_k.std()) / math.sqrt(2 / n_in) - 1) < 0.03
    assert abs(float(w_k.mean())) < 0.01
    w_u = OrthogonalRNNCell(n_in, d, input_init="uniform", generator=gen(3)).weight_ih.detach()
    bound = 1 / math.sqrt(d)
    assert float(w_u.abs().max()) <= bound
    assert abs(float(w_u.std()) / (bound / math.sqrt(3)) - 1) < 0.03
    default = OrthogonalRNNCell(n_in, d, generator=gen(3))
    assert default.input_init == "uniform" and torch.equal(default.weight_ih.detach(), w_u)
    assert OrthogonalRNNCell(n_in, d, input_constraint="tcwy").input_init is None
    # every layer of a stack gets the init; layer l > 0 reads d features
    rnn = OrthogonalRNN(n_in, d, num_layers=2, input_init="kaiming", generator=gen(4))
    w1 = rnn.cells[1].weight_ih.detach()
    assert abs(float(w1.std()) / math.sqrt(2 / d) - 1) < 0.03


def test_input_init_bad_values():
    with pytest.raises(ValueError, match=r"input_init.*'normal'"):
        OrthogonalRNNCell(3, 4, input_init="normal")
    with pytest.raises(ValueError, match=r"input_init.*input_constraint"):
        OrthogonalRNN(3, 8, input_constraint="tcwy", input_init="kaiming")
