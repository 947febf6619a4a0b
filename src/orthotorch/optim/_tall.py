"""The rank-2k Cayley step of tall Stiefel weights, shared by ``OrthogonalSGD`` and ``OrthogonalAdam``.

A matching of ``n/2`` row pairs carries only about ``1/(n − 1)`` of the generator ``W = D Xᵀ − X Dᵀ``,
whose rank is ``≤ 2k``; on a tall weight (``n ≫ k``) the whole generator is cheap instead: the Cayley
rotation ``X ← (I + ½lr·W)⁻¹(I − ½lr·W) X`` costs one ``2k × 2k`` solve and ``O(nk²)`` products
(:func:`orthotorch.manifolds.stiefel.cayley_rotate`). The optimizers route a constrained weight here by
the group option ``tall_step`` (docs/optim.md, "Tall weights"):

- ``"auto"`` (default): the Cayley step when the tall view ``(n, k)`` has ``n ≥ TALL_RATIO·k``; square
  weights (O(d), SO(d)) and nearly square ones keep the Givens step;
- ``"cayley"``: the Cayley step for every non-square Stiefel weight;
- ``"givens"``: the Givens step for every weight (the behaviour before this option existed).

Not public API.
"""

from __future__ import annotations

import torch

from orthotorch._numerics import compute_dtype
from orthotorch.manifolds.stiefel import cayley_rotate

__all__ = ["TALL_RATIO", "TALL_STEPS", "canonical_rgrad", "cayley_step_", "uses_cayley"]

#: Values of the ``tall_step`` group option.
TALL_STEPS = ("auto", "givens", "cayley")

#: ``tall_step="auto"`` uses the Cayley step when ``n ≥ TALL_RATIO·k`` (chosen by the Brockett race in
#: docs/optim.md, "Tall weights").
TALL_RATIO = 2


def uses_cayley(option: str, manifold: str, n: int, k: int) -> bool:
    """Whether a constrained weight with tall view ``(n, k)`` takes the Cayley step under ``tall_step``.

    Square weights never do (``"orthogonal"``/``"so"`` are square by construction, and a square Stiefel
    weight is O(d), where the generator has full rank and the Givens step was measured faster).
    """
    if manifold != "stiefel" or n == k or option == "givens":
        return False
    return option == "cayley" or n >= TALL_RATIO * k


def canonical_rgrad(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Canonical-metric Riemannian gradient ``G − X Gᵀ X = W(X, G)·X`` (as ``Stiefel(metric="canonical")
    .egrad2rgrad``, without its checks), shapes ``(..., n, k)``, O(nk²).

    It vanishes exactly at the stationary points, unlike the ambient gradient (``G = X·S`` there), so an
    elementwise (Adam) rescaling of it keeps the stationary points fixed.
    """
    return g - x @ (g.mT @ x)


@torch.no_grad()
def cayley_step_(
    x: torch.Tensor, d: torch.Tensor, lr: float, *, moment: torch.Tensor | None = None
) -> None:
    """In place: ``X ← Q X`` with ``Q = (I + ½lr·W)⁻¹(I − ½lr·W)``, ``W = D Xᵀ − X Dᵀ``, and ``M ← Q M``.

    :func:`~orthotorch.manifolds.stiefel.cayley_rotate` with ``orthonormalize=True``: the new point is
    re-orthonormalised to first order at no extra ``O(nk²)`` cost, so float rounding does not accumulate
    over steps (‖XᵀX − I‖ stays at its one-step level, about 1e-6 in float32 at n = 1024, k = 64).

    Args:
        x: tall point ``(..., n, k)`` (any layout, e.g. the ``.mT`` view of a wide weight); updated.
        d: direction ``(..., n, k)`` driving the step. If ``d`` *is* ``moment`` (heavy ball without
            Nesterov), the moment is rotated through the products already formed for ``d``.
        lr: step size (``≥ 0``; descent along ``−W``).
        moment: an ambient moment ``(..., n, k)`` carried by the same rotation (updated), or None.

    Cost (multiply-adds): ``6nk²`` to split ``D`` along ``X`` and its complement, ``2nk²`` for ``X`` and
    for a moment that is ``D``, ``4nk²`` for a separate moment, plus ``O(k³)`` ``k × k`` work:
    ``10nk²`` for heavy ball, ``12nk²`` with a separate moment. Half-precision inputs are computed in
    float32.
    """
    acc = compute_dtype(x.dtype)
    xc, dc = x.to(acc), d.to(acc)
    zs: list[torch.Tensor] = [xc]
    if moment is not None:
        zs.append(dc if moment is d else moment.to(acc))
    out = cayley_rotate(xc, dc, -float(lr), zs, orthonormalize=True)
    x.copy_(out[0])
    if moment is not None:
        moment.copy_(out[1])
