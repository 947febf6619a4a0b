"""Constrain linear layers to orthogonal / orthonormal weights with T-CWY and train them.

A wide ``nn.Linear(256, 32)`` (weight (32, 256): orthonormal rows, handled by transposing) and a square
``nn.Linear(32, 32)`` in SO(32) learn to recover a hidden orthonormal projection followed by a rotation.
Shows: registration, ``parametrize.cached()`` (the weight is built once per step even if used twice),
``renormalize_`` against the growth of the Householder vectors under SGD, and a state_dict round trip.

    python examples/parametrize_linear.py
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from orthotorch.parametrize import orthogonal, renormalize_


def orthonormal_rows(w: torch.Tensor) -> float:
    """max |W Wᵀ − I| for a wide weight."""
    return float((w @ w.mT - torch.eye(w.shape[0], dtype=w.dtype)).abs().max())


def main() -> None:
    g = torch.Generator().manual_seed(0)
    d_in, d_out = 256, 32
    hidden = torch.linalg.qr(torch.randn(d_in, d_out, generator=g))[
        0
    ].mT  # (32, 256), rows orthonormal
    rotation = torch.linalg.qr(torch.randn(d_out, d_out, generator=g))[0]

    torch.manual_seed(0)  # nn.Linear's own initialisation
    model = nn.Sequential(nn.Linear(d_in, d_out, bias=False), nn.Linear(d_out, d_out, bias=False))
    orthogonal(model[0], "weight", method="tcwy")  # St(256, 32), transposed
    orthogonal(model[1], "weight", method="tcwy", group="SO")  # SO(32)
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)

    for step in range(301):
        x = torch.randn(128, d_in, generator=g)
        y = x @ hidden.mT @ rotation.mT
        opt.zero_grad()
        with parametrize.cached():  # each constrained weight is computed once for this step
            loss = (model(x) - y).pow(2).mean()
            loss.backward()
        opt.step()
        if step % 100 == 0:
            renormalize_(model)  # unit Householder vectors: keeps the effective step size
            w0, w1 = model[0].weight.detach(), model[1].weight.detach()
            print(
                f"step {step:3d}  loss {loss.item():.3e}  |WWᵀ−I| {orthonormal_rows(w0):.1e}  "
                f"det W1 {torch.linalg.det(w1).item():+.6f}"
            )

    clone = nn.Sequential(nn.Linear(d_in, d_out, bias=False), nn.Linear(d_out, d_out, bias=False))
    orthogonal(clone[0], "weight", method="tcwy")
    orthogonal(clone[1], "weight", method="tcwy", group="SO")
    clone.load_state_dict(model.state_dict())
    diff = (clone[0].weight - model[0].weight).abs().max().item()
    print(f"state_dict round trip: max |ΔW| = {diff:.1e}")


if __name__ == "__main__":
    main()
