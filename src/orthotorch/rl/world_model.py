"""World models of an environment's dynamics: transition shards and recurrent models of four kinds.

A first step of part 2 of issue 13: transitions recorded from a policy are stored as ``.npz`` shards
with the policy version that produced them; a :class:`DynamicsModel` predicts, from the observation and
action of each step, the change of observation, the reward and the termination, with a recurrent core
that is an orthogonal RNN (:class:`orthotorch.nn.OrthogonalRNN`, recurrent matrix kept on O(h) by
:class:`orthotorch.optim.OrthogonalAdam`'s Givens rotations), a plain ``nn.RNN``, an ``nn.LSTM`` or no
recurrence at all (an MLP). :func:`k_step_error` measures open-loop prediction error, feeding the model
its own predictions for k steps. The trainer uses a model to screen ES perturbations in imagination
(:mod:`~orthotorch.rl.screening`; measured in docs/benchmarks/humanoid_screening.md).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from orthotorch._validation import check_choice, check_generator, check_positive_int
from orthotorch.nn import OrthogonalRNN
from orthotorch.optim import OrthogonalAdam
from orthotorch.rl.policies import Actor
from orthotorch.rl.rollout import root_x

__all__ = [
    "MODEL_KINDS",
    "DynamicsModel",
    "Episode",
    "imagine",
    "k_step_error",
    "load_shard",
    "record_episodes",
    "save_shard",
    "train_model",
]

#: The recurrent cores of :class:`DynamicsModel`.
MODEL_KINDS = ("orthogonal", "rnn", "lstm", "mlp")


@dataclass
class Episode:
    """One recorded episode: ``obs`` ``(T+1, obs_dim)``, ``act`` ``(T, act_dim)``, ``reward`` ``(T,)``,
    ``terminated`` ``(T,)`` bool (True only at a terminal step), float64; ``forward``: torso displacement."""

    obs: np.ndarray
    act: np.ndarray
    reward: np.ndarray
    terminated: np.ndarray
    forward: float = math.nan

    def __len__(self) -> int:
        return int(self.act.shape[0])


def record_episodes(
    env: Any,
    act: Actor,
    mean: np.ndarray,
    inv_std: np.ndarray,
    seeds: list[int],
    *,
    action_noise: float = 0.0,
    rng: np.random.Generator | None = None,
    max_steps: int | None = None,
) -> list[Episode]:
    """Episodes of ``act((o − mean)·inv_std)`` (plus Gaussian action noise of scale ``action_noise``
    times the half-width of the action box, drawn from ``rng``), one per reset seed, clipped to the box."""
    low, high = env.action_space.low.astype(np.float64), env.action_space.high.astype(np.float64)
    if action_noise and rng is None:
        raise ValueError("`rng` is required when `action_noise` > 0")
    out = []
    for seed in seeds:
        obs, _ = env.reset(seed=int(seed))
        x0 = root_x(env)
        os_, as_, rs, ts = [np.asarray(obs, dtype=np.float64)], [], [], []
        steps = 0
        while max_steps is None or steps < max_steps:
            a = act((os_[-1] - mean) * inv_std)
            if action_noise:
                assert rng is not None
                a = np.clip(
                    a + action_noise * (high - low) / 2 * rng.standard_normal(a.shape), low, high
                )
            obs, r, term, trunc, _ = env.step(a)
            os_.append(np.asarray(obs, dtype=np.float64))
            as_.append(np.asarray(a, dtype=np.float64))
            rs.append(float(r))
            ts.append(bool(term))
            steps += 1
            if term or trunc:
                break
        out.append(
            Episode(np.stack(os_), np.stack(as_), np.array(rs), np.array(ts), root_x(env) - x0)
        )
    return out


def save_shard(
    path: str | os.PathLike[str], episodes: list[Episode], *, policy_version: int, env_id: str
) -> Path:
    """Write ``episodes`` to one compressed ``.npz`` shard atomically (episodes concatenated, with offsets)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(
        tmp,
        obs=np.concatenate([e.obs for e in episodes]),
        act=np.concatenate([e.act for e in episodes]),
        reward=np.concatenate([e.reward for e in episodes]),
        terminated=np.concatenate([e.terminated for e in episodes]),
        lengths=np.array([len(e) for e in episodes], dtype=np.int64),
        forward=np.array([e.forward for e in episodes]),
        policy_version=np.array(policy_version, dtype=np.int64),
        env_id=np.array(env_id),
    )
    os.replace(tmp, path)
    return path


def load_shard(path: str | os.PathLike[str]) -> tuple[list[Episode], dict[str, Any]]:
    """Inverse of :func:`save_shard`: the episodes and ``{"policy_version", "env_id"}``."""
    with np.load(path) as z:
        lengths = z["lengths"]
        episodes, o, a = [], 0, 0
        for n, fwd in zip(lengths, z["forward"]):
            n = int(n)
            episodes.append(
                Episode(
                    z["obs"][o : o + n + 1],
                    z["act"][a : a + n],
                    z["reward"][a : a + n],
                    z["terminated"][a : a + n],
                    float(fwd),
                )
            )
            o, a = o + n + 1, a + n
        meta = {"policy_version": int(z["policy_version"]), "env_id": str(z["env_id"])}
    return episodes, meta


class DynamicsModel(nn.Module):
    """``(o_t, a_t) ↦ (Δo_t, r_t, termination logit)`` with a recurrent (or MLP) core, float32.

    Inputs and targets are standardised with statistics of the training data (buffers set by
    :meth:`fit_normaliser`). ``forward`` takes ``obs`` ``(B, T, obs_dim)`` and ``act`` ``(B, T, act_dim)``
    and returns ``delta`` ``(B, T, obs_dim)`` and ``reward``/``done_logit`` ``(B, T)`` in standardised
    units, plus the final recurrent state.

    Args:
        obs_dim, act_dim: sizes.
        hidden: width of the core.
        kind: ``"orthogonal"`` (OrthogonalRNN, tanh, Givens-constrained recurrent matrix), ``"rnn"``,
            ``"lstm"`` or ``"mlp"`` (two tanh layers, no memory).
        generator: initialisation randomness (default seeded 0).
    """

    obs_mean: torch.Tensor
    obs_std: torch.Tensor
    act_mean: torch.Tensor
    act_std: torch.Tensor
    delta_mean: torch.Tensor
    delta_std: torch.Tensor
    obs_varies: torch.Tensor
    rew_mean: torch.Tensor
    rew_std: torch.Tensor

    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        *,
        hidden: int = 64,
        kind: str = "orthogonal",
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.kind = str(check_choice("kind", kind, MODEL_KINDS))
        self.obs_dim = check_positive_int("obs_dim", obs_dim)
        self.act_dim = check_positive_int("act_dim", act_dim)
        self.hidden = check_positive_int("hidden", hidden)
        check_generator("generator", generator)
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        n_in = obs_dim + act_dim
        self.core: nn.Module
        if kind == "orthogonal":
            self.core = OrthogonalRNN(
                n_in,
                hidden,
                nonlinearity="tanh",
                batch_first=True,
                constraint="givens",
                generator=gen,
            )
        elif kind in ("rnn", "lstm"):
            with torch.random.fork_rng(devices=[]):  # nn.RNN/LSTM draw from the global RNG
                torch.manual_seed(int(torch.randint(2**62, (1,), generator=gen)))
                cls = nn.RNN if kind == "rnn" else nn.LSTM
                self.core = cls(n_in, hidden, batch_first=True)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(torch.randint(2**62, (1,), generator=gen)))
                self.core = nn.Sequential(
                    nn.Linear(n_in, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh()
                )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(2**62, (1,), generator=gen)))
            self.head = nn.Linear(hidden, obs_dim + 2)
        for name, dim in (("obs", obs_dim), ("act", act_dim), ("delta", obs_dim)):
            self.register_buffer(f"{name}_mean", torch.zeros(dim))
            self.register_buffer(f"{name}_std", torch.ones(dim))
        self.register_buffer("obs_varies", torch.ones(obs_dim, dtype=torch.bool))
        self.register_buffer("rew_mean", torch.zeros(()))
        self.register_buffer("rew_std", torch.ones(()))

    def fit_normaliser(self, episodes: list[Episode]) -> None:
        """Set the standardisation buffers from ``episodes``.

        Coordinates that are constant in the data (std < 1e-6, e.g. Humanoid's contact forces before any
        contact) get std 1 and are left out of :func:`k_step_error` and :func:`imagine`
        (``obs_varies``): the data says nothing about them, and dividing by a zero std would let one such
        coordinate dominate every error.
        """
        obs = np.concatenate([e.obs[:-1] for e in episodes])
        delta = np.concatenate([np.diff(e.obs, axis=0) for e in episodes])
        act = np.concatenate([e.act for e in episodes])
        rew = np.concatenate([e.reward for e in episodes])
        for name, x in (("obs", obs), ("act", act), ("delta", delta)):
            std = x.std(0)
            getattr(self, f"{name}_mean").copy_(torch.from_numpy(x.mean(0)))
            getattr(self, f"{name}_std").copy_(torch.from_numpy(np.where(std < 1e-6, 1.0, std)))
        self.obs_varies.copy_(torch.from_numpy(obs.std(0) >= 1e-6))
        self.rew_mean.fill_(float(rew.mean()))
        self.rew_std.fill_(max(float(rew.std()), 1e-6))

    def forward(
        self, obs: torch.Tensor, act: torch.Tensor, state: Any = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any]:
        x = torch.cat(
            [(obs - self.obs_mean) / self.obs_std, (act - self.act_mean) / self.act_std], dim=-1
        )
        if self.kind == "mlp":
            h, state = self.core(x), None
        else:
            h, state = self.core(x, state)
        out = self.head(h)
        return out[..., : self.obs_dim], out[..., self.obs_dim], out[..., self.obs_dim + 1], state

    def recurrent_matrix(self) -> torch.Tensor | None:
        """The recurrent matrix ``(hidden, hidden)`` (None for the MLP; the first of the LSTM's gates)."""
        core: Any = self.core
        if self.kind == "orthogonal":
            return core.cells[0].weight_hh
        if self.kind in ("rnn", "lstm"):
            return core.weight_hh_l0[: self.hidden]
        return None


def _windows(episodes: list[Episode], length: int) -> list[tuple[int, int]]:
    return [(k, s) for k, e in enumerate(episodes) for s in range(len(e) - length + 1)]


def _batch(
    episodes: list[Episode], picks: list[tuple[int, int]], length: int
) -> tuple[torch.Tensor, ...]:
    obs = np.stack([episodes[k].obs[s : s + length + 1] for k, s in picks])
    act = np.stack([episodes[k].act[s : s + length] for k, s in picks])
    rew = np.stack([episodes[k].reward[s : s + length] for k, s in picks])
    term = np.stack([episodes[k].terminated[s : s + length] for k, s in picks])
    t = [torch.from_numpy(x).float() for x in (obs, act, rew, term.astype(np.float64))]
    return tuple(t)


def train_model(
    model: DynamicsModel,
    episodes: list[Episode],
    *,
    steps: int | None = None,
    seconds: float | None = None,
    window: int = 16,
    batch: int = 32,
    lr: float = 3e-3,
    generator: torch.Generator | None = None,
) -> list[float]:
    """Teacher-forced training on random windows; stops after ``steps`` updates or ``seconds`` of wall clock.

    The orthogonal model is optimised by :class:`~orthotorch.optim.OrthogonalAdam` (its recurrent matrix
    is rotated by Givens rotations and stays orthogonal), the others by ``torch.optim.Adam``. Loss: MSE of
    the standardised observation change and reward plus the binary cross-entropy of termination.
    Returns the loss of every update.
    """
    if steps is None and seconds is None:
        raise ValueError("give `steps` or `seconds`")
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    wins = _windows(episodes, window)
    if not wins:
        raise ValueError(f"no episode has at least `window` = {window} steps")
    opt: torch.optim.Optimizer = (
        OrthogonalAdam(model.parameters(), lr=lr)
        if model.kind == "orthogonal"
        else torch.optim.Adam(model.parameters(), lr=lr)
    )
    losses: list[float] = []
    t0 = time.perf_counter()
    while (steps is None or len(losses) < steps) and (
        seconds is None or time.perf_counter() - t0 < seconds
    ):
        idx = torch.randint(len(wins), (batch,), generator=gen).tolist()
        obs, act, rew, term = _batch(episodes, [wins[i] for i in idx], window)
        delta, r, d, _ = model(obs[:, :-1], act)
        target = (obs[:, 1:] - obs[:, :-1] - model.delta_mean) / model.delta_std
        loss = (
            (delta - target).pow(2).mean()
            + ((r - (rew - model.rew_mean) / model.rew_std) ** 2).mean()
            + nn.functional.binary_cross_entropy_with_logits(d, term)
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


@torch.no_grad()
def k_step_error(
    model: DynamicsModel,
    episodes: list[Episode],
    k: int,
    *,
    windows: int = 64,
    generator: torch.Generator | None = None,
) -> float:
    """Mean squared open-loop error of the observation after ``k`` steps, in units of the data's std.

    From the true observation at a random start, the model is fed its own predicted observations and the
    recorded actions for ``k`` steps (recurrent state starting at zero, as in training); the error is
    ``mean_j ((ô_k − o_k)_j / std_j)²`` over the coordinates that vary in the training data, averaged over
    ``windows`` random windows (NaN if no episode has ``k`` steps).
    """
    check_positive_int("k", k)
    gen = generator if generator is not None else torch.Generator().manual_seed(1)
    wins = _windows(episodes, k)
    if not wins:
        return math.nan
    idx = torch.randint(len(wins), (windows,), generator=gen).tolist()
    obs, act, _, _ = _batch(episodes, [wins[i] for i in idx], k)
    o = obs[:, :1]
    state = None
    for t in range(k):
        delta, _, _, state = model(o, act[:, t : t + 1], state)
        o = o + delta * model.delta_std + model.delta_mean
        if model.kind == "mlp":
            state = None
    err = ((o[:, 0] - obs[:, k]) / model.obs_std)[:, model.obs_varies] ** 2
    return float(err.mean())


@torch.no_grad()
def imagine(
    model: DynamicsModel,
    obs0: np.ndarray,
    act: Actor,
    mean: np.ndarray,
    inv_std: np.ndarray,
    steps: int,
) -> np.ndarray:
    """Closed-loop rollout in imagination: the policy acts on the model's own predicted observations.

    Returns the standardised distance from the data mean, ``‖(ô_t − μ)/σ‖ / √obs_dim`` ``(steps + 1,)``
    (about 1 on the data; a value that grows without bound is an unstable model). Stops early (the rest
    is ``inf``) once a prediction is not finite.
    """
    check_positive_int("steps", steps)
    out = np.full(steps + 1, np.inf)
    o = torch.as_tensor(obs0, dtype=torch.float32).reshape(1, 1, -1)
    state = None

    keep = model.obs_varies

    def size(x: torch.Tensor) -> float:
        z = ((x.reshape(-1) - model.obs_mean) / model.obs_std)[keep]
        return float(z.norm() / math.sqrt(max(1, z.numel())))

    out[0] = size(o)
    for t in range(steps):
        o64 = o.reshape(-1).double().numpy()
        a = torch.as_tensor(act((o64 - mean) * inv_std), dtype=torch.float32).reshape(1, 1, -1)
        delta, _, _, state = model(o, a, None if model.kind == "mlp" else state)
        o = o + delta * model.delta_std + model.delta_mean
        if not bool(torch.isfinite(o).all()):
            break
        out[t + 1] = size(o)
    return out
