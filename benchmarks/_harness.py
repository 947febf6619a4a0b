"""Shared helpers for the benchmark scripts: timing, environment header, markdown output, memory peaks.

Times are medians of several repeats; every script compares against its baseline in the same run and
prints the thread count and versions, because absolute times on a shared 2-core machine are noisy.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks"


def sync(device: torch.device | str | None = None) -> None:
    """Wait for queued kernels on ``device`` (no-op on CPU)."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median_time(
    fn: Callable[[], object],
    *,
    repeats: int = 7,
    warmup: int = 2,
    min_time: float = 0.02,
    device: torch.device | str | None = None,
) -> float:
    """Median wall-clock seconds of ``fn()`` over ``repeats`` measurements.

    Each measurement runs ``fn`` enough times to last at least ``min_time`` seconds, so sub-millisecond
    steps are not dominated by timer resolution.
    """
    for _ in range(warmup):
        fn()
    sync(device)
    # calibrate inner loop count
    t0 = time.perf_counter()
    fn()
    sync(device)
    once = max(time.perf_counter() - t0, 1e-7)
    inner = max(1, int(min_time / once))
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        sync(device)
        samples.append((time.perf_counter() - t0) / inner)
    return statistics.median(samples)


def interleaved_times(
    fns: dict[str, Callable[[], object]],
    *,
    repeats: int = 7,
    warmup: int = 1,
    min_time: float = 0.02,
    device: torch.device | str | None = None,
) -> dict[str, list[float]]:
    """Per-call seconds of each function, measured in alternation: ``repeats`` rounds, each timing every
    function once (in a rotated order) for at least ``min_time``.

    On a loaded machine the load changes between measurements; interleaving exposes every function to the
    same conditions, so the per-round ratios (see :func:`median_ratio`) are much steadier than ratios of
    separately measured medians.
    """
    names = list(fns)
    inner: dict[str, int] = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        inner[name] = max(1, int(min_time / max(time.perf_counter() - t0, 1e-7)))
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            fn = fns[name]
            t0 = time.perf_counter()
            for _ in range(inner[name]):
                fn()
            sync(device)
            samples[name].append((time.perf_counter() - t0) / inner[name])
    return samples


def median_ratio(samples: dict[str, list[float]], num: str, den: str) -> float:
    """Median over rounds of ``samples[num][r] / samples[den][r]`` (from :func:`interleaved_times`)."""
    return statistics.median(a / b for a, b in zip(samples[num], samples[den]))


def env_header(extra: Sequence[str] = ()) -> str:
    """Markdown block with date, versions, thread count and device used for a benchmark run.

    ``extra``: more distributions whose versions go on the versions line (``-`` if not installed).
    """
    from importlib import metadata

    def ver(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "-"

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return (
        f"- date: {_dt.datetime.now().strftime('%Y-%m-%d %H:%M')}\n"
        f"- torch {torch.__version__}, geoopt {ver('geoopt')}, networkx {ver('networkx')}, "
        f"python {platform.python_version()}"
        + "".join(f", {dist} {ver(dist)}" for dist in extra)
        + "\n"
        f"- CPU: {cpu} ({os.cpu_count()} logical cores), torch threads: {torch.get_num_threads()}\n"
        f"- GPU: {gpu}\n"
    )


def fmt(x: float, digits: int = 3) -> str:
    """Compact number formatting for tables."""
    if x != x:  # NaN
        return "–"
    if x == 0:
        return "0"
    if abs(x) >= 1000 or abs(x) < 1e-3:
        return f"{x:.{digits - 1}e}"
    return f"{x:.{digits}g}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table; floats go through :func:`fmt`."""
    cells = [[fmt(c) if isinstance(c, float) else str(c) for c in row] for row in rows]
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in cells]
    return "\n".join(out)


def write_doc(area: str, body: str, *, quick: bool = False) -> Path:
    """Write ``docs/benchmarks/<area>.md`` (``<area>.quick.md`` for quick runs, which are not committed)."""
    DOCS.mkdir(parents=True, exist_ok=True)
    path = DOCS / (f"{area}.quick.md" if quick else f"{area}.md")
    path.write_text(body)
    return path


def peak_rss_mb(code: str, *, env: dict[str, str] | None = None, timeout: float = 900) -> dict:
    """Run ``code`` in a fresh Python process and return its JSON result plus peak RSS (MiB).

    ``code`` must print one JSON object on its last stdout line. The peak resident set size
    (``VmHWM``, else ``ru_maxrss``) of a fresh process is the honest CPU memory peak: torch's CPU allocator has no
    statistics API. Subtract a baseline process's peak to get the extra memory of an operation.
    """
    # VmHWM is the peak RSS of this process's own address space (reset by exec). ru_maxrss is not:
    # Linux carries the parent's high-water mark into a forked/exec'd child, which hides small peaks
    # when the benchmark process itself is large.
    wrapper = (
        "import json, resource, sys\n" + code + "\ndef _peak_mb():\n"
        "    try:\n"
        "        for line in open('/proc/self/status'):\n"
        "            if line.startswith('VmHWM:'):\n"
        "                return int(line.split()[1]) / 1024\n"
        "    except OSError:\n"
        "        pass\n"
        "    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024\n"
        "print(json.dumps({**(_result if '_result' in globals() else {}), "
        "'peak_rss_mb': _peak_mb()}))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", wrapper],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark subprocess failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
