"""Evolution strategies with orthogonal perturbations for Gymnasium MuJoCo tasks (Humanoid-v5).

ARS (:mod:`~orthotorch.rl.es`) with iid Gaussian, Haar-orthogonal or Givens-product directions
(:mod:`~orthotorch.rl.directions`), numpy linear/MLP policies with running observation normalisation
(:mod:`~orthotorch.rl.policies`), whole-episode rollouts (:mod:`~orthotorch.rl.rollout`) run in-process, in
one worker process per core or on Ray (:mod:`~orthotorch.rl.workers`), and atomic JSON checkpoints
(:mod:`~orthotorch.rl.checkpoint`). The package imports without its optional dependencies; gymnasium,
mujoco and ray (extra ``rl``: ``pip install -e ".[rl]"``) are imported when first needed. See docs/rl.md.
"""

from orthotorch.rl._extra import INSTALL_HINT, MissingExtraError
from orthotorch.rl.checkpoint import load_checkpoint, save_checkpoint
from orthotorch.rl.directions import (
    DirectionSampler,
    GaussianDirections,
    GivensDirections,
    OrthogonalDirections,
    make_sampler,
)
from orthotorch.rl.es import ARSConfig, ARSTrainer, ars_update
from orthotorch.rl.policies import LinearPolicy, MLPPolicy, RunningStat, make_policy
from orthotorch.rl.rollout import (
    EpisodeResult,
    env_info,
    make_env,
)  # rollout(): in orthotorch.rl.rollout
from orthotorch.rl.workers import (
    ProcessBackend,
    RayBackend,
    RolloutWorker,
    SerialBackend,
    WorkerSpec,
    make_backend,
)

__all__ = [
    "INSTALL_HINT",
    "ARSConfig",
    "ARSTrainer",
    "DirectionSampler",
    "EpisodeResult",
    "GaussianDirections",
    "GivensDirections",
    "LinearPolicy",
    "MLPPolicy",
    "MissingExtraError",
    "OrthogonalDirections",
    "ProcessBackend",
    "RayBackend",
    "RolloutWorker",
    "RunningStat",
    "SerialBackend",
    "WorkerSpec",
    "ars_update",
    "env_info",
    "load_checkpoint",
    "make_backend",
    "make_env",
    "make_policy",
    "make_sampler",
    "save_checkpoint",
]
