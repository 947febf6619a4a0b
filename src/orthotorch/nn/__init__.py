"""Orthogonal recurrent networks and constrained layers.

- :class:`OrthogonalRNN` / :class:`OrthogonalRNNCell`: ``nn.RNN``-style RNN whose recurrent matrix stays on
  O(d) or SO(d) (``constraint="givens"`` for the Givens optimizers, or a CWY / matrix_exp / Cayley
  parametrization); ``modrelu``, ``tanh``, ``relu`` or ``identity``; Haar, Henaff and Cayley inits.
- :class:`StiefelGRU`: a GRU with each d×d recurrent gate block orthogonal.
- :class:`OrthogonalLinear` / :class:`StiefelLinear`: linear layers with a constrained weight.
- :mod:`orthotorch.nn.tasks`: copying, adding and sequential-digits tasks.

Guide: docs/nn.md.
"""

from orthotorch.nn import init, tasks
from orthotorch.nn.cells import OrthogonalRNNCell
from orthotorch.nn.constraints import CONSTRAINTS, constrained_weights, orthogonality_error
from orthotorch.nn.gated import StiefelGRU
from orthotorch.nn.linear import OrthogonalLinear, StiefelLinear
from orthotorch.nn.nonlinearities import NONLINEARITIES, ModReLU, modrelu
from orthotorch.nn.rnn import OrthogonalRNN

__all__ = [
    "CONSTRAINTS",
    "NONLINEARITIES",
    "ModReLU",
    "OrthogonalLinear",
    "OrthogonalRNN",
    "OrthogonalRNNCell",
    "StiefelGRU",
    "StiefelLinear",
    "constrained_weights",
    "init",
    "modrelu",
    "orthogonality_error",
    "tasks",
]
