"""The native kernel's build cache: every failure mode falls back (temporary directory or torch path) with
one warning and never raises into a step or `orthotorch info` (issue 10). Tests run as root, where chmod
does not deny access: unwritable directories are simulated by paths under a regular file and by
monkeypatching the calls that would fail for a non-root user."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import pytest
import torch

from orthotorch.apps.cli import info_lines
from orthotorch.graph_sampling import round_robin_matching
from orthotorch.manifolds import _native
from orthotorch.manifolds.givens import givens_step_, givens_steps_
from orthotorch.optim import OrthogonalSGD

REAL = _native.get_lib()
REAL_PATH = _native._state.get("path")


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """A not-yet-loaded kernel with its own cache dir; the session's loaded state is restored after."""
    saved = dict(_native._state)
    monkeypatch.setenv("ORTHOTORCH_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("ORTHOTORCH_NATIVE", raising=False)
    monkeypatch.setattr(_native, "fallback_dir", lambda: tmp_path / "fallback")
    _native.reset()
    yield tmp_path
    _native._state.clear()
    _native._state.update(saved)


def needs_real():
    if REAL is None or REAL_PATH is None:
        pytest.skip("native kernel unavailable in this environment")


def prebuilt(directory: Path) -> None:
    """Put a copy of the session's library where a build in ``directory`` would write it (no compile)."""
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(REAL_PATH, directory / Path(REAL_PATH).name)


def orthogonal_step_works() -> None:
    """The optimizers' primitives and `orthotorch info` run, whatever the kernel's state."""
    x = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))[0].contiguous()
    g, b = torch.randn(8, 8, dtype=torch.float64), torch.zeros(8, 8, dtype=torch.float64)
    rounds = [round_robin_matching(8, r) for r in range(3)]
    givens_steps_(x, g, rounds, 0.1, momentum_buffer=b, momentum=0.9)
    givens_step_(x, g, rounds[0].i, rounds[0].j, 0.1, co_rotate=b)
    eye = torch.eye(8, dtype=torch.float64)
    assert torch.allclose(x.T @ x, eye, atol=1e-12)
    assert any("native kernel" in line for line in info_lines())


def optimizer_step_works() -> None:
    w = torch.nn.Parameter(torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))[0].contiguous())
    opt = OrthogonalSGD([{"params": [w], "manifold": "orthogonal"}], lr=0.1, momentum=0.9)
    for _ in range(2):
        w.grad = torch.randn(8, 8, dtype=torch.float64)
        opt.step()
    eye = torch.eye(8, dtype=torch.float64)
    assert torch.allclose(w.detach().T @ w.detach(), eye, atol=1e-12)


def load_with_warnings() -> tuple[object, list[warnings.WarningMessage]]:
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        lib = _native.get_lib()
        _native.get_lib()  # a second call neither rebuilds nor warns again
        orthogonal_step_works()
    return lib, [w for w in rec if issubclass(w.category, RuntimeWarning)]


def test_cache_dir_pointing_at_a_file_uses_the_temporary_directory(fresh, monkeypatch):
    needs_real()
    (fresh / "afile").write_text("x")
    monkeypatch.setenv("ORTHOTORCH_CACHE_DIR", str(fresh / "afile"))
    prebuilt(fresh / "fallback")
    lib, warns = load_with_warnings()
    assert lib is not None
    assert len(warns) == 1 and "afile" in str(warns[0].message)
    assert str(fresh / "fallback") in _native.status()


def test_home_cache_being_a_file(fresh, monkeypatch):
    needs_real()
    monkeypatch.delenv("ORTHOTORCH_CACHE_DIR")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(fresh / "home"))
    (fresh / "home").mkdir()
    (fresh / "home" / ".cache").write_text("not a directory")
    assert _native.cache_dir() == fresh / "home" / ".cache" / "orthotorch"
    prebuilt(fresh / "fallback")
    lib, warns = load_with_warnings()
    assert lib is not None and len(warns) == 1
    assert "NotADirectoryError" in str(warns[0].message) or "FileExistsError" in str(
        warns[0].message
    )


def test_uncreatable_cache_path_under_a_regular_file(fresh, monkeypatch):
    needs_real()
    (fresh / "plain").write_text("x")
    monkeypatch.setenv("ORTHOTORCH_CACHE_DIR", str(fresh / "plain" / "sub" / "dir"))
    prebuilt(fresh / "fallback")
    lib, warns = load_with_warnings()
    assert lib is not None and len(warns) == 1


def test_read_only_cache_dir_for_a_non_root_user(fresh, monkeypatch):
    """mkdir and mkstemp raise PermissionError there (simulated: root is never denied)."""
    needs_real()
    cache = fresh / "cache"
    real_mkdir, real_mkstemp = Path.mkdir, tempfile.mkstemp

    def mkdir(self, *args, **kwargs):
        if (self == cache or cache in self.parents) and not self.exists():
            raise PermissionError(13, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    def mkstemp(*args, **kwargs):
        if Path(kwargs.get("dir", "")) == cache:
            raise PermissionError(13, "Permission denied", str(cache))
        return real_mkstemp(*args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    prebuilt(fresh / "fallback")
    lib, warns = load_with_warnings()
    assert lib is not None and len(warns) == 1 and "PermissionError" in str(warns[0].message)
    # an existing but read-only directory: mkdir succeeds, file creation fails
    _native.reset()
    real_mkdir(cache)
    lib, warns = load_with_warnings()
    assert lib is not None and len(warns) == 1 and "PermissionError" in str(warns[0].message)


def test_no_usable_directory_falls_back_to_torch_with_one_warning(fresh, monkeypatch):
    (fresh / "afile").write_text("x")
    monkeypatch.setenv("ORTHOTORCH_CACHE_DIR", str(fresh / "afile" / "a"))
    monkeypatch.setattr(_native, "fallback_dir", lambda: fresh / "afile" / "b")
    lib, warns = load_with_warnings()
    if _native._compiler() is None:
        assert lib is None and not warns  # no compiler: silent torch path, as before
        return
    assert lib is None and len(warns) == 1
    assert "torch path" in _native.status()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # nothing more is warned
        optimizer_step_works()


def test_library_without_kernel_symbols_is_rebuilt(fresh):
    needs_real()
    cc = _native._compiler()
    cache = fresh / "cache"
    cache.mkdir()
    src = fresh / "dummy.c"
    src.write_text("int something_else(void) { return 1; }\n")
    target = cache / _native.library_name(cc, _native._FLAG_SETS[0])
    subprocess.run([cc, "-shared", "-fPIC", str(src), "-o", str(target)], check=True)
    lib, warns = load_with_warnings()
    assert lib is not None and not warns
    assert "-march=native" in _native.status()
    assert hasattr(lib, "ot_steps_f32")


def test_zero_byte_cached_file_is_rebuilt_with_the_same_flags(fresh):
    """Used to switch silently to the build without -march=native."""
    needs_real()
    cache = fresh / "cache"
    cache.mkdir()
    target = cache / _native.library_name(_native._compiler(), _native._FLAG_SETS[0])
    target.write_bytes(b"")
    lib, warns = load_with_warnings()
    assert lib is not None and not warns
    assert "-march=native" in _native.status()
    assert target.stat().st_size > 0


def test_garbage_cached_file_is_rebuilt(fresh):
    needs_real()
    cache = fresh / "cache"
    cache.mkdir()
    target = cache / _native.library_name(_native._compiler(), _native._FLAG_SETS[0])
    target.write_bytes(b"\x7fELF garbage" * 100)
    lib, warns = load_with_warnings()
    assert lib is not None and not warns
    assert "-march=native" in _native.status()


def test_no_compiler(fresh, monkeypatch):
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(_native.shutil, "which", lambda name: None)
    lib, warns = load_with_warnings()
    assert lib is None and not warns
    assert "no C compiler" in _native.status()


def test_cc_false(fresh, monkeypatch):
    if shutil.which("false") is None:
        pytest.skip("no `false` binary")
    monkeypatch.setenv("CC", "false")
    lib, warns = load_with_warnings()
    assert lib is None and len(warns) == 1
    # the torch path gives the result
    x = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))[0]
    m = round_robin_matching(6, 0)
    givens_steps_(x, torch.randn(6, 6, dtype=torch.float64), [m], 0.1)
    assert torch.allclose(x.T @ x, torch.eye(6, dtype=torch.float64), atol=1e-12)


def test_native_disabled_by_environment(fresh, monkeypatch):
    monkeypatch.setenv("ORTHOTORCH_NATIVE", "0")
    lib, warns = load_with_warnings()
    assert lib is None and not warns and "disabled" in _native.status()


def test_unexpected_error_never_escapes(fresh, monkeypatch):
    def boom():
        raise RuntimeError("boom")

    monkeypatch.setattr(_native, "cache_dir", boom)
    lib, warns = load_with_warnings()
    assert lib is None and len(warns) == 1 and "boom" in _native.status()


def test_four_python_threads_share_one_build(fresh, monkeypatch):
    needs_real()
    prebuilt(fresh / "cache")
    calls = []
    real_build = _native._build

    def counting_build():
        calls.append(1)
        return real_build()

    monkeypatch.setattr(_native, "_build", counting_build)
    libs: list[object] = []
    barrier = threading.Barrier(4)

    def worker():
        barrier.wait()
        libs.append(_native.get_lib())
        x = torch.randn(32, 8)
        givens_step_(x, torch.randn(32, 8), torch.arange(0, 32, 2), torch.arange(1, 32, 2), 0.1)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert (
        len(calls) == 1
        and len(libs) == 4
        and all(lib is libs[0] and lib is not None for lib in libs)
    )


@pytest.mark.slow  # two fresh interpreters compile at once: ≈ 5 s idle, 20+ s on a loaded machine
def test_concurrent_first_builds_in_separate_processes(tmp_path):
    needs_real()
    code = (
        "from orthotorch.manifolds import _native; import torch;"
        "from orthotorch.manifolds.givens import givens_step_;"
        "x = torch.randn(8, 4); givens_step_(x, torch.randn(8, 4), [0, 2], [1, 3], 0.1);"
        "print(_native.status())"
    )
    env = {**os.environ, "ORTHOTORCH_CACHE_DIR": str(tmp_path / "shared")}
    procs = [
        subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert all(out.startswith("loaded") for out in outs), outs
    assert not list((tmp_path / "shared").glob(".build-*"))  # no stray temporary files
