"""orthotorch: optimization on orthogonal groups O(d)/SO(d) and Stiefel manifolds St(n, k) in PyTorch.

Subpackages:

- :mod:`orthotorch.manifolds`: O(d), SO(d), St(n, k) (geoopt-compatible), Givens primitives, CWY/T-CWY.
- :mod:`orthotorch.graph_sampling`: matchings, 1-factorisations, edge colourings, samplers.
- :mod:`orthotorch.optim`: stochastic Givens-rotation optimizers (drop-in ``torch.optim.Optimizer``).
- :mod:`orthotorch.parametrize`: orthogonality as ``torch.nn.utils.parametrize`` constraints.
- :mod:`orthotorch.attention`: FAVOR+ attention and SLiM causal training.
- :mod:`orthotorch.bilevel`: exact, FOM and UFOM hypergradients.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
