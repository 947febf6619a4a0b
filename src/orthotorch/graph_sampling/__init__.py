"""Graph side of the Givens optimizers: matchings, 1-factorisations, edge colourings, samplers.

All randomness comes from a caller-supplied ``torch.Generator``; every sampler reports the inclusion
probability of each pair so callers can form unbiased estimates.
"""

from orthotorch.graph_sampling.colouring import edge_colouring, edge_colouring_classes
from orthotorch.graph_sampling.matching import (
    Matching,
    MatchingBlock,
    greedy_matching,
    random_matching,
    round_robin,
    round_robin_matching,
)
from orthotorch.graph_sampling.samplers import (
    SAMPLER_ALIASES,
    ColouringSampler,
    GreedySampler,
    MatchingSampler,
    RandomMatchingSampler,
    RoundRobinSampler,
    make_sampler,
)

__all__ = [
    "SAMPLER_ALIASES",
    "ColouringSampler",
    "GreedySampler",
    "Matching",
    "MatchingBlock",
    "MatchingSampler",
    "RandomMatchingSampler",
    "RoundRobinSampler",
    "edge_colouring",
    "edge_colouring_classes",
    "greedy_matching",
    "make_sampler",
    "random_matching",
    "round_robin",
    "round_robin_matching",
]
