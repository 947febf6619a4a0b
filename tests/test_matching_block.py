"""``MatchingBlock``: the stacked form of m matchings that the optimizers pass to the fused steps.

Checked against the per-matching forms it replaces: ``RoundRobinSampler.sample_block`` against repeated
``sample`` calls, and ``givens_steps_`` / ``givens_adam_steps_`` on a block against the same matchings
given as a list (bit for bit, native kernel and torch path), plus its argument errors.
"""

from __future__ import annotations

import pytest
import torch

from orthotorch.graph_sampling import MatchingBlock, RoundRobinSampler
from orthotorch.manifolds import givens
from orthotorch.manifolds.givens import givens_adam_steps_, givens_steps_
from orthotorch.optim import OrthogonalAdam, OrthogonalSGD


@pytest.mark.parametrize("n", [2, 6, 7, 64, 257, 300])
@pytest.mark.parametrize("shuffle", [False, True])
def test_sample_block_equals_successive_samples(n: int, shuffle: bool) -> None:
    a, b = RoundRobinSampler(n, shuffle=shuffle), RoundRobinSampler(n, shuffle=shuffle)
    ga, gb = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for m in (1, 3, n, 2 * n + 1):  # within a cycle, up to its end, across cycle boundaries
        block = a.sample_block(m, ga)
        assert block.i.shape == block.j.shape == (m, n // 2)
        ref = [b.sample(gb) for _ in range(m)]
        for got, want in zip(block.matchings(), ref, strict=True):
            assert torch.equal(got.i, want.i) and torch.equal(got.j, want.j)
            assert torch.equal(got.prob, want.prob)
    assert a.position == b.position


def test_sample_block_returns_fresh_tensors() -> None:
    s = RoundRobinSampler(8)
    first = s.sample_block(3)
    first.i.fill_(0)  # must not corrupt the cached cycle
    s.position = 0
    again = s.sample_block(3)
    assert torch.equal(again.i, RoundRobinSampler(8).sample_block(3).i)


def _inputs(n: int, k: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    x = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=dtype))[0][:, :k].contiguous()
    g = torch.randn(n, k, generator=gen, dtype=dtype)
    b = torch.randn(n, k, generator=gen, dtype=dtype)
    return x, g, b


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", ["plain", "heavy_ball", "nesterov"])
@pytest.mark.parametrize("scaled", [False, True])
def test_steps_on_a_block_equal_steps_on_its_matchings(
    native: bool, dtype: torch.dtype, mode: str, scaled: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not native:
        monkeypatch.setattr(givens, "_use_native", lambda *t: False)
    x, g, b = _inputs(10, 6, dtype)
    block = RoundRobinSampler(10, shuffle=True).sample_block(4, torch.Generator().manual_seed(1))
    scales = torch.rand(4, 5, generator=torch.Generator().manual_seed(2)) if scaled else None
    out = []
    for rounds in (block, [(m.i, m.j) for m in block.matchings()]):
        xx, bb = x.clone(), b.clone()
        kw: dict[str, object] = {}
        if mode != "plain":
            kw = {"momentum_buffer": bb, "momentum": 0.9, "nesterov": mode == "nesterov"}
        sc = scales if scales is None or isinstance(rounds, MatchingBlock) else list(scales)
        givens_steps_(xx, g, rounds, 0.2, scales=sc, **kw)  # type: ignore[arg-type]
        out.append((xx, bb))
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])
    assert not torch.equal(out[0][0], x)


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_adam_steps_on_a_block_equal_steps_on_its_matchings(
    native: bool, amsgrad: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not native:
        monkeypatch.setattr(givens, "_use_native", lambda *t: False)
    x, g, m0 = _inputs(9, 4, torch.float64)
    block = RoundRobinSampler(9).sample_block(6)
    out = []
    for rounds in (block, block.matchings()):
        xx, mm = x.clone(), m0.clone()
        rs, rc = torch.zeros(9, dtype=torch.float64), torch.zeros(9, dtype=torch.float64)
        mx = torch.zeros(9, dtype=torch.float64) if amsgrad else None
        givens_adam_steps_(xx, g, mm, rounds, 0.05, row_sq=rs, row_count=rc, max_row_sq=mx)
        out.append((xx, mm, rs, rc))
    for a, b in zip(*out, strict=True):
        assert torch.equal(a, b)


def test_optimizers_take_the_block_path_and_match_the_list_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The optimizers' round-robin steps go through a block; forcing the per-matching list gives the
    same iterates (bit for bit), unbiased scales included."""
    from orthotorch.optim import _base

    def as_list(self, info, group, x, direction):  # type: ignore[no-untyped-def]
        mats = self._matchings(info, group, x, direction)
        return [(i, j) for i, j, _ in mats], [s for _, _, s in mats]

    def run(cls: type, force_list: bool, **kw: object) -> torch.Tensor:
        with monkeypatch.context() as mp:
            if force_list:
                mp.setattr(_base.GivensOptimizer, "_step_rounds", as_list)
            torch.manual_seed(0)
            p = torch.nn.Parameter(torch.linalg.qr(torch.randn(12, 12, dtype=torch.float64))[0])
            opt = cls([{"params": [p], "manifold": "orthogonal"}], lr=0.05, **kw)
            for _ in range(5):
                p.grad = torch.randn(12, 12, dtype=torch.float64)
                opt.step()
            return p.detach().clone()

    p = torch.nn.Parameter(torch.eye(12))
    opt = OrthogonalSGD([{"params": [p], "manifold": "orthogonal"}], lr=0.1)
    p.grad = torch.randn(12, 12)
    opt.step()
    rounds, scales = opt._step_rounds(opt._info[p], opt.param_groups[0], p.detach(), None)
    assert isinstance(rounds, MatchingBlock) and rounds.i.shape == (16, 6) and scales is None

    for cls, kw in (
        (OrthogonalSGD, {"momentum": 0.9}),
        (OrthogonalSGD, {"unbiased": True}),
        (OrthogonalAdam, {}),
    ):
        assert torch.equal(run(cls, False, **kw), run(cls, True, **kw)), (cls.__name__, kw)


def test_block_argument_errors() -> None:
    x, g = torch.eye(6), torch.randn(6, 6)
    one = torch.ones(3)
    with pytest.raises(TypeError, match=r"`rounds.i` must be an integer tensor"):
        givens_steps_(x, g, MatchingBlock(torch.zeros(1, 3), torch.zeros(1, 3), one), 0.1)
    with pytest.raises(ValueError, match=r"`rounds.j` must be 2-D \(m, P\)"):
        givens_steps_(x, g, MatchingBlock(torch.zeros(1, 3).long(), torch.arange(3), one), 0.1)
    with pytest.raises(ValueError, match="must have the same shape"):
        block = MatchingBlock(torch.tensor([[0, 1, 2]]), torch.tensor([[3, 4]]), one)
        givens_steps_(x, g, block, 0.1)
    with pytest.raises(ValueError, match=r"rounds\[1\] must be disjoint"):
        block = MatchingBlock(
            torch.tensor([[0, 1, 2], [0, 1, 1]]), torch.tensor([[3, 4, 5], [2, 3, 4]]), one
        )
        givens_steps_(x, g, block, 0.1)
    with pytest.raises(IndexError, match=r"must lie in \[0, 6\)"):
        givens_steps_(
            x, g, MatchingBlock(torch.tensor([[0, 1, 2]]), torch.tensor([[3, 4, 9]]), one), 0.1
        )
    with pytest.raises(
        ValueError, match=r"`scales` of a MatchingBlock must be None or an \(m, P\)"
    ):
        block = MatchingBlock(torch.tensor([[0, 1, 2]]), torch.tensor([[3, 4, 5]]), one)
        givens_steps_(x, g, block, 0.1, scales=torch.ones(3))
    before = x.clone()
    with pytest.raises(ValueError):
        block = MatchingBlock(
            torch.tensor([[0, 1], [0, 0]]), torch.tensor([[2, 3], [1, 2]]), one[:2]
        )
        givens_steps_(x, g, block, 0.1)
    assert torch.equal(x, before)  # nothing written
