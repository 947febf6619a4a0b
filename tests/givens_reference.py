"""Shared by the tests of the fused Givens steps (``test_givens.py``, ``test_givens_adam_fused.py``):
round-robin schedules, a dense rotation reference, operand layouts and a thread-count sweep."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from orthotorch.graph_sampling import round_robin_matching


def round_robin_rounds(n, m, start=0):
    """``m`` successive matchings of the round-robin 1-factorisation of ``n`` rows, from round ``start``
    (cyclically)."""
    rounds = n - 1 if n % 2 == 0 else n
    return [round_robin_matching(n, (start + s) % rounds) for s in range(m)]


def dense_rotation(n, i, j, theta):
    """expm(Σ θ_p (E_ij − E_ji)) written out with cos/sin, float64 ``(..., n, n)`` for ``theta``
    ``(..., P)`` (torch's float64 matrix_exp is only accurate to ~2e-10 for generators of norm ~0.05:
    it picks a low-degree Taylor polynomial there)."""
    rot = torch.eye(n, dtype=torch.float64).expand(*theta.shape[:-1], n, n).clone()
    c, s = torch.cos(theta), torch.sin(theta)
    for p in range(i.numel()):
        a, b = int(i[p]), int(j[p])
        rot[..., a, a], rot[..., b, b] = c[..., p], c[..., p]
        rot[..., a, b], rot[..., b, a] = s[..., p], -s[..., p]
    return rot


def with_layout(t, kind):
    """A copy of ``t`` ``(..., n, k)`` in memory layout ``kind``: ``"row"`` (contiguous), ``"col"``
    (each matrix column-major), ``"sliced"`` (every other column of a wider tensor: no contiguous
    dimension, one row-major copy per kernel call); anything else: contiguous rows, padded."""
    if kind == "row":
        return t.contiguous().clone()
    if kind == "col":
        return t.mT.contiguous().mT.clone(memory_format=torch.preserve_format)
    if kind == "sliced":
        big = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
        big[..., ::2] = t
        return big[..., ::2]
    big = torch.zeros(*t.shape[:-1], t.shape[-1] + 5, dtype=t.dtype)
    big[..., : t.shape[-1]] = t
    return big[..., : t.shape[-1]]


def per_thread_count_and_layout(run: Callable[[str], Any]) -> list[Any]:
    """``run(layout)`` for the layouts ``"row"`` and ``"col"`` under 1, 2 and 3 torch threads, in that
    order (the thread count is restored afterwards, also on failure)."""
    results = []
    threads = torch.get_num_threads()
    try:
        for nt in (1, 2, 3):
            torch.set_num_threads(nt)
            results.extend(run(lay) for lay in ("row", "col"))
    finally:
        torch.set_num_threads(threads)
    return results
