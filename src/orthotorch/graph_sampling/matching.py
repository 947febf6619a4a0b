"""Matchings of the n rows of a matrix: the disjoint pairs a Givens step rotates in parallel."""

from __future__ import annotations

from typing import NamedTuple

import torch

from orthotorch._validation import check_generator, check_positive_int

__all__ = ["Matching", "greedy_matching", "random_matching", "round_robin", "round_robin_matching"]


class Matching(NamedTuple):
    """Disjoint pairs ``(i[p], j[p])`` with their inclusion probabilities under the sampler.

    Attributes:
        i, j: int64 ``(P,)`` row indices, every row at most once across ``i`` and ``j``.
        prob: ``(P,)`` float64 probability that the sampler includes each pair (1 for deterministic
            choices); ``Σ_p W_p / prob_p`` over a sampled matching is an unbiased estimate of ``Σ_e W_e``.
    """

    i: torch.Tensor
    j: torch.Tensor
    prob: torch.Tensor

    def __len__(self) -> int:  # number of pairs, not tuple length
        return int(self.i.numel())

    def to(self, device: torch.device | str) -> Matching:
        """The same matching on ``device``."""
        return Matching(self.i.to(device), self.j.to(device), self.prob.to(device))


class MatchingBlock(NamedTuple):
    """``m`` matchings of ``P`` pairs each, stacked: what a fused multi-matching step takes in one call
    (:func:`orthotorch.manifolds.givens.givens_steps_`), without one tensor per matching.

    Attributes:
        i, j: int64 ``(m, P)`` row indices; row ``s`` is a matching (every row index at most once
            across ``i[s]`` and ``j[s]``).
        prob: ``(P,)`` float64 inclusion probability of each pair, shared by the ``m`` matchings.
    """

    i: torch.Tensor
    j: torch.Tensor
    prob: torch.Tensor

    def matchings(self) -> list[Matching]:
        """The ``m`` matchings one by one (views into ``i`` and ``j``)."""
        return [Matching(a, b, self.prob) for a, b in zip(self.i.unbind(0), self.j.unbind(0))]


def _device_of(
    generator: torch.Generator | None, device: torch.device | str | None
) -> torch.device:
    if device is not None:
        return torch.device(device)
    return generator.device if generator is not None else torch.device("cpu")


def random_matching(
    n: int, *, generator: torch.Generator | None = None, device: torch.device | str | None = None
) -> Matching:
    """A uniformly random (near-)perfect matching of ``n`` vertices.

    Args:
        n: number of vertices (rows), ``n >= 2``.
        generator: source of randomness (the global RNG is never used when one is given).
        device: device of the returned indices (default: the generator's device).

    Returns:
        ``Matching`` with ``P = n // 2`` pairs; for odd ``n`` one uniformly chosen vertex is left out.
        Every pair is included with probability ``1/(n−1)`` (even n) or ``1/n`` (odd n). Cost O(n).
    """
    check_positive_int("n", n, minimum=2)
    check_generator("generator", generator)
    gen_device = generator.device if generator is not None else torch.device("cpu")
    perm = torch.randperm(n, generator=generator, device=gen_device)
    P = n // 2
    out_device = _device_of(generator, device)
    i = perm[0 : 2 * P : 2].to(out_device)
    j = perm[1 : 2 * P : 2].to(out_device)
    p = 1.0 / (n - 1) if n % 2 == 0 else 1.0 / n
    return Matching(i, j, torch.full((P,), p, dtype=torch.float64, device=out_device))


def round_robin_matching(n: int, r: int, *, device: torch.device | str | None = None) -> Matching:
    """Round ``r`` of the circle-method 1-factorisation of the complete graph ``K_n``, in O(n).

    For even ``n`` vertex ``n−1`` sits at the centre and ``0..n−2`` on a circle; round ``r`` (``0 ≤ r < n−1``)
    pairs ``(r, n−1)`` and ``((r+t) mod (n−1), (r−t) mod (n−1))`` for ``t = 1..n/2−1``. For odd ``n`` a dummy
    vertex is added and its partner sits out, giving ``n`` rounds of ``(n−1)/2`` pairs. Over all rounds every
    pair appears exactly once, so ``prob`` is ``1/(number of rounds)``.
    """
    check_positive_int("n", n, minimum=2)
    m = n if n % 2 == 0 else n + 1  # even vertex count incl. dummy
    rounds = m - 1
    if not 0 <= r < rounds:
        raise ValueError(f"`r` must be in [0, {rounds}) for n={n}, got {r}")
    t = torch.arange(1, m // 2, device=device)
    a = (r + t) % rounds
    b = (r - t) % rounds
    i = torch.cat([torch.tensor([r], device=device), a])
    j = torch.cat([torch.tensor([m - 1], device=device), b])
    if m != n:  # drop the pair containing the dummy vertex n
        keep = (i != n) & (j != n)
        i, j = i[keep], j[keep]
    prob = torch.full((i.numel(),), 1.0 / rounds, dtype=torch.float64, device=device)
    return Matching(i.to(torch.int64), j.to(torch.int64), prob)


def round_robin(n: int, *, device: torch.device | str | None = None) -> list[Matching]:
    """All rounds of the circle-method 1-factorisation of ``K_n`` (see :func:`round_robin_matching`).

    Returns ``n−1`` perfect matchings for even ``n`` or ``n`` near-perfect ones for odd ``n``; every unordered
    pair ``{a, b}`` appears in exactly one round. Memory O(n²): for large ``n`` iterate over
    :func:`round_robin_matching` instead.
    """
    check_positive_int("n", n, minimum=2)
    rounds = n - 1 if n % 2 == 0 else n
    return [round_robin_matching(n, r, device=device) for r in range(rounds)]


@torch.no_grad()
def greedy_matching(weights: torch.Tensor, *, max_rounds: int | None = None) -> Matching:
    """Heavy matching of a dense symmetric weight matrix by locally dominant edges (vectorised greedy).

    Each round, every free vertex points to its heaviest free neighbour; mutual pointers are matched. This
    yields the same matching as the sequential greedy algorithm (heaviest edge first, ties by index), whose
    weight is at least ½ of the maximum-weight matching. Edges with weight ``<= 0`` or NaN are never used.

    Args:
        weights: ``(n, n)`` symmetric weights (e.g. ``|W|`` of a skew generator); the diagonal is ignored.
        max_rounds: optional cap on the rounds (each O(n²)); default: until no positive edge remains
            between free vertices (typically O(log n) rounds).

    Returns:
        ``Matching`` with ``prob`` set to 1 (a deterministic choice given the weights). Cost O(n²·rounds).
    """
    if not isinstance(weights, torch.Tensor):
        raise TypeError(f"`weights` must be a torch.Tensor, got {type(weights).__name__}")
    if weights.dim() != 2 or weights.shape[0] != weights.shape[1]:
        raise ValueError(
            f"`weights` must be a square (n, n) matrix, got shape {tuple(weights.shape)}"
        )
    if not weights.is_floating_point():
        raise TypeError(f"`weights` must be floating point, got {weights.dtype}")
    n = weights.shape[0]
    device = weights.device
    w = weights.detach().clone()
    w = torch.nan_to_num(w, nan=0.0)
    w.fill_diagonal_(0.0)
    w[w <= 0] = -torch.inf
    free = torch.ones(n, dtype=torch.bool, device=device)
    ar = torch.arange(n, device=device)
    pairs_i, pairs_j = [], []
    rounds = 0
    while max_rounds is None or rounds < max_rounds:
        rounds += 1
        best_w, best = w.max(dim=1)
        ok = free & torch.isfinite(best_w)
        if not bool(ok.any()):
            break
        mutual = ok & (best[best] == ar) & (ar < best)
        if not bool(mutual.any()):  # cannot happen with exact ties broken by index; guard anyway
            break
        a, b = ar[mutual], best[mutual]
        pairs_i.append(a)
        pairs_j.append(b)
        gone = torch.cat([a, b])
        free[gone] = False
        w[gone, :] = -torch.inf
        w[:, gone] = -torch.inf
    if pairs_i:
        i, j = torch.cat(pairs_i), torch.cat(pairs_j)
    else:
        i = j = torch.zeros(0, dtype=torch.int64, device=device)
    return Matching(i, j, torch.ones(i.numel(), dtype=torch.float64, device=device))
