"""Environments and whole-episode rollouts in numpy.

Gymnasium is imported inside the functions (extra ``rl``). An episode is run to termination or to the
environment's time limit without any inter-process communication; the result carries the three figures
every report gives together: return, length and forward displacement.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from orthotorch.rl._extra import require
from orthotorch.rl.policies import Actor, RunningStat

__all__ = ["EpisodeResult", "env_info", "make_env", "rollout", "root_x"]


@dataclass
class EpisodeResult:
    """One episode: ``ret`` (sum of the environment's rewards, unshifted), ``length`` (steps),
    ``forward`` (x of the root body at the end minus at the start; NaN for environments without a MuJoCo
    root position), when collected, the statistics of the visited observations and, when recorded, the
    transitions ``trace = (obs (T+1, obs_dim), act (T, act_dim), reward (T,), terminated (T,) bool)``."""

    ret: float
    length: int
    forward: float
    stats: RunningStat | None = None
    trace: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None


def make_env(env_id: str, **kwargs: Any) -> Any:
    """``gymnasium.make(env_id, **kwargs)`` with clear errors.

    Raises:
        MissingExtraError: gymnasium (extra ``rl``) is not installed.
        ValueError: ``env_id`` is not a registered Gymnasium environment (or needs a missing dependency).
    """
    gym = require("gymnasium")
    if not isinstance(env_id, str) or not env_id:
        raise TypeError(f"`env_id` must be a non-empty str, got {env_id!r}")
    try:
        return gym.make(env_id, **kwargs)
    except gym.error.Error as exc:
        raise ValueError(f"unknown Gymnasium environment {env_id!r}: {exc}") from exc
    except ImportError as exc:
        raise ValueError(f"environment {env_id!r} needs a missing dependency: {exc}") from exc


def env_info(env: Any) -> dict[str, Any]:
    """Observation/action sizes, action box and episode limit of a Box→Box environment.

    Returns:
        ``{"obs_dim", "act_dim", "low", "high", "max_episode_steps"}``. ``ValueError`` for environments
        whose spaces are not flat ``Box`` spaces (discrete actions are not supported).
    """
    gym = require("gymnasium")
    obs_space, act_space = env.observation_space, env.action_space
    for what, space in (("observation", obs_space), ("action", act_space)):
        if not isinstance(space, gym.spaces.Box) or len(space.shape) != 1:
            raise ValueError(f"only flat Box {what} spaces are supported, got {space}")
    spec = getattr(env, "spec", None)
    return {
        "obs_dim": int(obs_space.shape[0]),
        "act_dim": int(act_space.shape[0]),
        "low": np.asarray(act_space.low, dtype=np.float64).tolist(),
        "high": np.asarray(act_space.high, dtype=np.float64).tolist(),
        "max_episode_steps": getattr(spec, "max_episode_steps", None),
    }


def root_x(env: Any) -> float:
    """x coordinate of the root body (``data.qpos[0]``, the torso for Humanoid) or NaN without one."""
    data = getattr(env.unwrapped, "data", None)
    qpos = getattr(data, "qpos", None)
    if qpos is None or len(qpos) == 0:
        return math.nan
    return float(qpos[0])


def rollout(
    env: Any,
    act: Actor,
    mean: np.ndarray,
    inv_std: np.ndarray,
    *,
    seed: int,
    max_steps: int | None = None,
    collect_stats: bool = False,
    record: bool = False,
) -> EpisodeResult:
    """Run one episode of ``env`` with ``act((o − mean)·inv_std)``.

    Args:
        env: a Gymnasium environment (flat Box spaces).
        act: the policy with its parameters bound (:meth:`Policy.actor`).
        mean, inv_std: frozen observation normalisation ``(obs_dim,)``.
        seed: ``env.reset(seed=seed)``: the episode is a deterministic function of it and the policy.
        max_steps: optional cap below the environment's own time limit.
        collect_stats: also return the statistics of the visited observations (including the first).
        record: also return the raw transitions (``EpisodeResult.trace``, float64; for world models).

    Returns:
        :class:`EpisodeResult`.
    """
    obs, _ = env.reset(seed=int(seed))
    x0 = root_x(env)
    visited: list[np.ndarray] | None = [] if collect_stats or record else None
    acts: list[np.ndarray] | None = [] if record else None
    rewards: list[float] = []
    terminated = False
    total, steps = 0.0, 0
    limit = math.inf if max_steps is None else max_steps
    while steps < limit:
        o = np.asarray(obs, dtype=np.float64)
        if visited is not None:
            visited.append(o)
        a = act((o - mean) * inv_std)
        if acts is not None:
            acts.append(np.asarray(a, dtype=np.float64))
        obs, reward, terminated, truncated, _ = env.step(a)
        total += float(reward)
        if acts is not None:
            rewards.append(float(reward))
        steps += 1
        if terminated or truncated:
            break
    stats = RunningStat.of(np.stack(visited)) if visited and collect_stats else None
    trace = None
    if acts is not None and visited is not None:
        term = np.zeros(steps, dtype=bool)
        term[-1] = bool(terminated)
        final = np.asarray(obs, dtype=np.float64)
        trace = (np.stack([*visited, final]), np.stack(acts), np.array(rewards), term)
    return EpisodeResult(total, steps, root_x(env) - x0, stats, trace)
