"""Numerics shared by every package: working precision, sign-fixed QR, Haar samples, determinant signs.

One home for the small dense-linear-algebra rules the library relies on (docs/design.md, "Numerics"):

- LAPACK has no float16/bfloat16 kernels and half precision loses orthogonality after a few products, so
  factorisations and accumulations run in :func:`compute_dtype` (float32 for half, the dtype itself
  otherwise) and results are cast back by the caller.
- A QR factor is unique only up to column signs; :func:`qr_sign_fixed` fixes ``diag(R) ≥ 0``, which makes
  ``Q`` a continuous function of a full-rank input and exactly Haar distributed for Gaussian input.
- Every tensor created here is contiguous row-major (the hot Givens paths need ``stride(-1) == 1``).
"""

from __future__ import annotations

import torch

__all__ = [
    "LOW_PRECISION",
    "compute_dtype",
    "det_sign",
    "haar",
    "qr_sign_fixed",
]

#: Dtypes that are computed in float32 (:func:`compute_dtype`).
LOW_PRECISION: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Working dtype for ``dtype``: float32 for float16/bfloat16, ``dtype`` itself otherwise."""
    return torch.float32 if dtype in LOW_PRECISION else dtype


def qr_sign_fixed(a: torch.Tensor) -> torch.Tensor:
    """Q factor of the reduced QR of tall ``a`` ``(..., n, k)`` with ``diag(R) ≥ 0``.

    Computed in :func:`compute_dtype` and returned in ``a.dtype``, contiguous. An orthonormal input is
    returned unchanged up to rounding, and a near-orthogonal square input keeps its determinant sign.
    A zero diagonal entry of ``R`` (rank-deficient input) keeps its column's sign. Cost O(nk²).
    """
    q, r = torch.linalg.qr(a.to(compute_dtype(a.dtype)))
    diag = torch.diagonal(r, dim1=-2, dim2=-1)
    sign = torch.where(diag < 0, -1.0, 1.0).to(q.dtype)
    return (q * sign.unsqueeze(-2)).to(a.dtype).contiguous()


def haar(
    n: int,
    k: int,
    *,
    generator: torch.Generator | None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    batch: tuple[int, ...] = (),
) -> torch.Tensor:
    """Haar-distributed point of St(n, k) (O(n) when ``n == k``), ``(*batch, n, k)``, contiguous.

    Sampled in float64 (float32 is not enough for exact orthogonality after the cast at large n) on
    ``generator``'s device, then moved to ``device``/``dtype``. Needs ``n >= k``. Cost O(nk²).
    """
    gen_device = generator.device if generator is not None else torch.device("cpu")
    g = torch.randn(*batch, n, k, generator=generator, dtype=torch.float64, device=gen_device)
    q = qr_sign_fixed(g)
    return q.to(dtype=dtype, device=device if device is not None else gen_device).contiguous()


def det_sign(x: torch.Tensor) -> torch.Tensor:
    """Sign of ``det x`` for square ``(..., d, d)`` via ``slogdet`` (O(d³)).

    ``torch.linalg.det`` in float32 returns ``-0.0``/``0.0`` for orthogonal matrices from d ≈ 512 on
    (torch 2.13, CPU), so its sign is useless there; ``slogdet`` keeps the sign exact. Half-precision
    inputs are computed in float32.
    """
    return torch.linalg.slogdet(x.to(compute_dtype(x.dtype)))[0]
