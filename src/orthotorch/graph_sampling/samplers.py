"""Stateful matching samplers with inclusion probabilities, for the optimizers.

Every sampler has ``sample(generator=None, weights=None) -> Matching`` and ``state_dict()`` /
``load_state_dict()`` for its own (non-RNG) state; the randomness comes from the caller's generator.
``Σ_p W_p / prob_p`` over a sampled matching is an unbiased estimate of ``Σ_e W_e`` for the random samplers.
"""

from __future__ import annotations

from typing import Any

import torch

from orthotorch._validation import check_generator, check_positive_int
from orthotorch.graph_sampling.colouring import edge_colouring
from orthotorch.graph_sampling.matching import (
    Matching,
    MatchingBlock,
    greedy_matching,
    random_matching,
    round_robin_matching,
)

__all__ = [
    "SAMPLER_ALIASES",
    "ColouringSampler",
    "GreedySampler",
    "MatchingSampler",
    "RandomMatchingSampler",
    "RoundRobinSampler",
    "make_sampler",
]


class MatchingSampler:
    """Base class: draws matchings of ``n`` rows. Subclasses set ``needs_weights`` if they read ``|W|``."""

    needs_weights = False

    def __init__(self, n: int) -> None:
        self.n = check_positive_int("n", n, minimum=2)

    def sample(
        self,
        generator: torch.Generator | None = None,
        *,
        weights: torch.Tensor | None = None,
        device: torch.device | str | None = None,
    ) -> Matching:
        """One matching (see the subclass); ``weights`` is the ``(n, n)`` matrix for weight-based samplers."""
        raise NotImplementedError

    def sample_n(
        self,
        m: int,
        generator: torch.Generator | None = None,
        *,
        device: torch.device | str | None = None,
    ) -> list[Matching]:
        """``m`` successive matchings: exactly what ``m`` calls of :meth:`sample` return (same state
        afterwards, same draws from ``generator``). Subclasses may do it in fewer tensor operations."""
        check_positive_int("m", m)
        return [self.sample(generator, device=device) for _ in range(m)]

    def state_dict(self) -> dict[str, Any]:
        """Sampler state other than the RNG (which the caller owns)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n={self.n})"


class RandomMatchingSampler(MatchingSampler):
    """Uniform random perfect matching each call; ``prob = 1/(n−1)`` (even n) or ``1/n`` (odd n). O(n)."""

    def sample(self, generator=None, *, weights=None, device=None) -> Matching:
        check_generator("generator", generator)
        return random_matching(self.n, generator=generator, device=device)


class RoundRobinSampler(MatchingSampler):
    """Cycles through the circle-method 1-factorisation: every pair exactly once per ``n−1`` calls (even n).

    With ``shuffle=True`` each cycle relabels the rows by a fresh random permutation (drawn from the
    caller's generator at the start of the cycle), so the pair order differs between cycles. ``prob`` is
    ``1/(number of rounds)``: the fraction of calls in which a pair is rotated. O(n) per call.
    """

    def __init__(self, n: int, *, shuffle: bool = False) -> None:
        super().__init__(n)
        self.shuffle = shuffle
        self.rounds = n - 1 if n % 2 == 0 else n
        self.position = 0
        self._perm: torch.Tensor | None = None

    def sample(self, generator=None, *, weights=None, device=None) -> Matching:
        check_generator("generator", generator)
        r = self.position % self.rounds
        if self.shuffle and (r == 0 or self._perm is None):
            gdev = generator.device if generator is not None else torch.device("cpu")
            self._perm = torch.randperm(self.n, generator=generator, device=gdev)
        m = round_robin_matching(self.n, r, device=device)
        self.position += 1
        if self.shuffle:
            assert self._perm is not None  # drawn above at the first call of every cycle
            perm = self._perm.to(m.i.device)
            m = Matching(perm[m.i], perm[m.j], m.prob)
        return m

    def _cycle(
        self, device: torch.device | str | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """All rounds of the circle method as ``(rounds, P)`` index tensors ``i``, ``j`` and the ``(P,)``
        probabilities, built once per device (O(n²) memory, so only for small n, where the per-call
        tensor operations are what costs)."""
        key = str(torch.device(device) if device is not None else torch.device("cpu"))
        cache = self.__dict__.setdefault("_cycles", {})
        if key not in cache:
            n, rounds = self.n, self.rounds
            t = torch.arange(1, (n + 1) // 2, device=device)
            r = torch.arange(rounds, device=device).unsqueeze(-1)
            a, b = (r + t) % rounds, (r - t) % rounds
            if n % 2 == 0:  # the centre vertex n − 1 is paired with r
                i = torch.cat([r, a], dim=-1)
                j = torch.cat([torch.full_like(r, n - 1), b], dim=-1)
            else:  # the dummy vertex's pair (r, n) is dropped
                i, j = a, b
            prob = torch.full((i.shape[-1],), 1.0 / rounds, dtype=torch.float64, device=device)
            cache[key] = (i, j, prob)
        return cache[key]

    def sample_n(self, m, generator=None, *, device=None) -> list[Matching]:
        """``m`` successive rounds as :meth:`sample` gives them (the matchings of :meth:`sample_block`)."""
        return self.sample_block(m, generator, device=device).matchings()

    def sample_block(self, m, generator=None, *, device=None) -> MatchingBlock:
        """``m`` successive rounds as :meth:`sample` gives them, stacked into ``(m, P)`` index tensors
        (every round has ``P = n // 2`` pairs), with a few tensor operations per cycle instead of about
        ten per round, so that the per-step sampling cost of an optimizer does not grow with
        ``matchings_per_step`` (it dominated small layers). For n ≤ 256 the whole cycle is kept
        (≤ 0.5 MiB) and a step only slices it. The tensors are fresh: the caller may keep or modify them.
        """
        check_positive_int("m", m)
        check_generator("generator", generator)
        n, rounds = self.n, self.rounds
        chunks: list[tuple[torch.Tensor, torch.Tensor]] = []
        prob = None
        done = 0
        while done < m:
            r0 = self.position % rounds
            if self.shuffle and (r0 == 0 or self._perm is None):
                gdev = generator.device if generator is not None else torch.device("cpu")
                self._perm = torch.randperm(n, generator=generator, device=gdev)
            count = min(m - done, rounds - r0)  # up to the end of the cycle
            if n <= 256:
                ci, cj, prob = self._cycle(device)
                i, j = ci[r0 : r0 + count], cj[r0 : r0 + count]
            else:
                t = torch.arange(1, (n + 1) // 2, device=device)
                r = torch.arange(r0, r0 + count, device=device).unsqueeze(-1)
                a, b = (r + t) % rounds, (r - t) % rounds
                if n % 2 == 0:
                    i = torch.cat([r, a], dim=-1)
                    j = torch.cat([torch.full_like(r, n - 1), b], dim=-1)
                else:
                    i, j = a, b
                prob = torch.full((i.shape[-1],), 1.0 / rounds, dtype=torch.float64, device=device)
            if self.shuffle:
                assert self._perm is not None
                perm = self._perm.to(i.device)
                i, j = perm[i], perm[j]
            elif n <= 256 and count == m:  # a slice of the cached cycle: copy
                i, j = i.clone(), j.clone()
            chunks.append((i, j))
            done += count
            self.position += count
        assert prob is not None
        if len(chunks) == 1:
            return MatchingBlock(chunks[0][0], chunks[0][1], prob)
        return MatchingBlock(
            torch.cat([c[0] for c in chunks]), torch.cat([c[1] for c in chunks]), prob
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "position": self.position,
            "perm": None if self._perm is None else self._perm.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = int(state["position"])
        self._perm = None if state.get("perm") is None else state["perm"].clone()


class ColouringSampler(MatchingSampler):
    """A uniformly random colour class of a user-given allowed-pair graph (networkx), ``prob = 1/C``.

    The colouring (Misra–Gries, ≤ Δ+1 classes) is computed once at construction. Rows outside the graph
    are never rotated.
    """

    def __init__(self, n: int, graph: Any) -> None:
        super().__init__(n)
        self.classes = edge_colouring(graph)
        if not self.classes:
            raise ValueError("`graph` has no edges: there is no pair to rotate")
        top = max(int(torch.cat([m.i, m.j]).max()) for m in self.classes)
        if top >= n:
            raise ValueError(f"`graph` has node {top}, outside the {n} rows of the parameter")

    def sample(self, generator=None, *, weights=None, device=None) -> Matching:
        check_generator("generator", generator)
        gdev = generator.device if generator is not None else torch.device("cpu")
        c = int(torch.randint(len(self.classes), (1,), generator=generator, device=gdev))
        m = self.classes[c]
        return m if device is None else m.to(device)


class GreedySampler(MatchingSampler):
    """Greedy max-``|W|`` matchings (locally dominant edges): the one home of the ``"greedy"`` sampler.

    Needs the dense ``(n, n)`` weights: the caller forms ``W = D Xᵀ − X Dᵀ`` (O(n²k)) and passes ``|W|``.
    Deterministic: ``prob = 1``. :meth:`sample_many` gives the m successive matchings of one step.
    """

    needs_weights = True

    def _check_weights(self, weights: torch.Tensor | None) -> torch.Tensor:
        if weights is None:
            raise ValueError("GreedySampler.sample needs `weights` (the (n, n) matrix |W|)")
        if weights.shape != (self.n, self.n):
            raise ValueError(
                f"`weights` must have shape ({self.n}, {self.n}), got {tuple(weights.shape)}"
            )
        return weights

    def sample(self, generator=None, *, weights=None, device=None) -> Matching:
        m = greedy_matching(self._check_weights(weights))
        return m if device is None else m.to(device)

    def sample_many(
        self, weights: torch.Tensor, m: int, *, device: torch.device | str | None = None
    ) -> list[Matching]:
        """Up to ``m`` successive greedy matchings of ``weights`` ``(n, n)``, each one's pairs removed
        before the next (stops early when no positive weight is left). ``weights`` is not modified.
        O(m·n² log n)."""
        check_positive_int("m", m)
        w = self._check_weights(weights).clone()
        out = []
        for t in range(m):
            mt = greedy_matching(w)
            if len(mt) == 0:
                break
            out.append(mt if device is None else mt.to(device))
            if t + 1 < m:
                w[mt.i, mt.j] = 0.0
                w[mt.j, mt.i] = 0.0
        return out


#: Spellings :func:`make_sampler` and the optimizers accept for one sampler.
SAMPLER_ALIASES = {"coloring": "colouring"}


def make_sampler(name: str, n: int, *, graph: Any = None) -> MatchingSampler:
    """Sampler by name: ``"random"``, ``"round_robin"``, ``"round_robin_shuffled"``, ``"greedy"``,
    ``"colouring"`` (alias ``"coloring"``; needs ``graph``). The optimizers accept the same names
    (plus ``"full"``, which needs no sampler)."""
    if not isinstance(name, str):
        raise TypeError(f"`name` must be a sampler name (str), got {type(name).__name__} {name!r}")
    name = SAMPLER_ALIASES.get(name, name)
    if name == "random":
        return RandomMatchingSampler(n)
    if name == "round_robin":
        return RoundRobinSampler(n)
    if name == "round_robin_shuffled":
        return RoundRobinSampler(n, shuffle=True)
    if name == "greedy":
        return GreedySampler(n)
    if name == "colouring":
        if graph is None:
            raise ValueError(
                "sampler 'colouring' needs `graph` (a networkx.Graph of allowed row pairs)"
            )
        return ColouringSampler(n, graph)
    raise ValueError(
        f"unknown sampler {name!r}; expected one of 'random', 'round_robin', 'round_robin_shuffled', "
        "'greedy', 'colouring' (alias 'coloring')"
    )
