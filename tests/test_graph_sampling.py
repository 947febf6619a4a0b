"""Matchings, 1-factorisations, colourings and samplers: structure, marginals and optimality bounds."""

import itertools
import math

import networkx as nx
import pytest
import torch

from orthotorch.graph_sampling import (
    ColouringSampler,
    GreedySampler,
    RandomMatchingSampler,
    RoundRobinSampler,
    edge_colouring,
    greedy_matching,
    make_sampler,
    random_matching,
    round_robin,
    round_robin_matching,
)


def pairs_of(m):
    return [tuple(sorted(p)) for p in zip(m.i.tolist(), m.j.tolist())]


def assert_disjoint(m):
    verts = m.i.tolist() + m.j.tolist()
    assert len(verts) == len(set(verts))
    assert all(a != b for a, b in pairs_of(m))


@pytest.mark.parametrize("n", [2, 3, 8, 11, 64])
def test_random_matching_is_perfect_and_disjoint(n):
    m = random_matching(n, generator=torch.Generator().manual_seed(n))
    assert_disjoint(m)
    assert len(m) == n // 2
    assert set(m.i.tolist() + m.j.tolist()) <= set(range(n))
    assert torch.allclose(m.prob, torch.full_like(m.prob, 1 / (n - 1) if n % 2 == 0 else 1 / n))


def test_random_matching_reproducible_and_uses_generator():
    a = random_matching(50, generator=torch.Generator().manual_seed(3))
    b = random_matching(50, generator=torch.Generator().manual_seed(3))
    c = random_matching(50, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a.i, b.i) and torch.equal(a.j, b.j)
    assert not torch.equal(a.i, c.i)


@pytest.mark.parametrize("n", [6, 7])
def test_random_matching_marginals_monte_carlo(n):
    """Each pair appears with probability p_e; the empirical frequencies pass a 5-sigma binomial test."""
    gen = torch.Generator().manual_seed(0)
    trials = 6000
    counts = dict.fromkeys(itertools.combinations(range(n), 2), 0)
    for _ in range(trials):
        m = random_matching(n, generator=gen)
        for e in pairs_of(m):
            counts[e] += 1
    p = 1 / (n - 1) if n % 2 == 0 else 1 / n
    sd = math.sqrt(trials * p * (1 - p))
    for e, c in counts.items():
        assert abs(c - trials * p) < 5 * sd, (e, c, trials * p)


@pytest.mark.parametrize("n", list(range(2, 14)))
def test_round_robin_covers_every_edge_once(n):
    rounds = round_robin(n)
    assert len(rounds) == (n - 1 if n % 2 == 0 else n)
    seen = []
    for m in rounds:
        assert_disjoint(m)
        assert len(m) == n // 2
        seen += pairs_of(m)
    assert sorted(seen) == sorted(itertools.combinations(range(n), 2))


def test_round_robin_matching_range_error():
    with pytest.raises(ValueError, match="`r` must be in"):
        round_robin_matching(6, 5)
    with pytest.raises(ValueError, match="`n` must be >= 2"):
        round_robin_matching(1, 0)


def _nx_optimum(w):
    g = nx.Graph()
    n = w.shape[0]
    for a in range(n):
        for b in range(a + 1, n):
            if w[a, b] > 0:
                g.add_edge(a, b, weight=float(w[a, b]))
    opt = nx.max_weight_matching(g)
    return sum(g[a][b]["weight"] for a, b in opt)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("n", [7, 16])
def test_greedy_at_least_half_of_networkx_optimum(seed, n):
    gen = torch.Generator().manual_seed(seed)
    w = torch.rand(n, n, generator=gen, dtype=torch.float64) ** 3  # skewed weights make greedy err
    w = w + w.T
    m = greedy_matching(w)
    assert_disjoint(m)
    got = float(w[m.i, m.j].sum())
    opt = _nx_optimum(w)
    assert got >= 0.5 * opt - 1e-12
    assert got <= opt + 1e-12
    # maximal: no positive edge left between two unmatched vertices
    free = sorted(set(range(n)) - set(m.i.tolist() + m.j.tolist()))
    assert len(free) <= 1


def test_greedy_picks_heaviest_edge_and_handles_zero_weights():
    w = torch.zeros(6, 6)
    w[1, 4] = w[4, 1] = 5.0
    w[0, 1] = w[1, 0] = 4.0
    m = greedy_matching(w)
    assert pairs_of(m) == [(1, 4)]  # weight-0 edges are never used
    with pytest.raises(ValueError, match="square"):
        greedy_matching(torch.zeros(3, 4))


def _check_colouring(graph, classes):
    delta = max((d for _, d in graph.degree), default=0)
    assert len(classes) <= delta + 1
    seen = []
    for m in classes:
        assert_disjoint(m)
        seen += pairs_of(m)
    assert sorted(seen) == sorted(tuple(sorted(e)) for e in graph.edges)


@pytest.mark.parametrize(
    "graph",
    [
        nx.petersen_graph(),
        nx.complete_graph(9),
        nx.complete_graph(10),
        nx.cycle_graph(7),
        nx.path_graph(5),
        nx.gnp_random_graph(40, 0.2, seed=1),
        nx.random_regular_graph(7, 24, seed=2),
        nx.grid_2d_graph(4, 5),
    ],
    ids=["petersen", "K9", "K10", "C7", "P5", "gnp", "regular", "grid"],
)
def test_edge_colouring_proper_and_at_most_delta_plus_one(graph):
    if not all(isinstance(v, int) for v in graph.nodes):
        graph = nx.convert_node_labels_to_integers(graph)
    _check_colouring(graph, edge_colouring(graph))


def test_edge_colouring_bad_graphs():
    with pytest.raises(TypeError, match="undirected"):
        edge_colouring(nx.DiGraph([(0, 1)]))
    g = nx.Graph()
    g.add_edge(0, 0)
    with pytest.raises(ValueError, match="self-loops"):
        edge_colouring(g)
    with pytest.raises(ValueError, match="non-negative integers"):
        edge_colouring(nx.Graph([("a", "b")]))


@pytest.mark.parametrize(
    "sampler",
    [
        RandomMatchingSampler(6),
        RoundRobinSampler(6, shuffle=True),
        ColouringSampler(6, nx.cycle_graph(6)),
    ],
    ids=["random", "rr-shuffled", "colouring"],
)
def test_samplers_give_unbiased_estimates(sampler):
    """E[Σ_{e∈M} W_e / p_e] = Σ_e W_e over the sampler's support (Monte Carlo, 5 sigma)."""
    n = 6
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(n, n, generator=gen, dtype=torch.float64)
    support = (
        list(itertools.combinations(range(n), 2))
        if not isinstance(sampler, ColouringSampler)
        else [tuple(sorted(e)) for e in nx.cycle_graph(6).edges]
    )
    target = sum(float(w[a, b]) for a, b in support)
    draws = []
    for _ in range(3000):
        m = sampler.sample(gen)
        a, b = torch.minimum(m.i, m.j), torch.maximum(m.i, m.j)
        draws.append(float((w[a, b] / m.prob).sum()))
    d = torch.tensor(draws)
    assert abs(d.mean() - target) < 5 * d.std() / math.sqrt(len(d)) + 1e-9


def test_round_robin_sampler_cycles_and_state_dict():
    s = RoundRobinSampler(8)
    first = [pairs_of(s.sample()) for _ in range(7)]
    assert sorted(p for r in first for p in r) == sorted(itertools.combinations(range(8), 2))
    assert pairs_of(s.sample()) == first[0]  # cycle restarts
    s2 = RoundRobinSampler(8, shuffle=True)
    gen = torch.Generator().manual_seed(0)
    s2.sample(gen)
    state, gstate = s2.state_dict(), gen.get_state()
    nxt = pairs_of(s2.sample(gen))
    s3 = RoundRobinSampler(8, shuffle=True)
    s3.load_state_dict(state)
    gen.set_state(gstate)
    assert pairs_of(s3.sample(gen)) == nxt


def test_greedy_sampler_and_factory_errors():
    s = make_sampler("greedy", 4)
    assert isinstance(s, GreedySampler) and s.needs_weights
    with pytest.raises(ValueError, match="needs `weights`"):
        s.sample()
    with pytest.raises(ValueError, match="unknown sampler 'bogus'"):
        make_sampler("bogus", 4)
    with pytest.raises(ValueError, match="needs `graph`"):
        make_sampler("colouring", 4)
    with pytest.raises(ValueError, match="outside the 4 rows"):
        ColouringSampler(4, nx.path_graph(6))


def test_greedy_sample_many_removes_used_pairs_and_matches_an_explicit_loop():
    n = 8
    w = torch.rand(n, n, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    w = w + w.T
    w.fill_diagonal_(0.0)
    before = w.clone()
    got = GreedySampler(n).sample_many(w, 3)
    assert torch.equal(w, before)  # input untouched
    ref, used = [], set()
    work = w.clone()
    for _ in range(3):  # independent reference: greedy_matching with used pairs zeroed by hand
        m = greedy_matching(work)
        ref.append(pairs_of(m))
        for a, b in pairs_of(m):
            used.add((a, b))
            work[a, b] = work[b, a] = 0.0
    assert [pairs_of(m) for m in got] == ref
    seen = [p for m in got for p in pairs_of(m)]
    assert len(seen) == len(set(seen))  # no pair twice across the matchings
    for m in got:
        assert_disjoint(m)
    with pytest.raises(ValueError, match="shape"):
        GreedySampler(n).sample_many(torch.zeros(3, 3), 1)
    with pytest.raises(ValueError, match="`m`"):
        GreedySampler(n).sample_many(w, 0)


def test_make_sampler_accepts_both_spellings_of_colouring_and_checks_the_name_type():
    g = nx.cycle_graph(6)
    a, b = make_sampler("colouring", 6, graph=g), make_sampler("coloring", 6, graph=g)
    assert isinstance(a, ColouringSampler) and isinstance(b, ColouringSampler)
    assert [pairs_of(m) for m in a.classes] == [pairs_of(m) for m in b.classes]
    with pytest.raises(TypeError, match="name"):
        make_sampler(None, 6)


@pytest.mark.parametrize("n", [2, 3, 4, 9, 16, 33, 257, 300])  # > 256: not from the cached cycle
@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("m", [1, 3, 16, 40])
def test_round_robin_sample_n_equals_successive_samples(n, shuffle, m):
    """The vectorised ``sample_n`` (what the optimizers call once per step) gives the matchings, sampler
    state and generator draws of ``m`` calls of ``sample``, across cycle boundaries (m > n − 1)."""
    a, b = RoundRobinSampler(n, shuffle=shuffle), RoundRobinSampler(n, shuffle=shuffle)
    ga, gb = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for _ in range(3):
        one_by_one = [a.sample(ga) for _ in range(m)]
        batched = b.sample_n(m, gb)
        assert len(batched) == m
        for x, y in zip(one_by_one, batched):
            assert torch.equal(x.i, y.i) and torch.equal(x.j, y.j) and torch.equal(x.prob, y.prob)
            assert y.i.dtype == torch.int64 and y.i.is_contiguous()
        assert a.state_dict()["position"] == b.state_dict()["position"]
        assert torch.equal(ga.get_state(), gb.get_state())
    with pytest.raises(ValueError, match="`m`"):
        b.sample_n(0, gb)
