"""The ``orthotorch`` command: ``--version``, ``info`` and the application subcommands.

Every subcommand lives in a module of :mod:`orthotorch.apps` with a ``register(subparsers)`` function,
listed explicitly in :data:`SUBCOMMANDS`. A module that fails to import fails the command loudly: a
renamed module must not make its subcommand vanish. Modules that need an optional extra import it inside
the command, so ``--help`` works without it.
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys
from collections.abc import Sequence
from importlib import metadata

import torch

from orthotorch import __version__
from orthotorch.manifolds import givens

#: ``(subcommand, module)``: each module's ``register(subparsers)`` adds that subcommand.
SUBCOMMANDS: tuple[tuple[str, str], ...] = (
    ("demo", "orthotorch.apps.demo"),
    ("attention", "orthotorch.apps.attention_lm"),
    ("bilevel", "orthotorch.apps.bilevel.cli"),
    ("rnn", "orthotorch.apps.rnn"),
    ("humanoid", "orthotorch.apps.humanoid"),
)


def _version_of(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def info_lines() -> list[str]:
    """Environment summary: library versions, thread counts and available devices."""

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
    lines.append(f"givens     native kernel: {givens.native_status()}")
    return lines


def _cmd_info(args: argparse.Namespace) -> int:
    print("\n".join(info_lines()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every available subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="orthotorch",
        description="Optimization on orthogonal groups and Stiefel manifolds for PyTorch: demos, "
        "experiments and environment information.",
    )
    parser.add_argument("--version", action="version", version=f"orthotorch {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p_info = sub.add_parser(
        "info",
        help="versions, thread count and available devices",
        description="Print library versions, torch thread counts, available devices and whether the "
        "native Givens kernel is loaded.",
    )
    p_info.set_defaults(func=_cmd_info)
    for _, module in SUBCOMMANDS:
        importlib.import_module(module).register(sub)
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
