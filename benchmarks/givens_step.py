"""Givens steps against plain SGD, a QR retraction and geoopt's RiemannianSGD; layouts; the fused default step.

Writes docs/benchmarks/givens_step.md (``--quick``: docs/benchmarks/givens_step.quick.md).

Table 1 (one matching) times, on the same tensor shape in the same process:
- ``sgd``: ``torch.optim.SGD.step()`` (lr only), the floor any optimizer step is compared with;
- ``matching``: sample a uniform random perfect matching + the fused Givens step (coefficients and
  rotation, native kernel on CPU) — what ``OrthogonalSGD`` does per step;
- ``torch path``: the same step through the vectorised gather/scatter torch path (the fallback);
- ``qr``: Euclidean step then a QR retraction with sign fix (O(nk²));
- ``geoopt``: ``geoopt.optim.RiemannianSGD`` on ``geoopt.EuclideanStiefel`` (projection + QR retraction).
Table 2 (layouts): the fused default step (``givens_steps_``: 16 round-robin matchings with heavy-ball
momentum, the work of one ``OrthogonalSGD(momentum=0.9)`` step) on a row-major weight/gradient/buffer,
on column-major ones (what ``torch.linalg.qr`` returns), on mixed layouts, on a sliced weight, and on a
wide weight (``nn.Linear`` storage ``(k, n)`` rotated through its ``.mT``) against the tall one.

Table 3 (default step): the fused step with m = 16 and m = 1 matchings against ``torch.optim.SGD``
(momentum 0.9), the sequential loop of 16 single-matching calls it replaces, and the fraction of memory
bandwidth reached: bytes the step must move (read x, g, B; write x, B) per second, over the same for a
``torch.add_`` of equal bytes.

The machine this runs on is shared and loaded: tables 2 and 3 time the compared functions in alternation
(``_harness.interleaved_times``) and report medians of per-round ratios; only ratios are meaningful.
Times are medians of repeats.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import (
    env_header,
    fmt,
    interleaved_times,
    markdown_table,
    median_ratio,
    median_time,
    write_doc,
)
from orthotorch.graph_sampling import random_matching, round_robin_matching
from orthotorch.manifolds import _native
from orthotorch.manifolds.givens import givens_step_, givens_steps_

MATCHINGS = 16  # OrthogonalSGD's default matchings_per_step
MOMENTUM = 0.9


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
        givens_step_(x, grad, m.i, m.j, lr, check=False)

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


def _layout(t: torch.Tensor, kind: str) -> torch.Tensor:
    """A copy of ``t`` with the given memory layout."""
    if kind == "row":
        return t.contiguous().clone()
    if kind == "col":
        return torch.empty(t.shape[1], t.shape[0], dtype=t.dtype).copy_(t.mT).mT
    if (
        kind == "slice"
    ):  # rows contiguous, row stride larger than the row (a column slice of a wider matrix)
        big = torch.zeros(t.shape[0], t.shape[1] + 64, dtype=t.dtype)
        big[:, : t.shape[1]] = t
        return big[:, : t.shape[1]]
    raise ValueError(kind)


def _fused(x, g, b, rounds, m=MATCHINGS):
    rs = rounds[:m]
    return lambda: givens_steps_(x, g, rs, 1e-3, momentum_buffer=b, momentum=MOMENTUM, check=False)


def bench_layouts(d: int, wide: list[int], repeats: int, n_wide: int = 1024) -> list[list[object]]:
    """Rows: layout, ratio of its fused-step time to the row-major one (same run, interleaved)."""
    gen = torch.Generator().manual_seed(0)
    x0 = torch.linalg.qr(torch.randn(d, d, generator=gen))[0]
    g0 = torch.randn(d, d, generator=gen) * 1e-3
    b0 = torch.randn(d, d, generator=gen) * 1e-3
    rounds = [round_robin_matching(d, r) for r in range(MATCHINGS)]
    cases = {
        "row-major x, g, B": ("row", "row", "row"),
        "column-major x, g, B": ("col", "col", "col"),
        "x row, g column, B row": ("row", "col", "row"),
        "x column, g row, B column": ("col", "row", "col"),
        "sliced x, g, B": ("slice", "slice", "slice"),
    }
    fns = {}
    for name, (lx, lg, lb) in cases.items():
        fns[name] = _fused(_layout(x0, lx), _layout(g0, lg), _layout(b0, lb), rounds)
    samples = interleaved_times(fns, repeats=repeats, min_time=0.05)
    base = "row-major x, g, B"
    rows: list[list[object]] = []
    for name in cases:
        t = sorted(samples[name])[len(samples[name]) // 2]
        rows.append([f"{d}×{d}: {name}", t * 1e3, median_ratio(samples, name, base)])
    for k in wide:
        n = n_wide
        w0 = torch.linalg.qr(torch.randn(n, k, generator=gen))[0].mT.contiguous()  # (k, n) storage
        gw = torch.randn(k, n, generator=gen) * 1e-3
        bw = torch.randn(k, n, generator=gen) * 1e-3
        tall = _fused(w0.mT.contiguous(), gw.mT.contiguous(), bw.mT.contiguous(), round_robin(n))
        widef = _fused(w0.clone().mT, gw.mT, bw.clone().mT, round_robin(n))
        s2 = interleaved_times({"tall": tall, "wide": widef}, repeats=repeats, min_time=0.05)
        t = sorted(s2["wide"])[len(s2["wide"]) // 2]
        rows.append(
            [
                f"wide {k}×{n} (tall view .mT) vs tall {n}×{k}",
                t * 1e3,
                median_ratio(s2, "wide", "tall"),
            ]
        )
    return rows


def round_robin(n: int) -> list:
    return [round_robin_matching(n, r) for r in range(MATCHINGS)]


def bench_default_step(d: int, repeats: int) -> dict[str, float]:
    """Fused default step and m = 1 against torch SGD with momentum; bandwidth fraction."""
    gen = torch.Generator().manual_seed(0)
    x = torch.linalg.qr(torch.randn(d, d, generator=gen))[0].contiguous()
    g = torch.randn(d, d, generator=gen) * 1e-3
    b = torch.randn(d, d, generator=gen) * 1e-3
    rounds = round_robin(d)
    p = torch.nn.Parameter(x.clone())
    p.grad = g.clone()
    sgd = torch.optim.SGD([p], lr=1e-3, momentum=MOMENTUM)
    sgd.step()  # creates the buffer: later steps do B = μB + G, p -= lr·B

    def sequential() -> None:
        b.mul_(MOMENTUM).add_(g)
        for r in rounds:
            givens_step_(x, b, r.i, r.j, 1e-3, co_rotate=b, check=False)

    # an add_ moving the same bytes as the step (reads 2, writes 1 per element: 3·(5d²/3) = 5d² floats)
    c1 = torch.randn(5 * d * d // 3, generator=gen)
    c2 = torch.randn_like(c1)
    fns = {
        "sgd": sgd.step,
        "fused16": _fused(x, g, b, rounds),
        "fused1": _fused(x, g, b, rounds, 1),
        "sequential16": sequential,
        "add": lambda: c1.add_(c2),
    }
    s = interleaved_times(fns, repeats=repeats, min_time=0.05)
    med = {name: sorted(v)[len(v) // 2] for name, v in s.items()}
    nbytes = 5 * d * d * 4  # read x, g, B; write x, B (float32)
    add_bytes = 3 * c1.numel() * 4
    return {
        "d": d,
        **{f"{name}_ms": t * 1e3 for name, t in med.items()},
        "fused16/sgd": median_ratio(s, "fused16", "sgd"),
        "fused1/sgd": median_ratio(s, "fused1", "sgd"),
        "sequential16/sgd": median_ratio(s, "sequential16", "sgd"),
        "bw_fused16": (nbytes / med["fused16"]) / (add_bytes / med["add"]),
        "bw_fused1": (nbytes / med["fused1"]) / (add_bytes / med["add"]),
        "bw_sgd": (nbytes / med["sgd"]) / (add_bytes / med["add"]),
        "add_GBps": add_bytes / med["add"] / 1e9,
    }


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
        layout_d, default_ds, rounds = 1024, [2048], 5
    else:
        squares, talls, repeats, budget = (
            [256, 512, 1024, 2048, 4096],
            [(4096, 64), (16384, 256)],
            9,
            1.0,
        )
        layout_d, default_ds, rounds = 2048, [1024, 2048], 9

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
    print("\nlayouts (fused default step, ratio to row-major in the same run):", flush=True)
    lrows = bench_layouts(layout_d, [64, 256], rounds)
    ltable = markdown_table(["layout", "fused step ms", "time / row-major"], lrows)
    print(ltable, flush=True)
    drows = []
    for d in default_ds:
        r = bench_default_step(d, rounds)
        drows.append(
            [
                f"{d}×{d}",
                r["sgd_ms"],
                r["fused16_ms"],
                r["fused16/sgd"],
                r["fused1_ms"],
                r["fused1/sgd"],
                r["sequential16/sgd"],
                r["bw_fused16"],
                r["bw_fused1"],
                r["bw_sgd"],
                r["add_GBps"],
            ]
        )
    dtable = markdown_table(
        [
            "shape",
            "SGD(momentum) ms",
            "fused m=16 ms",
            "m=16 / SGD",
            "fused m=1 ms",
            "m=1 / SGD",
            "16 sequential / SGD",
            "bandwidth m=16",
            "bandwidth m=1",
            "bandwidth SGD",
            "add_ GB/s",
        ],
        drows,
    )
    print(dtable, flush=True)
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
        + "\n\nA cheap step is not progress: one matching carries about 1/(n−1) of ‖W‖² (docs/design.md); "
        "see docs/benchmarks/optimizers.md for time-to-target comparisons.\n\n"
        "## Layouts\n\n"
        f"The fused default step (`givens_steps_`, {MATCHINGS} round-robin matchings, heavy-ball momentum "
        f"{MOMENTUM}), float32; time relative to the row-major case, median of per-round ratios of "
        "interleaved measurements.\n\n" + ltable + "\n\n"
        "## The default step\n\n"
        f"`givens_steps_` with {MATCHINGS} and 1 round-robin matchings, momentum {MOMENTUM}, against "
        "`torch.optim.SGD(momentum=0.9).step()` and the loop of single-matching `givens_step_` calls "
        "that it replaces. Bandwidth: bytes the step must move (read x, g, B; write x, B) per second, as "
        "a fraction of what `torch.add_` reaches on the same number of bytes in the same run.\n\n"
        + dtable
        + "\n"
    )
    path = write_doc("givens_step", body, quick=args.quick)
    print()
    print(table)
    print("\n".join(verdict))
    print(f"\nwritten: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
