"""Learn a hidden rotation from noisy minibatches with OrthogonalSGD (a copyable starting point).

A linear layer whose weight must stay orthogonal is trained on y = Q* x + noise. The weight is marked
orthogonal through its param group; the bias is an ordinary parameter and gets torch's SGD update. The
weight stays exactly orthogonal (up to float rounding) at every step, at a step cost close to plain SGD.

    python examples/orthogonal_procrustes.py [--dim 256] [--steps 1500]
"""

from __future__ import annotations

import argparse

import torch

from orthotorch.optim import OrthogonalSGD


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    d = args.dim

    data = torch.Generator().manual_seed(0)
    q_star = torch.linalg.qr(torch.randn(d, d, generator=data))[0]
    if torch.linalg.det(q_star) < 0:  # Givens rotations keep det(W): aim inside SO(d)
        q_star[:, 0] = -q_star[:, 0]

    layer = torch.nn.Linear(d, d)
    torch.nn.init.orthogonal_(layer.weight)  # must start on the manifold
    if torch.linalg.det(layer.weight.detach()) < 0:
        with torch.no_grad():
            layer.weight[0].neg_()

    opt = OrthogonalSGD(
        [
            {"params": [layer.weight], "manifold": "orthogonal"},  # rotated by Givens steps
            {"params": [layer.bias]},  # plain torch SGD update
        ],
        lr=0.05,
        momentum=0.9,  # momentum is the lever that matters most (docs/optim.md)
        matchings_per_step=16,  # 16 round-robin matchings per gradient: still O(d²) per step
        stabilize=1000,  # optional QR re-projection every 1000 steps
    )

    for step in range(1, args.steps + 1):
        x = torch.randn(args.batch, d, generator=data)
        y = x @ q_star.T + 0.01 * torch.randn(args.batch, d, generator=data)
        loss = 0.5 * ((layer(x) - y) ** 2).sum(dim=1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % (args.steps // 10) == 0 or step == 1:
            w = layer.weight.detach()
            dist = float((w - q_star).norm() ** 2 / (2 * d))
            orth = float((w.T @ w - torch.eye(d)).norm())
            print(
                f"step {step:5d}  loss {float(loss):9.4f}  ‖W − Q*‖²/2d {dist:.4f}  "
                f"‖WᵀW − I‖ {orth:.1e}"
            )


if __name__ == "__main__":
    main()
