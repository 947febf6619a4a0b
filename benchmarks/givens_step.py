"""One Givens matching step against plain SGD, a QR retraction and geoopt's RiemannianSGD.

Writes docs/benchmarks/givens_step.md (``--quick``: docs/benchmarks/givens_step.quick.md).

Every row times, on the same tensor shape in the same process:
- ``sgd``: ``torch.optim.SGD.step()`` (lr only), the floor any optimizer step is compared with;
- ``matching``: sample a uniform random perfect matching + the fused Givens step (coefficients and
  rotation, native kernel on CPU) — what ``OrthogonalSGD`` does per step;
- ``torch path``: the same step through the vectorised gather/scatter torch path (the fallback);
- ``qr``: Euclidean step then a QR retraction with sign fix (O(nk²));
- ``geoopt``: ``geoopt.optim.RiemannianSGD`` on ``geoopt.EuclideanStiefel`` (projection + QR retraction).
Times are medians of repeats; ratios are computed within the run.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import env_header, fmt, markdown_table, median_time, write_doc
from orthotorch.graph_sampling import random_matching
from orthotorch.manifolds import _native
from orthotorch.manifolds.givens import givens_step_


def bench_shape(n: int, k: int, *, repeats: int, slow_budget: float) -> dict[str, float]:
    gen = torch.Generator().manual_seed(0)
    x0 = torch.linalg.qr(torch.randn(n, k, generator=gen))[0].contiguous()
    grad = torch.randn(n, k, generator=gen) / math.sqrt(n * k)
    lr = 1e-3
    out: dict[str, float] = {}

    p = torch.nn.Parameter(x0.clone())
    p.grad = grad.clone()
    sgd = torch.optim.SGD([p], lr=lr)
    out["sgd"] = median_time(sgd.step, repeats=repeats)

    x = x0.clone()
    mgen = torch.Generator().manual_seed(1)

    def matching_step() -> None:
        m = random_matching(n, generator=mgen)
        givens_step_(x, grad, m.i, m.j, lr)

    out["matching"] = median_time(matching_step, repeats=repeats)

    lib = _native._state.get("lib")
    _native._state["lib"] = None  # force the torch path for this measurement
    try:
        out["torch_path"] = median_time(matching_step, repeats=repeats)
    finally:
        _native._state["lib"] = lib

    def qr_step() -> None:
        q, r = torch.linalg.qr(x0 - lr * grad)
        q * torch.sign(torch.diagonal(r)).unsqueeze(-2)

    slow_reps = max(3, repeats // 2)
    est = median_time(qr_step, repeats=1, warmup=0, min_time=0)
    out["qr"] = est if est > slow_budget else median_time(qr_step, repeats=slow_reps, warmup=1)

    import geoopt

    gp = geoopt.ManifoldParameter(x0.clone(), manifold=geoopt.EuclideanStiefel())
    gp.grad = grad.clone()
    ropt = geoopt.optim.RiemannianSGD([gp], lr=lr)
    est = median_time(ropt.step, repeats=1, warmup=0, min_time=0)
    out["geoopt"] = (
        est if est > slow_budget else median_time(ropt.step, repeats=slow_reps, warmup=1)
    )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, fewer repeats (≈1 minute)")
    ap.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)"
    )
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        squares, talls, repeats, budget = [256, 512, 1024, 2048], [(4096, 64)], 5, 0.5
    else:
        squares, talls, repeats, budget = (
            [256, 512, 1024, 2048, 4096],
            [(4096, 64), (16384, 256)],
            9,
            1.0,
        )

    print(env_header())
    print(f"native kernel: {_native.status()}\n")
    rows, results = [], {}
    for n, k in [(d, d) for d in squares] + talls:
        r = bench_shape(n, k, repeats=repeats, slow_budget=budget)
        results[(n, k)] = r
        row = [
            f"{n}×{k}",
            r["sgd"] * 1e3,
            r["matching"] * 1e3,
            r["torch_path"] * 1e3,
            r["qr"] * 1e3,
            r["geoopt"] * 1e3,
            r["matching"] / r["sgd"],
            r["torch_path"] / r["sgd"],
            r["geoopt"] / r["matching"],
            r["qr"] / r["matching"],
        ]
        rows.append(row)
        print(" | ".join(fmt(c) if isinstance(c, float) else c for c in row), flush=True)

    headers = [
        "shape n×k",
        "SGD ms",
        "matching ms",
        "torch path ms",
        "QR retr ms",
        "geoopt RSGD ms",
        "matching / SGD",
        "torch path / SGD",
        "geoopt / matching",
        "QR / matching",
    ]
    table = markdown_table(headers, rows)
    ds = [d for d in squares if d >= 512]
    slope = float("nan")
    if len(ds) >= 2:
        xs = torch.tensor([math.log(d) for d in ds])
        ys = torch.tensor([math.log(results[(d, d)]["matching"]) for d in ds])
        xs_c = xs - xs.mean()
        slope = float((xs_c * (ys - ys.mean())).sum() / (xs_c**2).sum())
    verdict = []
    if (2048, 2048) in results:
        r = results[(2048, 2048)]
        verdict.append(
            f"- d = 2048: matching step = {r['matching'] / r['sgd']:.2f}× plain SGD (target ≤ 5×), "
            f"{r['geoopt'] / r['matching']:.0f}× faster than geoopt RSGD (target ≥ 20×)."
        )
    verdict.append(
        f"- log-log slope of the matching step time over d = {ds[0]}…{ds[-1]}: {slope:.2f} (d² is 2; target ≤ 2.2)."
    )
    body = (
        "# Givens matching step vs SGD, QR retraction and geoopt\n\n"
        "Produced by `python benchmarks/givens_step.py"
        + (" --quick" if args.quick else "")
        + "`.\n"
        "One step on a float32 weight with a given gradient; median of repeats (ms). The matching step "
        "includes sampling the random perfect matching. Ratios are within this run.\n\n"
        + env_header()
        + f"- native kernel: {_native.status()}\n\n"
        + table
        + "\n\n"
        + "\n".join(verdict)
        + "\n\nA cheap step is not progress: one matching carries about 1/(n−1) of ‖W‖² (DESIGN.md); "
        "see docs/benchmarks/optimizers.md for time-to-target comparisons.\n"
    )
    path = write_doc("givens_step", body, quick=args.quick)
    print()
    print(table)
    print("\n".join(verdict))
    print(f"\nwritten: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
