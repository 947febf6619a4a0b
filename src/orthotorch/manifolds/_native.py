"""Build-on-first-use loader for the C Givens kernels (``_givens_kernel.c``), called through ctypes.

The kernel is a plain C file compiled with the system C compiler (``$CC``, else ``cc``/``gcc``) into a
per-user cache (``$ORTHOTORCH_CACHE_DIR``, default ``~/.cache/orthotorch``), keyed by the source, the flags
and the CPU, so a rebuild happens only when one of them changes. It needs no torch headers, so the build takes
about a second. Without a compiler (or with ``ORTHOTORCH_NATIVE=0``) the library uses its pure-torch path,
which gives the same results more slowly.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

_SOURCE = Path(__file__).with_name("_givens_kernel.c")
_FLAG_SETS = (
    ["-O3", "-march=native", "-fopenmp"],
    ["-O3", "-fopenmp"],
    ["-O3"],
)
_lock = threading.Lock()
_state: dict[str, object] = {"lib": None, "tried": False, "status": "not loaded yet"}


def _cpu_key() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith(("model name", "flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor()


def _cache_dir() -> Path:
    root = os.environ.get("ORTHOTORCH_CACHE_DIR")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "orthotorch"


def _compiler() -> str | None:
    for cand in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cand and shutil.which(cand):
            return cand
    return None


# Argument types of each kernel (see _givens_kernel.c): p = pointer, i = int64, r = the real type,
# c = int (thread count). Every kernel returns an int status.
_SIGNATURES = {
    "coeffs": "piiipiiippiiiipc",
    "rotate": "piiippiiiipic",
    "step": "piiipiiippiiiirpipc",
    "step2": "piipiiipiippiiiirpipc",
}


def _declare(lib: ctypes.CDLL) -> None:
    for sfx, real in (("f32", ctypes.c_float), ("f64", ctypes.c_double)):
        kinds = {"p": ctypes.c_void_p, "i": ctypes.c_int64, "r": real, "c": ctypes.c_int}
        for name, sig in _SIGNATURES.items():
            f = getattr(lib, f"ot_{name}_{sfx}")
            f.argtypes = [kinds[ch] for ch in sig]
            f.restype = ctypes.c_int


def _build() -> ctypes.CDLL | None:
    if os.environ.get("ORTHOTORCH_NATIVE", "1") == "0":
        _state["status"] = "disabled (ORTHOTORCH_NATIVE=0)"
        return None
    cc = _compiler()
    if cc is None:
        _state["status"] = "unavailable (no C compiler found; using the torch path)"
        return None
    source = _SOURCE.read_bytes()
    errors = []
    for flags in _FLAG_SETS:
        key = hashlib.sha256(
            source
            + " ".join([cc, *flags]).encode()
            + _cpu_key().encode()
            + platform.machine().encode()
        ).hexdigest()[:16]
        target = _cache_dir() / f"givens_{key}.so"
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
            os.close(fd)
            cmd = [cc, *flags, "-fPIC", "-shared", str(_SOURCE), "-o", tmp, "-lm"]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                os.unlink(tmp)
                errors.append(f"{' '.join(cmd)}: {proc.stderr.strip()[:300]}")
                continue
            os.replace(tmp, target)  # atomic: concurrent processes see a complete file
        try:
            lib = ctypes.CDLL(str(target))
            _declare(lib)
        except OSError as exc:
            errors.append(f"loading {target}: {exc}")
            continue
        _state["status"] = f"loaded ({target.name}, flags: {' '.join(flags)})"
        return lib
    _state["status"] = "unavailable (build failed; using the torch path)"
    warnings.warn(
        "orthotorch: could not build the native Givens kernel, falling back to the slower torch path:\n"
        + "\n".join(errors),
        RuntimeWarning,
        stacklevel=3,
    )
    return None


def get_lib() -> ctypes.CDLL | None:
    """The loaded kernel library, building it on first use; ``None`` when unavailable."""
    if not _state["tried"]:
        with _lock:
            if not _state["tried"]:
                _state["lib"] = _build()
                _state["tried"] = True
    return _state["lib"]  # type: ignore[return-value]


def status() -> str:
    """Human-readable state of the native kernel (loads it if not tried yet)."""
    get_lib()
    return str(_state["status"])
