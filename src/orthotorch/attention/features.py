"""Random projections and random feature maps for the softmax kernel and generalised kernels.

The softmax kernel ``exp(qᵀk/√d)`` is estimated by ``φ(q')ᵀφ(k')`` with ``q' = q·d^(−1/4)``,
``k' = k·d^(−1/4)`` (the attention functions do the scaling). Each feature map is written as

    φ(x) = base(x) ⊙ exp(expo(x))

so that the attention code can subtract maxima inside the exponent (stabilisation) before exponentiating.
``expo`` is ``(..., M)`` or ``(..., 1)``; ``base`` is ``(..., M)`` or ``None`` (meaning 1).

Projection matrices ``W`` are ``(m, d)``: one random direction per row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from orthotorch._numerics import haar
from orthotorch._validation import check_generator, check_positive_int, check_tensor
from orthotorch.graph_sampling import random_matching
from orthotorch.manifolds.givens import rotate_pairs, rotate_pairs_

KINDS = ("positive", "hyperbolic", "trig", "relu", "elu")
PROJECTIONS = ("gaussian", "orthogonal", "orthogonal_fixed", "givens", "givens_fixed")


def _check_dtype(dtype: torch.dtype) -> None:
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"`dtype` must be torch.float32 or torch.float64, got {dtype}")


def gaussian_projection(
    m: int,
    d: int,
    *,
    generator: torch.Generator,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """iid Gaussian projection: ``(m, d)`` with entries ``N(0, 1)``.

    Args:
        m: number of random features (rows), ``m >= 1``.
        d: input dimension, ``d >= 1``.
        generator: source of randomness (required; the global RNG is never used).
        dtype: float32 or float64. device: where the result lives (sampled on the generator's device).
    """
    check_positive_int("m", m)
    check_positive_int("d", d)
    _check_generator_required(generator)
    _check_dtype(dtype)
    w = torch.randn(m, d, generator=generator, dtype=torch.float64, device=generator.device)
    return w.to(dtype=dtype, device=device if device is not None else generator.device)


def _check_generator_required(generator: object) -> None:
    check_generator("generator", generator)
    if generator is None:
        raise TypeError(
            "`generator` must be a torch.Generator (library code never uses the global RNG)"
        )


def _row_norms(
    m: int, d: int, scaling: str, generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    if scaling == "chi":
        g = torch.randn(m, d, generator=generator, dtype=torch.float64, device=device)
        return g.norm(dim=1)
    if scaling == "sqrt_d":
        return torch.full((m,), math.sqrt(d), dtype=torch.float64, device=device)
    raise ValueError(f"`scaling` must be 'chi' or 'sqrt_d', got {scaling!r}")


def orthogonal_projection(
    m: int,
    d: int,
    *,
    generator: torch.Generator,
    scaling: str = "chi",
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Orthogonal random features: rows of independent Haar-orthogonal ``d×d`` blocks, rescaled.

    Rows within a block are exactly orthogonal; blocks are independent (``ceil(m/d)`` blocks, the last
    one truncated). Each row is rescaled to norm ``‖g‖`` with ``g ~ N(0, I_d)`` (``scaling="chi"``: the
    marginal of every row is exactly ``N(0, I_d)``, so the softmax-kernel estimate stays unbiased) or to
    ``√d`` (``scaling="sqrt_d"``: lower variance, slightly biased). Cost O(ceil(m/d)·d³) (one QR per
    block).

    Returns:
        ``(m, d)`` projection.
    """
    check_positive_int("m", m)
    check_positive_int("d", d)
    _check_generator_required(generator)
    _check_dtype(dtype)
    dev = generator.device
    blocks = []
    for _ in range(-(-m // d)):
        # sign-fixed QR of a Gaussian block: exactly Haar distributed
        blocks.append(haar(d, d, generator=generator, dtype=torch.float64).T)
    w = torch.cat(blocks, dim=0)[:m]
    w = w * _row_norms(m, d, scaling, generator, dev)[:, None]
    return w.to(dtype=dtype, device=device if device is not None else dev)


@dataclass
class GivensBlocks:
    """A structured orthogonal projection: per block, ``rounds`` rounds of disjoint Givens rotations.

    Attributes:
        d: input dimension.
        m: number of output rows.
        i, j: int64 ``(B, R, P)`` row pairs of every round of every block (``P = d // 2``).
        theta: ``(B, R, P)`` rotation angles.
        norms: ``(m,)`` row norms applied after the rotations.

    Applying the projection to ``x`` costs O(R·d) = O(d log d) per block instead of O(d²).
    """

    d: int
    m: int
    i: torch.Tensor
    j: torch.Tensor
    theta: torch.Tensor
    norms: torch.Tensor

    def dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The ``(m, d)`` matrix ``W`` (rows of ``G_R ⋯ G_1`` per block, rescaled)."""
        blocks = []
        for b in range(self.i.shape[0]):
            x = torch.eye(self.d, dtype=torch.float64, device=self.theta.device)
            for r in range(self.i.shape[1]):
                rotate_pairs_(x, self.i[b, r], self.j[b, r], self.theta[b, r])
            blocks.append(x)
        w = torch.cat(blocks, dim=0)[: self.m] * self.norms[:, None]
        return w.to(dtype)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``x Wᵀ`` for ``x`` ``(..., d)`` → ``(..., m)`` in O(m log d) per row, differentiable in ``x``."""
        lead = x.shape[:-1]
        cols = x.reshape(-1, self.d).T  # (d, N): the library rotates rows
        outs = []
        for b in range(self.i.shape[0]):
            y = cols
            for r in range(self.i.shape[1]):
                y = rotate_pairs(y, self.i[b, r], self.j[b, r], self.theta[b, r].to(x.dtype))
            outs.append(y)
        y = torch.cat(outs, dim=0)[: self.m] * self.norms[:, None].to(x.dtype)
        return y.T.reshape(*lead, self.m)


def givens_blocks(
    m: int,
    d: int,
    *,
    generator: torch.Generator,
    rounds: int | None = None,
    scaling: str = "chi",
) -> GivensBlocks:
    """Sample a structured orthogonal projection from rounds of random disjoint Givens rotations.

    Each of the ``ceil(m/d)`` blocks is ``G_R ⋯ G_1`` where every ``G_r`` rotates the pairs of a
    uniformly random perfect matching of the ``d`` coordinates by angles uniform in ``[0, 2π)``
    (``orthotorch.graph_sampling.random_matching`` and ``orthotorch.manifolds.givens``). The default
    ``R = 2·ceil(log2 d)`` rounds (≈ d log d rotations, Kac's walk mixing scale) makes rows close to
    uniform on the sphere; rows are then rescaled as in :func:`orthogonal_projection`.
    """
    check_positive_int("m", m)
    check_positive_int("d", d, minimum=2)
    _check_generator_required(generator)
    if rounds is None:
        rounds = 2 * max(1, math.ceil(math.log2(d)))
    check_positive_int("rounds", rounds)
    dev = generator.device
    nb = -(-m // d)
    ii, jj, th = [], [], []
    for _ in range(nb):
        bi, bj, bt = [], [], []
        for _ in range(rounds):
            mt = random_matching(d, generator=generator)
            bi.append(mt.i)
            bj.append(mt.j)
            u = torch.rand(mt.i.numel(), generator=generator, dtype=torch.float64, device=dev)
            bt.append(2 * math.pi * u)
        ii.append(torch.stack(bi))
        jj.append(torch.stack(bj))
        th.append(torch.stack(bt))
    norms = _row_norms(m, d, scaling, generator, dev)
    return GivensBlocks(d, m, torch.stack(ii), torch.stack(jj), torch.stack(th), norms)


def givens_projection(
    m: int,
    d: int,
    *,
    generator: torch.Generator,
    rounds: int | None = None,
    scaling: str = "chi",
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Dense ``(m, d)`` matrix of :func:`givens_blocks` (rows orthogonal within each block)."""
    _check_dtype(dtype)
    w = givens_blocks(m, d, generator=generator, rounds=rounds, scaling=scaling).dense(
        torch.float64
    )
    return w.to(dtype=dtype, device=device if device is not None else generator.device)


def sample_projection(
    kind: str,
    m: int,
    d: int,
    *,
    generator: torch.Generator,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Dispatch: ``kind`` in ``gaussian``, ``orthogonal`` (χ norms), ``orthogonal_fixed`` (√d norms),
    ``givens`` (χ norms), ``givens_fixed`` (√d norms). Returns ``(m, d)``."""
    if kind == "gaussian":
        return gaussian_projection(m, d, generator=generator, dtype=dtype, device=device)
    if kind in ("orthogonal", "orthogonal_fixed"):
        scaling = "chi" if kind == "orthogonal" else "sqrt_d"
        return orthogonal_projection(
            m, d, generator=generator, scaling=scaling, dtype=dtype, device=device
        )
    if kind in ("givens", "givens_fixed"):
        scaling = "chi" if kind == "givens" else "sqrt_d"
        return givens_projection(
            m, d, generator=generator, scaling=scaling, dtype=dtype, device=device
        )
    raise ValueError(f"`projection` must be one of {PROJECTIONS}, got {kind!r}")


class FeatureMap(nn.Module):
    """A random feature map ``φ: (..., d) → (..., M)`` with a redrawable projection.

    Kinds (``x`` already scaled by ``d^(−1/4)`` for the softmax kernel; ``p = W x``, ``m`` rows):

    - ``positive`` (FAVOR+): ``φ(x) = exp(p − ‖x‖²/2)/√m``; ``M = m``; unbiased for ``exp(xᵀy)``.
    - ``hyperbolic``: ``exp(−‖x‖²/2)·[exp(p), exp(−p)]/√(2m)``; ``M = 2m``; unbiased, positive.
    - ``trig`` (original FAVOR): ``exp(‖x‖²/2)·[cos p, sin p]/√m``; ``M = 2m``; unbiased but signed, so
      normalisers can be ≈ 0 or negative (see docs/attention.md).
    - ``relu``: ``relu(p)/√m + eps``; ``elu``: ``(elu(p) + 1)/√m``: generalised (non-softmax) kernels.

    Args:
        dim: input dimension ``d``.
        num_features: ``m >= 1`` (rows of the projection).
        kind: one of ``positive``, ``hyperbolic``, ``trig``, ``relu``, ``elu``.
        projection: ``gaussian``, ``orthogonal``, ``orthogonal_fixed``, ``givens``, ``givens_fixed``.
        generator: used for the initial draw; default ``torch.Generator().manual_seed(seed)``.
        seed: seed of the default generator.
        eps: additive constant of the ``relu`` kernel (keeps normalisers positive).

    The projection is a buffer ``weight`` ``(m, d)`` (float32, or float64 after ``.double()``), saved in
    ``state_dict``. :meth:`redraw` samples a fresh one.
    """

    weight: torch.Tensor

    def __init__(
        self,
        dim: int,
        num_features: int = 256,
        *,
        kind: str = "positive",
        projection: str = "orthogonal",
        generator: torch.Generator | None = None,
        seed: int = 0,
        eps: float = 1e-3,
    ) -> None:
        super().__init__()
        check_positive_int("dim", dim)
        check_positive_int("num_features", num_features)
        if kind not in KINDS:
            raise ValueError(f"`kind` must be one of {KINDS}, got {kind!r}")
        if projection not in PROJECTIONS:
            raise ValueError(f"`projection` must be one of {PROJECTIONS}, got {projection!r}")
        if projection.startswith("givens") and dim < 2:
            raise ValueError(f"`projection` {projection!r} needs dim >= 2, got dim={dim}")
        check_generator("generator", generator)
        self.dim = dim
        self.num_features = num_features
        self.kind = kind
        self.projection = projection
        self.eps = float(eps)
        self._generator = (
            generator if generator is not None else torch.Generator().manual_seed(seed)
        )
        self.register_buffer("weight", torch.empty(num_features, dim))
        self.redraw()

    @property
    def feature_dim(self) -> int:
        """``M``: output width (``2m`` for ``hyperbolic`` and ``trig``, else ``m``)."""
        return 2 * self.num_features if self.kind in ("hyperbolic", "trig") else self.num_features

    @property
    def is_exponential(self) -> bool:
        """Whether the map has an exponential factor that needs stabilisation."""
        return self.kind in ("positive", "hyperbolic", "trig")

    @torch.no_grad()
    def redraw(self, generator: torch.Generator | None = None) -> None:
        """Sample a new projection in place (from ``generator``, else the map's own generator)."""
        check_generator("generator", generator)
        gen = generator if generator is not None else self._generator
        w = sample_projection(
            self.projection, self.num_features, self.dim, generator=gen, dtype=torch.float64
        )
        self.weight.copy_(w.to(self.weight.device, self.weight.dtype))

    def parts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(expo, base)`` with ``φ(x) = base ⊙ exp(expo)``.

        Args:
            x: ``(..., d)`` (float32/float64; the caller upcasts half precision).

        Returns:
            ``expo`` ``(..., M)`` or ``(..., 1)``; ``base`` ``(..., M)`` or ``None``.
        """
        check_tensor("x", x)
        if x.shape[-1] != self.dim:
            raise ValueError(
                f"`x` last dimension must equal the feature map's dim {self.dim}, got {tuple(x.shape)}"
            )
        p = x @ self.weight.to(x.dtype).T
        m = self.num_features
        if self.kind == "positive":
            sq = 0.5 * (x * x).sum(-1, keepdim=True)
            return p - sq - 0.5 * math.log(m), None
        if self.kind == "hyperbolic":
            sq = 0.5 * (x * x).sum(-1, keepdim=True)
            return torch.cat([p, -p], dim=-1) - sq - 0.5 * math.log(2 * m), None
        if self.kind == "trig":
            sq = 0.5 * (x * x).sum(-1, keepdim=True)
            return sq, torch.cat([torch.cos(p), torch.sin(p)], dim=-1) / math.sqrt(m)
        zero = x.new_zeros((*x.shape[:-1], 1))
        if self.kind == "relu":
            return zero, torch.relu(p) / math.sqrt(m) + self.eps
        return zero, (torch.nn.functional.elu(p) + 1.0) / math.sqrt(m)

    def key_bound(self) -> torch.Tensor:
        """Data-independent upper bound of the exponents, ``(M,)`` or ``(1,)``.

        ``wᵀx − ‖x‖²/2 ≤ ‖w‖²/2`` for every ``x``, so subtracting this bound from key exponents never
        overflows and uses no key (zeros for kinds without a bounded exponent).
        """
        w = self.weight
        if self.kind in ("positive", "hyperbolic"):
            half = 0.5 * (w * w).sum(-1)
            if self.kind == "positive":
                return half - 0.5 * math.log(self.num_features)
            return torch.cat([half, half]) - 0.5 * math.log(2 * self.num_features)
        return w.new_zeros(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Unstabilised features ``φ(x)`` ``(..., M)`` (reference use; may overflow for large ``‖x‖``)."""
        expo, base = self.parts(x)
        out = torch.exp(expo)
        return out if base is None else out * base

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_features={self.num_features}, kind={self.kind}, "
            f"projection={self.projection}"
        )
