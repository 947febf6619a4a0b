import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic_global_seed():
    # Library code never touches the global RNG; tests seed it so that their own data is reproducible.
    torch.manual_seed(0)
    yield


def orth_error(x: torch.Tensor) -> float:
    """max over batch of ||XᵀX − I||_F for tall X (..., n, k)."""
    k = x.shape[-1]
    eye = torch.eye(k, dtype=x.dtype, device=x.device)
    return float((x.transpose(-1, -2) @ x - eye).flatten(-2).norm(dim=-1).max())
