"""Forward+backward time and memory of orthogonal parametrizations: CWY / T-CWY vs torch and geotorch.

For every method and size: a layer whose weight is parametrized, the weight materialised and
back-propagated with the same fixed random loss gradient ``G`` (``w = layer.weight; w.backward(G)``).
Competitors: ``torch.nn.utils.parametrizations.orthogonal`` (``matrix_exp``, ``cayley``,
``householder``) and ``geotorch.orthogonal``. Times are medians of samples taken in turn across the
methods of one size (so load bursts on a shared machine hit all alike); ratios are against our T-CWY
(= CWY for square weights), from the same run. Cases whose predicted single run exceeds the per-case
budget (extrapolated from the previous size of the same method) are printed as "skipped (> budget)".
A second table compares our analytic backward with autograd through the same operations; a third
gives the peak extra resident memory of one forward+backward in a fresh process.

    python benchmarks/parametrizations.py --quick   # < 2 min, docs/benchmarks/parametrizations.quick.md
    python benchmarks/parametrizations.py           # ~10 min, docs/benchmarks/parametrizations.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from orthotorch.manifolds.cwy import cwy_columns
from orthotorch.parametrize import orthogonal

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import env_header, fmt, markdown_table, median_time, peak_rss_mb, write_doc

SQUARE_FULL = [256, 512, 1024, 2048]
TALL_FULL = [(1024, 64), (4096, 64), (4096, 256)]
SQUARE_QUICK = [128, 256]
TALL_QUICK = [(512, 32)]

METHODS = [
    "ours tcwy",
    "ours cwy",
    "ours givens",
    "torch matrix_exp",
    "torch cayley",
    "torch householder",
    "geotorch",
]


def build(method: str, n: int, k: int) -> nn.Module:
    """A bias-free layer with an (n, k) weight (tall: Linear(k, n)), parametrized by ``method``."""
    torch.manual_seed(0)  # the benchmark's own data; library code takes no global randomness
    layer = nn.Linear(k, n, bias=False)
    if method.startswith("ours"):
        return orthogonal(layer, "weight", method=method.split()[1])
    if method.startswith("torch"):
        from torch.nn.utils.parametrizations import orthogonal as torch_orthogonal

        return torch_orthogonal(layer, "weight", orthogonal_map=method.split()[1])
    if method == "geotorch":
        import geotorch

        geotorch.orthogonal(layer, "weight")
        return layer
    raise ValueError(method)


def fwd_bwd(layer: nn.Module, g: torch.Tensor) -> Callable[[], None]:
    params = list(layer.parameters())

    def step() -> None:
        for p in params:
            p.grad = None
        layer.weight.backward(g)

    return step


def timed(fn: Callable[[], object]) -> float:
    """Seconds of one call (also the warm-up)."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved(
    fns: dict[str, Callable[[], object]], firsts: dict[str, float], budget: float
) -> dict[str, tuple[float, int]]:
    """Median seconds and sample count per function, sampling the functions in turn.

    Round-robin sampling makes a burst of load on the shared machine hit every method alike, so the
    ratios stay meaningful even when absolute times are noisy. Each sample is
    ``median_time(fn, repeats=1, min_time=0.02)``; a method gets up to 7 samples within ``budget``
    (methods whose first call alone took more than half the budget keep that single timing).
    """
    reps = {m: int(min(7, budget / (2 * max(t, 0.02)))) for m, t in firsts.items()}
    samples: dict[str, list[float]] = {m: [] for m in fns}
    for r in range(max(reps.values(), default=0)):
        for m, fn in fns.items():
            if r < reps[m]:
                samples[m].append(median_time(fn, repeats=1, warmup=0, min_time=0.02))
    return {m: (statistics.median(v), len(v)) if v else (firsts[m], 1) for m, v in samples.items()}


def predicted(method: str, prev: tuple[int, int, float], n: int, k: int) -> float:
    """Extrapolate the time of ``method`` at (n, k) from its time at a previous size (n0, k0)."""
    n0, k0, t0 = prev
    if n == k:  # square: every method is cubic in d
        return t0 * (n / n0) ** 3
    a, b = {
        "ours tcwy": (1, 2),  # O(nk²)
        "ours cwy": (2, 1),  # O(n²k)
        "ours givens": (3, 1),  # n−1 rounds of O(nk), O(n²k) saved copies: measured ~n³
        "torch householder": (1, 2),  # O(nk²), sequential
    }.get(method, (3, 0))  # matrix_exp / cayley / geotorch inflate to n×n: O(n³)
    return t0 * (n / n0) ** a * (k / k0) ** b


def autograd_cwy(v: torch.Tensor, m: int) -> torch.Tensor:
    """The same forward as ``orthotorch.manifolds.cwy`` written with autograd-tracked torch ops."""
    d, ell = v.shape[-2:]
    u = v / torch.linalg.vector_norm(v, dim=-2, keepdim=True)
    s = torch.triu(u.mT @ u, diagonal=1) + 0.5 * torch.eye(ell, dtype=v.dtype)
    y = torch.linalg.solve_triangular(s, u[..., :m, :].mT, upper=True)
    return torch.eye(d, m, dtype=v.dtype) - u @ y


MEM_CODE = """
import torch, sys
sys.path.insert(0, {bench!r})
torch.set_num_threads({threads})
from parametrizations import build, fwd_bwd, vm_kib
n, k = {n}, {k}
g = torch.randn(n, k, generator=torch.Generator().manual_seed(1))
fwd_bwd(build({method!r}, 16, min(k, 8)), torch.randn(16, min(k, 8)))()  # lazy imports, pools
layer = build({method!r}, n, k)
step = fwd_bwd(layer, g)
try:  # give freed heap pages back so that the step's allocations are counted
    import ctypes
    ctypes.CDLL("libc.so.6").malloc_trim(0)
except OSError:
    pass
try:  # reset the kernel's high-water mark so the peak below is this step's own
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
except OSError:
    pass
before = vm_kib("VmRSS")
step()
_result = {{"extra_mb": (vm_kib("VmHWM") - before) / 1024}}
"""


def vm_kib(field: str) -> float:
    """``VmRSS`` / ``VmHWM`` of this process from /proc/self/status (KiB)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return float(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def memory_mb(method: str, n: int, k: int, threads: int) -> float:
    """Peak extra resident memory (MiB) of one forward+backward, measured in a fresh process."""
    bench = str(Path(__file__).resolve().parent)
    code = MEM_CODE.format(bench=bench, threads=threads, n=n, k=k, method=method)
    return float(peak_rss_mb(code, timeout=600)["extra_mb"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes, writes *.quick.md")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default 2; 1 if the machine is busy)",
    )
    ap.add_argument(
        "--budget", type=float, default=None, help="seconds per case (default 20, quick 5)"
    )
    ap.add_argument("--no-memory", action="store_true", help="skip the memory table")
    args = ap.parse_args()
    budget = args.budget or (5.0 if args.quick else 20.0)
    squares = SQUARE_QUICK if args.quick else SQUARE_FULL
    talls = TALL_QUICK if args.quick else TALL_FULL
    cases = [(d, d) for d in squares] + list(talls)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    busy = load > (os.cpu_count() or 1)
    threads = args.threads if args.threads is not None else (1 if busy else 2)
    torch.set_num_threads(threads)
    header = env_header()
    if busy:
        header += (
            f"- WARNING: 1-minute load average {load:.1f} exceeds the {os.cpu_count()} cores: "
            "other processes compete for the CPU and absolute times are inflated (with more than "
            "one torch thread, badly: threads wait for descheduled peers); "
            f"{'so this run uses 1 thread; ' if args.threads is None else ''}"
            "re-run on a quiet machine\n"
        )
    print(header)
    times: dict[tuple[str, int, int], float | None] = {}
    last: dict[tuple[str, bool], tuple[int, int, float]] = {}
    for n, k in cases:
        tall = n != k
        g = torch.randn(n, k, generator=torch.Generator().manual_seed(1))
        fns: dict[str, Callable[[], None]] = {}
        firsts: dict[str, float] = {}
        for method in METHODS:
            if method == "ours cwy" and not tall:
                continue  # identical to tcwy for square weights
            prev = last.get((method, tall))
            if prev is not None and method != "ours tcwy":  # the reference always runs
                guess = predicted(method, prev, n, k)
                if guess > budget:
                    times[(method, n, k)] = None
                    print(f"{n}x{k} {method:18s} skipped (> budget, predicted {guess:.1f} s)")
                    continue
            fns[method] = fwd_bwd(build(method, n, k), g)
            firsts[method] = timed(fns[method])
        for method, (t, runs) in interleaved(fns, firsts, budget).items():
            times[(method, n, k)] = t
            last[(method, tall)] = (n, k, t)
            print(f"{n}x{k} {method:18s} {t * 1e3:10.2f} ms  ({runs} samples)", flush=True)
        del fns

    def cell(method: str, n: int, k: int) -> str:
        t = times.get((method, n, k), "n/a")
        if t == "n/a":
            return "–"
        if t is None:
            return "skipped (> budget)"
        ref = times.get(("ours tcwy", n, k))
        ratio = f" ({fmt(t / ref)}×)" if isinstance(ref, float) and method != "ours tcwy" else ""
        return f"{fmt(t * 1e3)}{ratio}"

    rows = [[f"{n}×{k}"] + [cell(m, n, k) for m in METHODS] for n, k in cases]
    table1 = markdown_table(["n×k", *METHODS], rows)

    # analytic backward vs autograd through the same ops
    rows2 = []
    for n, k in cases:
        m = n if n == k else k
        v = torch.randn(n, k, generator=torch.Generator().manual_seed(2), requires_grad=True)
        g = torch.randn(n, m, generator=torch.Generator().manual_seed(3))

        def ours(v=v, g=g, m=m) -> None:
            v.grad = None
            cwy_columns(v, m).backward(g)

        def ref(v=v, g=g, m=m) -> None:
            v.grad = None
            autograd_cwy(v, m).backward(g)

        pair = {"ours": ours, "ref": ref}
        res = interleaved(pair, {name: timed(f) for name, f in pair.items()}, budget)
        t_ours, t_ref = res["ours"][0], res["ref"][0]
        rows2.append([f"{n}×{k}", t_ours * 1e3, t_ref * 1e3, t_ref / t_ours])
        print(f"{n}x{k} analytic {t_ours * 1e3:.2f} ms, autograd {t_ref * 1e3:.2f} ms", flush=True)
    table2 = markdown_table(
        ["n×k", "analytic backward (ms)", "autograd, same ops (ms)", "speed-up"], rows2
    )

    table3 = ""
    if not args.no_memory:
        mem_cases = [(256, 256), (512, 32)] if args.quick else [(1024, 1024), (4096, 256)]
        rows3 = []
        for n, k in mem_cases:
            row: list[object] = [f"{n}×{k}"]
            for method in METHODS:
                if method == "ours cwy" and n == k:
                    row.append("–")
                    continue
                if times.get((method, n, k), 0.0) is None:
                    row.append("skipped")
                    continue
                row.append(memory_mb(method, n, k, threads))
                print(f"memory {n}x{k} {method}: {row[-1]:.1f} MiB", flush=True)
            rows3.append(row)
        table3 = markdown_table(["n×k", *METHODS], rows3)

    targets = []
    d = 1024
    if ("ours tcwy", d, d) in times:
        for comp in ("torch matrix_exp", "torch householder"):
            t = times.get((comp, d, d))
            ours = times[("ours tcwy", d, d)]
            if isinstance(t, float) and isinstance(ours, float):
                targets.append(
                    f"- CWY vs {comp} at d = 1024: {t / ours:.1f}× faster (target ≥ 10×)"
                )
    if ("ours tcwy", 1024, 64) in times:
        t = times.get(("torch householder", 1024, 64))
        ours = times[("ours tcwy", 1024, 64)]
        if isinstance(t, float) and isinstance(ours, float):
            targets.append(
                f"- T-CWY vs torch householder at 1024×64: {t / ours:.1f}× faster (target ≥ 50×)"
            )
    a, b = times.get(("ours tcwy", 1024, 64)), times.get(("ours tcwy", 4096, 64))
    if isinstance(a, float) and isinstance(b, float):
        targets.append(f"- T-CWY time 4096×64 / 1024×64 = {b / a:.2f} (linear in n: 4)")

    body = (
        "# Orthogonal parametrizations: forward + backward\n\n"
        f"{header}\n"
        f"Command: `python benchmarks/parametrizations.py{' --quick' if args.quick else ''}` "
        f"(threads {threads}, per-case budget {budget:g} s), float32.\n\n"
        "## Forward+backward of a parametrized weight (ms, median; ratio vs ours tcwy)\n\n"
        "`w = layer.weight; w.backward(G)` with the same fixed random `G` for every method. "
        "n×k with n = k is square (O(d)); otherwise the weight is tall (n, k). "
        "'ours cwy' forms the n×n product and slices; 'ours tcwy' never does.\n\n"
        f"{table1}\n\n"
        + ("\n".join(targets) + "\n\n" if targets else "")
        + "## Analytic backward vs autograd through the same operations\n\n"
        f"{table2}\n\n"
        + (
            "## Peak memory of one forward+backward (MiB)\n\n"
            "A fresh process per cell builds the layer, resets the kernel's resident-set high-water "
            "mark (`/proc/self/clear_refs`), runs one forward+backward and reports `VmHWM − VmRSS` "
            "(the step's own peak: weight, graph, gradients, temporaries; parameters excluded).\n\n"
            f"{table3}\n"
            if table3
            else ""
        )
    )
    path = write_doc("parametrizations", body, quick=args.quick)
    print(body)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
