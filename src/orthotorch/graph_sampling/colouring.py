"""Proper edge colourings of an allowed-pair graph (Misra–Gries, at most Δ+1 colours).

Each colour class is a matching, so a user can restrict rotations to a sparse set of row pairs (a band,
a block structure, a hardware topology) and still rotate one class of disjoint pairs at a time.
"""

from __future__ import annotations

from typing import Any

import torch

from orthotorch.graph_sampling.matching import Matching

__all__ = ["edge_colouring", "edge_colouring_classes"]


def _check_graph(graph: Any) -> tuple[int, list[tuple[int, int]]]:
    try:
        import networkx as nx
    except ImportError as exc:  # pragma: no cover - networkx is a core dependency
        raise ImportError(
            "edge_colouring needs networkx (a core dependency of orthotorch)"
        ) from exc
    if not isinstance(graph, nx.Graph) or graph.is_directed() or graph.is_multigraph():
        raise TypeError(
            f"`graph` must be an undirected simple networkx.Graph, got {type(graph).__name__}"
        )
    nodes = list(graph.nodes)
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in nodes):
        raise ValueError("`graph` nodes must be non-negative integers (row indices)")
    edges = []
    for u, v in graph.edges:
        if u == v:
            raise ValueError(
                f"`graph` must have no self-loops (a row cannot pair with itself), got ({u}, {v})"
            )
        edges.append((u, v) if u < v else (v, u))
    n = (max(nodes) + 1) if nodes else 0
    return n, sorted(edges)


def edge_colouring_classes(graph: Any) -> list[list[tuple[int, int]]]:
    """Misra–Gries proper edge colouring of a simple graph as lists of edges per colour.

    Guarantee: at most ``Δ + 1`` colours, ``Δ`` the maximum degree (Vizing's bound); every edge appears in
    exactly one class and no two edges of a class share a vertex. Cost O(|V|·|E|) in Python.
    """
    _, edges = _check_graph(graph)
    adj: dict[int, set[int]] = {}
    for u, v in edges:
        adj.setdefault(u, set()).add(v)
        adj.setdefault(v, set()).add(u)
    delta = max((len(s) for s in adj.values()), default=0)
    ncol = delta + 1
    colour: dict[tuple[int, int], int] = {}  # key (min, max)
    at: dict[int, dict[int, int]] = {v: {} for v in adj}  # at[v][c] = neighbour joined by colour c

    def key(a: int, b: int) -> tuple[int, int]:
        return (a, b) if a < b else (b, a)

    def free(v: int, c: int) -> bool:
        return c not in at[v]

    def first_free(v: int) -> int:
        for c in range(ncol):
            if c not in at[v]:
                return c
        raise AssertionError("no free colour: degree exceeds Δ")  # pragma: no cover

    def set_colour(a: int, b: int, c: int | None) -> None:
        old = colour.pop(key(a, b), None)
        if old is not None:
            at[a].pop(old, None)
            at[b].pop(old, None)
        if c is not None:
            colour[key(a, b)] = c
            at[a][c] = b
            at[b][c] = a

    for u, v in edges:
        # maximal fan of u starting at v
        fan = [v]
        in_fan = {v}
        grew = True
        while grew:
            grew = False
            last = fan[-1]
            for w in adj[u]:
                if w in in_fan:
                    continue
                cw = colour.get(key(u, w))
                if cw is not None and free(last, cw):
                    fan.append(w)
                    in_fan.add(w)
                    grew = True
                    break
        c = first_free(u)
        d = first_free(fan[-1])
        # invert the cd-path starting at u
        if not free(u, d):
            path = []
            x, cur = u, d
            while cur in at[x]:
                y = at[x][cur]
                path.append((x, y, cur))
                x, cur = y, (c if cur == d else d)
            for a, b, _ in path:
                set_colour(a, b, None)
            for a, b, col in path:
                set_colour(a, b, c if col == d else d)
        # find w in fan with d free such that fan[:w] is a fan
        wi = 0
        for idx, w in enumerate(fan):
            if free(w, d):
                ok = all(free(fan[t], colour[key(u, fan[t + 1])]) for t in range(idx))
                if ok:
                    wi = idx
                    break
        # rotate the fan prefix: colour(u, fan[t]) <- colour(u, fan[t+1])
        for t in range(wi):
            nxt = colour[key(u, fan[t + 1])]
            set_colour(u, fan[t + 1], None)
            set_colour(u, fan[t], nxt)
        set_colour(u, fan[wi], d)

    classes: list[list[tuple[int, int]]] = [[] for _ in range(ncol)]
    for e, c in colour.items():
        classes[c].append(e)
    return [sorted(cl) for cl in classes if cl]


def edge_colouring(graph: Any, *, device: torch.device | str | None = None) -> list[Matching]:
    """Proper edge colouring of an allowed-pair graph as a list of :class:`Matching` (one per colour).

    Args:
        graph: undirected simple ``networkx.Graph`` whose nodes are row indices ``0..n−1``.
        device: device of the returned index tensors.

    Returns:
        At most ``Δ + 1`` matchings (Misra–Gries; ``Δ`` the maximum degree) that together contain every edge
        exactly once. ``prob`` is ``1/C`` for ``C`` classes: the inclusion probability of each edge when one
        class is drawn uniformly at random.
    """
    classes = edge_colouring_classes(graph)
    out = []
    for cl in classes:
        t = torch.tensor(cl, dtype=torch.int64, device=device).reshape(-1, 2)
        prob = torch.full((len(cl),), 1.0 / len(classes), dtype=torch.float64, device=device)
        out.append(Matching(t[:, 0].contiguous(), t[:, 1].contiguous(), prob))
    return out
