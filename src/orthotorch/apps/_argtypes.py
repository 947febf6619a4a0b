"""argparse ``type=`` functions shared by the orthotorch subcommands.

Each raises :class:`argparse.ArgumentTypeError`, which argparse prints as one line,
``orthotorch CMD: error: argument --flag: <message>``, and exits with status 2. The messages state the
constraint and echo what was given (``must be >= 1, got 0``); the flag is named by argparse itself.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

__all__ = ["int_at_least", "positive_real", "real"]


def int_at_least(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """A ``type`` accepting integers in ``[minimum, maximum]`` (no upper bound when ``maximum`` is None)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be <= {maximum}, got {value}")
        return value

    return parse


def _bounds_text(
    minimum: float | None, maximum: float | None, min_inclusive: bool, max_inclusive: bool
) -> str:
    """The constraint in words: ``''``, ``' > 0'``, ``' <= 1'`` or ``' in [0, 1)'``."""
    if minimum is not None and maximum is not None:
        lo = "[" if min_inclusive else "("
        hi = "]" if max_inclusive else ")"
        return f" in {lo}{minimum:g}, {maximum:g}{hi}"
    if minimum is not None:
        return f" {'>=' if min_inclusive else '>'} {minimum:g}"
    if maximum is not None:
        return f" {'<=' if max_inclusive else '<'} {maximum:g}"
    return ""


def real(
    minimum: float | None = None,
    maximum: float | None = None,
    *,
    min_inclusive: bool = True,
    max_inclusive: bool = True,
) -> Callable[[str], float]:
    """A ``type`` accepting finite floats between ``minimum`` and ``maximum`` (None: unbounded).

    NaN and ±inf are always refused. ``min_inclusive`` / ``max_inclusive`` say whether the bounds
    themselves are allowed, e.g. ``real(0.0, 1.0, max_inclusive=False)`` accepts ``[0, 1)``.
    """
    bounds = _bounds_text(minimum, maximum, min_inclusive, max_inclusive)

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        ok = math.isfinite(value)
        if ok and minimum is not None:
            ok = value >= minimum if min_inclusive else value > minimum
        if ok and maximum is not None:
            ok = value <= maximum if max_inclusive else value < maximum
        if not ok:
            raise argparse.ArgumentTypeError(f"must be a finite number{bounds}, got {text}")
        return value

    return parse


_positive = real(0.0, min_inclusive=False)


def positive_real(text: str) -> float:
    """A ``type`` accepting finite floats ``> 0`` (learning rates, time budgets, noise scales)."""
    return _positive(text)
