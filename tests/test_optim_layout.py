"""Memory layout of constrained weights in the optimizers (issue 12 §1).

At its first step each constrained weight is stored so that the rows of its tall view are contiguous
(the fused kernel walks rows); its gradient and moments follow. These tests pin that the iterates do not
depend on the layout the user passes (bitwise where the arithmetic is the same), that values, shapes and
the Parameter object are kept, that the state follows the weight across ``state_dict`` round trips and
that autograd then delivers gradients in the weight's strides. Timings live in
``benchmarks/givens_step.py``, never here.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable

import pytest
import torch
from torch import nn

from orthotorch.optim import OrthogonalAdam, OrthogonalSGD

N, K, STEPS = 24, 6, 6

CONFIGS: dict[str, tuple[type, dict[str, object]]] = {
    "sgd_momentum": (OrthogonalSGD, {"lr": 0.05, "momentum": 0.9}),
    "sgd_nesterov": (OrthogonalSGD, {"lr": 0.05, "momentum": 0.9, "nesterov": True}),
    "adam": (OrthogonalAdam, {"lr": 1e-2}),
}
STATE_KEY = {OrthogonalSGD: "momentum_buffer", OrthogonalAdam: "exp_avg"}
# the Givens step on every shape (tall weights may otherwise be routed to another step, optim/_tall.py)
GIVENS = (
    {"tall_step": "givens"} if "tall_step" in inspect.signature(OrthogonalSGD).parameters else {}
)


def _group(p: torch.Tensor, manifold: str = "stiefel") -> list[dict[str, object]]:
    return [{"params": [p], "manifold": manifold, **GIVENS}]


def _tall0(batch: tuple[int, ...] = (), dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A row-major (contiguous) orthonormal ``(*batch, N, K)``."""
    gen = torch.Generator().manual_seed(1)
    q = torch.linalg.qr(torch.randn(*batch, N, K, generator=gen, dtype=torch.float64))[0]
    return q.to(dtype).contiguous()


def _loss(tall: torch.Tensor) -> torch.Tensor:
    """Elementwise in the tall view: its gradient has the same values in every layout."""
    gen = torch.Generator().manual_seed(2)
    target = torch.randn(tall.shape, generator=gen, dtype=torch.float64).to(tall.dtype)
    weight = torch.randn(tall.shape, generator=gen, dtype=torch.float64).to(tall.dtype)
    return 0.5 * ((tall - target) ** 2).sum() + (weight * tall.sin()).sum()


def _col(t: torch.Tensor) -> torch.Tensor:
    """``t`` stored column-major (last two dims)."""
    return t.mT.contiguous().mT


def _make(
    layout: str, x0: torch.Tensor
) -> tuple[nn.Parameter, Callable[[torch.Tensor], torch.Tensor]]:
    """A parameter holding the tall point ``x0`` in ``layout``, and the map from it to its tall view."""
    same: Callable[[torch.Tensor], torch.Tensor] = lambda t: t  # noqa: E731
    mt: Callable[[torch.Tensor], torch.Tensor] = lambda t: t.mT  # noqa: E731
    if layout == "contiguous":
        assert x0.is_contiguous()
        return nn.Parameter(x0.clone()), same
    if layout == "transposed":  # what torch.linalg.qr returns
        return nn.Parameter(_col(x0)), same
    if layout == "sliced":  # rows of a wider tensor: not dense, left in place
        big = torch.zeros(*x0.shape[:-1], K + 3, dtype=x0.dtype)
        big[..., :K] = x0
        return nn.Parameter(big[..., :K]), same
    if layout == "sliced_transposed":  # a column-major slice: not dense, left in place
        big = torch.zeros(K, N + 3, dtype=x0.dtype)
        big[:, :N] = x0.mT
        return nn.Parameter(big[:, :N].mT), same
    if layout == "batched":  # (3, N, K) with the batch dimension innermost
        p = torch.empty(K, N, 3, dtype=x0.dtype).permute(2, 1, 0)
        return nn.Parameter(p.copy_(x0)), same
    if layout == "wide":  # nn.Linear(in=N, out=K) storage: (K, N) row-major
        return nn.Parameter(x0.mT.contiguous()), mt
    if layout == "wide_batched":
        return nn.Parameter(x0.mT.contiguous()), mt
    raise ValueError(layout)


BATCH = {"batched": (3,), "wide_batched": (2,)}


def _run(
    cls: type,
    kwargs: dict[str, object],
    p: nn.Parameter,
    tall: Callable[[torch.Tensor], torch.Tensor],
    steps: int = STEPS,
) -> list[torch.Tensor]:
    opt = cls(_group(p), **kwargs)
    out = []
    for _ in range(steps):
        opt.zero_grad()
        _loss(tall(p)).backward()
        opt.step()
        out.append(tall(p).detach().clone())
    return out


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize(
    "layout",
    ["transposed", "sliced", "sliced_transposed", "batched", "wide", "wide_batched"],
)
def test_iterates_do_not_depend_on_the_layout(config, layout):
    cls, kwargs = CONFIGS[config]
    x0 = _tall0(BATCH.get(layout, ()))
    ref = _run(cls, kwargs, *_make("contiguous", x0))
    p, tall = _make(layout, x0)
    ptr, shape = p.data_ptr(), p.shape
    got = _run(cls, kwargs, p, tall)
    assert p.shape == shape
    for step, (a, b) in enumerate(zip(got, ref)):
        # the same per-row arithmetic in every layout (the kernel's tiles for the column-major slice
        # included), and elementwise gradients: equal to the last bit
        assert torch.equal(a, b), f"step {step}: max diff {(a - b).abs().max():.3g}"
    if layout.startswith("sliced"):
        # a view of a bigger tensor keeps its storage: the bigger tensor sees every update
        assert p.data_ptr() == ptr
        assert p._base is None and p.untyped_storage().nbytes() > p.numel() * p.element_size()
    else:
        assert tall(p).is_contiguous()


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("layout", ["transposed", "wide", "batched"])
def test_relayout_keeps_values_shape_object_and_moves_grad_and_state(config, layout):
    cls, kwargs = CONFIGS[config]
    x0 = _tall0(BATCH.get(layout, ()))
    p, tall = _make(layout, x0)
    module = nn.Module()
    module.weight = p
    values, shape = p.detach().clone(), p.shape
    gen = torch.Generator().manual_seed(3)
    grad = torch.randn(p.shape, generator=gen, dtype=p.dtype).as_strided(p.shape, p.stride())
    grad_values = grad.clone()
    p.grad = grad
    opt = cls(_group(p), **{**kwargs, "lr": 0.0})
    opt.step()  # lr = 0: the step rotates by angle 0, so only the layout may change
    assert module.weight is p and p.shape == shape
    assert torch.equal(p.detach(), values)
    assert tall(p).is_contiguous() and not tall(values).is_contiguous()
    assert p.grad.stride() == p.stride() and torch.equal(p.grad, grad_values)
    state = opt.state[p][STATE_KEY[cls]]
    assert state.stride() == p.stride()
    # one re-layout: later steps work in place on the same storage
    ptr = p.data_ptr()
    for _ in range(2):
        opt.step()
    assert p.data_ptr() == ptr and opt.state[p][STATE_KEY[cls]].stride() == p.stride()


@pytest.mark.parametrize("config", list(CONFIGS))
def test_gradients_follow_the_relaid_layout_after_backward(config):
    cls, kwargs = CONFIGS[config]
    torch.manual_seed(0)
    layer = nn.Linear(N, K, bias=False, dtype=torch.float64)  # wide: rotated through weight.mT
    with torch.no_grad():
        layer.weight.copy_(_tall0().mT)
    p = layer.weight
    assert p.is_contiguous()
    opt = cls(_group(p), **kwargs)
    inp = torch.randn(5, N, dtype=torch.float64)
    layer(inp).square().sum().backward()
    opt.step()
    assert p.mT.is_contiguous() and not p.is_contiguous()
    opt.zero_grad()  # set_to_none: autograd creates the next grad in p's strides
    layer(inp).square().sum().backward()
    assert p.grad.stride() == p.stride()
    # an existing grad (set_to_none=False) was converted at the first step and is accumulated into
    opt.zero_grad(set_to_none=False)
    layer(inp).square().sum().backward()
    assert p.grad.stride() == p.stride()
    expected = torch.func.grad(lambda w: (inp @ w.mT).square().sum())(p.detach().clone())
    torch.testing.assert_close(p.grad, expected, rtol=1e-12, atol=1e-12)


def test_square_weight_from_qr_is_made_row_major_and_autograd_follows():
    q = torch.linalg.qr(torch.randn(16, 16, dtype=torch.float64))[0]
    assert not q.is_contiguous()  # the trap: column-major
    p = nn.Parameter(q)
    a = torch.randn(16, 16, dtype=torch.float64)
    opt = OrthogonalSGD(_group(p, "orthogonal"), lr=1e-2, momentum=0.9)
    for _ in range(3):
        opt.zero_grad()
        (a @ p).square().sum().backward()
        opt.step()
        assert p.is_contiguous() and p.grad.is_contiguous()
        assert opt.state[p]["momentum_buffer"].is_contiguous()


@pytest.mark.parametrize("config", list(CONFIGS))
def test_state_dict_round_trip_after_relayout(config):
    cls, kwargs = CONFIGS[config]
    key = STATE_KEY[cls]
    x0 = _tall0()

    def steps(opt, p, count):
        out = []
        for _ in range(count):
            opt.zero_grad()
            _loss(p.mT).backward()
            opt.step()
            out.append(p.mT.detach().clone())
        return out

    p = nn.Parameter(x0.mT.contiguous())  # wide, row-major: re-laid out at the first step
    opt = cls(_group(p), **kwargs)
    steps(opt, p, 3)
    saved = copy.deepcopy(opt.state_dict())
    snapshot = p.detach().clone()
    assert saved["state"][0][key].stride() == p.stride()
    ref = steps(opt, p, 3)

    # into a weight stored as nn.Linear stores it (row-major): the loaded moment is column-major
    q = nn.Parameter(snapshot.contiguous())
    opt2 = cls(_group(q), **kwargs)
    opt2.load_state_dict(copy.deepcopy(saved))
    got = steps(opt2, q, 3)
    assert q.stride() == p.stride() and opt2.state[q][key].stride() == q.stride()
    for a, b in zip(got, ref):
        assert torch.equal(a, b)

    # into an already re-laid-out weight, with the moment saved in another layout
    r = nn.Parameter(snapshot.clone())
    opt3 = cls(_group(r), **kwargs)
    other = copy.deepcopy(saved)
    other["state"][0][key] = other["state"][0][key].contiguous()
    opt3.load_state_dict(other)
    got = steps(opt3, r, 3)
    assert opt3.state[r][key].stride() == r.stride()
    for a, b in zip(got, ref):
        assert torch.equal(a, b)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_a_gradient_set_by_hand_in_another_layout_every_step(config):
    cls, kwargs = CONFIGS[config]
    x0 = _tall0()
    gen = torch.Generator().manual_seed(4)
    grads = [torch.randn(N, K, generator=gen, dtype=torch.float64) for _ in range(STEPS)]

    def run(p, as_layout):
        opt = cls(_group(p), **kwargs)
        out = []
        for g in grads:
            p.grad = as_layout(g)
            opt.step()
            out.append(p.detach().clone())
        return opt, out

    _, ref = run(nn.Parameter(x0.clone()), lambda g: g.clone())
    p = nn.Parameter(x0.clone())
    opt, got = run(p, _col)  # x row-major, every gradient column-major
    assert p.is_contiguous() and opt.state[p][STATE_KEY[cls]].is_contiguous()
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_a_parameter_sharing_its_storage_is_left_in_place():
    # dense column-major, but its storage holds more than the parameter: another tensor sees it
    flat = torch.zeros(N * K + 5, dtype=torch.float64)
    view = flat[: N * K].view(K, N).mT
    view.copy_(_tall0())
    p = nn.Parameter(view)
    ptr = p.data_ptr()
    ref = _run(OrthogonalSGD, CONFIGS["sgd_momentum"][1], *_make("contiguous", _tall0()))
    got = _run(OrthogonalSGD, CONFIGS["sgd_momentum"][1], p, lambda t: t)
    assert p.data_ptr() == ptr and p.stride() == (1, N)
    assert torch.equal(flat[: N * K].view(K, N).mT, p.detach())
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_relayout_in_half_and_single_precision(dtype):
    x0 = _tall0(dtype=dtype)
    kwargs = {"lr": 0.05, "momentum": 0.9}
    ref = _run(OrthogonalSGD, kwargs, nn.Parameter(x0.clone()), lambda t: t)
    p = nn.Parameter(_col(x0))
    got = _run(OrthogonalSGD, kwargs, p, lambda t: t)
    assert p.is_contiguous() and p.dtype == dtype
    for a, b in zip(got, ref):
        assert torch.equal(a, b)


def test_a_failed_first_step_leaves_the_layout():
    p = nn.Parameter(_col(torch.randn(N, K, dtype=torch.float64)))  # not on the manifold
    p.grad = torch.ones_like(p)
    opt = OrthogonalSGD(_group(p), lr=0.1)
    stride = p.stride()
    with pytest.raises(ValueError, match="not on the Stiefel manifold"):
        opt.step()
    assert p.stride() == stride


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import os

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {}
        for bucket_view in (False, True):
            for name, (cls, kwargs) in CONFIGS.items():
                torch.manual_seed(0)  # the same model on every rank
                model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 6))
                model[0].weight.data = torch.linalg.qr(torch.randn(16, 16))[0]  # column-major
                nn.init.orthogonal_(model[2].weight)  # wide, row-major: re-laid out
                ddp = nn.parallel.DistributedDataParallel(
                    model, gradient_as_bucket_view=bucket_view
                )
                constrained = [model[0].weight, model[2].weight]
                opt = cls(
                    [
                        {"params": constrained, "manifold": "stiefel", **GIVENS},
                        {"params": [model[0].bias, model[2].bias]},
                    ],
                    **kwargs,
                )
                data = torch.Generator().manual_seed(rank)  # different data on every rank
                for _ in range(30):
                    opt.zero_grad()
                    x, y = torch.randn(8, 16, generator=data), torch.randn(8, 6, generator=data)
                    nn.functional.mse_loss(ddp(x), y).backward()
                    opt.step()
                results[f"{name}-{bucket_view}"] = (
                    [p.detach().clone() for p in model.parameters()],
                    [(p.stride(), p.grad.stride()) for p in constrained],
                )
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_ranks_stay_identical_with_relaid_weights(tmp_path):
    import sys

    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available() or sys.platform == "win32":
        pytest.skip("gloo with a file:// rendezvous on Linux/macOS")
    mp.spawn(
        _ddp_worker, args=(2, str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2, join=True
    )
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    for key, (params, strides) in r0.items():
        assert all(torch.equal(a, b) for a, b in zip(params, r1[key][0])), key
        # DDP built its buckets before the re-layout; the gradients still follow the weights
        assert strides == [((16, 1), (16, 1)), ((1, 6), (1, 6))], key
