"""``OrthogonalLinear`` (square, O(d)/SO(d)) and ``StiefelLinear`` (rectangular, orthonormal columns or rows)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from orthotorch._validation import check_bool, check_choice, check_generator, check_positive_int
from orthotorch.nn.constraints import (
    ConstrainedModule,
    constrain_,
    normalize_constraint,
    stiefel_init,
)
from orthotorch.nn.init import INITS, orthogonal_init

__all__ = ["OrthogonalLinear", "StiefelLinear"]


class _ConstrainedLinear(ConstrainedModule):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        constraint: str,
        weight: torch.Tensor,
        *,
        square: bool,
        group: str,
        dtype: torch.dtype,
        device: torch.device | str | None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.constraint = constraint
        constrain_(self, "weight", weight.to(device), constraint, square=square, group=group)
        self.bias: nn.Parameter | None = (
            nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        )

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.shape[-1] != self.in_features:
            raise ValueError(
                f"`input` must have {self.in_features} features in its last dimension, got shape "
                f"{tuple(input.shape)}"
            )
        return F.linear(input, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, constraint={self.constraint!r}"
        )


def _constraint(constraint: str) -> str:
    c = normalize_constraint(constraint)
    if c == "none":
        raise ValueError(
            "`constraint` must name a constraint; use nn.Linear for an unconstrained layer"
        )
    return c


class StiefelLinear(_ConstrainedLinear):
    """``y = x Wᵀ + b`` with ``W`` ``(out_features, in_features)`` on a Stiefel manifold.

    Tall (``out ≥ in``): orthonormal columns, ``WᵀW = I``; wide (``out < in``): orthonormal rows,
    ``WWᵀ = I`` (the library's convention: a wide weight is handled through its transpose).

    Args:
        in_features, out_features, bias: as in ``nn.Linear`` (the bias is initialised to 0).
        constraint: ``"tcwy"`` (default), ``"cwy"``, ``"givens"`` (a marked weight for
            ``OrthogonalSGD``/``OrthogonalAdam``), ``"matrix_exp"``, ``"cayley"``.
        generator: generator of the Haar init (default: a fresh one seeded 0).
        dtype, device: of the parameters.

    Shape: ``(..., in_features) → (..., out_features)``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        constraint: str = "tcwy",
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        check_positive_int("in_features", in_features)
        check_positive_int("out_features", out_features)
        check_bool("bias", bias)
        c = _constraint(constraint)
        check_generator("generator", generator)
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        dtype = dtype or torch.get_default_dtype()
        w = stiefel_init(out_features, in_features, generator=gen, dtype=dtype)
        super().__init__(
            in_features,
            out_features,
            bias,
            c,
            w,
            square=False,
            group="O",
            dtype=dtype,
            device=device,
        )


class OrthogonalLinear(_ConstrainedLinear):
    """``y = x Wᵀ + b`` with a square ``W`` ``(features, features)`` on O(d) or SO(d).

    Args:
        in_features, out_features: must be equal (``out_features`` defaults to ``in_features``; use
            :class:`StiefelLinear` for rectangular weights).
        bias: as in ``nn.Linear`` (initialised to 0).
        constraint: ``"tcwy"`` (default), ``"cwy"``, ``"givens"``, ``"matrix_exp"``, ``"cayley"``.
        group: ``"O"`` or ``"SO"``.
        init: ``"haar"`` (default), ``"henaff"`` or ``"cayley"``.
        generator: generator of the init (default: a fresh one seeded 0).
        dtype, device: of the parameters.

    Shape: ``(..., d) → (..., d)``.

    Raises:
        ValueError: ``in_features != out_features`` (O(d) needs a square weight).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int | None = None,
        bias: bool = True,
        *,
        constraint: str = "tcwy",
        group: str = "O",
        init: str = "haar",
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        out_features = in_features if out_features is None else out_features
        check_positive_int("in_features", in_features)
        check_positive_int("out_features", out_features)
        if in_features != out_features:
            raise ValueError(
                "OrthogonalLinear needs a square weight (in_features == out_features) for O(d)/SO(d), "
                f"got in_features={in_features}, out_features={out_features}; use StiefelLinear"
            )
        check_bool("bias", bias)
        c = _constraint(constraint)
        check_choice("group", group, ("O", "SO"))
        check_choice("init", init, INITS)
        check_generator("generator", generator)
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        dtype = dtype or torch.get_default_dtype()
        w = orthogonal_init(init, in_features, generator=gen, dtype=dtype, group=group)
        super().__init__(
            in_features,
            out_features,
            bias,
            c,
            w,
            square=True,
            group=group,
            dtype=dtype,
            device=device,
        )
        self.group = group
