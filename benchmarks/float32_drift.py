"""Float32 drift of ‖XᵀX − I‖ under many Givens matching steps, without re-projection.

Writes docs/benchmarks/float32_drift.md (``--quick``: fewer steps, the .quick.md file). Random gradients;
the learning rate is set from the first step so that the typical angle |θ| has the requested size.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import env_header, markdown_table, write_doc
from orthotorch.graph_sampling import random_matching
from orthotorch.manifolds import _native
from orthotorch.manifolds.givens import givens_step_, pair_coefficients


def orth_error(x: torch.Tensor) -> float:
    x = x.double()
    return float((x.mT @ x - torch.eye(x.shape[-1], dtype=torch.float64)).norm())


def drift(d: int, angle: float, steps: int, checkpoints: list[int]) -> list[float]:
    gen = torch.Generator().manual_seed(d)
    x = (
        torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=gen))[0]
        .float()
        .contiguous()
    )
    g = torch.randn(d, d, generator=gen)
    m = random_matching(d, generator=gen)
    lr = angle / float(pair_coefficients(x, g, m.i, m.j).abs().mean())
    out = []
    for s in range(1, steps + 1):
        g = torch.randn(d, d, generator=gen)
        m = random_matching(d, generator=gen)
        givens_step_(x, g, m.i, m.j, lr)
        if s in checkpoints:
            out.append(orth_error(x))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    steps = 2000 if args.quick else 10_000
    checkpoints = [1000, steps] if not args.quick else [500, steps]
    cases = [(64, 5e-2), (256, 5e-2), (1024, 5e-2), (256, 5e-4), (256, 5e-5)]
    rows = []
    for d, angle in cases:
        errs = drift(d, angle, steps, checkpoints)
        rows.append([d, f"{angle:g}", *errs])
        print(rows[-1], flush=True)
    headers = ["d", "typical |θ|", *[f"after {c} steps" for c in checkpoints]]
    table = markdown_table(headers, rows)
    body = (
        "# Float32 drift without re-projection\n\n"
        f"Produced by `python benchmarks/float32_drift.py{' --quick' if args.quick else ''}`. "
        "‖XᵀX − I‖_F of a d×d float32 weight after many single-matching steps with random gradients.\n\n"
        + env_header()
        + f"- native kernel: {_native.status()}\n\n"
        + table
        + "\n\nThe kernel applies each rotation in increment form, x ← x + ((c − 1)x + s·y) with "
        "c − 1 = −2 sin²(θ/2). The plain form c·x + s·y drifts linearly at small angles, because cos θ "
        "rounds to 1 in float32 for |θ| < 2.4e-4 and every rotation then scales its rows by √(1 + θ²): "
        "before this change the last two rows read 4.5e-4 and 7.9e-4 after 10⁴ steps. "
        "For long float32 runs `stabilize=N` still bounds the random-walk part.\n"
    )
    path = write_doc("float32_drift", body, quick=args.quick)
    print(table)
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
