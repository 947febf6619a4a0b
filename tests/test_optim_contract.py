"""The optimizer contract (issue 9 item 8), run over one table of optimizers and configurations, the way
torch tests every optimizer through its ``OptimizerInfo`` table.

Every configuration builds one optimizer over a model holding every kind of parameter the optimizers
route (square O(d), SO(d), tall and wide Stiefel, a geoopt SO(d) ``ManifoldParameter``, a weight marked
with ``_orthotorch_manifold``, a plain vector and matrix) and is checked for: bit-identical continuation
after a state_dict round trip, after deepcopy / pickle / torch.save of the optimizer itself; LR schedulers
(StepLR, OneCycleLR with momentum cycling) giving torch's own update on the plain parameters; step and
state-dict hooks; closures; maximize; zero_grad; and staying on the manifold. Small shapes: fast.
"""

from __future__ import annotations

import copy
import io
import pickle
from collections.abc import Callable
from typing import Any

import geoopt
import pytest
import torch

from conftest import orth_error
from orthotorch.manifolds import SpecialOrthogonalGroup
from orthotorch.optim import OrthogonalAdam, OrthogonalAdamW, OrthogonalSGD

# (id, class, our kwargs, torch reference class for the plain parameters)
CONFIGS: list[Any] = [
    ("sgd", OrthogonalSGD, {"lr": 0.05}, torch.optim.SGD),
    (
        "sgd-momentum",
        OrthogonalSGD,
        {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.01},
        torch.optim.SGD,
    ),
    (
        "sgd-nesterov",
        OrthogonalSGD,
        {"lr": 0.05, "momentum": 0.9, "nesterov": True},
        torch.optim.SGD,
    ),
    (
        "sgd-random",
        OrthogonalSGD,
        {
            "lr": 0.05,
            "momentum": 0.5,
            "dampening": 0.1,
            "sampler": "random",
            "matchings_per_step": 3,
        },
        torch.optim.SGD,
    ),
    (
        "sgd-shuffled-unbiased",
        OrthogonalSGD,
        {"lr": 0.01, "sampler": "round_robin_shuffled", "unbiased": True, "stabilize": 3},
        torch.optim.SGD,
    ),
    pytest.param(  # greedy forms the dense n×n generator and matches on the host: slow here
        (
            "sgd-greedy",
            OrthogonalSGD,
            {"lr": 0.05, "sampler": "greedy", "matchings_per_step": 2},
            torch.optim.SGD,
        ),
        marks=pytest.mark.slow,
        id="sgd-greedy",
    ),
    ("sgd-full", OrthogonalSGD, {"lr": 0.05, "momentum": 0.9, "sampler": "full"}, torch.optim.SGD),
    ("adam", OrthogonalAdam, {"lr": 1e-2}, torch.optim.Adam),
    (
        "adam-amsgrad-random",
        OrthogonalAdam,
        {
            "lr": 1e-2,
            "amsgrad": True,
            "weight_decay": 0.1,
            "sampler": "random",
            "matchings_per_step": 2,
        },
        torch.optim.Adam,
    ),
    (
        "adam-shuffled",
        OrthogonalAdam,
        {"lr": 1e-2, "sampler": "round_robin_shuffled"},
        torch.optim.Adam,
    ),
    ("adamw", OrthogonalAdamW, {"lr": 1e-2, "weight_decay": 0.1}, torch.optim.AdamW),
]
IDS = [c[0] if isinstance(c, tuple) else c.id for c in CONFIGS]
DTYPES = [torch.float32, torch.float64]
_OURS_ONLY = ("sampler", "matchings_per_step", "unbiased", "stabilize", "graph", "nonfinite")


def _orth(n: int, k: int, gen: torch.Generator, dtype: torch.dtype, det_positive: bool = True):
    q = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))[0]
    if det_positive and torch.linalg.det(q) < 0:
        q[0] = -q[0]
    return q[:, :k].contiguous().to(dtype)


class _Model:
    """Every parameter kind, built identically from a seed."""

    def __init__(self, dtype: torch.dtype, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.square = torch.nn.Parameter(_orth(6, 6, gen, dtype, det_positive=False))
        self.so = torch.nn.Parameter(_orth(5, 5, gen, dtype))
        self.tall = torch.nn.Parameter(_orth(7, 3, gen, dtype))
        self.wide = torch.nn.Parameter(_orth(8, 3, gen, dtype).mT.contiguous())
        self.geo = geoopt.ManifoldParameter(
            _orth(4, 4, gen, dtype), manifold=SpecialOrthogonalGroup(4)
        )
        self.marked = torch.nn.Parameter(_orth(6, 2, gen, dtype))
        self.marked._orthotorch_manifold = "stiefel"
        self.vec = torch.nn.Parameter(torch.randn(5, generator=gen, dtype=dtype))
        self.mat = torch.nn.Parameter(torch.randn(3, 4, generator=gen, dtype=dtype))

    @property
    def constrained(self) -> list[torch.Tensor]:
        return [self.square, self.so, self.tall, self.wide, self.geo, self.marked]

    @property
    def plain(self) -> list[torch.Tensor]:
        return [self.vec, self.mat]

    def groups(self) -> list[dict[str, Any]]:
        return [
            {"params": [self.square], "manifold": "orthogonal"},
            {"params": [self.so], "manifold": "so"},
            {"params": [self.tall, self.wide], "manifold": "stiefel"},
            {"params": [self.geo, self.marked]},
            {"params": self.plain},
        ]

    def all(self) -> list[torch.Tensor]:
        return self.constrained + self.plain

    def loss(self) -> torch.Tensor:
        total = torch.zeros((), dtype=self.vec.dtype)
        for i, p in enumerate(self.all()):
            w = torch.linspace(-1.0, 1.0, p.numel(), dtype=p.dtype).reshape(p.shape)
            total = total + ((p - (0.3 + 0.1 * i) * w) ** 2).sum() + 0.1 * (p**3).sum()
        return total


def _grads(params: list[torch.Tensor], seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)


def _kwargs(config) -> dict[str, Any]:
    return {"matchings_per_step": 2, **config[2]}  # few matchings: the contract, not convergence


def _make(config, dtype, seed: int = 0) -> tuple[_Model, torch.optim.Optimizer]:
    model = _Model(dtype, seed)
    return model, config[1](model.groups(), **_kwargs(config))


def _run(model: _Model, opt: torch.optim.Optimizer, start: int, stop: int) -> None:
    for s in range(start, stop):
        _grads(model.all(), s)
        opt.step()


def _same(a: _Model, b: _Model) -> bool:
    return all(torch.equal(x.detach(), y.detach()) for x, y in zip(a.all(), b.all()))


def _tol(dtype: torch.dtype) -> float:
    return 1e-4 if dtype == torch.float32 else 1e-10


@pytest.fixture(params=CONFIGS, ids=IDS)
def config(request):
    return request.param


@pytest.fixture(params=DTYPES, ids=["f32", "f64"])
def dtype(request):
    return request.param


def test_state_dict_round_trip_continues_bit_identically(config, dtype):
    model, opt = _make(config, dtype)
    _run(model, opt, 0, 3)
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "params": [p.detach().clone() for p in model.all()]}, buf)
    _run(model, opt, 3, 6)
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    other, other_opt = _make(config, dtype, seed=1)  # different weights, then overwritten
    with torch.no_grad():
        for p, v in zip(other.all(), saved["params"]):
            p.copy_(v)
    other_opt.load_state_dict(saved["opt"])
    _run(other, other_opt, 3, 6)
    assert _same(model, other)


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_copied_optimizer_then_step(config, dtype, how):
    model, opt = _make(config, dtype)
    _run(model, opt, 0, 2)
    if how == "deepcopy":
        other_opt = copy.deepcopy(opt)
    elif how == "pickle":
        other_opt = pickle.loads(pickle.dumps(opt))
    else:
        buf = io.BytesIO()
        torch.save(opt, buf)
        buf.seek(0)
        other_opt = torch.load(buf, weights_only=False)
    params = [p for g in other_opt.param_groups for p in g["params"]]
    originals = [p for g in opt.param_groups for p in g["params"]]
    _run(model, opt, 2, 5)
    for s in range(2, 5):
        _grads(params, s)
        other_opt.step()
    for a, b in zip(params, originals):
        assert torch.equal(a.detach(), b.detach())


def _reference(config, model: _Model) -> torch.optim.Optimizer:
    _, _, kwargs, ref_cls = config
    return ref_cls(model.plain, **{k: v for k, v in kwargs.items() if k not in _OURS_ONLY})


@pytest.mark.parametrize(
    "make_scheduler",
    [
        lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
        lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=8),
    ],
    ids=["StepLR", "OneCycleLR"],
)
def test_lr_schedulers_drive_every_group_like_torch(config, dtype, make_scheduler: Callable):
    model, opt = _make(config, dtype)
    ref_model = _Model(dtype)
    ref = _reference(config, ref_model)
    sched, ref_sched = make_scheduler(opt), make_scheduler(ref)
    cycles_momentum = isinstance(sched, torch.optim.lr_scheduler.OneCycleLR) and (
        ("momentum" in opt.defaults and config[2].get("momentum", 0) > 0) or "betas" in opt.defaults
    )
    seen_momenta = set()
    for s in range(8):
        _grads(model.all(), s)
        for a, b in zip(model.plain, ref_model.plain):
            b.grad = a.grad.clone()
        opt.step()
        ref.step()
        sched.step()
        ref_sched.step()
        for g in opt.param_groups:
            assert g["lr"] == ref.param_groups[0]["lr"]
        key = "momentum" if "momentum" in opt.defaults else "betas"
        seen_momenta.add(str(opt.param_groups[0][key]))
    for a, b in zip(model.plain, ref_model.plain):
        assert torch.equal(a, b)
    if cycles_momentum:
        assert len(seen_momenta) > 1  # the scheduler's momentum cycling reached our groups
    for p in model.constrained:
        assert orth_error(
            p.detach().double().mT if p is model.wide else p.detach().double()
        ) < _tol(dtype)


def test_step_and_state_dict_hooks(config, dtype):
    model, opt = _make(config, dtype)
    calls: list[str] = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    opt.register_state_dict_pre_hook(lambda o: calls.append("sd-pre"))
    opt.register_state_dict_post_hook(lambda o, sd: calls.append("sd-post:" + ",".join(sorted(sd))))
    opt.register_load_state_dict_pre_hook(
        lambda o, sd: calls.append("load-pre:" + ",".join(sorted(sd)))
    )
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load-post"))
    _run(model, opt, 0, 2)
    opt.load_state_dict(opt.state_dict())
    keys = "orthotorch,param_groups,state"
    assert calls == [
        "pre",
        "post",
        "pre",
        "post",
        "sd-pre",
        f"sd-post:{keys}",
        f"load-pre:{keys}",
        "load-post",
    ]


def test_closure_is_evaluated_with_grad_and_its_loss_returned(config, dtype):
    model, opt = _make(config, dtype)
    twin, twin_opt = _make(config, dtype)

    def closure():
        opt.zero_grad()
        loss = model.loss()
        loss.backward()
        return loss

    for _ in range(3):
        loss = opt.step(closure)
        twin_opt.zero_grad()
        expected = twin.loss()
        expected.backward()
        twin_opt.step()
        assert torch.equal(loss.detach(), expected.detach())
    assert _same(model, twin)


def test_maximize_equals_minimizing_the_negated_gradient(config, dtype):
    cls, kwargs = config[1], _kwargs(config)
    a, b = _Model(dtype), _Model(dtype)
    opt_max = cls(a.groups(), **kwargs, maximize=True)
    opt_min = cls(b.groups(), **kwargs)
    for s in range(4):
        _grads(a.all(), s)
        _grads(b.all(), s)
        for p in b.all():
            p.grad.neg_()
        opt_max.step()
        opt_min.step()
    assert _same(a, b)


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad(config, dtype, set_to_none):
    model, opt = _make(config, dtype)
    _run(model, opt, 0, 2)
    opt.zero_grad(set_to_none=set_to_none)
    for p in model.all():
        assert (p.grad is None) if set_to_none else torch.equal(p.grad, torch.zeros_like(p))
    if set_to_none:  # parameters without gradients are not touched
        before = [p.detach().clone() for p in model.all()]
        opt.step()
        assert all(torch.equal(p.detach(), b) for p, b in zip(model.all(), before))


def test_descends_and_stays_on_the_manifold(config, dtype):
    model, opt = _make(config, dtype)
    first = float(model.loss().detach())
    for _ in range(12):
        opt.zero_grad()
        model.loss().backward()
        opt.step()
    assert float(model.loss().detach()) < first
    for p in model.constrained:
        x = p.detach().double()
        assert orth_error(x.mT if p is model.wide else x) < _tol(dtype)
    assert torch.linalg.det(model.so.detach().double()) > 0
    assert torch.linalg.det(model.geo.detach().double()) > 0
