"""The fused OrthogonalAdam step (``givens_adam_steps_``, kernel mode 3) against an independent dense
reference, against the per-matching loop it replaces (the torch fallback), across layouts and thread
counts, and inside the optimizer (state dict, fallback paths)."""

import io
import math

import numpy as np
import pytest
import torch

from givens_reference import (
    dense_rotation,
    per_thread_count_and_layout,
    round_robin_rounds,
    with_layout,
)
from orthotorch.graph_sampling import random_matching
from orthotorch.manifolds import _native, givens
from orthotorch.manifolds.givens import givens_adam_steps_
from orthotorch.optim import OrthogonalAdam

NATIVE = pytest.mark.skipif(_native.get_lib() is None, reason="native kernel unavailable")


def dense_reference(x, g, m, rounds, step, state, betas, eps, scales, update):
    """Independent float64 reference: dense generators, an explicit loop over pairs for the row state,
    dense rotations; matching by matching as optim/adam.py describes it."""
    b1, b2 = betas
    x, g, m = x.double().clone(), g.double(), m.double().clone()
    rs, cnt = state["row_sq"].double().clone(), state["row_count"].double().clone()
    mx = None if state.get("max_row_sq") is None else state["max_row_sq"].double().clone()
    n = x.shape[-2]
    if update:
        m = b1 * m + (1 - b1) * g
    for r, sc in zip(rounds, scales):
        wg = g @ x.mT - x @ g.mT
        wm = m @ x.mT - x @ m.mT
        theta = torch.zeros(*x.shape[:-2], r.i.numel(), dtype=torch.float64)
        for p in range(r.i.numel()):
            a, b = int(r.i[p]), int(r.j[p])
            cnt[a] += 1
            cnt[b] += 1
            w2 = wg[..., a, b] ** 2
            vhat = []
            for row in (a, b):
                rs[..., row] = b2 * rs[..., row] + (1 - b2) * w2
                v = rs[..., row]
                if mx is not None:
                    mx[..., row] = torch.maximum(mx[..., row], v)
                    v = mx[..., row]
                vhat.append(v / (1 - b2 ** float(cnt[row])))
            denom = torch.sqrt((vhat[0] + vhat[1]) / 2) + eps
            scale = 1.0 if sc is None else float(sc[p])
            theta[..., p] = -step * wm[..., a, b] * scale / denom
        rot = dense_rotation(n, r.i, r.j, theta)
        x, m = rot @ x, rot @ m
    return x, m, rs, cnt, mx


def make_problem(n, k, batch=(), dtype=torch.float64, amsgrad=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.linalg.qr(torch.randn(*batch, n, k, dtype=torch.float64, generator=gen))[0]
    g = torch.randn(*batch, n, k, dtype=torch.float64, generator=gen)
    m = torch.randn(*batch, n, k, dtype=torch.float64, generator=gen) * 0.3
    state = {
        "row_sq": torch.rand(*batch, n, dtype=torch.float64, generator=gen),
        "row_count": torch.randint(0, 6, (n,), generator=gen).double(),
    }
    if amsgrad:
        state["max_row_sq"] = state["row_sq"] + 0.2 * torch.rand(
            *batch, n, dtype=torch.float64, generator=gen
        )
    cast = {key: v.to(dtype) for key, v in state.items()}
    return x.to(dtype).contiguous(), g.to(dtype), m.to(dtype), cast


def run_fused(x, g, m, rounds, step, state, betas=(0.9, 0.999), eps=1e-8, scales=None, update=True):
    x, m = x.clone(), m.clone()
    st = {key: v.clone() for key, v in state.items()}
    givens_adam_steps_(
        x, g, m, rounds, step, row_sq=st["row_sq"], row_count=st["row_count"], betas=betas,
        eps=eps, max_row_sq=st.get("max_row_sq"), scales=scales, update_moment=update,
    )  # fmt: skip
    return x, m, st


def run_loop(x, g, m, rounds, step, state, betas=(0.9, 0.999), eps=1e-8, scales=None, update=True):
    """The per-matching loop (torch fallback; on CPU its primitives run in the native kernel)."""
    x, m = x.clone(), m.clone()
    st = {key: v.clone() for key, v in state.items()}
    mats = givens._rounds(rounds, x.device)
    scs = givens._scales(scales, mats, x)
    givens._adam_steps_torch(
        x, g, m, mats, scs, step, st["row_sq"], st["row_count"], st.get("max_row_sq"), *betas, eps,
        update,
    )  # fmt: skip
    return x, m, st


@NATIVE
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n,k,batch", [(16, 5, ()), (33, 8, ()), (12, 4, (2,))])
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("update", [True, False])
def test_fused_equals_dense_reference_and_loop(dtype, n, k, batch, amsgrad, scaled, update):
    x0, g, m0, state = make_problem(n, k, batch, dtype, amsgrad, seed=n + k)
    gen = torch.Generator().manual_seed(1)
    rounds = [*round_robin_rounds(n, 5, start=3), random_matching(n, generator=gen)]
    scales = [torch.rand(r.i.numel(), generator=gen) + 0.5 if scaled else None for r in rounds]
    step, betas = 0.05, (0.8, 0.99)
    x, m, st = run_fused(x0, g, m0, rounds, step, state, betas, 1e-8, scales, update)
    xr, mr, rsr, cr, mxr = dense_reference(
        x0, g, m0, rounds, step, state, betas, 1e-8, scales, update
    )
    xl, ml, stl = run_loop(x0, g, m0, rounds, step, state, betas, 1e-8, scales, update)
    tol = 1e-12 if dtype == torch.float64 else 3e-5
    for got, ref, loop in [
        (x, xr, xl),
        (m, mr, ml),
        (st["row_sq"], rsr, stl["row_sq"]),
        (st["row_count"], cr, stl["row_count"]),
    ]:
        assert torch.allclose(got.double(), ref, atol=tol, rtol=tol)
        assert torch.allclose(got, loop, atol=tol, rtol=tol)
    if amsgrad:
        assert torch.allclose(st["max_row_sq"].double(), mxr, atol=tol, rtol=tol)
        assert torch.allclose(st["max_row_sq"], stl["max_row_sq"], atol=tol, rtol=tol)
    assert torch.equal(st["row_count"], stl["row_count"])  # integers: exact on both paths


@NATIVE
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("beta2", [0.5, 0.999])
def test_fused_equals_loop_bitwise_where_the_arithmetic_is_the_same(
    monkeypatch, dtype, amsgrad, beta2
):
    """The kernel does the row-state arithmetic in the loop's order and rounding (products rounded
    before the sum, torch.lerp_'s fused form for the moment), so the results agree bit for bit — once
    the loop's square root is correctly rounded: torch's CPU sqrt may go through a vector math library
    that is not (1 ulp off), while the kernel's sqrt is IEEE."""
    monkeypatch.setattr(torch.Tensor, "sqrt", lambda t: torch.from_numpy(np.sqrt(t.numpy())))
    for seed in range(4):
        x0, g, m0, state = make_problem(37, 9, (), dtype, amsgrad, seed=seed)
        rounds = [
            *round_robin_rounds(37, 5),
            random_matching(37, generator=torch.Generator().manual_seed(seed)),
        ]
        fused = run_fused(x0, g, m0, rounds, 0.05, state, (0.9, beta2))
        loop = run_loop(x0, g, m0, rounds, 0.05, state, (0.9, beta2))
        assert torch.equal(fused[0], loop[0]) and torch.equal(fused[1], loop[1])
        for key in state:
            assert torch.equal(fused[2][key], loop[2][key]), key


def test_torch_path_equals_dense_reference(monkeypatch):
    """Without the native kernel (other devices, half precision) the loop runs on torch primitives."""
    x0, g, m0, state = make_problem(20, 6, (), torch.float64, amsgrad=True)
    rounds = round_robin_rounds(20, 6)
    ref = dense_reference(x0, g, m0, rounds, 0.05, state, (0.9, 0.999), 1e-8, [None] * 6, True)
    monkeypatch.setattr(_native, "get_lib", lambda: None)
    x, m, st = run_fused(x0, g, m0, rounds, 0.05, state)
    assert torch.allclose(x, ref[0], atol=1e-12) and torch.allclose(m, ref[1], atol=1e-12)
    assert torch.allclose(st["row_sq"], ref[2], atol=1e-12)


@NATIVE
@pytest.mark.parametrize("batch", [(), (2,)])
def test_identical_bits_across_layouts(batch):
    """Every layout of weight, gradient and moment (column-major through the kernel's tiles of 16 rows:
    n = 37 has a partial tile; batched column-major and sliced ones through one copy) gives the same bits
    as row-major, and keeps its strides; non-contiguous row state too."""
    x0, g0, m0, state = make_problem(37, 9, batch, torch.float32, amsgrad=True)
    rounds = [
        *round_robin_rounds(37, 5),
        random_matching(37, generator=torch.Generator().manual_seed(0)),
    ]
    ref = run_fused(x0, g0, m0, rounds, 0.05, state)
    for lx in ("row", "col", "sliced", "padded"):
        for lg in ("row", "col", "sliced"):
            for lm in ("row", "col"):
                x, g, m = with_layout(x0, lx), with_layout(g0, lg), with_layout(m0, lm)
                strides = (x.stride(), g.stride(), m.stride())
                st = {key: v.clone() for key, v in state.items()}
                givens_adam_steps_(
                    x, g, m, rounds, 0.05, row_sq=st["row_sq"], row_count=st["row_count"],
                    max_row_sq=st["max_row_sq"],
                )  # fmt: skip
                assert (x.stride(), g.stride(), m.stride()) == strides
                assert torch.equal(x, ref[0]) and torch.equal(m, ref[1]), (lx, lg, lm)
                assert all(torch.equal(st[key], ref[2][key]) for key in st)
    # row state that is not contiguous (e.g. a strided view into a larger buffer)
    wide = torch.zeros(*batch, 37, 2, dtype=torch.float32)
    wide[..., 0] = state["row_sq"]
    rs = wide[..., 0]
    x, m = x0.clone(), m0.clone()
    mx = state["max_row_sq"].clone()
    count = state["row_count"].clone()
    givens_adam_steps_(x, g0, m, rounds, 0.05, row_sq=rs, row_count=count, max_row_sq=mx)
    assert torch.equal(x, ref[0]) and torch.equal(rs, ref[2]["row_sq"])


@NATIVE
def test_wide_weight_through_its_transpose():
    """A wide weight (k, n) stored row-major, rotated through .mT (the optimizer's wide case)."""
    k, n = 5, 40
    x0, g0, m0, state = make_problem(n, k, (), torch.float64)
    rounds = round_robin_rounds(n, 8)
    ref = dense_reference(x0, g0, m0, rounds, 0.1, state, (0.9, 0.999), 1e-8, [None] * 8, True)
    w, gw, mw = x0.mT.contiguous(), g0.mT.contiguous(), m0.mT.contiguous()
    st = {key: v.clone() for key, v in state.items()}
    givens_adam_steps_(
        w.mT, gw.mT, mw.mT, rounds, 0.1, row_sq=st["row_sq"], row_count=st["row_count"]
    )
    assert torch.allclose(w.mT, ref[0], atol=1e-12) and torch.allclose(mw.mT, ref[1], atol=1e-12)


@NATIVE
def test_thread_counts_give_the_same_bits():
    """Above the kernel's parallel threshold, any thread count and interleaving give the same bits."""
    n, k = 256, 64
    x0, g, m0, state = make_problem(n, k, (), torch.float32, amsgrad=True)
    rounds = round_robin_rounds(n, 8, start=7)

    def run(lay):
        x, m = with_layout(x0, lay), with_layout(m0, lay)
        st = {key: v.clone() for key, v in state.items()}
        givens_adam_steps_(
            x, g, m, rounds, 0.01, row_sq=st["row_sq"], row_count=st["row_count"],
            max_row_sq=st["max_row_sq"],
        )  # fmt: skip
        return x.contiguous(), m.contiguous(), st["row_sq"], st["max_row_sq"]

    results = per_thread_count_and_layout(run)
    for got in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(got, results[0]))


@pytest.mark.parametrize("path", ["native", "torch"])
def test_rows_outside_every_matching(monkeypatch, path):
    """Rows no matching touches keep x, their second moments and counts; their moment still gets the
    update (odd n: one row sits out of each round; plus a partial matching)."""
    if path == "torch":
        monkeypatch.setattr(_native, "get_lib", lambda: None)
    elif _native.get_lib() is None:
        pytest.skip("native kernel unavailable")
    n, k = 9, 4
    x0, g, m0, state = make_problem(n, k, (), torch.float64, amsgrad=True)
    rounds = [(torch.tensor([0, 2]), torch.tensor([1, 3])), (torch.tensor([1]), torch.tensor([2]))]
    x, m, st = run_fused(x0, g, m0, rounds, 0.2, state, (0.9, 0.999))
    untouched = [4, 5, 6, 7, 8]
    assert torch.equal(x[untouched], x0[untouched])
    for key in state:
        assert torch.equal(st[key][untouched], state[key][untouched]), key
    assert torch.allclose(m[untouched], (0.9 * m0 + 0.1 * g)[untouched], atol=1e-15)
    assert torch.equal(st["row_count"][:4], state["row_count"][:4] + torch.tensor([1.0, 2, 2, 1]))
    assert not torch.equal(x[:4], x0[:4])


@NATIVE
def test_orthogonality_and_determinant_preserved():
    n = 24
    gen = torch.Generator().manual_seed(3)
    x = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=gen))[0].contiguous()
    det0 = torch.linalg.det(x)
    m = torch.zeros_like(x)
    rs, count = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    for t in range(1, 41):
        g = torch.randn(n, n, dtype=torch.float64, generator=gen)
        rounds = round_robin_rounds(n, 16, start=16 * t)
        givens_adam_steps_(x, g, m, rounds, 0.05 / (1 - 0.9**t), row_sq=rs, row_count=count)
    eye = torch.eye(n, dtype=torch.float64)
    assert float((x.mT @ x - eye).norm()) < 1e-12
    assert torch.allclose(torch.linalg.det(x), det0, atol=1e-12)
    assert torch.equal(count, torch.full((n,), 640.0))


@pytest.mark.parametrize("path", ["native", "torch"])
def test_bad_inputs_raise_and_write_nothing(monkeypatch, path):
    if path == "torch":
        monkeypatch.setattr(_native, "get_lib", lambda: None)
    elif _native.get_lib() is None:
        pytest.skip("native kernel unavailable")
    x, g, m, state = make_problem(6, 3, (), torch.float64, amsgrad=True)
    rs, cnt, mx = state["row_sq"], state["row_count"], state["max_row_sq"]
    good = [(torch.tensor([0, 2]), torch.tensor([1, 3]))]

    def call(**kw):
        args = {"row_sq": rs, "row_count": cnt, "max_row_sq": mx, **kw}
        return givens_adam_steps_(
            args.pop("x", x), args.pop("g", g), args.pop("m", m), args.pop("rounds", good),
            args.pop("step", 0.1), **args,
        )  # fmt: skip

    with pytest.raises(ValueError, match=r"`row_sq` must have shape \(6,\)"):
        call(row_sq=torch.zeros(5, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"`row_sq` must have dtype torch\.float64"):
        call(row_sq=torch.zeros(6))
    with pytest.raises(TypeError, match="`row_count` must be a tensor"):
        call(row_count=[0] * 6)
    with pytest.raises(ValueError, match=r"`max_row_sq` must have shape"):
        call(max_row_sq=torch.zeros(2, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match="`row_sq` has internally overlapping memory"):
        call(row_sq=torch.zeros(1, dtype=torch.float64).expand(6))
    with pytest.raises(ValueError, match="must not alias"):
        call(m=g)
    with pytest.raises(TypeError, match="`exp_avg` must have the dtype"):
        call(m=torch.zeros(6, 3))
    with pytest.raises(ValueError, match=r"`betas\[1\]` must be < 1"):
        call(betas=(0.9, 1.0))
    with pytest.raises(TypeError, match="`betas` must be a pair"):
        call(betas=0.9)
    with pytest.raises(ValueError, match="`eps` must be >= 0"):
        call(eps=-1.0)
    with pytest.raises(ValueError, match="`step_size` must be finite"):
        call(step=math.nan)
    with pytest.raises(TypeError, match="`update_moment` must be a bool"):
        call(update_moment=1)
    saved = [t.clone() for t in (x, m, rs, cnt, mx)]
    # a later round that is not a matching: refused before anything (even the moment) is written
    with pytest.raises(ValueError, match=r"rounds\[1\]"):
        call(rounds=[good[0], (torch.tensor([0, 1]), torch.tensor([1, 2]))], check=True)
    with pytest.raises(IndexError, match=r"\[0, 6\)"):
        call(rounds=[good[0], (torch.tensor([0, 7]), torch.tensor([1, 2]))], check=False)
    for before, after in zip(saved, (x, m, rs, cnt, mx)):
        assert torch.equal(before, after)


# ----------------------------------------------------------------------------------------------------
# inside the optimizer


def _model_step(opt_kwargs, steps, seed=0, wide=False, dtype=torch.float32, batch=()):
    gen = torch.Generator().manual_seed(seed)
    n, k = (16, 11) if wide else (16, 16)  # wide: (11, 16), not tall enough for another route
    x = torch.linalg.qr(torch.randn(*batch, n, k, dtype=torch.float64, generator=gen))[0]
    p = torch.nn.Parameter((x.mT if wide else x).contiguous().to(dtype))
    target = torch.randn(p.shape, generator=gen).to(dtype)
    opt = OrthogonalAdam([{"params": [p], "manifold": "stiefel"}], **opt_kwargs)
    for _ in range(steps):
        opt.zero_grad()
        ((p - target) ** 2).sum().backward()
        opt.step()
    return p.detach(), opt, target


@pytest.mark.parametrize(
    "kwargs",
    [
        {"lr": 1e-2},
        {"lr": 1e-2, "amsgrad": True, "maximize": True},
        {"lr": 1e-2, "sampler": "random", "unbiased": True, "matchings_per_step": 3},
        {"lr": 1e-2, "sampler": "greedy", "matchings_per_step": 2},
        {"lr": 1e-2, "wide": True},
        {"lr": 1e-2, "batch": (2,)},
    ],
)
def test_optimizer_fused_step_equals_the_torch_loop(monkeypatch, kwargs):
    """OrthogonalAdam (fused kernel) against the same optimizer on the torch path (the loop)."""
    if _native.get_lib() is None:
        pytest.skip("native kernel unavailable")
    kwargs = dict(kwargs)
    wide, batch = kwargs.pop("wide", False), kwargs.pop("batch", ())
    fused, opt, _ = _model_step(kwargs, 12, wide=wide, dtype=torch.float64, batch=batch)
    monkeypatch.setattr(_native, "get_lib", lambda: None)
    loop, _, _ = _model_step(kwargs, 12, wide=wide, dtype=torch.float64, batch=batch)
    assert torch.allclose(fused, loop, atol=1e-12, rtol=0)
    assert set(opt.state[opt.param_groups[0]["params"][0]]) <= {
        "step", "exp_avg", "row_sq", "row_count", "max_row_sq",
    }  # fmt: skip


def test_state_dict_round_trip_unchanged():
    """Same state keys, shapes and dtypes as before the fused step; a resumed run is bit-identical."""
    p_ref, _, _ = _model_step({"lr": 1e-2, "amsgrad": True}, 10)
    p, opt, target = _model_step({"lr": 1e-2, "amsgrad": True}, 5)
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "p": p.clone()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    state = saved["opt"]["state"][0]
    assert set(state) == {"step", "exp_avg", "row_sq", "row_count", "max_row_sq"}
    assert state["row_sq"].shape == (16,) and state["row_count"].dtype == torch.float32
    assert float(state["row_count"].sum()) == 5 * 16 * 16  # 16 matchings x 16 rows per step
    q = torch.nn.Parameter(saved["p"].clone())
    other = OrthogonalAdam([{"params": [q], "manifold": "stiefel"}], lr=1e-2, amsgrad=True)
    other.load_state_dict(saved["opt"])
    for _ in range(5):
        other.zero_grad()
        ((q - target) ** 2).sum().backward()
        other.step()
    assert torch.equal(q.detach(), p_ref)


def test_half_precision_takes_the_loop_with_float32_state():
    p, opt, _ = _model_step({"lr": 1e-2, "stabilize": 5}, 6, dtype=torch.bfloat16)
    state = opt.state[opt.param_groups[0]["params"][0]]
    assert state["row_sq"].dtype == torch.float32 and state["exp_avg"].dtype == torch.bfloat16
    x = p.float()
    assert float((x.mT @ x - torch.eye(16)).norm()) < 0.1
