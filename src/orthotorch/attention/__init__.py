"""FAVOR+ attention: random feature maps, bidirectional and causal linear attention, SLiM training.

- Feature maps (:class:`FeatureMap`): positive (FAVOR+), hyperbolic, trigonometric, ReLU, ELU+1, with
  iid Gaussian, orthogonal-block or Givens-structured projections drawn from a ``torch.Generator``.
- :func:`favor_attention`: ``scaled_dot_product_attention``-shaped FAVOR, bidirectional or causal,
  cross-attention, key padding masks, recurrent :class:`FavorState` for O(1)-per-token decoding.
- SLiM: the causal path's custom autograd (memory independent of L beyond inputs/outputs) and
  :func:`slim_train_step`, slice-by-slice training of a :class:`PerformerLM` through all layers.
- Modules: :class:`FavorAttention` (drop-in for ``nn.MultiheadAttention``, loads its state_dict),
  :class:`PerformerBlock`, :class:`Performer`, :class:`PerformerLM`.

See docs/attention.md for where FAVOR+ is accurate and fast, and where it is not.
"""

from orthotorch.attention.features import (
    FeatureMap,
    GivensBlocks,
    gaussian_projection,
    givens_blocks,
    givens_projection,
    orthogonal_projection,
    sample_projection,
)
from orthotorch.attention.functional import (
    FavorState,
    favor_attention,
    favor_decode_step,
    init_state,
    rebuild_state,
    softmax_attention,
)
from orthotorch.attention.modules import (
    FavorAttention,
    Performer,
    PerformerBlock,
    PerformerLM,
    constrain_projections,
    orthogonal_init_,
    sinusoidal_positions,
    stiefel_parameters,
)
from orthotorch.attention.slim import slim_train_step

__all__ = [
    "FavorAttention",
    "FavorState",
    "FeatureMap",
    "GivensBlocks",
    "Performer",
    "PerformerBlock",
    "PerformerLM",
    "constrain_projections",
    "favor_attention",
    "favor_decode_step",
    "gaussian_projection",
    "givens_blocks",
    "givens_projection",
    "init_state",
    "orthogonal_init_",
    "orthogonal_projection",
    "rebuild_state",
    "sample_projection",
    "sinusoidal_positions",
    "slim_train_step",
    "softmax_attention",
    "stiefel_parameters",
]
