"""Long-running checks (`make test-slow`): convergence to high precision at moderate size and long float32
runs. Excluded from the default suite."""

import pytest
import torch

from conftest import orth_error
from orthotorch.optim import OrthogonalSGD

pytestmark = pytest.mark.slow


def _kabsch_so(a: torch.Tensor) -> torch.Tensor:
    """argmin_{Q ∈ SO(d)} ‖Q − A‖ (the independent reference), via SVD with a det fix."""
    u, _, vh = torch.linalg.svd(a)
    d = torch.ones(a.shape[0], dtype=a.dtype)
    d[-1] = torch.sign(torch.linalg.det(u @ vh))
    return u @ torch.diag(d) @ vh


@pytest.mark.parametrize("sampler", ["round_robin", "random"])
def test_defaults_solve_procrustes_d256_to_high_precision(sampler):
    """A = Q* S with Q* ∈ SO(d), S diagonal in [1, 2]: the nearest rotation (Kabsch) is Q*; the default
    optimizer must reach it to 1e-8 from a random rotation."""
    d = 256
    gen = torch.Generator().manual_seed(0)
    q_star = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=gen))[0]
    if torch.linalg.det(q_star) < 0:
        q_star[:, 0] = -q_star[:, 0]
    a = q_star @ torch.diag(1 + torch.rand(d, dtype=torch.float64, generator=gen))
    assert torch.allclose(_kabsch_so(a), q_star, atol=1e-10)
    x0 = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=gen))[0]
    if torch.linalg.det(x0) < 0:
        x0[:, 0] = -x0[:, 0]
    w = torch.nn.Parameter(x0)
    opt = OrthogonalSGD([{"params": [w], "manifold": "so"}], lr=0.3, sampler=sampler)
    for _ in range(3000):
        opt.zero_grad()
        loss = 0.5 * ((w - a) ** 2).sum()
        loss.backward()
        opt.step()
    assert (w.detach() - q_star).norm() < 1e-8
    assert orth_error(w.detach()) < 1e-11


def test_float32_long_run_with_stabilize_stays_orthogonal():
    """10⁵ noisy float32 steps: stabilize bounds the random-walk drift at the float32 floor."""
    d = 128
    gen = torch.Generator().manual_seed(1)
    w = torch.nn.Parameter(torch.linalg.qr(torch.randn(d, d, generator=gen))[0].contiguous())
    opt = OrthogonalSGD(
        [{"params": [w], "manifold": "orthogonal"}], lr=1e-2, matchings_per_step=1, stabilize=1000
    )
    for _ in range(100_000):
        w.grad = torch.randn(d, d, generator=gen)
        opt.step()
    assert orth_error(w.detach().double()) < 3e-5
