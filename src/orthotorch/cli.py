"""The ``orthotorch`` command.

``orthotorch --version``, ``orthotorch info`` and ``orthotorch demo`` live here; every subpackage that
offers a subcommand has a ``cli`` module with ``register(subparsers)``, listed in ``_SUBCOMMAND_MODULES``.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import platform
import sys
from collections.abc import Sequence

from orthotorch import __version__

_SUBCOMMAND_MODULES = (
    "orthotorch.demo",
    "orthotorch.optim.cli",
    "orthotorch.attention.cli",
    "orthotorch.bilevel.cli",
    "orthotorch.nn.cli",
    "orthotorch.rl.cli",
)


def _version_of(dist: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def info_lines() -> list[str]:
    """Environment summary: library versions, thread counts and available devices."""
    import torch

    lines = [
        f"orthotorch {__version__}",
        f"python     {platform.python_version()} ({platform.machine()}, {platform.system()})",
    ]
    for dist in ("torch", "geoopt", "networkx", "scipy", "numpy"):
        lines.append(f"{dist:<10} {_version_of(dist)}")
    lines.append(
        f"threads    torch={torch.get_num_threads()} interop={torch.get_num_interop_threads()} "
        f"cpus={os.cpu_count()}"
    )
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += [
            f"cuda:{i} ({torch.cuda.get_device_name(i)})" for i in range(torch.cuda.device_count())
        ]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        devices.append("mps")
    lines.append(f"devices    {', '.join(devices)}")
    from orthotorch.manifolds import givens

    lines.append(f"givens     native kernel: {givens.native_status()}")
    return lines


def _cmd_info(args: argparse.Namespace) -> int:
    print("\n".join(info_lines()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every available subcommand registered."""
    parser = argparse.ArgumentParser(prog="orthotorch", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"orthotorch {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p_info = sub.add_parser("info", help="versions, thread count and available devices")
    p_info.set_defaults(func=_cmd_info)
    for name in _SUBCOMMAND_MODULES:
        if importlib.util.find_spec(name) is None:
            continue
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``orthotorch`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
