"""FAVOR+ attention: approximation error by norm regime, speed/memory against exact SDPA, SLiM memory.

Writes docs/benchmarks/attention.md + PNGs (``--quick``: docs/benchmarks/attention.quick.md, smaller
sizes, no PNGs). Three tables:

1. Relative MSE of the attention output against exact softmax attention (float64) vs the number of
   random features m, for iid / orthogonal / Givens-structured projections, positive and hyperbolic
   features, in three norm regimes r = ‖q‖²/√d (q, k ~ N(0, σ²I); r = 8 is unit variance at d = 64).
   Mean over seeds (redraws). The "uniform" column is the error of plain averaging of V.
2. Bidirectional forward+backward time and extra peak memory vs L against
   ``torch.nn.functional.scaled_dot_product_attention`` (d = 64, m = 256, batch 1, 4 heads).
3. Causal forward+backward: exact SDPA with ``is_causal=True`` vs SLiM (custom autograd) vs plain
   autograd through the same chunks vs the textbook prefix-sum version: extra peak memory (fresh
   process per point, inputs and outputs subtracted) and time per token.

performer-pytorch and fast-transformers rows are added where those packages import (optional; they
are never installed by this script), otherwise the reason is printed and written to the report.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import (
    DOCS,
    env_header,
    fmt,
    markdown_table,
    median_time,
    peak_rss_mb,
    write_doc,
)
from orthotorch.attention import FeatureMap, favor_attention, softmax_attention

D = 64
HEADS = 4
PROJ = {"iid": "gaussian", "orthogonal": "orthogonal", "givens": "givens"}


# ------------------------------------------------------------------------------------------ 1. error
def error_table(ms, regimes, seeds, length):
    gen = torch.Generator().manual_seed(0)
    results = {}  # (regime, kind, proj, m) -> mean rel mse
    uniform = {}
    for r in regimes:
        sigma = math.sqrt(r / math.sqrt(D))
        q = torch.randn(1, 1, length, D, generator=gen, dtype=torch.float64) * sigma
        k = torch.randn(1, 1, length, D, generator=gen, dtype=torch.float64) * sigma
        v = torch.randn(1, 1, length, D, generator=gen, dtype=torch.float64)
        exact = softmax_attention(q, k, v)
        den = (exact**2).sum()
        uniform[r] = float(((v.mean(-2, keepdim=True) - exact) ** 2).sum() / den)
        for kind in ("positive", "hyperbolic"):
            for name, proj in PROJ.items():
                for m in ms:
                    errs = []
                    for s in range(seeds):
                        # hyperbolic uses m/2 directions, so both kinds have m features in total
                        mm = m if kind == "positive" else max(1, m // 2)
                        fmap = FeatureMap(D, mm, kind=kind, projection=proj, seed=1000 * s + m)
                        out = favor_attention(q, k, v, features=fmap.double())
                        errs.append(float(((out - exact) ** 2).sum() / den))
                    results[(r, kind, name, m)] = sum(errs) / len(errs)
    return results, uniform


# ---------------------------------------------------------------------------- 2. speed vs SDPA
_SETUP = """
import torch, time
torch.manual_seed(0)
L, d, m, H = {L}, 64, 256, 4
q = torch.randn(1, H, L, d, requires_grad=True)
k = torch.randn(1, H, L, d, requires_grad=True)
v = torch.randn(1, H, L, d, requires_grad=True)
"""

_RUN = {
    "sdpa": "out = torch.nn.functional.scaled_dot_product_attention(q, k, v)\nout.sum().backward()",
    "sdpa_causal": (
        "out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)\n"
        "out.sum().backward()"
    ),
    "favor": (
        "from orthotorch.attention import FeatureMap, favor_attention\n"
        "f = FeatureMap(d, m)\n"
        "out = favor_attention(q, k, v, features=f, causal={causal}, implementation='{impl}',"
        " chunk_size={chunk})\nout.sum().backward()"
    ),
    "base": "out = torch.zeros_like(v)\ng = [torch.zeros_like(t) for t in (q, k, v)]",
}


_BASE: dict[int, float] = {}


def extra_mb(length, run, **fmtargs):
    """Peak RSS of ``run`` minus that of a process holding the same inputs, output and gradients.

    Linux carries a parent's peak RSS into ``ru_maxrss`` of a forked child, so every memory point is
    measured before this process allocates anything large (see :func:`memory_points`).
    """
    if length not in _BASE:
        _BASE[length] = peak_rss_mb(_SETUP.format(L=length) + _RUN["base"])["peak_rss_mb"]
    base = _BASE[length]
    code = _SETUP.format(L=length) + _RUN[run].format(**fmtargs)
    return peak_rss_mb(code)["peak_rss_mb"] - base


def fwd_bwd_time(length, fn, repeats):
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, HEADS, length, D, requires_grad=True) for _ in range(3))

    def step():
        for t in (q, k, v):
            t.grad = None
        fn(q, k, v).sum().backward()

    return median_time(step, repeats=repeats, warmup=1, min_time=0.0)


def memory_points(lengths, sdpa_max, causal_lengths, naive_max, chunk):
    """All memory measurements (fresh processes), taken while this process is still small."""
    mem = {}
    for length in lengths:
        mem[("sdpa", length)] = extra_mb(length, "sdpa") if length <= sdpa_max else float("nan")
        mem[("favor", length)] = extra_mb(length, "favor", causal=False, impl="slim", chunk=chunk)
    for length in causal_lengths:
        if length <= sdpa_max:
            mem[("sdpa_causal", length)] = extra_mb(length, "sdpa_causal")
        for impl in ("slim", "chunked", "prefix"):
            if impl == "prefix" and length > naive_max:
                continue
            mem[(impl, length)] = extra_mb(length, "favor", causal=True, impl=impl, chunk=chunk)
    return mem


def speed_table(lengths, repeats, sdpa_max, mem):
    fmap = FeatureMap(D, 256)
    rows, raw = [], []
    for length in lengths:
        reps = repeats if length <= 4096 else 1
        t_f = fwd_bwd_time(length, lambda q, k, v: favor_attention(q, k, v, features=fmap), reps)
        if length <= sdpa_max:
            t_s = fwd_bwd_time(length, torch.nn.functional.scaled_dot_product_attention, reps)
        else:
            t_s = float("nan")
        m_s, m_f = mem[("sdpa", length)], mem[("favor", length)]
        raw.append((length, t_s, t_f, m_s, m_f))
        rows.append(
            [length, t_s * 1e3, t_f * 1e3, t_s / t_f if t_s == t_s else float("nan"), m_s, m_f]
        )
    headers = ["L", "SDPA ms", "FAVOR+ ms", "speed-up", "SDPA extra MiB", "FAVOR+ extra MiB"]
    return markdown_table(headers, rows), raw


# ---------------------------------------------------------------------------- 3. causal / SLiM
def causal_table(lengths, naive_max, chunk, repeats, mem_points, sdpa_max):
    fmap = FeatureMap(D, 256)
    rows, raw = [], []

    def sdpa_causal(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    for length in lengths:
        reps = repeats if length <= 4096 else 1
        row: list[float] = [length]
        entry: dict = {"L": length}
        if length <= sdpa_max:
            t = fwd_bwd_time(length, sdpa_causal, reps)
            mem = mem_points[("sdpa_causal", length)]
            row += [mem, t / length * 1e6]
            entry["sdpa"] = (mem, t / length * 1e6)
        else:
            row += [float("nan"), float("nan")]
        for impl in ("slim", "chunked", "prefix"):
            if impl == "prefix" and length > naive_max:
                row += [float("nan"), float("nan")]
                continue

            def fn(q, k, v, _impl=impl):
                return favor_attention(
                    q, k, v, features=fmap, causal=True, implementation=_impl, chunk_size=chunk
                )

            t = fwd_bwd_time(length, fn, reps)
            mem = mem_points[(impl, length)]
            row += [mem, t / length * 1e6]
            entry[impl] = (mem, t / length * 1e6)
        rows.append(row)
        raw.append(entry)
    headers = [
        "L",
        "SDPA is_causal extra MiB",
        "SDPA is_causal µs/token",
        "SLiM extra MiB",
        "SLiM µs/token",
        "chunked-autograd MiB",
        "chunked µs/token",
        "naive prefix MiB",
        "naive µs/token",
    ]
    return markdown_table(headers, rows), raw


# ------------------------------------------------------------------------ optional external rows
def external_rows(lengths, repeats):
    """performer-pytorch / fast-transformers fwd+bwd ms where they import; reasons otherwise."""
    rows, notes = [], []
    impls = {}
    try:
        from performer_pytorch import FastAttention  # optional, never installed by this script

        pa = FastAttention(dim_heads=D, nb_features=256, causal=False)
        pc = FastAttention(dim_heads=D, nb_features=256, causal=True)
        impls["performer-pytorch"] = (pa, pc)
    except Exception as exc:  # any import failure means "not available"
        notes.append(f"performer-pytorch skipped: {type(exc).__name__}: {exc}")
    try:
        from fast_transformers.attention import CausalLinearAttention, LinearAttention
        from fast_transformers.masking import FullMask, LengthMask, TriangularCausalMask

        def ft(causal):
            att = CausalLinearAttention(D) if causal else LinearAttention(D)

            def run(q, k, v):
                b, length = q.shape[0], q.shape[2]
                mask = TriangularCausalMask(length) if causal else FullMask(length, length)
                lens = LengthMask(torch.full((b,), length, dtype=torch.int64))
                tr = [t.transpose(1, 2) for t in (q, k, v)]  # fast-transformers: (B, L, H, d)
                return att(*tr, mask, lens, lens).transpose(1, 2)

            return run

        impls["fast-transformers"] = (ft(False), ft(True))
    except Exception as exc:  # any import failure means "not available"
        notes.append(f"fast-transformers skipped: {type(exc).__name__}: {exc}")
    for name, (bi, ca) in impls.items():
        for length in lengths:
            reps = repeats if length <= 4096 else 1
            rows.append(
                [
                    name,
                    length,
                    fwd_bwd_time(length, bi, reps) * 1e3,
                    fwd_bwd_time(length, ca, reps) * 1e3,
                ]
            )
    for note in notes:
        print(note, flush=True)
    table = markdown_table(["library", "L", "bidirectional ms", "causal ms"], rows) if rows else ""
    return table, notes


def plots(err, ms, regimes, speed_raw, causal_raw):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(regimes), figsize=(5 * len(regimes), 4))
    for ax, r in zip(axes, regimes):
        for kind, ls in (("positive", "-"), ("hyperbolic", "--")):
            for name in PROJ:
                ax.loglog(
                    ms,
                    [err[(r, kind, name, m)] for m in ms],
                    ls,
                    marker="o",
                    label=f"{kind}/{name}",
                )
        ax.set_title(f"r = ‖q‖²/√d = {r}")
        ax.set_xticks(ms, [str(m) for m in ms], rotation=45)
        ax.minorticks_off()
        ax.set_xlabel("m (features)")
        ax.set_ylabel("relative MSE vs softmax")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(DOCS / "attention_error.png", dpi=110)
    plt.close(fig)

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    ls = [x[0] for x in speed_raw]
    a1.loglog(ls, [x[1] * 1e3 for x in speed_raw], "o-", label="SDPA (exact)")
    a1.loglog(ls, [x[2] * 1e3 for x in speed_raw], "s-", label="FAVOR+ m=256")
    a1.set_xticks(ls, [str(x) for x in ls], rotation=45)
    a1.minorticks_off()
    a1.set_xlabel("L")
    a1.set_ylabel("fwd+bwd ms")
    a1.legend()
    lc = [e["L"] for e in causal_raw]
    for impl in ("sdpa", "slim", "chunked", "prefix"):
        pts = [(e["L"], e[impl][0]) for e in causal_raw if impl in e]
        a2.loglog([p[0] for p in pts], [max(p[1], 1e-1) for p in pts], "o-", label=impl)
    a2.set_xticks(lc, [str(x) for x in lc], rotation=45)
    a2.minorticks_off()
    a2.set_xlabel("L (causal)")
    a2.set_ylabel("extra peak MiB")
    a2.legend()
    fig.tight_layout()
    fig.savefig(DOCS / "attention_speed_memory.png", dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, few seeds (≈1 minute)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    if args.quick:
        ms, seeds, err_len = [16, 64, 256], 3, 512
        lengths, sdpa_max, repeats = [1024, 4096], 4096, 2
        causal_lengths, naive_max = [2048, 8192], 2048
        causal_sdpa_max = 8192
    else:
        ms, seeds, err_len = [16, 32, 64, 128, 256, 512], 8, 1024
        lengths, sdpa_max, repeats = [1024, 4096, 16384, 65536], 65536, 5
        causal_lengths, naive_max = [4096, 16384, 65536], 4096
        causal_sdpa_max = 65536
    regimes = [0.25, 1.0, 8.0]

    mem = memory_points(lengths, sdpa_max, causal_lengths, naive_max, 256)
    for length in causal_lengths:  # causal SDPA memory, same rule as above
        if length <= causal_sdpa_max and ("sdpa_causal", length) not in mem:
            mem[("sdpa_causal", length)] = extra_mb(length, "sdpa_causal")
    print("memory done", f"{time.perf_counter() - t0:.0f}s", flush=True)
    err, uniform = error_table(ms, regimes, seeds, err_len)
    print("error done", f"{time.perf_counter() - t0:.0f}s", flush=True)
    err_rows = []
    for r in regimes:
        for kind in ("positive", "hyperbolic"):
            for name in PROJ:
                err_rows.append(
                    [r, kind, name] + [err[(r, kind, name, m)] for m in ms] + [uniform[r]]
                )
    t1 = markdown_table(
        ["r", "features", "projection"] + [f"m={m}" for m in ms] + ["uniform"], err_rows
    )
    mref = 256
    ratio_rows = [
        [
            r,
            kind,
            err[(r, kind, "orthogonal", mref)] / err[(r, kind, "iid", mref)],
            err[(r, kind, "givens", mref)] / err[(r, kind, "iid", mref)],
        ]
        for r in regimes
        for kind in ("positive", "hyperbolic")
    ]
    t1b = markdown_table(["r", "features", "orthogonal / iid", "givens / iid"], ratio_rows)
    print(t1, "\n", t1b, flush=True)

    t2, speed_raw = speed_table(lengths, repeats, sdpa_max, mem)
    print(t2, flush=True)
    t3, causal_raw = causal_table(causal_lengths, naive_max, 256, repeats, mem, causal_sdpa_max)
    print(t3, flush=True)
    t4, notes = external_rows(lengths[:2], repeats)
    slim_mem = [e["slim"][0] for e in causal_raw]
    growth = (slim_mem[-1] - slim_mem[0]) / max(slim_mem[0], 1e-9)

    body = (
        "# FAVOR+ attention benchmark\n\n"
        + env_header()
        + f"- command: `python benchmarks/attention.py{' --quick' if args.quick else ''}`, "
        f"run time {time.perf_counter() - t0:.0f} s\n\n"
        "## 1. Approximation error vs m (relative MSE against exact softmax, float64)\n\n"
        f"L = {err_len}, d = {D}, q, k ~ N(0, σ²I) with r = ‖q‖²/√d = σ²√d; mean over {seeds} "
        "redraws. `uniform` = error of averaging V (a useless approximation). Hyperbolic uses m/2 "
        "directions (m features).\n\n" + t1 + "\n\n"
        f"Ratio to iid at m = {mref} (target: orthogonal ≤ 0.7× iid):\n\n" + t1b + "\n\n"
        f"## 2. Bidirectional forward+backward vs SDPA (d = 64, m = 256, batch 1, {HEADS} heads, "
        "float32)\n\n"
        "Extra MiB = peak RSS of a fresh process minus one holding the same inputs, output and "
        "gradients.\n\n" + t2 + "\n\n"
        f"## 3. Causal forward+backward (d = 64, m = 256, chunk 256, batch 1, {HEADS} heads)\n\n"
        + t3
        + f"\n\nSLiM extra memory growth from L = {causal_lengths[0]} to {causal_lengths[-1]}: "
        f"{fmt(100 * growth)}% (target ≤ 10%).\n\n"
        "## 4. Other FAVOR+ libraries (optional)\n\n"
        + (t4 + "\n\n" if t4 else "")
        + "".join(f"- {n}\n" for n in notes)
    )
    if not args.quick:
        plots(err, ms, regimes, speed_raw, causal_raw)
        body += (
            "\n![error](attention_error.png)\n\n![speed and memory](attention_speed_memory.png)\n"
        )
    path = write_doc("attention", body, quick=args.quick)
    print(f"wrote {path} in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
