"""Pointwise nonlinearities of orthogonal RNNs: ``modrelu`` (learned bias), ``tanh``, ``relu``, ``identity``.

``modrelu(z) = sign(z) · relu(|z| + b)`` (Arjovsky et al. 2016; the real version used by expRNN): it keeps
the sign of each unit and shrinks or grows its magnitude by the learned bias ``b``; with ``b ≈ 0`` it is
close to the identity, which is what preserves the norm-preserving dynamics of an orthogonal recurrence.
"""

from __future__ import annotations

import torch
from torch import nn

from orthotorch._validation import check_generator, check_positive_int

__all__ = ["NONLINEARITIES", "ModReLU", "modrelu"]

#: Names accepted by the ``nonlinearity`` argument of the RNN modules.
NONLINEARITIES = ("modrelu", "tanh", "relu", "identity")


def modrelu(z: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``sign(z) · relu(|z| + bias)``; ``z`` ``(..., H)``, ``bias`` ``(H,)`` broadcast over the last dim."""
    return torch.sign(z) * torch.relu(z.abs() + bias)


class ModReLU(nn.Module):
    """ModReLU with a learned bias ``(features,)``, initialised ``U[−init_range, init_range]``.

    Args:
        features: number of units ``H``.
        init_range: half-width of the uniform bias init (expRNN: 0.01).
        generator: generator of the init (``None``: a fixed seed 0, never the global RNG).

    Shape: ``(..., H) → (..., H)``.
    """

    def __init__(
        self,
        features: int,
        *,
        init_range: float = 0.01,
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        features = check_positive_int("features", features)
        check_generator("generator", generator)
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        b = (torch.rand(features, generator=gen, dtype=torch.float64) * 2 - 1) * init_range
        self.bias = nn.Parameter(b.to(dtype or torch.get_default_dtype()).to(device))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return modrelu(z, self.bias)

    def extra_repr(self) -> str:
        return f"features={self.bias.shape[0]}"
