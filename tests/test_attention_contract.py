"""The attention contract: every implementation × feature kind × dtype × causal/bidirectional.

Each property is checked against an independent reference: the explicit masked quadratic form built from
the same (unstabilised) features in float64, exact softmax attention, or finite differences
(gradcheck / gradgradcheck). Shapes are small so the whole suite stays fast.
"""

from __future__ import annotations

import math

import pytest
import torch

from orthotorch.attention import FeatureMap, favor_attention

IMPLS = ["bidirectional", "slim", "chunked", "prefix"]
CAUSAL_IMPLS = ["slim", "chunked", "prefix"]
KINDS = ["positive", "hyperbolic", "trig", "relu", "elu"]
SOFTMAX_KINDS = ["positive", "hyperbolic"]


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rand(*shape, scale=1.0, dtype=torch.float64, seed=0):
    return torch.randn(*shape, generator=gen(seed), dtype=torch.float64).mul(scale).to(dtype)


def call(impl, q, k, v, fmap, **kw):
    if impl == "bidirectional":
        return favor_attention(q, k, v, features=fmap, **kw)
    return favor_attention(
        q, k, v, features=fmap, causal=True, implementation=impl, chunk_size=4, **kw
    )


def explicit(fmap, q, k, v, *, causal, valid=None):
    """Independent reference: the masked quadratic form of the features, float64, no stabiliser."""
    fm = FeatureMap(fmap.dim, fmap.num_features, kind=fmap.kind).double()
    fm.weight.copy_(fmap.weight.double())
    s = q.shape[-1] ** -0.25
    a = fm(q.double() * s) @ fm(k.double() * s).transpose(-1, -2)
    lq, lk = a.shape[-2:]
    if causal:
        a = a * torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq)
    if valid is not None:
        a = a * valid[..., None, :]
    v = v.double() if valid is None else v.double().masked_fill(~valid[..., None], 0.0)
    den = a.sum(-1, keepdim=True)
    return torch.where(den != 0, (a @ v) / torch.where(den != 0, den, 1.0), 0.0)


def fmap_for(kind, d=6, m=8, seed=1):
    return FeatureMap(d, m, kind=kind, seed=seed)


def inputs(lq=10, lk=10, d=6, dv=3, scale=0.5, dtype=torch.float64):
    return (
        rand(2, 2, lq, d, scale=scale, dtype=dtype),
        rand(2, 2, lk, d, scale=scale, dtype=dtype, seed=1),
        rand(2, 2, lk, dv, dtype=dtype, seed=2),
    )


def expect_prefix_trig_error(impl, kind):
    return impl == "prefix" and kind == "trig"


# ------------------------------------------------------------------------------------------ values
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("impl", IMPLS)
def test_matches_the_explicit_quadratic_form(impl, kind, dtype):
    fmap = fmap_for(kind)
    q, k, v = inputs(dtype=dtype)
    if expect_prefix_trig_error(impl, kind):
        with pytest.raises(ValueError, match="trig"):
            call(impl, q, k, v, fmap)
        return
    out = call(impl, q, k, v, fmap)
    assert out.dtype == dtype and out.shape == (2, 2, 10, 3)
    ref = explicit(fmap, q, k, v, causal=impl != "bidirectional")
    tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    scale = float(ref.abs().max())
    assert float((out.double() - ref).abs().max()) <= tol * max(scale, 1.0)


# ------------------------------------------------------------------------------- no future leakage
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("impl", CAUSAL_IMPLS)
def test_no_future_leakage(impl, kind):
    if expect_prefix_trig_error(impl, kind):
        pytest.skip("prefix refuses trig features (tested above)")
    fmap = fmap_for(kind)
    q, k, v = inputs(lq=13, lk=13, dtype=torch.float32)
    out = call(impl, q, k, v, fmap)
    k2, v2 = k.clone(), v.clone()
    big = 3.0 if impl == "prefix" else 30.0  # prefix's fixed stabiliser cannot take ×30 keys
    k2[..., 6:, :] *= big  # mid-chunk (chunks of 4): a global key maximum would change the past
    v2[..., 6:, :] = 7.0
    out2 = call(impl, q, k2, v2, fmap)
    assert torch.equal(out[..., :6, :], out2[..., :6, :])
    # and the gradient of a past output ignores future inputs
    ts = [t.clone().requires_grad_() for t in (q, k2, v2)]
    call(impl, *ts, fmap)[..., :6, :].sum().backward()
    for t in ts:
        assert torch.equal(t.grad[..., 6:, :], torch.zeros_like(t.grad[..., 6:, :]))


# ------------------------------------------------------------------------------------------ padding
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("impl", IMPLS)
def test_padding_invariance_even_with_nan_padded_values(impl, kind):
    if expect_prefix_trig_error(impl, kind):
        pytest.skip("prefix refuses trig features (tested above)")
    fmap = fmap_for(kind)
    q, k, v = inputs()
    pad = torch.zeros(2, 10, dtype=torch.bool)
    pad[0, 7:] = True  # right padding in item 0
    pad[1, 2] = True  # a hole in item 1
    dirty_k, dirty_v = k.clone(), v.clone()
    full = pad[:, None, :].expand(2, 2, 10)
    dirty_k[full] = float("nan")
    dirty_v[full] = float("nan")
    ts = [t.clone().requires_grad_() for t in (q, dirty_k, dirty_v)]
    out = call(impl, *ts, fmap, key_padding_mask=pad)
    out.sum().backward()
    valid = ~full
    ref = explicit(fmap, q, k, v, causal=impl != "bidirectional", valid=valid)
    assert torch.isfinite(out).all()
    assert float((out.detach() - ref).abs().max()) < 1e-10
    for t in ts:  # padded positions get exactly zero gradient, real ones stay finite
        assert torch.isfinite(t.grad).all()
    assert torch.equal(ts[1].grad[full], torch.zeros_like(ts[1].grad[full]))
    assert torch.equal(ts[2].grad[full], torch.zeros_like(ts[2].grad[full]))
    # right padding: identical to the unpadded shorter sequence
    short = call(impl, q[:1, :, :7], k[:1, :, :7], v[:1, :, :7], fmap)
    assert torch.allclose(out[0, :, :7].detach(), short[0], atol=1e-12)


# ---------------------------------------------------------------------------------------- gradients
def heavy(*values):
    """Parameters past the first run only with the slow tests (``-m slow``)."""
    return [values[0]] + [pytest.param(x, marks=pytest.mark.slow) for x in values[1:]]


@pytest.mark.parametrize("kind", ["positive", "trig", *heavy("elu", "hyperbolic", "relu")])
@pytest.mark.parametrize("impl", IMPLS)
def test_gradcheck(impl, kind):
    if expect_prefix_trig_error(impl, kind):
        pytest.skip("prefix refuses trig features (tested above)")
    fmap = fmap_for(kind, d=4, m=4).double()
    q, k, v = (t[:1, :1, :6, :].clone().requires_grad_() for t in inputs(d=4, dv=2))

    def fn(q, k, v):
        return call(impl, q, k, v, fmap)

    assert torch.autograd.gradcheck(fn, (q, k, v), atol=1e-7, fast_mode=True)


@pytest.mark.parametrize("kind", heavy("positive", "hyperbolic", "trig"))
@pytest.mark.parametrize("impl", IMPLS)
def test_gradgradcheck(impl, kind):
    if expect_prefix_trig_error(impl, kind):
        pytest.skip("prefix refuses trig features (tested above)")
    fmap = fmap_for(kind, d=4, m=3).double()
    q, k, v = (t[:1, :1, :5, :].clone().requires_grad_() for t in inputs(d=4, dv=2))

    def fn(q, k, v):
        return call(impl, q, k, v, fmap)

    assert torch.autograd.gradgradcheck(fn, (q, k, v), atol=1e-6, fast_mode=True)


@pytest.mark.parametrize("with_state", [False, True])
def test_slim_double_backward_equals_chunked(with_state):
    """A gradient penalty through SLiM is a real function of the inputs, not a constant (issue 10)."""
    fmap = fmap_for("positive", d=8, m=16).double()
    base = inputs(lq=23, lk=23, d=8, dv=3)
    res = {}
    for impl in ("slim", "chunked"):
        ts = [t.clone().requires_grad_() for t in base]
        kw = {}
        if with_state:
            _, st = favor_attention(
                *(t[..., :9, :] for t in ts), causal=True, features=fmap, chunk_size=4,
                implementation=impl, return_state=True,
            )  # fmt: skip
            kw = {"state": st}
            ts_in = [t[..., 9:, :] for t in ts]
        else:
            ts_in = ts
        out = favor_attention(
            *ts_in, causal=True, features=fmap, chunk_size=4, implementation=impl, **kw
        )
        gq, gk = torch.autograd.grad(out.sin().sum(), ts[:2], create_graph=True)
        assert gq.requires_grad and gk.requires_grad
        penalty = (gq**2).sum() + (gk**2).sum()
        penalty.backward()
        res[impl] = [t.grad.clone() for t in ts]
    for a, b in zip(res["slim"], res["chunked"]):
        assert torch.allclose(a, b, atol=1e-10)


# -------------------------------------------------------------------------------------- large norms
@pytest.mark.parametrize("norm", [10.0, pytest.param(100.0, marks=pytest.mark.slow)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", SOFTMAX_KINDS)
@pytest.mark.parametrize("impl", ["bidirectional", "slim", "chunked"])
def test_large_norms_finite_and_accurate(impl, kind, dtype, norm):
    d, length = 16, 40
    q = rand(1, 2, length, d, seed=3)
    k = rand(1, 2, length, d, seed=4)
    q = (q / q.norm(dim=-1, keepdim=True) * norm * math.sqrt(d)).to(dtype)
    k = (k / k.norm(dim=-1, keepdim=True) * norm * math.sqrt(d)).to(dtype)
    v = rand(1, 2, length, 3, seed=5).to(dtype)
    w = rand(1, 2, length, 3, seed=6)
    fmap = fmap_for(kind, d=d, m=32)
    ts = [t.clone().requires_grad_() for t in (q, k, v)]
    out = call(impl, *ts, fmap)
    (out.double() * w).sum().backward()
    # float64 with the same (rounded) inputs
    rs = [t.double().clone().requires_grad_() for t in (q, k, v)]
    ref = call(impl, *rs, fmap.double())
    (ref * w).sum().backward()
    assert torch.isfinite(out.float()).all()
    for t in ts:
        assert torch.isfinite(t.grad.float()).all()
    assert not bool((out.float().abs().sum(-1) == 0).any())  # every row has valid keys
    # float32 rounding of exponents of size ≈ norm² is amplified by the conditioning, ∝ norm
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5 * norm
    assert float((out.double() - ref).detach().norm() / ref.detach().norm()) < tol
    if dtype == torch.float32 and norm <= 10:  # beyond, the exact gradient is ≈ 0 (saturated)
        for t, r in zip(ts, rs):
            assert float((t.grad.double() - r.grad).norm() / r.grad.norm()) < 1e-3


def test_prefix_raises_instead_of_underflowing():
    d = 16
    q = rand(1, 1, 12, d, seed=3)
    k = rand(1, 1, 12, d, seed=4)
    q = q / q.norm(dim=-1, keepdim=True) * 10 * math.sqrt(d)
    k = k / k.norm(dim=-1, keepdim=True) * 10 * math.sqrt(d)
    with pytest.raises(ValueError, match="underflow"):
        call("prefix", q.float(), k.float(), rand(1, 1, 12, 2).float(), fmap_for("positive", d=d))


@pytest.mark.parametrize("impl", ["bidirectional", "slim", "chunked"])
def test_trig_features_do_not_overflow(impl):
    d = 16
    q = rand(1, 1, 12, d, seed=3) * 10
    k = rand(1, 1, 12, d, seed=4) * 10  # exp(‖k'‖²/2) ≈ e^400 unstabilised
    out = call(impl, q.float(), k.float(), rand(1, 1, 12, 2).float(), fmap_for("trig", d=d))
    assert torch.isfinite(out).all()


# ----------------------------------------------------------------------------------- L = 0 and L = 1
@pytest.mark.parametrize("kind", ["positive", "elu"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("lq", "lk"), [(0, 0), (0, 5), (5, 0), (1, 1)])
def test_empty_and_single_position(impl, kind, lq, lk):
    fmap = fmap_for(kind)
    ts = [t.clone().requires_grad_() for t in inputs(lq=lq, lk=lk)]
    out = call(impl, *ts, fmap)
    assert out.shape == (2, 2, lq, 3)
    out.sum().backward()
    for t in ts:
        assert t.grad is not None and t.grad.shape == t.shape and torch.isfinite(t.grad).all()
    ref = explicit(fmap, *ts, causal=impl != "bidirectional")
    assert torch.allclose(out.detach(), ref, atol=1e-12)
    if lq == lk == 1:  # a single key: the output is its value
        assert torch.allclose(out.detach(), ts[2].detach(), atol=1e-12)


# ------------------------------------------------------------------------------------------ layouts
@pytest.mark.parametrize("impl", IMPLS)
def test_layouts_give_the_same_answer(impl):
    fmap = fmap_for("positive")
    q, k, v = inputs(lq=9, lk=9)
    want = call(impl, q, k, v, fmap)
    # (B, L, H, d) storage seen through a transpose, and a strided slice of a larger tensor
    tq, tk, tv = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    assert not tq.is_contiguous()
    assert torch.allclose(call(impl, tq, tk, tv, fmap), want, atol=1e-13)
    # every other column of an interleaved tensor (stride 2 in the last dim)
    sq, sk, sv = (torch.stack([t, -t], -1).flatten(-2)[..., ::2] for t in (q, k, v))
    assert sq.stride(-1) == 2
    assert torch.allclose(call(impl, sq, sk, sv, fmap), want, atol=1e-13)
    # one batch element alone gives the same rows
    assert torch.allclose(call(impl, q[1:], k[1:], v[1:], fmap), want[1:], atol=1e-13)
