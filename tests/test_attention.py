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


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("norm", [1.0, 3.0, 10.0])
@pytest.mark.parametrize("causal", [False, True])
def test_no_overflow_up_to_ten_sqrt_d_in_float32(norm, causal, seed):
    # at the default num_features=256 (issue 10: 2 of 4 seeds used to give NaN gradients)
    d = 64
    q = rand(1, 2, 256, d, dtype=torch.float32, seed=10 * seed)
    k = rand(1, 2, 256, d, dtype=torch.float32, seed=10 * seed + 1)
    q = q / q.norm(dim=-1, keepdim=True) * norm * math.sqrt(d)
    k = k / k.norm(dim=-1, keepdim=True) * norm * math.sqrt(d)
    v = rand(1, 2, 256, 8, dtype=torch.float32, seed=10 * seed + 2)
    fmap = FeatureMap(d, 256, seed=seed)
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
    # causal with Lq != Lk is supported (queries aligned to the end); dropout is not
    with pytest.raises(ValueError, match="dropout_p"):
        favor_attention(q, k, v, dropout_p=0.1)
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


# ---------------------------------------------------------------- drop-in SDPA signature (issue 10)

sdpa = torch.nn.functional.scaled_dot_product_attention


def explicit_masked(fmap, q, k, v, allowed, scale=None):
    """Independent reference: masked quadratic form of the features, ``allowed`` (..., Lq, Lk)."""
    s = (q.shape[-1] ** -0.5 if scale is None else scale) ** 0.5
    a = (fmap(q * s) @ fmap(k * s).transpose(-1, -2)) * allowed
    den = a.sum(-1, keepdim=True)
    return torch.where(den != 0, (a @ v) / torch.where(den != 0, den, 1.0), 0.0)


def small_qkv(lq=9, lk=9, heads=2, kv_heads=None, d=8, dv=3):
    kv_heads = heads if kv_heads is None else kv_heads
    return (
        rand(2, heads, lq, d, scale=0.3),
        rand(2, kv_heads, lk, d, scale=0.3, seed=1),
        rand(2, kv_heads, lk, dv, seed=2),
    )


def test_sdpa_positional_arguments_and_meaning():
    fmap = FeatureMap(8, 16, seed=1).double()
    q, k, v = small_qkv()
    a = favor_attention(q, k, v, None, 0.0, True, 0.2, features=fmap)
    b = favor_attention(q, k, v, causal=True, scale=0.2, features=fmap)
    assert torch.equal(a, b)
    tri = torch.ones(9, 9, dtype=torch.bool).tril()
    assert torch.allclose(a, explicit_masked(fmap, q, k, v, tri, scale=0.2), atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_attn_mask_key_masks_equal_key_padding_mask(causal):
    fmap = FeatureMap(8, 16, seed=1).double()
    q, k, v = small_qkv()
    pad = torch.zeros(2, 9, dtype=torch.bool)
    pad[0, 6:] = True
    pad[1, 3] = True
    want = favor_attention(q, k, v, features=fmap, is_causal=causal, key_padding_mask=pad)
    keep = ~pad
    allowed = keep[:, None, None, :] & (
        torch.ones(9, 9, dtype=torch.bool).tril() if causal else True
    )
    assert torch.allclose(want, explicit_masked(fmap, q, k, v, allowed), atol=1e-12)
    for mask in (
        keep[:, None, None, :],  # bool (B, 1, 1, Lk)
        keep[:, None, None, :].expand(2, 1, 9, 9),  # the same, repeated over the queries
        torch.zeros(2, 1, 1, 9, dtype=torch.float64).masked_fill(pad[:, None, None, :], -math.inf),
    ):
        got = favor_attention(q, k, v, mask, is_causal=causal, features=fmap)
        assert torch.allclose(got, want, atol=1e-12)
    # a causal mask given as attn_mask (with the padding folded in) is recognised as such
    got = favor_attention(q, k, v, allowed if causal else allowed.expand(2, 2, 9, 9), features=fmap)
    assert torch.allclose(got, want, atol=1e-12)


def test_attention_masks_linear_attention_cannot_honour_raise():
    q, k, v = small_qkv()
    band = torch.ones(9, 9, dtype=torch.bool).tril() & torch.ones(9, 9, dtype=torch.bool).triu(-2)
    with pytest.raises(ValueError, match="arbitrary dense mask"):
        favor_attention(q, k, v, band, num_features=8)
    with pytest.raises(ValueError, match="additive"):
        favor_attention(q, k, v, torch.randn(9, 9, dtype=torch.float64), num_features=8)
    with pytest.raises(ValueError, match="broadcastable"):
        favor_attention(q, k, v, torch.ones(3, 9, dtype=torch.bool), num_features=8)
    with pytest.raises(TypeError, match="attn_mask"):
        favor_attention(q, k, v, torch.ones(9, 9, dtype=torch.int64), num_features=8)
    with pytest.raises(ValueError, match="dropout_p"):
        favor_attention(q, k, v, None, 0.1)
    with pytest.raises(TypeError, match="is_causal"):
        favor_attention(q, k, v, is_causal=1)  # type: ignore[arg-type]


def test_leading_dims_broadcast():
    fmap = FeatureMap(8, 16, seed=1).double()
    q = rand(2, 3, 7, 8, scale=0.3)
    k, v = rand(1, 3, 7, 8, scale=0.3, seed=1), rand(2, 1, 7, 4, seed=2)
    for causal in (False, True):
        got = favor_attention(q, k, v, is_causal=causal, features=fmap)
        want = favor_attention(q, k.expand(2, 3, 7, 8), v.expand(2, 3, 7, 4), is_causal=causal,
                               features=fmap)  # fmt: skip
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match="enable_gqa"):
        favor_attention(q, rand(2, 2, 7, 8), rand(2, 2, 7, 4))


@pytest.mark.parametrize("causal", [False, True])
def test_grouped_query_attention(causal):
    fmap = FeatureMap(8, 16, seed=1).double()
    q, k, v = small_qkv(heads=4, kv_heads=2)
    got = favor_attention(q, k, v, is_causal=causal, enable_gqa=True, features=fmap)
    rep = [t.repeat_interleave(2, dim=-3) for t in (k, v)]
    assert torch.equal(got, favor_attention(q, *rep, is_causal=causal, features=fmap))
    with pytest.raises(ValueError, match="multiple"):
        favor_attention(q, rand(2, 3, 9, 8), rand(2, 3, 9, 3), enable_gqa=True)


@pytest.mark.parametrize("implementation", ["slim", "chunked", "prefix"])
@pytest.mark.parametrize(("lq", "lk"), [(3, 11), (1, 11), (11, 4)])
def test_causal_with_lq_not_lk_aligns_queries_to_the_end(implementation, lq, lk):
    fmap = FeatureMap(8, 16, seed=1).double()
    q, k, v = small_qkv(lq=lq, lk=lk)
    got = favor_attention(q, k, v, is_causal=True, features=fmap, chunk_size=4,
                          implementation=implementation)  # fmt: skip
    allowed = torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq)
    assert torch.allclose(got, explicit_masked(fmap, q, k, v, allowed), atol=1e-12)
    if lq < lk:  # = the last rows of the full causal pass (decoding with a cache)
        qq = torch.cat([rand(2, 2, lk - lq, 8, seed=9), q], dim=-2)
        full = favor_attention(qq, k, v, is_causal=True, features=fmap, chunk_size=4)
        assert torch.allclose(got, full[..., -lq:, :], atol=1e-12)
    else:  # the first lq - lk queries see no key
        assert torch.equal(got[..., : lq - lk, :], torch.zeros_like(got[..., : lq - lk, :]))


def test_softmax_attention_equals_sdpa():
    q, k, v = small_qkv(lq=5, lk=9)
    assert torch.allclose(softmax_attention(q, k, v), sdpa(q, k, v), atol=1e-12)
    bottom_right = torch.ones(5, 9, dtype=torch.bool).tril(4)
    assert torch.allclose(
        softmax_attention(q, k, v, causal=True), sdpa(q, k, v, attn_mask=bottom_right), atol=1e-12
    )
    pad = torch.zeros(2, 9, dtype=torch.bool)
    pad[0, 7:] = True
    assert torch.allclose(
        softmax_attention(q, k, v, key_padding_mask=pad, scale=0.3),
        sdpa(q, k, v, attn_mask=~pad[:, None, None, :], scale=0.3),
        atol=1e-12,
    )


@pytest.mark.parametrize("causal", [False, True])
def test_favor_approaches_exact_sdpa_with_many_features(causal):
    # small norms, many features: the FAVOR+ estimate is close to exact attention, masks included
    q, k, v = (
        rand(2, 2, 12, 8, scale=0.4),
        rand(2, 2, 12, 8, scale=0.4, seed=1),
        rand(2, 2, 12, 3, seed=2),
    )
    keep = torch.ones(2, 1, 1, 12, dtype=torch.bool)
    keep[0, ..., 9:] = False
    allowed = keep & (torch.ones(12, 12, dtype=torch.bool).tril() if causal else True)
    exact = sdpa(q, k, v, attn_mask=allowed)
    fmap = FeatureMap(8, 4096, kind="hyperbolic", seed=3).double()
    got = favor_attention(q, k, v, keep, is_causal=causal, features=fmap)
    assert rel_err(got, exact) < 0.02


# ---------------------------------------------------------------- reliability (issue 10)


@pytest.mark.parametrize("bad", [0, -1.0, math.inf, math.nan])
def test_bad_scale_raises(bad):
    q, k, v = small_qkv()
    with pytest.raises(ValueError, match="scale"):
        softmax_attention(q, k, v, scale=bad)
    with pytest.raises(ValueError, match="scale"):
        favor_attention(q, k, v, scale=bad, num_features=8)


def test_softmax_attention_ignores_nan_in_padded_values_and_empty_lengths():
    q, k, v = small_qkv()
    pad = torch.zeros(2, 9, dtype=torch.bool)
    pad[:, 7:] = True
    dirty = v.clone()
    dirty[:, :, 7:] = math.nan
    got = softmax_attention(q, k, dirty, key_padding_mask=pad)
    assert torch.allclose(got, softmax_attention(q, k[..., :7, :], v[..., :7, :]), atol=1e-12)
    for lq, lk in ((0, 4), (4, 0), (0, 0)):
        qq, kk, vv = (t.clone().requires_grad_() for t in small_qkv(lq=lq, lk=lk))
        out = softmax_attention(qq, kk, vv, causal=True)
        assert out.shape == (2, 2, lq, 3) and not out.detach().abs().any()
        out.sum().backward()
        assert qq.grad is not None and qq.grad.shape == qq.shape


def test_default_features_are_cached_without_touching_rng(monkeypatch):
    from orthotorch.attention import functional

    functional.clear_feature_cache()
    draws = []
    original = FeatureMap.redraw

    def counting(self, generator=None):
        draws.append(1)
        return original(self, generator)

    monkeypatch.setattr(FeatureMap, "redraw", counting)
    q, k, v = small_qkv()
    rng = torch.random.get_rng_state()
    a = favor_attention(q, k, v, num_features=16)
    b = favor_attention(q, k, v, num_features=16)
    assert torch.equal(a, b) and len(draws) == 1  # built once, then reused
    favor_attention(q, k, v, num_features=16, kind="hyperbolic")
    assert len(draws) == 2  # another key, another map
    assert torch.equal(rng, torch.random.get_rng_state())
    # a user generator keeps its uncached meaning: each call draws afresh and advances it
    g1, g2 = gen(5), gen(5)
    x1 = favor_attention(q, k, v, num_features=16, generator=g1)
    x2 = favor_attention(q, k, v, num_features=16, generator=g1)
    assert not torch.equal(x1, x2)
    fresh = FeatureMap(8, 16, generator=g2)  # what an uncached call draws
    assert torch.equal(x1, favor_attention(q, k, v, features=fresh))
    FeatureMap(8, 16, generator=g2)  # second uncached draw
    assert torch.equal(g1.get_state(), g2.get_state())
    # same generator state again: a cache hit that leaves the generator where a draw would
    g3 = gen(5)
    n = len(draws)
    assert torch.equal(favor_attention(q, k, v, num_features=16, generator=g3), x1)
    assert len(draws) == n
    g4 = gen(5)
    FeatureMap(8, 16, generator=g4)
    assert torch.equal(g3.get_state(), g4.get_state())
    # bounded
    for m in range(1, functional.FEATURE_CACHE_SIZE + 5):
        favor_attention(q[..., :2, :], k[..., :2, :], v[..., :2, :], num_features=m)
    assert len(functional._CACHE) == functional.FEATURE_CACHE_SIZE
    functional.clear_feature_cache()


@pytest.mark.parametrize("implementation", ["slim", "chunked"])
@pytest.mark.parametrize(("d", "norm"), [(64, 12.0), (8, 30.0)])
def test_rows_with_valid_keys_never_output_zero(implementation, d, norm):
    # issue 10: at these norms 2-469 causal rows used to be exactly 0 (error 2-4 against float64)
    q, k = rand(1, 2, 256, d, seed=5), rand(1, 2, 256, d, seed=6)
    q = (q / q.norm(dim=-1, keepdim=True) * norm * math.sqrt(d)).float()
    k = (k / k.norm(dim=-1, keepdim=True) * norm * math.sqrt(d)).float()
    v = rand(1, 2, 256, 8, seed=7).float()
    fmap = FeatureMap(d, 256, seed=1)
    ts = [t.clone().requires_grad_() for t in (q, k, v)]
    out = favor_attention(*ts, causal=True, features=fmap, implementation=implementation)
    out.sum().backward()
    ref = favor_attention(
        q.double(), k.double(), v.double(), causal=True, features=fmap.double(), chunk_size=32
    )
    assert not bool((out.detach().abs().sum(-1) == 0).any())
    assert all(torch.isfinite(t.grad).all() for t in ts)
    assert rel_err(out.double(), ref) < 1e-4
