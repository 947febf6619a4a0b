"""Argument checks shared by the whole library.

Every check raises ``TypeError``/``ValueError`` naming the argument, what it received and what was
expected, so user errors surface at the call site instead of as NaNs or shape errors deep inside.
"""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def describe(x: torch.Tensor) -> str:
    """Short description of a tensor for error messages: ``shape (3, 4), dtype torch.float32``."""
    return f"shape {tuple(x.shape)}, dtype {x.dtype}, device {x.device}"


def check_tensor(name: str, x: object) -> torch.Tensor:
    """Raise ``TypeError`` unless ``x`` is a tensor; return it."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(x).__name__}")
    return x


def check_floating(
    name: str, x: torch.Tensor, dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES
) -> None:
    """Raise ``TypeError`` unless ``x`` has one of ``dtypes`` (default: the floating dtypes)."""
    check_tensor(name, x)
    if x.dtype not in dtypes:
        allowed = ", ".join(str(d) for d in dtypes)
        raise TypeError(f"`{name}` must have a floating dtype ({allowed}), got {describe(x)}")


def check_matrix(name: str, x: torch.Tensor, *, tall: bool = False) -> tuple[int, int]:
    """Check ``x`` has shape ``(..., n, k)`` (``n >= k`` when ``tall``); return ``(n, k)``."""
    check_tensor(name, x)
    if x.dim() < 2:
        raise ValueError(f"`{name}` must have at least 2 dimensions (..., n, k), got {describe(x)}")
    n, k = x.shape[-2], x.shape[-1]
    if tall and n < k:
        raise ValueError(
            f"`{name}` must be tall (..., n, k) with n >= k (Stiefel convention; transpose wide "
            f"weights), got {describe(x)}"
        )
    return n, k


def check_same_shape(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``a`` and ``b`` have identical shapes, and ``TypeError`` on dtype mismatch."""
    if a.shape != b.shape:
        raise ValueError(
            f"`{name_b}` must have the same shape as `{name_a}` {tuple(a.shape)}, got {tuple(b.shape)}"
        )
    if a.dtype != b.dtype:
        raise TypeError(
            f"`{name_b}` must have the same dtype as `{name_a}` ({a.dtype}), got {b.dtype}"
        )


def check_positive_int(name: str, value: object, *, minimum: int = 1) -> int:
    """Return ``value`` as int, raising unless it is an integer ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value}")
    return value


def check_generator(name: str, generator: object) -> torch.Generator | None:
    """Accept ``None`` or a ``torch.Generator``."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"`{name}` must be a torch.Generator or None, got {type(generator).__name__}"
        )
    return generator


def check_real(
    name: str,
    value: object,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    min_inclusive: bool = True,
    max_inclusive: bool = True,
) -> float:
    """Return ``value`` as a finite float within the given bounds.

    ``TypeError`` unless ``value`` is a real number (int or float, or a 0-d real tensor; not bool, not a
    string); ``ValueError`` if it is NaN/inf or outside ``[minimum, maximum]`` (bounds open where
    ``min_inclusive``/``max_inclusive`` is False). The convention of the whole library: a wrong type is a
    ``TypeError``, a wrong value a ``ValueError``.
    """
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{name}` must be a real number, got {type(value).__name__} {value!r}")
    x = float(value)
    if x != x or x in (float("inf"), float("-inf")):
        raise ValueError(f"`{name}` must be finite, got {x}")
    if minimum is not None and (x < minimum or (not min_inclusive and x == minimum)):
        op = ">=" if min_inclusive else ">"
        raise ValueError(f"`{name}` must be {op} {minimum}, got {x}")
    if maximum is not None and (x > maximum or (not max_inclusive and x == maximum)):
        op = "<=" if max_inclusive else "<"
        raise ValueError(f"`{name}` must be {op} {maximum}, got {x}")
    return x


def check_choice(name: str, value: object, choices: tuple[object, ...]) -> object:
    """Return ``value`` if it is one of ``choices``; ``ValueError`` naming the choices otherwise."""
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {choices}, got {value!r}")
    return value


def check_bool(name: str, value: object) -> bool:
    """Return ``value`` if it is a bool; ``TypeError`` otherwise (``0``/``1``/strings are refused)."""
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be a bool, got {type(value).__name__} {value!r}")
    return value
