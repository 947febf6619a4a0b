"""Data-parallel identity: with DistributedDataParallel on 2 gloo processes, OrthogonalSGD/Adam keep the
parameters bit-identical across ranks for 100 steps, because every rank draws the same matchings from
the identically seeded default generator. A negative control (rank-dependent generators) must diverge."""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.distributed


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        from orthotorch.optim import OrthogonalAdam, OrthogonalSGD

        results = {}
        for name, cls, kwargs, own_gen in [
            ("sgd", OrthogonalSGD, {"lr": 0.05, "momentum": 0.9, "sampler": "random"}, False),
            (
                "adam",
                OrthogonalAdam,
                {"lr": 1e-2, "matchings_per_step": 2, "sampler": "random"},
                False,
            ),
            ("control", OrthogonalSGD, {"lr": 0.05, "sampler": "random"}, True),
        ]:
            torch.manual_seed(0)  # same initial model on every rank
            model = torch.nn.Sequential(
                torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 6)
            )
            torch.nn.init.orthogonal_(model[0].weight)
            torch.nn.init.orthogonal_(
                model[2].weight
            )  # wide (6, 16): rotated through its transpose
            ddp = torch.nn.parallel.DistributedDataParallel(model)
            constrained = [model[0].weight, model[2].weight]
            rest = [model[0].bias, model[2].bias]
            gen = torch.Generator().manual_seed(1000 + rank) if own_gen else None
            opt = cls(
                [{"params": constrained, "manifold": "stiefel"}, {"params": rest}],
                generator=gen,
                **kwargs,
            )
            data = torch.Generator().manual_seed(rank)  # different data on every rank
            for _ in range(100):
                x = torch.randn(8, 16, generator=data)
                y = torch.randn(8, 6, generator=data)
                opt.zero_grad()
                torch.nn.functional.mse_loss(ddp(x), y).backward()
                opt.step()
            results[name] = [p.detach().clone() for p in model.parameters()]
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
@pytest.mark.skipif(sys.platform == "win32", reason="file:// rendezvous with gloo on Linux/macOS")
def test_ddp_ranks_stay_bit_identical(tmp_path):
    init_file = str(tmp_path / "rendezvous")
    mp.spawn(_worker, args=(2, init_file, str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    for name in ("sgd", "adam"):
        for a, b in zip(r0[name], r1[name]):
            assert torch.equal(a, b), name
        w = r0[name][0]
        assert float((w.mT @ w - torch.eye(16)).abs().max()) < 1e-5
    # the negative control: different matchings per rank break the identity
    assert any(not torch.equal(a, b) for a, b in zip(r0["control"], r1["control"]))
