"""FavorAttention as an nn.MultiheadAttention drop-in, Performer stacks and model-level SLiM.

References are independent: torch's own ``nn.MultiheadAttention`` (loaded into FavorAttention through its
``state_dict``), explicit softmax attention, and explicit loops over the FAVOR+ feature products.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from orthotorch.attention import (
    FavorAttention,
    FeatureMap,
    Performer,
    PerformerLM,
    favor_attention,
    orthogonal_init_,
    slim_train_step,
    stiefel_parameters,
)

D64 = torch.float64


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def layout(t: torch.Tensor, batch_first: bool) -> torch.Tensor:
    """``(N, L, E)`` → the module's layout (a transposed view for sequence-first)."""
    return t if batch_first else t.transpose(0, 1)


def make_mha(batch_first, kdim, vdim, add_bias_kv, add_zero_attn, *, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.MultiheadAttention(
        8,
        2,
        bias=bias,
        add_bias_kv=add_bias_kv,
        add_zero_attn=add_zero_attn,
        kdim=kdim,
        vdim=vdim,
        batch_first=batch_first,
        dtype=D64,
    )


MHA_CONFIGS = [
    pytest.param(bf, kv, bkv, za, id=f"bf={bf}-kv={kv}-bias_kv={bkv}-zero_attn={za}")
    for bf, kv, bkv, za in itertools.product(
        [False, True], [(None, None), (6, 5)], [False, True], [False, True]
    )
]


def mha_inputs(kv, batch_first, *, scale=1.0, seed=1, n=3, lq=5, s=7):
    kdim, vdim = kv[0] or 8, kv[1] or 8
    g = gen(seed)
    q = torch.randn(n, lq, 8, generator=g, dtype=D64) * scale
    k = torch.randn(n, s, kdim, generator=g, dtype=D64) * scale
    v = torch.randn(n, s, vdim, generator=g, dtype=D64)
    return tuple(layout(t, batch_first).requires_grad_() for t in (q, k, v))


# --------------------------------------------------------------------------- MHA drop-in


def test_defaults_and_positional_order_are_those_of_multihead_attention():
    # nn.MultiheadAttention(E, H, dropout, bias, add_bias_kv, add_zero_attn, kdim, vdim, batch_first)
    args = (8, 2, 0.0, False, True, True, 6, 5, True)
    mha, fa = nn.MultiheadAttention(*args), FavorAttention(*args)
    for name in (
        "embed_dim",
        "num_heads",
        "kdim",
        "vdim",
        "batch_first",
        "add_zero_attn",
        "dropout",
    ):
        assert getattr(fa, name) == getattr(mha, name), name
    assert fa.q_proj.bias is None and fa.bias_k is not None and fa.bias_k.shape == (1, 1, 8)
    assert FavorAttention(8, 2).batch_first is nn.MultiheadAttention(8, 2).batch_first is False


@pytest.mark.parametrize("batch_first,kv,add_bias_kv,add_zero_attn", MHA_CONFIGS)
def test_mha_state_dict_loads_and_softmax_mode_reproduces_mha_exactly(
    batch_first, kv, add_bias_kv, add_zero_attn
):
    mha = make_mha(batch_first, kv[0], kv[1], add_bias_kv, add_zero_attn)
    fa = FavorAttention(
        8, 2, add_bias_kv=add_bias_kv, add_zero_attn=add_zero_attn, kdim=kv[0], vdim=kv[1],
        batch_first=batch_first, dtype=D64, implementation="softmax",
    )  # fmt: skip
    fresh = copy.deepcopy(fa)
    fa.load_state_dict(mha.state_dict())  # strict: every key maps
    q, k, v = mha_inputs(kv, batch_first)
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[1, 4:] = True
    for avg in (True, False):
        ref, ref_w = mha(q, k, v, key_padding_mask=pad, average_attn_weights=avg)
        out, w = fa(q, k, v, key_padding_mask=pad, average_attn_weights=avg)
        assert out.shape == ref.shape and w.shape == ref_w.shape
        torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
        torch.testing.assert_close(w, ref_w, atol=1e-12, rtol=0)
    # gradients of inputs and of the mapped parameters agree as well
    r = torch.randn(ref.shape, generator=gen(5), dtype=D64)
    extra_ref = [mha.bias_k, mha.bias_v] if add_bias_kv else []
    extra_out = [fa.bias_k, fa.bias_v] if add_bias_kv else []
    g_ref = torch.autograd.grad((ref * r).sum(), [q, k, v, mha.out_proj.weight, *extra_ref])
    g_out = torch.autograd.grad((out * r).sum(), [q, k, v, fa.out_proj.weight, *extra_out])
    for a, b in zip(g_out, g_ref):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    # negative control: the same module without the loaded weights does not match
    assert not torch.allclose(fresh(q, k, v, key_padding_mask=pad)[0], ref, atol=1e-3)


@pytest.mark.parametrize("batch_first,kv,add_bias_kv,add_zero_attn", MHA_CONFIGS)
def test_favor_from_mha_approximates_mha_at_small_norms(
    batch_first, kv, add_bias_kv, add_zero_attn
):
    mha = make_mha(batch_first, kv[0], kv[1], add_bias_kv, add_zero_attn)
    # (gaussian: an orthogonal draw of 2048 rows at head dim 4 takes seconds)
    fa = FavorAttention.from_mha(
        mha, num_features=2048, kind="hyperbolic", projection="gaussian", seed=1
    )
    q, k, v = mha_inputs(kv, batch_first, scale=0.5, n=2, lq=12, s=10)
    with torch.no_grad():
        ref, _ = mha(q, k, v, need_weights=False)
        out, w = fa(q, k, v, need_weights=False)
    assert w is None
    # baseline: uniform attention (the same model with the query projection switched off)
    uniform = FavorAttention.from_mha(mha, implementation="softmax")
    with torch.no_grad():
        uniform.q_proj.weight.zero_()
        uniform.q_proj.bias.zero_()
    with torch.no_grad():
        base, _ = uniform(q, k, v, need_weights=False)
    assert float((out - ref).norm() / (base - ref).norm()) < 0.25


def test_from_mha_copies_configuration_and_rejects_non_mha():
    mha = nn.MultiheadAttention(8, 2, bias=False, kdim=3, vdim=4, batch_first=True, dtype=D64)
    fa = FavorAttention.from_mha(mha, num_features=16)
    assert (fa.kdim, fa.vdim, fa.batch_first, fa.q_proj.bias) == (3, 4, True, None)
    assert fa.q_proj.weight.dtype == D64 and fa.features.weight.dtype == D64
    torch.testing.assert_close(fa.k_proj.weight, mha.k_proj_weight, atol=0, rtol=0)
    with pytest.raises(ValueError, match="dropout"):
        FavorAttention.from_mha(nn.MultiheadAttention(8, 2, dropout=0.1))
    assert FavorAttention.from_mha(nn.MultiheadAttention(8, 2, dropout=0.1), dropout=0.0)
    with pytest.raises(TypeError, match="mha"):
        FavorAttention.from_mha(nn.Linear(2, 2))  # type: ignore[arg-type]


def test_mha_state_dict_of_another_shape_is_refused():
    fa = FavorAttention(8, 2, kdim=6)
    with pytest.raises(RuntimeError, match="in_proj_weight"):
        fa.load_state_dict(nn.MultiheadAttention(8, 2).state_dict())
    with pytest.raises(RuntimeError, match="size mismatch"):
        FavorAttention(8, 2).load_state_dict(nn.MultiheadAttention(8, 2, kdim=6).state_dict())
    with pytest.raises(RuntimeError, match="Missing key"):  # bias=True module, bias=False dict
        FavorAttention(8, 2).load_state_dict(nn.MultiheadAttention(8, 2, bias=False).state_dict())


def test_mha_inside_a_model_switches_to_favor():
    enc = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
    sd = enc.state_dict()
    enc.self_attn = FavorAttention(8, 2, batch_first=True, implementation="softmax")
    enc.load_state_dict(sd)
    x = torch.randn(2, 5, 8)
    ref = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
    ref.load_state_dict(sd)
    # the encoder layer calls self_attn(x, x, x, attn_mask=..., key_padding_mask=..., need_weights=False)
    torch.testing.assert_close(enc(x), ref(x), atol=1e-6, rtol=0)
    # in eval mode torch's encoder layer has an exact-attention fast path reading MHA's packed
    # weights: it must not bypass a FAVOR+ module
    enc.self_attn = FavorAttention(8, 2, batch_first=True, num_features=16)
    with torch.no_grad():
        train_out = enc(x)
        enc.eval()
        torch.testing.assert_close(enc(x), train_out, atol=1e-6, rtol=0)


def test_unbatched_inputs_match_mha_and_the_batched_call():
    mha = make_mha(False, None, None, True, False)
    fa = FavorAttention.from_mha(mha, implementation="softmax")
    x = torch.randn(6, 8, dtype=D64)
    mask = nn.Transformer.generate_square_subsequent_mask(6, dtype=D64)
    ref, ref_w = mha(x, x, x, attn_mask=mask, average_attn_weights=False)
    out, w = fa(x, x, x, attn_mask=mask, average_attn_weights=False)
    assert out.shape == (6, 8) and w.shape == (2, 6, 7)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(w, ref_w, atol=1e-12, rtol=0)
    fav = FavorAttention.from_mha(mha, num_features=32)
    pad = torch.zeros(6, dtype=torch.bool)
    pad[4:] = True
    single, _ = fav(x, x, x, key_padding_mask=pad)
    batched, _ = fav(x[:, None], x[:, None], x[:, None], key_padding_mask=pad[None])
    torch.testing.assert_close(single, batched[:, 0], atol=1e-12, rtol=0)


@pytest.mark.parametrize("implementation", ["slim", "softmax"])
def test_float_padding_mask_is_the_bool_mask_and_other_values_raise(implementation):
    fa = FavorAttention(8, 2, num_features=16, batch_first=True, implementation=implementation)
    x = torch.randn(2, 5, 8)
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[0, 3:] = True
    as_float = torch.zeros(2, 5).masked_fill(pad, float("-inf"))
    torch.testing.assert_close(
        fa(x, x, x, key_padding_mask=as_float)[0], fa(x, x, x, key_padding_mask=pad)[0]
    )
    for bad in (0.5, -1e9, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"key_padding_mask.*0.0 .attend. and -inf"):
            fa(x, x, x, key_padding_mask=torch.zeros(2, 5).index_fill(1, torch.tensor([1]), bad))
    with pytest.raises(TypeError, match="key_padding_mask"):
        fa(x, x, x, key_padding_mask=torch.zeros(2, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"key_padding_mask.*shape"):
        fa(x, x, x, key_padding_mask=torch.zeros(5, 2, dtype=torch.bool))


@pytest.mark.parametrize("implementation", ["slim", "chunked", "prefix"])
@torch.no_grad()
def test_causal_mask_forms_and_is_causal_agree_and_match_mha(implementation):
    torch.manual_seed(2)
    mha = nn.MultiheadAttention(8, 2, batch_first=True, add_zero_attn=True, dtype=D64)
    fa = FavorAttention.from_mha(
        mha, num_features=1024, kind="hyperbolic", projection="gaussian",
        implementation=implementation, chunk_size=4,
    )  # fmt: skip
    x = torch.randn(2, 9, 8, dtype=D64) * 0.5
    bool_mask = torch.ones(9, 9, dtype=torch.bool).triu(1)
    float_mask = nn.Transformer.generate_square_subsequent_mask(9, dtype=D64)
    per_head = bool_mask.expand(2 * 2, 9, 9)
    outs = [
        fa(x, x, x, is_causal=True, need_weights=False)[0],
        fa(x, x, x, attn_mask=bool_mask, need_weights=False)[0],
        fa(x, x, x, attn_mask=float_mask, need_weights=False)[0],
        fa(x, x, x, attn_mask=per_head, need_weights=False)[0],
        fa(x, x, x, attn_mask=float_mask, is_causal=True, need_weights=False)[0],
    ]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], atol=1e-12, rtol=0)
    ref = mha(x, x, x, attn_mask=float_mask, need_weights=False)[0]
    bidir = fa(x, x, x, need_weights=False)[0]
    err, gap = float((outs[0] - ref).norm()), float((bidir - ref).norm())
    assert err < 0.2 * gap  # FAVOR causal is close to MHA causal, far from bidirectional
    # the past does not see the future
    x2 = x.clone()
    x2[:, 6:] = torch.randn(2, 3, 8, dtype=D64) * 3
    torch.testing.assert_close(
        fa(x2, x2, x2, is_causal=True)[0][:, :6], outs[0][:, :6], atol=1e-12, rtol=0
    )


def test_arbitrary_attn_mask_and_causal_cross_attention_raise():
    fa = FavorAttention(8, 2, num_features=8, batch_first=True)
    x, mem = torch.randn(1, 4, 8), torch.randn(1, 6, 8)
    band = torch.ones(4, 4, dtype=torch.bool).triu(2)
    with pytest.raises(ValueError, match=r"attn_mask.*neither empty nor the causal mask"):
        fa(x, x, x, attn_mask=band)
    with pytest.raises(ValueError, match=r"attn_mask.*0.0 .attend. and -inf"):
        fa(x, x, x, attn_mask=torch.full((4, 4), -1e4))
    with pytest.raises(ValueError, match=r"attn_mask.*shape"):
        fa(x, x, x, attn_mask=torch.zeros(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="one length"):
        fa(x, mem, mem, is_causal=True)
    # a mask that blocks nothing is no mask
    empty = torch.zeros(4, 6, dtype=torch.bool)
    torch.testing.assert_close(fa(x, mem, mem, attn_mask=empty)[0], fa(x, mem, mem)[0])


def test_forward_checks_shapes_and_arguments():
    fa = FavorAttention(8, 2, kdim=6, num_features=8, batch_first=True)
    x, k = torch.randn(2, 4, 8), torch.randn(2, 5, 6)
    with pytest.raises(ValueError, match="`key` must have last dimension 6"):
        fa(x, x, x)
    with pytest.raises(ValueError, match="`query` must be"):
        fa(torch.randn(8))
    with pytest.raises(ValueError, match="batch size"):
        fa(x, k[:1], torch.randn(1, 5, 8))
    with pytest.raises(ValueError, match="`value` is given"):
        fa(x, None, x)
    with pytest.raises(TypeError, match="need_weights"):
        fa(x, k, torch.randn(2, 5, 8), need_weights=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="query"):
        fa("x")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- attention weights


@pytest.mark.parametrize("kind", ["positive", "hyperbolic", "trig", "relu", "elu"])
@pytest.mark.parametrize("causal", [False, True])
def test_need_weights_returns_the_weights_the_favor_output_applies(kind, causal):
    fa = FavorAttention(
        8, 2, add_bias_kv=True, add_zero_attn=True, batch_first=True, dtype=D64,
        num_features=32, kind=kind, causal=causal, seed=4,
    )  # fmt: skip
    x = torch.randn(2, 6, 8, dtype=D64)
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[1, 2:] = True
    out, w = fa(x, x, x, key_padding_mask=pad, average_attn_weights=False)
    assert w.shape == (2, 2, 6, 8)
    # independent reference: explicit per-(query, key) products of the unstabilised features
    hd = 4
    scale = hd**-0.25
    q = fa._heads(fa.q_proj(x)) * scale
    k = torch.cat([fa._heads(fa.k_proj(x)), fa.bias_k.reshape(1, 2, 1, hd).expand(2, 2, 1, hd),
                   torch.zeros(2, 2, 1, hd, dtype=D64)], dim=2) * scale  # fmt: skip
    v = torch.cat([fa._heads(fa.v_proj(x)), fa.bias_v.reshape(1, 2, 1, hd).expand(2, 2, 1, hd),
                   torch.zeros(2, 2, 1, hd, dtype=D64)], dim=2)  # fmt: skip
    phi_q, phi_k = fa.features(q), fa.features(k)
    ref = torch.zeros(2, 2, 6, 8, dtype=D64)
    for b, h, i, j in itertools.product(range(2), range(2), range(6), range(8)):
        visible = (j >= 6 or not pad[b, j]) and (not causal or j >= 6 or j <= i)
        if visible:
            ref[b, h, i, j] = phi_q[b, h, i] @ phi_k[b, h, j]
    ref = ref / ref.sum(-1, keepdim=True)
    torch.testing.assert_close(w, ref, atol=1e-10, rtol=1e-8)
    # and the output is out_proj(weights @ v)
    expected = fa.out_proj((w @ v).transpose(1, 2).reshape(2, 6, 8))
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=0)
    avg = fa(x, x, x, key_padding_mask=pad)[1]
    torch.testing.assert_close(avg, w.mean(1))


def test_need_weights_defaults_and_length_limit():
    fa = FavorAttention(8, 2, num_features=8, batch_first=True)
    x = torch.randn(1, 40, 8)
    assert fa(x)[1] is None  # forward(x) shorthand: no weights unless asked
    assert fa(x, x, x)[1].shape == (1, 40, 40)  # MHA call: weights by default, as MHA
    fa.max_weights_size = 40 * 39
    with pytest.raises(ValueError, match="need_weights=False"):
        fa(x, x, x)
    assert fa(x, x, x, need_weights=False)[1] is None
    exact = FavorAttention(8, 2, batch_first=True, implementation="softmax")
    exact.max_weights_size = 1  # exact attention forms the weights anyway: no limit
    assert exact(x, x, x)[1].shape == (1, 40, 40)


# --------------------------------------------------------------------------- robustness


@pytest.mark.parametrize("implementation", ["slim", "chunked", "prefix", "softmax"])
@pytest.mark.parametrize("causal", [False, True])
def test_nan_in_padded_keys_and_values_does_not_touch_the_output(implementation, causal):
    fa = FavorAttention(8, 2, num_features=16, batch_first=True, causal=causal,
                        implementation=implementation,
                        kind="elu" if implementation == "prefix" else "trig")  # fmt: skip
    x = torch.randn(2, 6, 8)
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[:, 4:] = True
    dirty = x.clone()
    dirty[:, 4:] = float("nan")
    out, w = fa(x, dirty, dirty, key_padding_mask=pad)
    clean, _ = fa(x, x, x, key_padding_mask=pad)
    assert torch.isfinite(out).all() and torch.isfinite(w).all()
    torch.testing.assert_close(out, clean, atol=1e-6, rtol=0)


@pytest.mark.parametrize("implementation", ["slim", "softmax"])
def test_zero_length_query_or_keys(implementation):
    fa = FavorAttention(8, 2, num_features=8, batch_first=True, implementation=implementation)
    x = torch.randn(2, 3, 8)
    out, w = fa(x[:, :0], x, x)
    assert out.shape == (2, 0, 8) and w.shape == (2, 0, 3)
    out, w = fa(x, x[:, :0], x[:, :0])
    assert out.shape == (2, 3, 8) and w.shape == (2, 3, 0)
    torch.testing.assert_close(out, fa.out_proj(torch.zeros(2, 3, 8)))


def test_float32_and_float64_modules_agree():
    fa = FavorAttention(8, 2, num_features=32, batch_first=True, causal=True)
    fd = copy.deepcopy(fa).double()
    x = torch.randn(2, 7, 8)
    torch.testing.assert_close(fa(x)[0].double(), fd(x.double())[0], atol=1e-5, rtol=0)
    # sequence-first layout with a transposed (non-contiguous) input gives the same answer
    fs = copy.deepcopy(fa)
    fs.batch_first = False
    torch.testing.assert_close(fs(x.transpose(0, 1))[0].transpose(0, 1), fa(x)[0])


def test_module_matches_functional():
    attn = FavorAttention(16, 4, num_features=32, seed=1, batch_first=True).double()
    x = torch.randn(2, 9, 16, dtype=D64)
    mem = torch.randn(2, 5, 16, dtype=D64)
    out, _ = attn(x, mem, mem, need_weights=False)
    q = attn.q_proj(x).view(2, 9, 4, 4).transpose(1, 2)
    k = attn.k_proj(mem).view(2, 5, 4, 4).transpose(1, 2)
    v = attn.v_proj(mem).view(2, 5, 4, 4).transpose(1, 2)
    ref = favor_attention(q, k, v, features=attn.features).transpose(1, 2).reshape(2, 9, 16)
    torch.testing.assert_close(out, attn.out_proj(ref), atol=1e-12, rtol=0)


def test_kdim_vdim_and_padding_drop_the_padded_keys():
    attn = FavorAttention(8, 2, kdim=6, vdim=5, num_features=16, batch_first=True)
    q, k, v = torch.randn(3, 4, 8), torch.randn(3, 7, 6), torch.randn(3, 7, 5)
    mask = torch.zeros(3, 7, dtype=torch.bool)
    mask[1, 5:] = True
    out, _ = attn(q, k, v, key_padding_mask=mask)
    ref, _ = attn(q[1:2], k[1:2, :5], v[1:2, :5])
    torch.testing.assert_close(out[1:2], ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"implementation": "nope"}, ValueError, "implementation"),
        ({"chunk_size": 0}, ValueError, "chunk_size"),
        ({"chunk_size": 2.5}, TypeError, "chunk_size"),
        ({"num_features": 0}, ValueError, "num_features"),
        ({"kind": "gelu"}, ValueError, "kind"),
        ({"projection": "qr"}, ValueError, "projection"),
        ({"dropout": 0.1}, ValueError, "dropout"),
        ({"dropout": "0"}, TypeError, "dropout"),
        ({"dropout": 2.0}, ValueError, "dropout"),
        ({"redraw_interval": 0}, ValueError, "redraw_interval"),
        ({"seed": -1}, ValueError, "seed"),
        ({"seed": 2**63}, ValueError, "seed"),
        ({"seed": 1, "generator": torch.Generator()}, ValueError, "generator"),
        ({"generator": 3}, TypeError, "generator"),
        ({"kdim": 0}, ValueError, "kdim"),
        ({"batch_first": "yes"}, TypeError, "batch_first"),
        ({"causal": 1}, TypeError, "causal"),
        ({"orthogonal_projections": 3}, TypeError, "orthogonal_projections"),
        ({"orthogonal_projections": "qr"}, ValueError, "method"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        FavorAttention(8, 2, **kwargs)


def test_constructor_rejects_bad_shapes():
    with pytest.raises(ValueError, match="divisible"):
        FavorAttention(10, 3)
    with pytest.raises(ValueError, match="embed_dim"):
        FavorAttention(0, 1)
    with pytest.raises(TypeError, match="num_heads"):
        FavorAttention(8, 2.0)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- features, redraws


def test_features_are_cached_in_the_state_dict_and_redraw_schedule_survives_reload():
    attn = FavorAttention(8, 2, num_features=8, redraw_interval=2, seed=3, batch_first=True)
    x = torch.randn(1, 4, 8)
    w0 = attn.features.weight.clone()
    attn(x)
    attn(x)
    assert torch.equal(attn.features.weight, w0)  # calls 0 and 1: the cached projection
    attn(x)
    w1 = attn.features.weight.clone()
    assert not torch.equal(w1, w0)  # redrawn before call 2
    sd = attn.state_dict()
    assert {"features.weight", "feature_seed", "num_calls", "num_draws"} <= set(sd)
    assert int(sd["num_calls"]) == 3 and int(sd["num_draws"]) == 1
    other = FavorAttention(8, 2, num_features=8, redraw_interval=2, seed=99, batch_first=True)
    other.load_state_dict(sd)
    assert torch.equal(other.features.weight, w1)
    for _ in range(3):  # calls 3, 4 (redraw), 5
        attn(x)
        other(x)
    assert not torch.equal(attn.features.weight, w1)
    assert torch.equal(other.features.weight, attn.features.weight)
    attn.eval()
    w2 = attn.features.weight.clone()
    for _ in range(5):
        attn(x)
    assert torch.equal(attn.features.weight, w2)  # never in eval mode


def test_no_redraw_by_default_and_old_state_dicts_still_load():
    attn = FavorAttention(8, 2, num_features=8, batch_first=True)
    w0 = attn.features.weight.clone()
    for _ in range(5):
        attn(torch.randn(1, 3, 8))
    assert torch.equal(attn.features.weight, w0)
    old = {
        k: v
        for k, v in attn.state_dict().items()
        if k not in ("feature_seed", "num_calls", "num_draws")
    }
    FavorAttention(8, 2, num_features=8).load_state_dict(old)


def test_manual_redraw_follows_the_seeded_schedule():
    a = FavorAttention(8, 2, num_features=8, seed=5)
    b = FavorAttention(8, 2, num_features=8, seed=5)
    a.redraw()
    b.redraw()
    assert torch.equal(a.features.weight, b.features.weight)
    first = a.features.weight.clone()
    a.redraw(gen(11))
    assert not torch.equal(a.features.weight, first)
    with pytest.raises(TypeError, match="generator"):
        a.redraw(11)  # type: ignore[arg-type]


def test_feature_map_shared_by_heads_has_head_dim():
    attn = FavorAttention(12, 3, num_features=10, kind="hyperbolic")
    assert isinstance(attn.features, FeatureMap)
    assert attn.features.weight.shape == (10, 4) and attn.features.feature_dim == 20


# --------------------------------------------------------------------------- Performer stacks


def projections(model: nn.Module) -> list[torch.Tensor]:
    return [m.features.weight for m in model.modules() if isinstance(m, FavorAttention)]


@pytest.mark.parametrize("build", [
    lambda **kw: Performer(16, 3, 4, num_features=16, **kw),
    lambda **kw: PerformerLM(20, dim=16, depth=3, heads=4, num_features=16, **kw),
])  # fmt: skip
def test_every_layer_draws_its_own_projection_reproducibly(build):
    model = build()
    ws = projections(model)
    assert len(ws) == 3
    for a, b in itertools.combinations(ws, 2):
        assert not torch.allclose(a, b)  # (before: every layer seeded 0, identical)
    for a, b in zip(ws, projections(build())):
        assert torch.equal(a, b)
    for a, b in zip(projections(build(seed=7)), projections(build(generator=gen(7)))):
        assert torch.equal(a, b)
    assert not torch.equal(projections(build(seed=8))[0], ws[0])


def test_performer_encoder_and_decoder_stacks():
    enc = Performer(16, 2, 4, num_features=16)
    dec = Performer(16, 2, 4, num_features=16, causal=True)
    x = torch.randn(2, 10, 16)
    assert enc(x).shape == (2, 10, 16)
    y = dec(x)
    x2 = x.clone()
    x2[:, 6:] = torch.randn(2, 4, 16) * 3.0  # (a constant shift would vanish in LayerNorm)
    torch.testing.assert_close(dec(x2)[:, :6], y[:, :6], atol=1e-6, rtol=0)  # decoder is causal
    assert not torch.allclose(enc(x2)[:, :6], enc(x)[:, :6], atol=1e-3)
    with pytest.raises(ValueError, match="batch_first"):
        Performer(16, 2, 4, batch_first=False)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_model_level_slim_equals_full_backprop(dtype):
    torch.manual_seed(1)
    model = PerformerLM(40, dim=16, depth=2, heads=2, num_features=16, chunk_size=8).to(dtype)
    tokens = torch.randint(0, 40, (2, 45))
    targets = torch.randint(0, 40, (2, 45))
    logits = model(tokens)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
    loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    loss2 = slim_train_step(model, tokens, targets, slice_len=10)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert abs(float(loss2) - float(loss.detach())) < max(tol, 1e-6)
    for n, p in model.named_parameters():
        assert float((p.grad - ref[n]).norm() / ref[n].norm()) < tol, n


def test_slices_and_generation_use_the_recurrent_state():
    model = PerformerLM(30, dim=16, depth=2, heads=2, num_features=8).double()
    tokens = torch.randint(0, 30, (1, 20))
    full = model(tokens)
    a, st = model.forward_slice(tokens[:, :7], None)
    b, st = model.forward_slice(tokens[:, 7:8], st, offset=7)
    c, _ = model.forward_slice(tokens[:, 8:], st, offset=8)
    torch.testing.assert_close(torch.cat([a, b, c], 1), full, atol=1e-10, rtol=0)
    out = model.generate(tokens[:, :5], 6, generator=gen())
    assert out.shape == (1, 11) and torch.equal(out[:, :5], tokens[:, :5])
    out2 = model.generate(tokens[:, :5], 6, generator=gen())
    assert torch.equal(out, out2)


def test_generate_and_forward_reject_bad_input():
    model = PerformerLM(30, dim=16, depth=1, heads=2, num_features=8)
    prompt = torch.randint(0, 30, (2, 4))
    with pytest.raises(ValueError, match=r"prompt.*length >= 1"):
        model.generate(prompt[:, :0], 3, generator=gen())  # (before: IndexError)
    with pytest.raises(ValueError, match="prompt"):
        model.generate(prompt[:0], 3, generator=gen())
    with pytest.raises(ValueError, match="prompt"):
        model.generate(prompt.float(), 3, generator=gen())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="steps"):
        model.generate(prompt, 0, generator=gen())
    with pytest.raises(ValueError, match="temperature"):
        model.generate(prompt, 2, generator=gen(), temperature=0.0)
    with pytest.raises(TypeError, match="generator"):
        model.generate(prompt, 2, generator=None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"tokens.*\[0, 30\)"):
        model(torch.tensor([[3, 30]]))
    with pytest.raises(ValueError, match="one state per layer"):
        model.forward_slice(prompt, [None, None])


def test_stiefel_helpers():
    model = PerformerLM(20, dim=8, depth=2, heads=2, num_features=8)
    params = stiefel_parameters(model)
    assert len(params) == 6
    orthogonal_init_(model, generator=gen())
    for w in params:
        torch.testing.assert_close(w.T @ w, torch.eye(w.shape[1]), atol=1e-5, rtol=0)
    a, b = (p.detach().clone() for p in params[:2])
    assert not torch.allclose(a, b)  # one weight after the other, not one draw for all
    with pytest.raises(TypeError, match="generator"):
        orthogonal_init_(model, generator=None)  # type: ignore[arg-type]


def test_tcwy_constrained_projections():
    attn = FavorAttention(8, 2, num_features=8, orthogonal_projections="tcwy", batch_first=True)
    w = attn.q_proj.weight
    torch.testing.assert_close(w.T @ w, torch.eye(8), atol=1e-4, rtol=0)
    x = torch.randn(2, 5, 8)
    attn(x)[0].sum().backward()
