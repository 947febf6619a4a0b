"""Givens steps against plain SGD, a QR retraction and geoopt's RiemannianSGD; layouts; the fused default step.

Writes docs/benchmarks/givens_step.md (``--quick``: docs/benchmarks/givens_step.quick.md).

Table 1 (one matching) times, on the same tensor shape in the same process:
- ``sgd``: ``torch.optim.SGD.step()`` (lr only), the floor any optimizer step is compared with;
- ``matching``: sample a uniform random perfect matching + the fused Givens step (coefficients and
  rotation, native kernel on CPU) — what ``OrthogonalSGD`` does per step;
- ``torch path``: the same step through the vectorised gather/scatter torch path (the fallback);
- ``qr``: Euclidean step then a QR retraction with sign fix (O(nk²));
- ``geoopt``: ``geoopt.optim.RiemannianSGD`` on ``geoopt.EuclideanStiefel`` (projection + QR retraction).
Table 2 (layouts): the steady-state ``OrthogonalSGD(momentum=0.9)`` and ``OrthogonalAdam`` step (after
the first step, which re-lays out the weight, its gradient and moment) on a row-major weight/gradient, on
column-major ones (what ``torch.linalg.qr`` returns), with a column-major gradient set by hand every
step, on sliced weights (rows of a wider tensor; a transposed slice, which is left in place), and on a
wide weight (``nn.Linear`` storage ``(k, n)`` rotated through its ``.mT``) against the tall one; each as a
ratio to the row-major (tall) step in the same run, and the same ratio with the re-layout switched off.
Then the one-time re-layout cost, and the whole training step of a wide ``F.linear`` layer (forward,
backward, step) with the re-laid-out weight against the row-major ``nn.Linear`` storage kept.

Table 3 (default step): the fused step with m = 16 and m = 1 matchings against ``torch.optim.SGD``
(momentum 0.9), the sequential loop of 16 single-matching calls it replaces, and the fraction of memory
bandwidth reached: bytes the step must move (read x, g, B; write x, B) per second, over the same for a
``torch.add_`` of equal bytes.
Table 4 (Adam's default step): ``OrthogonalAdam.step()`` with m = 16 and m = 1 against
``torch.optim.Adam.step()``, and the per-matching loop that the fused kernel (``givens_adam_steps_``)
replaced.

The machine this runs on is shared and loaded: tables 2 and 3 time the compared functions in alternation
(``_harness.interleaved_times``) and report medians of per-round ratios; only ratios are meaningful.
Times are medians of repeats.
"""

from __future__ import annotations

import argparse
import inspect
import math
import statistics
import sys
import time
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
from orthotorch.manifolds import _native, givens
from orthotorch.manifolds.givens import givens_step_, givens_steps_
from orthotorch.optim import OrthogonalAdam, OrthogonalSGD
from orthotorch.optim import adam as adam_module
from orthotorch.optim._base import GivensOptimizer

MATCHINGS = 16  # OrthogonalSGD's default matchings_per_step
# the Givens step on every shape measured here (tall weights may be routed to another step by default)
GIVENS = (
    {"tall_step": "givens"} if "tall_step" in inspect.signature(OrthogonalSGD).parameters else {}
)
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
        return t.mT.contiguous().mT
    if kind == "slice":  # rows contiguous, row stride larger than the row (rows of a wider tensor)
        big = torch.zeros(t.shape[0], t.shape[1] + 64, dtype=t.dtype)
        big[:, : t.shape[1]] = t
        return big[:, : t.shape[1]]
    if kind == "slice_col":  # columns contiguous, column stride larger (a transposed slice)
        big = torch.zeros(t.shape[1], t.shape[0] + 64, dtype=t.dtype)
        big[:, : t.shape[0]] = t.mT
        return big[:, : t.shape[0]].mT
    raise ValueError(kind)


def _fused(x, g, b, rounds, m=MATCHINGS):
    rs = rounds[:m]
    return lambda: givens_steps_(x, g, rs, 1e-3, momentum_buffer=b, momentum=MOMENTUM, check=False)


def _opt_step(cls, x, g, *, hand_grad=None, **kw):
    """``opt.step`` of a one-parameter optimizer in steady state (after its first step: re-layout,
    buffer creation). ``hand_grad``: a gradient assigned by hand before every step (keeps its layout)."""
    p = torch.nn.Parameter(x)
    p.grad = g
    extra = {"momentum": MOMENTUM} if cls is OrthogonalSGD else {}
    opt = cls([{"params": [p], "manifold": "stiefel", **GIVENS}], lr=1e-3, **extra, **kw)
    opt.step()
    if hand_grad is None:
        return opt.step

    def step() -> None:
        p.grad = hand_grad
        opt.step()

    return step


class _no_relayout:
    """Context: the optimizers' one-time re-layout switched off (the behaviour before it existed)."""

    def __enter__(self):
        self._saved = GivensOptimizer._ensure_row_layout
        # marks the parameter done, so later steps outside the context keep the layout too
        GivensOptimizer._ensure_row_layout = lambda self, p, info: setattr(info, "laid_out", True)

    def __exit__(self, *exc):
        GivensOptimizer._ensure_row_layout = self._saved


def _med(samples: list[float]) -> float:
    return sorted(samples)[len(samples) // 2]


def bench_layouts(
    d: int, wide: list[int], repeats: int, n_wide: int = 1024, relayout: bool = True
) -> list[list[object]]:
    """Rows: layout, steady-state optimizer step (ms), ratio to the row-major / tall step in the same
    run (interleaved). ``relayout=False``: the same with the one-time re-layout switched off."""
    gen = torch.Generator().manual_seed(0)
    x0 = torch.linalg.qr(torch.randn(d, d, generator=gen))[0].contiguous()
    g0 = torch.randn(d, d, generator=gen) * 1e-3
    cases = {
        "row-major x, g, B": lambda cls: _opt_step(cls, _layout(x0, "row"), _layout(g0, "row")),
        "column-major x, g, B": lambda cls: _opt_step(cls, _layout(x0, "col"), _layout(g0, "col")),
        "x row, g column (set by hand every step)": lambda cls: _opt_step(
            cls, _layout(x0, "row"), _layout(g0, "row"), hand_grad=_layout(g0, "col")
        ),
        "sliced x (rows of a wider tensor), g": lambda cls: _opt_step(
            cls, _layout(x0, "slice"), _layout(g0, "row")
        ),
        "sliced x (a transposed slice: not re-laid out), g": lambda cls: _opt_step(
            cls, _layout(x0, "slice_col"), _layout(g0, "row")
        ),
    }
    rows: list[list[object]] = []
    ctx = _no_relayout() if not relayout else None
    if ctx is not None:
        ctx.__enter__()
    try:
        for cls in (OrthogonalSGD, OrthogonalAdam):
            label = "SGD μ=0.9" if cls is OrthogonalSGD else "Adam"
            fns = {name: make(cls) for name, make in cases.items()}
            samples = interleaved_times(fns, repeats=repeats, min_time=0.05)
            base = "row-major x, g, B"
            for name in cases:
                rows.append(
                    [f"{label}, {d}×{d}: {name}", _med(samples[name]) * 1e3,
                     median_ratio(samples, name, base)]
                )  # fmt: skip
            for k in wide:
                n = n_wide
                # tall (n, k) row-major (qr returns column-major: the trap measured above)
                w0 = torch.linalg.qr(torch.randn(n, k, generator=gen))[0].contiguous()
                gw = torch.randn(n, k, generator=gen) * 1e-3
                # wide: nn.Linear(in=n, out=k) storage (k, n) row-major, gradient likewise
                fns = {
                    "tall": _opt_step(cls, w0.clone(), gw.clone()),
                    "wide": _opt_step(cls, w0.mT.contiguous(), gw.mT.contiguous()),
                }
                s2 = interleaved_times(fns, repeats=repeats, min_time=0.05)
                rows.append(
                    [f"{label}, wide {k}×{n} (row-major storage) vs tall {n}×{k}",
                     _med(s2["wide"]) * 1e3, median_ratio(s2, "wide", "tall")]
                )  # fmt: skip
    finally:
        if ctx is not None:
            ctx.__exit__()
    return rows


def bench_relayout_cost(d: int, repeats: int) -> dict[str, float]:
    """The one-time re-layout of a column-major d×d weight with its gradient and momentum buffer (ms),
    and its ratio to one steady-state ``OrthogonalSGD(momentum)`` step."""
    gen = torch.Generator().manual_seed(0)
    x0 = torch.linalg.qr(torch.randn(d, d, generator=gen))[0].contiguous()
    g0 = torch.randn(d, d, generator=gen) * 1e-3
    times = []
    for _ in range(repeats):
        p = torch.nn.Parameter(_layout(x0, "col"))
        p.grad = _layout(g0, "col")
        opt = OrthogonalSGD([{"params": [p], "manifold": "orthogonal"}], lr=1e-3, momentum=0.9)
        opt.state[p]["momentum_buffer"] = _layout(g0, "col")
        info = opt._info[p]
        t0 = time.perf_counter()
        opt._ensure_row_layout(p, info)
        times.append(time.perf_counter() - t0)
        assert p.is_contiguous() and p.grad.is_contiguous()
    step = _opt_step(OrthogonalSGD, _layout(x0, "row"), _layout(g0, "row"))
    t_step = median_time(step, repeats=repeats)
    return {"relayout_ms": _med(times) * 1e3, "step_ms": t_step * 1e3}


def _linear_train(
    w0: torch.Tensor, inp: torch.Tensor, target: torch.Tensor, relayout: bool, with_step: bool
):
    """One training step of ``F.linear(inp, p)`` (MSE, backward, ``OrthogonalSGD(momentum)`` step) on a
    wide weight ``p`` starting at ``w0`` (k, n), after a first step with or without the re-layout."""
    p = torch.nn.Parameter(w0.clone())
    opt = OrthogonalSGD(
        [{"params": [p], "manifold": "stiefel", **GIVENS}], lr=1e-3, momentum=MOMENTUM
    )

    def train(step: bool = True) -> None:
        opt.zero_grad()
        torch.nn.functional.mse_loss(torch.nn.functional.linear(inp, p), target).backward()
        if step:
            opt.step()

    if relayout:
        train()
    else:
        with _no_relayout():
            train()
    assert p.mT.is_contiguous() == relayout
    return lambda: train(with_step)


def bench_training_step(
    n: int, ks: list[int], repeats: int, batch: int = 256
) -> list[list[object]]:
    """Wide ``nn.Linear(in=n, out=k)`` training step (forward ``F.linear``, backward, optimizer step):
    the weight re-laid out by the optimizer (``p.mT`` row-major, the default) against the row-major
    ``nn.Linear`` storage kept (re-layout switched off). Also the forward + backward alone."""
    gen = torch.Generator().manual_seed(0)
    rows: list[list[object]] = []
    for k in ks:
        inp = torch.randn(batch, n, generator=gen)
        target = torch.randn(batch, k, generator=gen)
        w0 = torch.linalg.qr(torch.randn(n, k, generator=gen))[0].mT.contiguous()  # (k, n)
        fns = {
            "relaid": _linear_train(w0, inp, target, True, True),
            "row": _linear_train(w0, inp, target, False, True),
            "relaid_fb": _linear_train(w0, inp, target, True, False),
            "row_fb": _linear_train(w0, inp, target, False, False),
        }
        s = interleaved_times(fns, repeats=repeats, min_time=0.05)
        rows.append(
            [f"{k}×{n}, batch {batch}", _med(s["row"]) * 1e3, _med(s["relaid"]) * 1e3,
             median_ratio(s, "row", "relaid"), median_ratio(s, "row_fb", "relaid_fb")]
        )  # fmt: skip
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


def bench_per_element(d: int, repeats: int) -> dict[str, float]:
    """CPU time (one thread) per element per matching of the fused 16-matching heavy-ball step, and per
    element of ``torch.optim.SGD(momentum=0.9).step()``, on a d×d float32 weight. A memory-bound step
    costs more per element once its operands (3·4d² bytes) leave the caches; a compute-bound one does not.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        gen = torch.Generator().manual_seed(0)
        x = torch.linalg.qr(torch.randn(d, d, generator=gen))[0].contiguous()
        g = torch.randn(d, d, generator=gen) * 1e-3
        b = torch.randn(d, d, generator=gen) * 1e-3
        p = torch.nn.Parameter(x.clone())
        p.grad = g.clone()
        sgd = torch.optim.SGD([p], lr=1e-3, momentum=MOMENTUM)
        sgd.step()
        fused = _fused(x, g, b, round_robin(d))
        fused()
        inner = max(
            5, int(2e7 / (MATCHINGS * d * d))
        )  # after the first call, warm caches where they fit
        per: dict[str, list[float]] = {"fused": [], "sgd": []}
        for _ in range(repeats):
            for name, fn in (("fused", fused), ("sgd", sgd.step)):
                t0 = time.thread_time()
                for _ in range(inner):
                    fn()
                per[name].append((time.thread_time() - t0) / inner)
        fused_s = statistics.median(per["fused"])
        sgd_s = statistics.median(per["sgd"])
    finally:
        torch.set_num_threads(threads)
    return {
        "d": d,
        "fused_ps": fused_s * 1e12 / (MATCHINGS * d * d),
        "sgd_ps": sgd_s * 1e12 / (d * d),
        "fused/sgd": fused_s / sgd_s,
    }


def _adam_loop(x, g, m, rounds, step_size, *, row_sq, row_count, betas, eps, max_row_sq, scales,
               update_moment, check):  # fmt: skip
    """``givens_adam_steps_`` as it was before the fused kernel: one ``givens_step_`` per matching."""
    mats = givens._rounds(rounds, x.device)
    givens._adam_steps_torch(
        x, g, m, mats, givens._scales(scales, mats, x), step_size, row_sq, row_count, max_row_sq,
        *betas, eps, update_moment,
    )  # fmt: skip


def bench_default_adam(d: int, repeats: int) -> dict[str, float]:
    """``OrthogonalAdam.step()`` (default 16 matchings, and 1) against ``torch.optim.Adam.step()`` on a
    d×d float32 weight with a given gradient, and the per-matching loop the fused kernel replaced."""
    gen = torch.Generator().manual_seed(0)
    x0 = torch.linalg.qr(torch.randn(d, d, generator=gen))[0].contiguous()
    g0 = torch.randn(d, d, generator=gen) * 1e-3

    def opt_step(make):
        p = torch.nn.Parameter(x0.clone())
        p.grad = g0.clone()
        opt = make(p)
        opt.step()  # steady state: moments created
        return opt.step

    def orth(m):
        return lambda p: OrthogonalAdam(
            [{"params": [p], "manifold": "orthogonal"}], lr=1e-3, matchings_per_step=m
        )

    loop_step = opt_step(orth(MATCHINGS))

    def loop() -> None:
        saved = adam_module.givens_adam_steps_
        adam_module.givens_adam_steps_ = _adam_loop
        try:
            loop_step()
        finally:
            adam_module.givens_adam_steps_ = saved

    c1 = torch.randn(5 * d * d // 3, generator=gen)
    c2 = torch.randn_like(c1)
    fns = {
        "adam": opt_step(lambda p: torch.optim.Adam([p], lr=1e-3)),
        "orth16": opt_step(orth(MATCHINGS)),
        "orth1": opt_step(orth(1)),
        "loop16": loop,
        "add": lambda: c1.add_(c2),
    }
    s = interleaved_times(fns, repeats=repeats, min_time=0.05)
    med = {name: _med(v) for name, v in s.items()}
    nbytes = 5 * d * d * 4  # read x, g, M; write x, M (float32); the per-row state is O(d)
    add_bytes = 3 * c1.numel() * 4
    return {
        **{f"{name}_ms": t * 1e3 for name, t in med.items()},
        "orth16/adam": median_ratio(s, "orth16", "adam"),
        "orth1/adam": median_ratio(s, "orth1", "adam"),
        "loop16/adam": median_ratio(s, "loop16", "adam"),
        "bw_orth16": (nbytes / med["orth16"]) / (add_bytes / med["add"]),
        "bw_adam": (7 * d * d * 4 / med["adam"]) / (add_bytes / med["add"]),
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
        adam_ds, element_ds = [256, 2048], [1024, 2048]
    else:
        squares, talls, repeats, budget = (
            [256, 512, 1024, 2048, 4096],
            [(4096, 64), (16384, 256)],
            9,
            1.0,
        )
        layout_d, default_ds, rounds = 2048, [1024, 2048], 9
        adam_ds, element_ds = [256, 1024, 2048], [256, 512, 1024, 2048]

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
    print("\nlayouts (optimizer step, ratio to row-major / tall in the same run):", flush=True)
    lrows = bench_layouts(layout_d, [64, 256], rounds)
    before = bench_layouts(layout_d, [64, 256], rounds, relayout=False)
    lrows = [[*r, b[2]] for r, b in zip(lrows, before)]
    ltable = markdown_table(
        ["layout", "step ms", "time / row-major (or tall)", "without re-layout"], lrows
    )
    print(ltable, flush=True)
    cost = bench_relayout_cost(layout_d, rounds)
    cost_line = (
        f"One-time re-layout of a column-major {layout_d}×{layout_d} weight with its gradient and "
        f"momentum buffer: {cost['relayout_ms']:.3g} ms = {cost['relayout_ms'] / cost['step_ms']:.2f} "
        f"steady-state steps ({cost['step_ms']:.3g} ms)."
    )
    print(cost_line, flush=True)
    trows = bench_training_step(1024, [64, 256], rounds)
    ttable = markdown_table(
        [
            "wide weight k×n",
            "row-major kept ms",
            "re-laid out ms",
            "step: row-major / re-laid out",
            "forward + backward only: row-major / re-laid out",
        ],
        trows,
    )
    print(ttable, flush=True)
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
    erows = []
    for d in element_ds:
        r = bench_per_element(d, rounds)
        erows.append([f"{d}×{d}", r["fused_ps"], r["sgd_ps"], r["fused/sgd"]])
    etable = markdown_table(
        [
            "shape",
            f"fused m={MATCHINGS} ps per element per matching",
            "SGD ps per element",
            f"m={MATCHINGS} / SGD (one thread)",
        ],
        erows,
    )
    print(etable, flush=True)
    arows = []
    for d in adam_ds:
        r = bench_default_adam(d, rounds)
        arows.append(
            [f"{d}×{d}", r["adam_ms"], r["orth16_ms"], r["orth16/adam"], r["orth1_ms"],
             r["orth1/adam"], r["loop16/adam"], r["bw_orth16"], r["bw_adam"]]
        )  # fmt: skip
    atable = markdown_table(
        [
            "shape",
            "torch Adam ms",
            f"OrthogonalAdam m={MATCHINGS} ms",
            f"m={MATCHINGS} / Adam",
            "m=1 ms",
            "m=1 / Adam",
            f"{MATCHINGS} per-matching passes / Adam",
            f"bandwidth m={MATCHINGS}",
            "bandwidth Adam",
        ],
        arows,
    )
    print(atable, flush=True)
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
        f"`OrthogonalSGD(momentum={MOMENTUM})` and `OrthogonalAdam` steps (defaults: {MATCHINGS} "
        "round-robin matchings), float32, gradient given, in steady state (after the first step, which "
        "re-lays out the weight, its gradient and its moment so that the rows of the tall view are "
        'contiguous: docs/optim.md, "Memory layout"). Time relative to the row-major square weight '
        "(wide rows: to the tall weight of the same size), median of per-round ratios of interleaved "
        'measurements. "without re-layout": the same ratio with the re-layout switched off (the '
        "behaviour before it). A gradient set by hand every step keeps its own layout.\n\n"
        + ltable
        + "\n\n"
        + cost_line
        + "\n\n"
        "Whole training step of a wide `nn.Linear(in=1024, out=k)` weight (forward `F.linear`, backward, "
        "`OrthogonalSGD(momentum=0.9)` step, `zero_grad`), batch 256: the re-laid-out weight (default) "
        "against the `nn.Linear` row-major storage kept. Ratios > 1 favour the re-layout.\n\n"
        + ttable
        + "\n\n"
        "## The default step\n\n"
        f"`givens_steps_` with {MATCHINGS} and 1 round-robin matchings, momentum {MOMENTUM}, against "
        "`torch.optim.SGD(momentum=0.9).step()` and the loop of single-matching `givens_step_` calls "
        "that it replaces. Bandwidth: bytes the step must move (read x, g, B; write x, B) per second, as "
        "a fraction of what `torch.add_` reaches on the same number of bytes in the same run.\n\n"
        + dtable
        + "\n\n"
        "Where the time goes: CPU time of one thread per element (per matching for the fused step; the "
        f"{MATCHINGS} matchings of a step each touch every element once). The fused step's cost per "
        "element stays the same whether its operands fit in the caches (d ≤ 1024: 12 MB at most) or "
        "stream from memory (d = 2048: 48 MB), so it is bound by arithmetic, not by bandwidth; SGD's "
        "rises as soon as its operands leave the caches. The ratio to SGD at d = 2048 is therefore about "
        "the fused cost per element-matching times 16 over SGD's memory-bound cost per element "
        '(docs/optim.md, "Cost").\n\n' + etable + "\n\n"
        "`OrthogonalAdam.step()` (gradient given, steady state) with its default "
        f"{MATCHINGS} and with 1 matching, against `torch.optim.Adam.step()` on the same weight, and "
        "the same optimizer step through the per-matching loop (one `givens_step_` per matching, the "
        "per-row second moments refreshed in torch between them) that the fused kernel "
        "(`givens_adam_steps_`) replaced. Bandwidth as above (ours moves x, g, M: 5 d² floats; "
        "torch Adam p, g, m, v: 7 d²).\n\n" + atable + "\n"
    )
    path = write_doc("givens_step", body, quick=args.quick)
    print()
    print(table)
    print("\n".join(verdict))
    print(f"\nwritten: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
