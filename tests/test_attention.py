"""FAVOR+ feature maps, projections and the functional attention API (orthotorch.attention)."""

from __future__ import annotations

import math

import pytest
import torch

from orthotorch.attention import (
    FeatureMap,
    favor_attention,
    favor_decode_step,
    gaussian_projection,
    givens_blocks,
    givens_projection,
    orthogonal_projection,
    softmax_attention,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rand(*shape, scale=1.0, dtype=torch.float64, seed=0):
    return torch.randn(*shape, generator=gen(seed), dtype=dtype) * scale


def quadratic_reference(fmap, q, k, v, *, causal, valid=None):
    """Independent reference: explicit (masked) quadratic attention built from the same features."""
    s = q.shape[-1] ** -0.25
    fq, fk = fmap(q * s), fmap(k * s)
    a = fq @ fk.transpose(-1, -2)
    if causal:
        a = a.tril()
    if valid is not None:
        a = a * valid[..., None, :].to(a.dtype)
    return (a @ v) / a.sum(-1, keepdim=True)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


# ---------------------------------------------------------------- projections


def test_orthogonal_projection_blocks_are_orthogonal_with_chi_norms():
    d, m = 16, 40
    w = orthogonal_projection(m, d, generator=gen(), dtype=torch.float64)
    assert w.shape == (m, d)
    norms = w.norm(dim=1)
    for a in range(0, m, d):
        blk = w[a : a + d] / norms[a : a + d, None]
        gram = blk @ blk.T
        assert torch.allclose(gram, torch.eye(gram.shape[0], dtype=w.dtype), atol=1e-12)
    # chi(d) norms: E‖g‖² = d
    big = orthogonal_projection(4096, d, generator=gen(1), dtype=torch.float64)
    assert abs(float((big.norm(dim=1) ** 2).mean()) - d) < 0.05 * d
    fixed = orthogonal_projection(m, d, generator=gen(), scaling="sqrt_d", dtype=torch.float64)
    assert torch.allclose(fixed.norm(dim=1), torch.full((m,), math.sqrt(d), dtype=w.dtype))


def test_givens_projection_orthogonal_and_structured_apply_matches_dense():
    d, m = 16, 24
    blocks = givens_blocks(m, d, generator=gen(3))
    assert blocks.i.shape[1] == 2 * math.ceil(math.log2(d))  # O(log d) rounds
    w = blocks.dense(torch.float64)
    unit = w / w.norm(dim=1, keepdim=True)
    gram = unit[:d] @ unit[:d].T
    assert torch.allclose(gram, torch.eye(d, dtype=w.dtype), atol=1e-12)
    x = rand(5, 3, d)
    assert torch.allclose(blocks.apply(x), x @ w.T, atol=1e-12)
    # the same generator seed reproduces the same matrix
    w2 = givens_projection(m, d, generator=gen(3), dtype=torch.float64)
    assert torch.equal(w, w2)


def test_givens_rows_are_spread_on_the_sphere():
    # after O(log d) rounds a fixed coordinate of a unit row has variance ≈ 1/d (uniform sphere)
    d = 32
    rows = torch.cat(
        [givens_projection(d, d, generator=gen(s), scaling="sqrt_d") for s in range(40)]
    ) / math.sqrt(d)
    var = float((rows[:, 0] ** 2).mean())
    assert abs(var - 1 / d) < 0.3 / d
    assert float(rows.abs().max()) < 0.9  # no row stuck near a basis vector


def test_projections_use_only_the_given_generator():
    state = torch.random.get_rng_state()
    gaussian_projection(8, 4, generator=gen())
    orthogonal_projection(8, 4, generator=gen())
    givens_projection(8, 4, generator=gen())
    FeatureMap(4, 8, projection="givens")
    favor_attention(rand(1, 3, 4), rand(1, 3, 4, seed=1), rand(1, 3, 2, seed=2))
    assert torch.equal(state, torch.random.get_rng_state())


def test_redraw_changes_projection_reproducibly():
    a, b = FeatureMap(8, 16, seed=5), FeatureMap(8, 16, seed=5)
    assert torch.equal(a.weight, b.weight)
    w0 = a.weight.clone()
    a.redraw()
    assert not torch.equal(a.weight, w0)
    b.redraw()
    assert torch.equal(a.weight, b.weight)
    a.redraw(gen(9))
    b.redraw(gen(9))
    assert torch.equal(a.weight, b.weight)


# ---------------------------------------------------------------- feature maps


@pytest.mark.parametrize("kind", ["positive", "hyperbolic", "trig"])
def test_softmax_features_are_unbiased_monte_carlo(kind):
    d, m = 4, 20000
    x = torch.tensor([0.3, -0.2, 0.5, 0.1], dtype=torch.float64)
    y = torch.tensor([-0.1, 0.4, 0.2, -0.3], dtype=torch.float64)
    fmap = FeatureMap(d, m, kind=kind, projection="gaussian", seed=1).double()
    # per-sample terms of the estimator (φ(x)ᵀφ(y) is their mean over the m directions)
    px, py = fmap(x), fmap(y)
    # paired kinds: the two halves of each direction form one sample
    terms = m * px * py if kind == "positive" else m * (px[:m] * py[:m] + px[m:] * py[m:])
    est, se = terms.mean(), terms.std() / math.sqrt(m)
    assert torch.allclose(est, (px * py).sum())
    assert abs(float(est) - math.exp(float(x @ y))) < 4 * float(se)
    if kind != "trig":
        assert bool((px > 0).all())


def test_positive_feature_formula():
    fmap = FeatureMap(3, 5, seed=2).double()
    x = rand(3)
    want = torch.exp(fmap.weight @ x - 0.5 * x @ x) / math.sqrt(5)
    assert torch.allclose(fmap(x), want)


@pytest.mark.parametrize("kind", ["relu", "elu"])
def test_generalised_kernels_same_interface(kind):
    fmap = FeatureMap(8, 32, kind=kind)
    q, k, v = rand(2, 2, 10, 8), rand(2, 2, 10, 8, seed=1), rand(2, 2, 10, 3, seed=2)
    out = favor_attention(q, k, v, features=fmap.double())
    ref = quadratic_reference(fmap, q, k, v, causal=False)
    assert torch.allclose(out, ref, atol=1e-12)
    out_c = favor_attention(q, k, v, features=fmap, causal=True)
    assert torch.allclose(out_c, quadratic_reference(fmap, q, k, v, causal=True), atol=1e-12)


# ---------------------------------------------------------------- approximation quality


def _mean_err(q, k, v, exact, *, m, kind, projection, seeds):
    errs = []
    for s in range(seeds):
        fmap = FeatureMap(q.shape[-1], m, kind=kind, projection=projection, seed=s).double()
        out = favor_attention(q, k, v, features=fmap)
        errs.append(float(((out - exact) ** 2).sum() / (exact**2).sum()))
    return sum(errs) / len(errs)


def test_error_falls_as_num_features_grows():
    q, k, v = (
        rand(2, 2, 64, 16, scale=0.5),
        rand(2, 2, 64, 16, scale=0.5, seed=1),
        rand(2, 2, 64, 8, seed=2),
    )
    exact = softmax_attention(q, k, v)
    errs = [
        _mean_err(q, k, v, exact, m=m, kind="positive", projection="orthogonal", seeds=6)
        for m in (16, 64, 256)
    ]
    assert errs[0] > errs[1] > errs[2]
    assert errs[2] < 0.25 * errs[0]  # ≈ 1/m decay


@pytest.mark.parametrize(("kind", "ratio"), [("positive", 0.9), ("hyperbolic", 0.8)])
def test_orthogonal_features_beat_iid(kind, ratio):
    q, k, v = (
        rand(2, 2, 64, 16, scale=0.5),
        rand(2, 2, 64, 16, scale=0.5, seed=1),
        rand(2, 2, 64, 8, seed=2),
    )
    exact = softmax_attention(q, k, v)
    iid = _mean_err(q, k, v, exact, m=16, kind=kind, projection="gaussian", seeds=16)
    orth = _mean_err(q, k, v, exact, m=16, kind=kind, projection="orthogonal", seeds=16)
    giv = _mean_err(q, k, v, exact, m=16, kind=kind, projection="givens", seeds=16)
    assert orth < ratio * iid
    assert giv < ratio * iid


# ---------------------------------------------------------------- exactness vs quadratic references


@pytest.mark.parametrize("implementation", ["slim", "chunked", "prefix"])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_causal_equals_masked_quadratic(implementation, dtype, tol):
    fmap = FeatureMap(16, 32, seed=1)
    q, k = rand(2, 3, 70, 16, dtype=dtype), rand(2, 3, 70, 16, dtype=dtype, seed=1)
    v = rand(2, 3, 70, 5, dtype=dtype, seed=2)
    out = favor_attention(
        q, k, v, causal=True, features=fmap, chunk_size=16, implementation=implementation
    )
    ref = quadratic_reference(
        fmap.to(torch.float64), q.double(), k.double(), v.double(), causal=True
    )
    assert out.dtype == dtype
    assert float((out.double() - ref).abs().max()) <= tol


@pytest.mark.parametrize("kind", ["positive", "hyperbolic", "trig"])
def test_bidirectional_equals_quadratic(kind):
    fmap = FeatureMap(8, 16, kind=kind, seed=4).double()
    q, k, v = rand(2, 7, 8, scale=0.3), rand(2, 9, 8, scale=0.3, seed=1), rand(2, 9, 4, seed=2)
    out = favor_attention(q, k, v, features=fmap)  # cross-attention, 3-D inputs
    assert out.shape == (2, 7, 4)
    assert torch.allclose(out, quadratic_reference(fmap, q, k, v, causal=False), atol=1e-10)


@pytest.mark.parametrize("chunk", [7, 16, 64])
def test_slim_gradients_equal_autograd_through_naive_prefix(chunk):
    fmap = FeatureMap(8, 16, seed=2).double()
    base = [rand(2, 2, 50, 8), rand(2, 2, 50, 8, seed=1), rand(2, 2, 50, 4, seed=2)]
    w = rand(2, 2, 50, 4, seed=3)
    grads = {}
    for impl in ("slim", "prefix"):
        ts = [t.clone().requires_grad_() for t in base]
        out = favor_attention(
            *ts, causal=True, features=fmap, chunk_size=chunk, implementation=impl
        )
        (out * w).sum().backward()
        grads[impl] = [t.grad for t in ts]
    # independent reference: autograd through the explicit masked quadratic form
    ts = [t.clone().requires_grad_() for t in base]
    (quadratic_reference(fmap, *ts, causal=True) * w).sum().backward()
    for a, b, c in zip(grads["slim"], grads["prefix"], [t.grad for t in ts]):
        assert float((a - b).abs().max()) < 1e-10
        assert float((a - c).abs().max()) < 1e-10


def test_slim_float32_gradients_when_the_running_max_jumps():
    # tiny keys, then one key aligned with a feature direction mid-chunk: the running maximum jumps by
    # ≈ ‖w‖²/2 ≈ 32, beyond what rebuilding the earlier state by subtraction survives even in float64;
    # SLiM must have kept that boundary state (without it the query gradient is off by > 100%).
    d, length = 64, 512
    fmap = FeatureMap(d, 64, seed=3)
    q = rand(1, 2, length, d, dtype=torch.float32) * 0.3
    k = rand(1, 2, length, d, dtype=torch.float32, seed=1) * 0.1
    k[:, :, 250] = fmap.weight[fmap.weight.norm(dim=1).argmax()] * d**0.25
    v = rand(1, 2, length, 4, dtype=torch.float32, seed=2)
    w = rand(1, 2, length, 4, dtype=torch.float32, seed=3)
    res = {}
    for impl in ("slim", "chunked"):
        ts = [t.clone().requires_grad_() for t in (q, k, v)]
        out = favor_attention(*ts, causal=True, features=fmap, chunk_size=32, implementation=impl)
        (out * w).sum().backward()
        res[impl] = [out.detach()] + [t.grad for t in ts]
    for a, b in zip(res["slim"], res["chunked"]):
        assert torch.isfinite(a).all()
        assert rel_err(a, b) < 1e-5


def test_slim_state_in_and_out_gradients():
    fmap = FeatureMap(8, 16, seed=2).double()
    q, k, v = rand(1, 2, 40, 8), rand(1, 2, 40, 8, seed=1), rand(1, 2, 40, 3, seed=2)

    def run(impl):
        ts = [t.clone().requires_grad_() for t in (q, k, v)]
        o1, st = favor_attention(
            ts[0][..., :23, :],
            ts[1][..., :23, :],
            ts[2][..., :23, :],
            causal=True,
            features=fmap,
            chunk_size=6,
            implementation=impl,
            return_state=True,
        )
        o2, st2 = favor_attention(
            ts[0][..., 23:, :],
            ts[1][..., 23:, :],
            ts[2][..., 23:, :],
            causal=True,
            features=fmap,
            chunk_size=6,
            implementation=impl,
            state=st,
            return_state=True,
        )
        (o1.sin().sum() + o2.cos().sum() + st2.kv.sum() * 1e-3).backward()
        return torch.cat([o1, o2], -2).detach(), [t.grad for t in ts]

    out_s, g_s = run("slim")
    out_c, g_c = run("chunked")
    assert torch.allclose(out_c, out_s, atol=1e-12)
    full = favor_attention(q, k, v, causal=True, features=fmap)
    assert torch.allclose(out_s, full, atol=1e-12)
    for a, b in zip(g_s, g_c):
        assert torch.allclose(a, b, atol=1e-10)


# ---------------------------------------------------------------- masks, cross-attention, decoding


@pytest.mark.parametrize("causal", [False, True])
def test_key_padding_removes_keys_from_numerator_and_normaliser(causal):
    fmap = FeatureMap(8, 16, seed=1).double()
    q, k, v = rand(2, 2, 12, 8), rand(2, 2, 12, 8, seed=1), rand(2, 2, 12, 3, seed=2)
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[0, 9:] = True  # right padding in batch item 0
    k2, v2 = k.clone(), v.clone()
    k2[0, :, 9:] *= 50.0  # wild padded keys/values must not matter at all
    v2[0, :, 9:] = 1e6
    out = favor_attention(q, k2, v2, features=fmap, causal=causal, key_padding_mask=mask)
    ref = favor_attention(q[:1, :, :9], k[:1, :, :9], v[:1, :, :9], features=fmap, causal=causal)
    assert torch.allclose(out[0, :, :9], ref[0], atol=1e-12)
    if not causal:
        assert torch.allclose(
            out[0, :, 9:],
            favor_attention(q[:1, :, 9:], k[:1, :, :9], v[:1, :, :9], features=fmap)[0],
            atol=1e-12,
        )
    valid = ~mask[:, None, :].expand(2, 2, 12)
    assert torch.allclose(
        out[1], quadratic_reference(fmap, q, k, v, causal=causal, valid=valid)[1], atol=1e-12
    )


def test_all_keys_padded_gives_zeros_not_nan():
    q, k, v = rand(1, 1, 4, 8), rand(1, 1, 4, 8, seed=1), rand(1, 1, 4, 2, seed=2)
    mask = torch.ones(1, 4, dtype=torch.bool)
    for causal in (False, True):
        out = favor_attention(q, k, v, key_padding_mask=mask, causal=causal, num_features=8)
        assert torch.equal(out, torch.zeros_like(out))


def test_causal_does_not_see_the_future():
    fmap = FeatureMap(16, 32, seed=1)
    q, k, v = (
        rand(1, 2, 64, 16, dtype=torch.float32),
        rand(1, 2, 64, 16, dtype=torch.float32, seed=1),
        rand(1, 2, 64, 4, dtype=torch.float32, seed=2),
    )
    out = favor_attention(q, k, v, causal=True, features=fmap, chunk_size=16)
    k2, v2 = k.clone(), v.clone()
    k2[..., 40:, :] *= 30.0  # huge future keys: a global key maximum would change the past
    v2[..., 40:, :] = 7.0
    out2 = favor_attention(q, k2, v2, causal=True, features=fmap, chunk_size=16)
    assert torch.equal(out[..., :40, :], out2[..., :40, :])


def test_incremental_decoding_matches_full_causal_forward():
    fmap = FeatureMap(8, 16, seed=1).double()
    q, k, v = rand(2, 2, 20, 8), rand(2, 2, 20, 8, seed=1), rand(2, 2, 20, 3, seed=2)
    full = favor_attention(q, k, v, causal=True, features=fmap, chunk_size=8)
    state, outs = None, []
    for t in range(20):
        o, state = favor_decode_step(
            q[..., t : t + 1, :], k[..., t : t + 1, :], v[..., t : t + 1, :], state, features=fmap
        )
        outs.append(o)
    assert torch.allclose(torch.cat(outs, -2), full, atol=1e-12)
    assert state.kv.shape == (2, 2, 16, 4)  # O(M·dv) state, independent of the prefix length


# ---------------------------------------------------------------- numerical range and precision


@pytest.mark.parametrize("norm", [1.0, 3.0, 10.0])
@pytest.mark.parametrize("causal", [False, True])
def test_no_overflow_up_to_ten_sqrt_d_in_float32(norm, causal):
    d = 64
    q, k = rand(1, 2, 256, d, dtype=torch.float32), rand(1, 2, 256, d, dtype=torch.float32, seed=1)
    q = q / q.norm(dim=-1, keepdim=True) * norm * math.sqrt(d)
    k = k / k.norm(dim=-1, keepdim=True) * norm * math.sqrt(d)
    v = rand(1, 2, 256, 8, dtype=torch.float32, seed=2)
    fmap = FeatureMap(d, 64, seed=0)
    qk, kk = q.clone().requires_grad_(), k.clone().requires_grad_()
    out = favor_attention(qk, kk, v, causal=causal, features=fmap)
    out.sum().backward()
    assert (
        torch.isfinite(out).all()
        and torch.isfinite(qk.grad).all()
        and torch.isfinite(kk.grad).all()
    )
    ref = favor_attention(q.double(), k.double(), v.double(), causal=causal, features=fmap.double())
    assert rel_err(out.double(), ref) < 1e-4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_half_precision_inputs_accumulate_in_float32(dtype, causal):
    q, k, v = (
        rand(1, 2, 300, 16, dtype=torch.float32),
        rand(1, 2, 300, 16, dtype=torch.float32, seed=1),
        rand(1, 2, 300, 8, dtype=torch.float32, seed=2),
    )
    fmap = FeatureMap(16, 32, seed=0)
    out = favor_attention(q.to(dtype), k.to(dtype), v.to(dtype), causal=causal, features=fmap)
    assert out.dtype == dtype
    ref = favor_attention(
        q.to(dtype).float(), k.to(dtype).float(), v.to(dtype).float(), causal=causal, features=fmap
    )
    assert torch.isfinite(out.float()).all()
    tol = 2e-3 if dtype == torch.float16 else 1.6e-2  # one rounding of the output
    assert float((out.float() - ref).abs().max()) <= tol * float(ref.abs().max())


# ---------------------------------------------------------------- errors


def test_bad_inputs_raise_clear_errors():
    q, k, v = rand(2, 3, 5, 8), rand(2, 3, 5, 8, seed=1), rand(2, 3, 5, 4, seed=2)
    with pytest.raises(ValueError, match="leading"):
        favor_attention(q, rand(2, 4, 5, 8), rand(2, 4, 5, 4))
    with pytest.raises(ValueError, match="feature dim"):
        favor_attention(q, rand(2, 3, 5, 7), v)
    with pytest.raises(ValueError, match="length"):
        favor_attention(q, k, rand(2, 3, 6, 4))
    with pytest.raises(ValueError, match="num_features"):
        favor_attention(q, k, v, num_features=0)
    with pytest.raises(ValueError, match=">= 1"):
        FeatureMap(8, -3)
    with pytest.raises(ValueError, match="key_padding_mask"):
        favor_attention(q, k, v, key_padding_mask=torch.zeros(2, 6, dtype=torch.bool))
    with pytest.raises(TypeError, match="key_padding_mask"):
        favor_attention(q, k, v, key_padding_mask=torch.zeros(2, 5))
    with pytest.raises(ValueError, match="Lq == Lk"):
        favor_attention(q, rand(2, 3, 6, 8), rand(2, 3, 6, 4), causal=True)
    with pytest.raises(TypeError, match="dtype"):
        favor_attention(q, k.float(), v)
    with pytest.raises(ValueError, match="built for dim"):
        favor_attention(q, k, v, features=FeatureMap(4, 8))
    with pytest.raises(ValueError, match="kind"):
        FeatureMap(8, 8, kind="softmax")
    with pytest.raises(ValueError, match="projection"):
        FeatureMap(8, 8, projection="hadamard")
    with pytest.raises(TypeError, match="generator"):
        gaussian_projection(4, 4, generator=None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="implementation"):
        favor_attention(q, k, v, causal=True, implementation="cuda")
    with pytest.raises(TypeError, match="floating"):
        favor_attention(q.long(), k.long(), v.long())
