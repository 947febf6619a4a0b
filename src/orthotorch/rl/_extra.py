"""The optional ``rl`` extra (gymnasium with MuJoCo, Ray): imported lazily, with one clear error message."""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["INSTALL_HINT", "MissingExtraError", "require"]

#: The command that installs the extra (from a checkout of the repository).
INSTALL_HINT = 'pip install -e ".[rl]"'


class MissingExtraError(ImportError):
    """An optional dependency of :mod:`orthotorch.rl` is not installed."""


def require(module: str) -> ModuleType:
    """Import ``module`` (``"gymnasium"``, ``"mujoco"``, ``"ray"``, ...) or raise :class:`MissingExtraError`.

    The message names the missing module and the install command of the ``rl`` extra; the original
    ``ImportError`` is chained as the cause.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(
            f"orthotorch.rl needs the optional extra `rl` ({module} is missing: {exc}); "
            f"install it with: {INSTALL_HINT}"
        ) from exc
