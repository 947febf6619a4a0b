"""Build-on-first-use loader for the C Givens kernels (``_givens_kernel.c``), called through ctypes.

The kernel is a plain C file compiled with the system C compiler (``$CC``, else ``cc``/``gcc``/``clang``)
into a per-user cache, keyed by the source, the compiler, the flags and the CPU, so a rebuild happens only
when one of them changes. It needs no torch headers, so the build takes about a second.

Environment:

- ``ORTHOTORCH_CACHE_DIR``: the cache directory (default ``$XDG_CACHE_HOME/orthotorch``, else
  ``~/.cache/orthotorch``).
- ``ORTHOTORCH_NATIVE=0``: never build or load the kernel (pure-torch path).

Nothing here raises into the caller. When the cache directory cannot be created or written (read-only
home, a path through a regular file, ...) the kernel is built in a private temporary directory instead;
when no compiler works, or a library cannot be loaded, the library uses its pure-torch path, which gives
the same results more slowly. Either fallback emits one ``RuntimeWarning`` per process. A cached file
that cannot be loaded (0 bytes, garbage, missing kernel symbols) is rebuilt in place with the same flags.
"""

from __future__ import annotations

import ctypes
import getpass
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

_SOURCE = Path(__file__).with_name("_givens_kernel.c")
# every file the build reads (the fused step is #included by _SOURCE): all are part of the cache key
_SOURCES = (_SOURCE, Path(__file__).with_name("_givens_steps_impl.c"))
_FLAG_SETS = (
    ["-O3", "-march=native", "-fopenmp"],
    ["-O3", "-fopenmp"],
    ["-O3"],
)
_ABI_VERSION = 7
_lock = threading.Lock()
_state: dict[str, object] = {"lib": None, "tried": False, "status": "not loaded yet", "path": None}

# Argument types of each kernel (see _givens_kernel.c): p = pointer, i = int64, r = the real type of the
# variant (float for ``_f32``, double for ``_f64``), c = int (thread count). Every kernel returns an int
# status: 0, -1 (index out of range), -2 (out of memory), -3 (a pair (i, i)), -4 (pairs not disjoint),
# -5 (a layout the kernel does not walk), -6 (inconsistent arguments).
SIGNATURES: dict[str, str] = {
    "coeffs": "piiipiiippiiiipc",
    "rotate": "piiippiiiipic",
    "step": "piiipiiippiiiirpipc",
    "step2": "piipiiipiippiiiirpipc",
    "steps": "piiipiiipiiipppiiiirpiirrpc",
    # mode 3 of the fused step (OrthogonalAdam): x, g, first moment (pointer + 3 strides each), pairs,
    # offsets, sizes, step size, scale, update, 1 - beta1, row_sq, row_count, max_row_sq, beta2,
    # 1 - beta2, eps
    "adam_steps": "piiipiiipiiipppiiiirpirppprrrc",
}
# Kernels without a real-typed variant (name used as is).
PLAIN_SIGNATURES: dict[str, str] = {
    "ot_check_pairs": "ppiii",
    "ot_abi_version": "",
}


def _cpu_key() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith(("model name", "flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor()


def cache_dir() -> Path:
    """The configured cache directory (it may not exist, or not be usable)."""
    root = os.environ.get("ORTHOTORCH_CACHE_DIR")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg) / "orthotorch"
    try:
        home = Path.home()
    except (RuntimeError, KeyError, OSError):  # no HOME and no passwd entry
        home = Path(tempfile.gettempdir())
    return home / ".cache" / "orthotorch"


def fallback_dir() -> Path:
    """Private per-user directory under the system temporary directory, used when :func:`cache_dir` is not."""
    try:
        user = getpass.getuser()
    except Exception:  # getuser raises several kinds of errors without a passwd entry
        user = str(os.getuid()) if hasattr(os, "getuid") else "user"
    return Path(tempfile.gettempdir()) / f"orthotorch-{user}"


def _compiler() -> str | None:
    for cand in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cand and shutil.which(cand):
            return cand
    return None


def library_name(cc: str, flags: list[str]) -> str:
    """File name of the cached library for a compiler and a flag set (depends on source and CPU too)."""
    key = hashlib.sha256(
        b"".join(src.read_bytes() for src in _SOURCES)
        + " ".join([cc, *flags]).encode()
        + _cpu_key().encode()
        + platform.machine().encode()
    ).hexdigest()[:16]
    return f"givens_{key}.so"


def _declare(lib: ctypes.CDLL) -> None:
    """Set argument types of every kernel; raises ``AttributeError`` if a symbol is missing."""
    for sfx, real in (("f32", ctypes.c_float), ("f64", ctypes.c_double)):
        kinds = {"p": ctypes.c_void_p, "i": ctypes.c_int64, "r": real, "c": ctypes.c_int}
        for name, sig in SIGNATURES.items():
            f = getattr(lib, f"ot_{name}_{sfx}")
            f.argtypes = [kinds[ch] for ch in sig]
            f.restype = ctypes.c_int
    kinds = {"p": ctypes.c_void_p, "i": ctypes.c_int64, "c": ctypes.c_int}
    for name, sig in PLAIN_SIGNATURES.items():
        f = getattr(lib, name)
        f.argtypes = [kinds[ch] for ch in sig]
        f.restype = ctypes.c_int
    version = lib.ot_abi_version()
    if version != _ABI_VERSION:
        raise AttributeError(f"kernel ABI version {version}, expected {_ABI_VERSION}")


def _load(path: Path) -> ctypes.CDLL:
    """Load and declare ``path``; raises ``OSError`` or ``AttributeError`` if it is not our kernel."""
    lib = ctypes.CDLL(str(path))
    _declare(lib)
    return lib


def _usable_dir(d: Path) -> None:
    """Create ``d`` if needed and check that a file can be created in it (raises ``OSError``)."""
    d.mkdir(parents=True, exist_ok=True)
    if not d.is_dir():
        raise NotADirectoryError(f"{d} is not a directory")
    fd, probe = tempfile.mkstemp(prefix=".probe-", dir=d)
    os.close(fd)
    os.unlink(probe)


def _compile(cc: str, flags: list[str], directory: Path, errors: list[str]) -> Path | None:
    """Compile into a fresh unique file in ``directory``; ``None`` (with a note in ``errors``) on failure."""
    fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=directory)
    os.close(fd)
    cmd = [cc, *flags, "-fPIC", "-shared", str(_SOURCE), "-o", tmp, "-lm"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as exc:
        os.unlink(tmp)
        errors.append(f"{' '.join(cmd)}: {exc}")
        return None
    if proc.returncode != 0 or os.path.getsize(tmp) == 0:
        os.unlink(tmp)
        errors.append(f"{' '.join(cmd)}: {proc.stderr.strip()[:300] or 'empty output'}")
        return None
    return Path(tmp)


def _build_in(
    cc: str, directory: Path, errors: list[str]
) -> tuple[ctypes.CDLL, Path, list[str]] | None:
    """Load the cached library from ``directory`` (building it when missing or unloadable)."""
    for flags in _FLAG_SETS:
        target = directory / library_name(cc, flags)
        if target.is_file() and target.stat().st_size > 0:
            try:
                return _load(target), target, flags
            except (OSError, AttributeError) as exc:
                # garbage, truncated or foreign file: rebuild it below with the same flags
                errors.append(f"cached {target.name} unusable ({exc}); rebuilding")
        built = _compile(cc, flags, directory, errors)
        if built is None:
            continue  # these flags do not compile here: try the next set
        try:
            # load from the unique build path: dlopen caches by name, so a library previously loaded from
            # ``target`` (e.g. one without our symbols) would otherwise be returned again
            lib = _load(built)
        except (OSError, AttributeError) as exc:
            errors.append(f"loading {built}: {exc}")
            os.unlink(built)
            continue
        try:
            os.replace(built, target)  # atomic: concurrent processes see a complete file
        except OSError:
            os.unlink(built)  # the loaded mapping stays valid
        return lib, target, flags
    return None


def _build() -> ctypes.CDLL | None:
    if os.environ.get("ORTHOTORCH_NATIVE", "1") == "0":
        _state["status"] = "disabled (ORTHOTORCH_NATIVE=0)"
        return None
    cc = _compiler()
    if cc is None:
        _state["status"] = "unavailable (no C compiler found; using the torch path)"
        return None
    errors: list[str] = []
    preferred = cache_dir()
    for directory in (preferred, fallback_dir()):
        try:
            _usable_dir(directory)
        except OSError as exc:
            errors.append(f"cache directory {directory} unusable: {type(exc).__name__}: {exc}")
            continue
        try:
            found = _build_in(cc, directory, errors)
        except OSError as exc:  # e.g. the directory became read-only, or the disk is full
            errors.append(f"building in {directory}: {type(exc).__name__}: {exc}")
            continue
        if found is None:
            break  # the compiler fails with every flag set: another directory will not help
        lib, target, flags = found
        _state["path"] = str(target)
        _state["status"] = f"loaded ({target.name}, flags: {' '.join(flags)})"
        if directory != preferred:
            _state["status"] = (
                f"loaded ({target}, flags: {' '.join(flags)}; cache {preferred} unusable)"
            )
            warnings.warn(
                f"orthotorch: the native Givens kernel cache {preferred} is not usable; built the kernel "
                f"in {directory} instead (set ORTHOTORCH_CACHE_DIR to a writable directory):\n"
                + "\n".join(errors),
                RuntimeWarning,
                stacklevel=4,
            )
        return lib
    _state["status"] = "unavailable (build failed; using the torch path)"
    warnings.warn(
        "orthotorch: could not build the native Givens kernel, falling back to the slower torch path:\n"
        + "\n".join(errors),
        RuntimeWarning,
        stacklevel=4,
    )
    return None


def get_lib() -> ctypes.CDLL | None:
    """The loaded kernel library, building it on first use; ``None`` when unavailable (never raises)."""
    if not _state["tried"]:
        with _lock:
            if not _state["tried"]:
                try:
                    _state["lib"] = _build()
                except Exception as exc:  # the torch path must stay usable whatever happens
                    _state["lib"] = None
                    _state["status"] = (
                        f"unavailable ({type(exc).__name__}: {exc}; using the torch path)"
                    )
                    warnings.warn(
                        f"orthotorch: native Givens kernel unavailable ({type(exc).__name__}: {exc}); "
                        "falling back to the slower torch path",
                        RuntimeWarning,
                        stacklevel=3,
                    )
                _state["tried"] = True
    return _state["lib"]  # type: ignore[return-value]


def kernel(name: str, dtype_suffix: str | None = None) -> Callable[..., int]:
    """The loaded function ``ot_<name>_<suffix>`` (or ``name`` itself when ``dtype_suffix`` is None)."""
    lib = get_lib()
    if lib is None:
        raise RuntimeError("the native Givens kernel is not loaded")
    fn: Callable[..., int] = getattr(
        lib, name if dtype_suffix is None else f"ot_{name}_{dtype_suffix}"
    )
    return fn


def reset() -> None:
    """Forget the loaded library so that the next :func:`get_lib` builds or loads it again (for tests)."""
    with _lock:
        _state.update(lib=None, tried=False, status="not loaded yet", path=None)


def status() -> str:
    """Human-readable state of the native kernel (loads it if not tried yet)."""
    get_lib()
    return str(_state["status"])
