"""FavorAttention, Performer stacks, model-level SLiM and the `orthotorch attention` command."""

from __future__ import annotations

import argparse
import importlib.util

import pytest
import torch
import torch.nn.functional as F

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


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_favor_attention_module_matches_functional_and_mha_signature():
    attn = FavorAttention(16, 4, num_features=32, seed=1).double()
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    mem = torch.randn(2, 5, 16, dtype=torch.float64)
    out, weights = attn(x, mem, mem)  # cross-attention, like nn.MultiheadAttention
    assert out.shape == (2, 9, 16) and weights is None
    q = attn.q_proj(x).view(2, 9, 4, 4).transpose(1, 2)
    k = attn.k_proj(mem).view(2, 5, 4, 4).transpose(1, 2)
    v = attn.v_proj(mem).view(2, 5, 4, 4).transpose(1, 2)
    ref = favor_attention(q, k, v, features=attn.features).transpose(1, 2).reshape(2, 9, 16)
    assert torch.allclose(out, attn.out_proj(ref), atol=1e-12)


def test_favor_attention_kdim_vdim_and_padding():
    attn = FavorAttention(8, 2, kdim=6, vdim=5, num_features=16)
    q, k, v = torch.randn(3, 4, 8), torch.randn(3, 7, 6), torch.randn(3, 7, 5)
    mask = torch.zeros(3, 7, dtype=torch.bool)
    mask[1, 5:] = True
    out, _ = attn(q, k, v, key_padding_mask=mask)
    ref, _ = attn(q[1:2], k[1:2, :5], v[1:2, :5])
    assert torch.allclose(out[1:2], ref, atol=1e-5)


def test_favor_attention_rejects_unsupported_arguments():
    with pytest.raises(ValueError, match="divisible"):
        FavorAttention(10, 3)
    with pytest.raises(ValueError, match="batch_first"):
        FavorAttention(8, 2, batch_first=False)
    attn = FavorAttention(8, 2, num_features=8)
    x = torch.randn(1, 3, 8)
    with pytest.raises(ValueError, match="need_weights"):
        attn(x, x, x, need_weights=True)
    with pytest.raises(ValueError, match="attn_mask"):
        attn(x, x, x, attn_mask=torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="query"):
        attn(torch.randn(3, 8))


def test_redraw_on_schedule_only_in_training():
    attn = FavorAttention(8, 2, num_features=8, redraw_interval=2, seed=3)
    x = torch.randn(1, 4, 8)
    w0 = attn.features.weight.clone()
    attn(x)
    attn(x)
    assert torch.equal(attn.features.weight, w0)  # calls 0 and 1
    attn(x)
    assert not torch.equal(attn.features.weight, w0)  # redrawn before call 2
    attn.eval()
    w1 = attn.features.weight.clone()
    for _ in range(5):
        attn(x)
    assert torch.equal(attn.features.weight, w1)
    assert "features.weight" in attn.state_dict()


def test_performer_encoder_and_decoder_stacks():
    enc = Performer(16, 2, 4, num_features=16)
    dec = Performer(16, 2, 4, num_features=16, causal=True)
    x = torch.randn(2, 10, 16)
    assert enc(x).shape == (2, 10, 16)
    y = dec(x)
    x2 = x.clone()
    x2[:, 6:] = torch.randn(2, 4, 16) * 3.0  # (a constant shift would vanish in LayerNorm)
    assert torch.allclose(dec(x2)[:, :6], y[:, :6], atol=1e-6)  # decoder is causal
    assert not torch.allclose(enc(x2)[:, :6], enc(x)[:, :6], atol=1e-3)


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
    assert torch.allclose(torch.cat([a, b, c], 1), full, atol=1e-10)
    out = model.generate(tokens[:, :5], 6, generator=gen())
    assert out.shape == (1, 11) and torch.equal(out[:, :5], tokens[:, :5])
    out2 = model.generate(tokens[:, :5], 6, generator=gen())
    assert torch.equal(out, out2)


def test_stiefel_helpers():
    model = PerformerLM(20, dim=8, depth=2, heads=2, num_features=8)
    params = stiefel_parameters(model)
    assert len(params) == 6
    orthogonal_init_(model, generator=gen())
    for w in params:
        eye = torch.eye(w.shape[1])
        assert torch.allclose(w.T @ w, eye, atol=1e-5)


@pytest.mark.skipif(
    importlib.util.find_spec("orthotorch.parametrize") is None, reason="parametrize not available"
)
def test_tcwy_constrained_projections():
    parametrize = pytest.importorskip("orthotorch.parametrize")
    if not hasattr(parametrize, "orthogonal"):
        pytest.skip("orthotorch.parametrize.orthogonal not available")
    attn = FavorAttention(8, 2, num_features=8, orthogonal_projections="tcwy")
    w = attn.q_proj.weight
    assert torch.allclose(w.T @ w, torch.eye(8), atol=1e-4)
    x = torch.randn(2, 5, 8)
    attn(x)[0].sum().backward()


def test_feature_map_shared_by_heads_has_head_dim():
    attn = FavorAttention(12, 3, num_features=10, kind="hyperbolic")
    assert isinstance(attn.features, FeatureMap)
    assert attn.features.weight.shape == (10, 4) and attn.features.feature_dim == 20


def test_cli_registers_and_trains_a_tiny_model():
    from orthotorch.attention import cli

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    cli.register(sub)
    args = parser.parse_args(["attention", "--steps", "3", "--quiet"])
    assert callable(args.func) and args.steps == 3
    losses = cli.train_char_lm(
        steps=40,
        seq_len=32,
        batch_size=4,
        dim=32,
        depth=1,
        heads=2,
        num_features=16,
        lr=1e-2,
        progress=False,
        slice_len=16,
    )
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
