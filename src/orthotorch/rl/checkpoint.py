"""Checkpoints of :class:`~orthotorch.rl.es.ARSTrainer`: one JSON file, written atomically.

JSON keeps the file readable and diffable, and Python's float ``repr`` round-trips float64 exactly, so a
resumed run continues bit-identically. A checkpoint holds the trainer state (config, policy and sampler
specs, parameters, observation statistics, ES iteration counters, the iteration RNG state), the env id,
the versions of the software that wrote it and whatever ``extra`` the caller adds (wall time, command).
"""

from __future__ import annotations

import json
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = ["FORMAT", "load_checkpoint", "save_checkpoint", "versions"]

#: Format tag stored in (and required of) every checkpoint.
FORMAT = "orthotorch.rl.ars/1"


def versions() -> dict[str, str]:
    """Versions of python, orthotorch, numpy, gymnasium and mujoco (``"not installed"`` if absent)."""
    out = {"python": platform.python_version()}
    for dist in ("orthotorch", "numpy", "gymnasium", "mujoco"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any], **extra: Any) -> Path:
    """Write ``state`` (:meth:`ARSTrainer.state_dict`) and ``extra`` to ``path`` atomically.

    The file is written to ``path.tmp``, flushed to disk and renamed over ``path``, so an interruption
    leaves either the old or the new checkpoint, never a partial one. Returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "format": FORMAT,
        "env_id": state["config"]["env_id"],
        "versions": versions(),
        **extra,
        "state": state,
    }
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(doc, f, allow_nan=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | os.PathLike[str], *, env_id: str | None = None) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Args:
        path: the JSON file.
        env_id: if given, the checkpoint must belong to this environment.

    Raises:
        FileNotFoundError: no such file. ValueError: not a checkpoint of this format, or of another env.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not a JSON checkpoint: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError(f"{path} is not an {FORMAT} checkpoint")
    if env_id is not None and doc["env_id"] != env_id:
        raise ValueError(f"checkpoint {path} is for environment {doc['env_id']!r}, not {env_id!r}")
    return doc
