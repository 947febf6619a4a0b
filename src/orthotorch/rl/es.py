"""Augmented Random Search (Mania et al., 2018, "V2-t"): the ES update and a resumable trainer.

One iteration with ``N`` directions ``δ_k`` (from a :mod:`~orthotorch.rl.directions` sampler), noise ``ν``
and step size ``α``: run the antithetic pair ``θ ± ν δ_k`` for every k (the same environment seed for both
signs), keep the ``b`` directions with the largest ``max(r_k⁺, r_k⁻)`` and step

    θ ← θ + α / (b σ_R) · Σ_{top b} (r_k⁺ − r_k⁻) δ_k,

where ``σ_R`` is the standard deviation of the 2b kept returns (rewards may be shifted by a constant per
step for training, e.g. Humanoid's survival bonus; reports always give the unshifted return). The running
observation statistics are frozen during an iteration and updated afterwards with every visited state.

With ``screen_directions`` > 0 the N directions are candidates: a world model scores all of them in
imagination and only the ``screen_directions`` best get real rollouts (:mod:`~orthotorch.rl.screening`).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from orthotorch._validation import check_choice, check_positive_int, check_real
from orthotorch.rl.directions import SAMPLERS, DirectionSampler, make_sampler
from orthotorch.rl.policies import POLICIES, Policy, RunningStat, make_policy
from orthotorch.rl.rollout import EpisodeResult
from orthotorch.rl.screening import Screener, rank_correlation
from orthotorch.rl.workers import Backend, PairTask, WorkerSpec, episode_seed
from orthotorch.rl.world_model import MODEL_KINDS

__all__ = ["ARSConfig", "ARSTrainer", "ars_update", "summarise"]


def ars_update(
    params: np.ndarray,
    directions: np.ndarray,
    r_plus: np.ndarray,
    r_minus: np.ndarray,
    *,
    step_size: float,
    top: int | None = None,
) -> tuple[np.ndarray, dict[str, float]]:
    """One ARS step.

    Args:
        params: ``(P,)`` current parameters.
        directions: ``(N, P)`` perturbation directions.
        r_plus, r_minus: ``(N,)`` returns of ``θ + ν δ_k`` and ``θ − ν δ_k``.
        step_size: ``α``.
        top: ``b``, the number of best directions used (default all ``N``).

    Returns:
        ``(new_params, info)`` with ``info = {"reward_std": σ_R, "step_norm": ‖Δθ‖}``. When the kept
        returns are all equal (``σ_R = 0``) there is no signal and the parameters are returned unchanged.
    """
    params = np.asarray(params, dtype=np.float64)
    directions = np.asarray(directions, dtype=np.float64)
    r_plus = np.asarray(r_plus, dtype=np.float64)
    r_minus = np.asarray(r_minus, dtype=np.float64)
    n = directions.shape[0]
    if directions.ndim != 2 or directions.shape[1] != params.shape[0]:
        raise ValueError(
            f"`directions` must be (N, {params.shape[0]}), got shape {directions.shape}"
        )
    if r_plus.shape != (n,) or r_minus.shape != (n,):
        raise ValueError(
            f"`r_plus` and `r_minus` must be ({n},), got {r_plus.shape} and {r_minus.shape}"
        )
    b = n if top is None else check_positive_int("top", top)
    if b > n:
        raise ValueError(f"`top` must be <= the number of directions {n}, got {b}")
    if not (np.isfinite(r_plus).all() and np.isfinite(r_minus).all()):
        raise ValueError("returns must be finite")
    order = np.argsort(-np.maximum(r_plus, r_minus), kind="stable")[:b]
    sigma = float(np.std(np.concatenate([r_plus[order], r_minus[order]])))
    if sigma == 0.0:
        return params.copy(), {"reward_std": 0.0, "step_norm": 0.0}
    step = (step_size / (b * sigma)) * ((r_plus[order] - r_minus[order]) @ directions[order])
    return params + step, {"reward_std": sigma, "step_norm": float(np.linalg.norm(step))}


def _mean(xs: list[float]) -> float:
    return float(np.mean(xs)) if xs else float("nan")


def summarise(episodes: list[EpisodeResult], prefix: str = "") -> dict[str, float]:
    """Mean/max return, mean length and mean/max forward displacement of ``episodes``."""
    rets = [e.ret for e in episodes]
    fwd = [e.forward for e in episodes]
    return {
        f"{prefix}return_mean": _mean(rets),
        f"{prefix}return_max": float(np.max(rets)),
        f"{prefix}length_mean": _mean([float(e.length) for e in episodes]),
        f"{prefix}forward_mean": _mean(fwd),
        f"{prefix}forward_max": float(np.max(fwd)),
    }


@dataclass
class ARSConfig:
    """Hyperparameters of :class:`ARSTrainer` (saved in every checkpoint).

    Attributes:
        env_id: Gymnasium environment id.
        policy: ``"linear"`` or ``"mlp"``; ``hidden``: MLP hidden sizes.
        directions: sampler name (``gaussian``, ``orthogonal``, ``givens``); ``norms``: ``"chi"`` or
            ``"fixed"`` row norms of the orthogonal samplers.
        num_directions: ``N``; top_directions: ``b`` (``None``: all N).
        step_size: ``α``; noise: ``ν``; reward_shift: subtracted from every training reward.
        seed: seeds the policy initialisation and the iteration seeds.
        max_episode_steps: cap below the environment's time limit (``None``: the environment's).
        eval_every, eval_episodes: evaluate the unperturbed policy every that many iterations (0: never).
        screen_directions: world-model screening (:mod:`~orthotorch.rl.screening`): 0 (off) or the
            number of the ``num_directions`` candidates that get real rollouts; top_directions must then
            be <= it. The other ``screen_*`` fields only matter when it is > 0 (and are then saved):
            screen_model (a ``world_model.MODEL_KINDS`` core), screen_hidden (its width), screen_horizon
            (imagined steps), screen_starts (real start states per imagined rollout), screen_every
            (fine-tune the model every that many iterations), screen_updates (training updates per
            fine-tuning), screen_buffer (real episodes kept for training and start states).
    """

    env_id: str = "Humanoid-v5"
    policy: str = "linear"
    hidden: tuple[int, ...] = (32, 32)
    directions: str = "orthogonal"
    norms: str = "chi"
    num_directions: int = 230
    top_directions: int | None = None
    step_size: float = 0.02
    noise: float = 0.0075
    reward_shift: float = 0.0
    seed: int = 0
    max_episode_steps: int | None = None
    eval_every: int = 10
    eval_episodes: int = 5
    env_kwargs: dict[str, Any] = field(default_factory=dict)
    screen_directions: int = 0
    screen_model: str = "orthogonal"
    screen_hidden: int = 32
    screen_horizon: int = 50
    screen_starts: int = 8
    screen_every: int = 1
    screen_updates: int = 100
    screen_buffer: int = 64

    def __post_init__(self) -> None:
        check_choice("policy", self.policy, tuple(POLICIES))
        check_choice("directions", self.directions, tuple(SAMPLERS))
        check_choice("norms", self.norms, ("chi", "fixed"))
        self.hidden = tuple(int(h) for h in self.hidden)
        check_positive_int("num_directions", self.num_directions)
        if self.top_directions is not None:
            check_positive_int("top_directions", self.top_directions)
            if self.top_directions > self.num_directions:
                raise ValueError(
                    f"`top_directions` must be <= num_directions ({self.num_directions}), "
                    f"got {self.top_directions}"
                )
        check_real("step_size", self.step_size, minimum=0.0, min_inclusive=False)
        check_real("noise", self.noise, minimum=0.0, min_inclusive=False)
        check_real("reward_shift", self.reward_shift)
        if self.max_episode_steps is not None:
            check_positive_int("max_episode_steps", self.max_episode_steps)
        check_positive_int("eval_every", self.eval_every, minimum=0)
        check_positive_int("eval_episodes", self.eval_episodes, minimum=0)
        check_positive_int("screen_directions", self.screen_directions, minimum=0)
        if self.screen_directions > self.num_directions:
            raise ValueError(
                f"`screen_directions` must be <= num_directions ({self.num_directions}), "
                f"got {self.screen_directions}"
            )
        if (
            self.screen_directions
            and self.top_directions is not None
            and self.top_directions > self.screen_directions
        ):
            raise ValueError(
                f"`top_directions` must be <= screen_directions ({self.screen_directions}) when "
                f"screening, got {self.top_directions}"
            )
        check_choice("screen_model", self.screen_model, MODEL_KINDS)
        for name in _SCREEN_INTS:
            check_positive_int(name, getattr(self, name))

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form; ``ARSConfig(**d)`` inverts it.

        Without screening the ``screen_*`` fields are left out, so configs (and checkpoints) are the
        same as before screening existed.
        """
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        if not self.screen_directions:
            for name in _SCREEN_FIELDS:
                del d[name]
        return d


_SCREEN_INTS = (
    "screen_hidden",
    "screen_horizon",
    "screen_starts",
    "screen_every",
    "screen_updates",
    "screen_buffer",
)
_SCREEN_FIELDS = ("screen_directions", "screen_model", *_SCREEN_INTS)


class ARSTrainer:
    """ARS with a choice of direction sampler; the whole state is in :meth:`state_dict`.

    Args:
        config: hyperparameters.
        env: ``{"obs_dim", "act_dim", "low", "high"}`` of the environment (:func:`~orthotorch.rl.rollout.env_info`).

    Attributes:
        params: ``(P,)`` float64 policy parameters; ``obs_stat``: running observation statistics;
        rng: numpy Generator (PCG64) drawing one seed per iteration; iteration, env_steps (training
        episodes only), eval_env_steps; best: ``{"iteration", "return_mean", ...}`` of the best evaluation.
    """

    def __init__(self, config: ARSConfig, env: dict[str, Any]) -> None:
        self.config = config
        spec: dict[str, Any] = {
            "obs_dim": int(env["obs_dim"]),
            "act_dim": int(env["act_dim"]),
            "low": list(env["low"]),
            "high": list(env["high"]),
        }
        if config.policy == "mlp":
            spec["hidden"] = list(config.hidden)
        self.policy: Policy = make_policy(config.policy, **spec)
        options: dict[str, Any] = {} if config.directions == "gaussian" else {"norms": config.norms}
        self.sampler: DirectionSampler = make_sampler(
            config.directions, self.policy.num_params, **options
        )
        root = np.random.SeedSequence(config.seed)
        init_seq, iter_seq = root.spawn(2)
        self.params = self.policy.init_params(np.random.default_rng(init_seq))
        self.rng = np.random.Generator(np.random.PCG64(iter_seq))
        self.obs_stat = RunningStat(self.policy.obs_dim)
        self.iteration = 0
        self.env_steps = 0
        self.eval_env_steps = 0
        self.best: dict[str, Any] | None = None
        self.screener: Screener | None = None
        if config.screen_directions:
            self.screener = Screener(
                self.policy,
                keep=config.screen_directions,
                kind=config.screen_model,
                hidden=config.screen_hidden,
                horizon=config.screen_horizon,
                starts=config.screen_starts,
                every=config.screen_every,
                updates=config.screen_updates,
                buffer=config.screen_buffer,
                seed=config.seed,
            )

    def worker_spec(self) -> WorkerSpec:
        """The :class:`WorkerSpec` for backends that run this trainer's rollouts."""
        return WorkerSpec(
            env_id=self.config.env_id,
            policy=self.policy.spec(),
            sampler=self.sampler.spec(),
            env_kwargs=dict(self.config.env_kwargs),
            max_episode_steps=self.config.max_episode_steps,
        )

    def step(self, backend: Backend) -> dict[str, Any]:
        """One ARS iteration on ``backend`` (plus an evaluation every ``eval_every`` iterations).

        Returns:
            The iteration's log record: ``iteration``, ``env_steps``, ``eval_env_steps``, the return /
            length / forward-displacement summaries of the 2N training episodes, ``reward_std``,
            ``step_norm``, ``iteration_s`` and, on evaluation iterations, ``eval_*`` figures with the
            per-episode ``eval_returns``/``eval_lengths``/``eval_forward``. With screening also
            ``screen_*`` figures (:meth:`_screen_record`). The state changes only when the whole
            iteration has succeeded.
        """
        cfg = self.config
        t0 = time.perf_counter()
        seed = int(self.rng.integers(2**63))
        n = cfg.num_directions
        mean, inv_std = self.obs_stat.normaliser()
        indices = list(range(n))
        if self.screener is not None:
            candidates = self.sampler.sample(seed, n)
            model, train_s = self.screener.trained_model(seed, self.iteration)
            t1 = time.perf_counter()
            indices, predicted = self.screener.select(
                model, seed, self.params, candidates, cfg.noise, mean, inv_std, cfg.reward_shift
            )
            imagine_s = time.perf_counter() - t1
        pairs = backend.pairs(
            PairTask(
                seed, n, cfg.noise, indices, self.params, mean, inv_std, self.screener is not None
            )
        )
        episodes = [e for pair in pairs for e in pair]
        r_plus = np.array([p.ret - cfg.reward_shift * p.length for p, _ in pairs])
        r_minus = np.array([m.ret - cfg.reward_shift * m.length for _, m in pairs])
        params, info = ars_update(
            self.params,
            self.sampler.sample(seed, n) if self.screener is None else candidates[indices],
            r_plus,
            r_minus,
            step_size=cfg.step_size,
            top=cfg.top_directions,
        )
        stat = RunningStat.from_state_dict(self.obs_stat.state_dict())
        for e in episodes:
            assert e.stats is not None
            stat.merge(e.stats)
        record: dict[str, Any] = {
            "iteration": self.iteration + 1,
            "env_steps": self.env_steps + sum(e.length for e in episodes),
            **summarise(episodes),
            **info,
        }
        if self.screener is not None:
            record.update(
                self._screen_record(
                    indices, predicted, r_plus, r_minus, len(episodes), train_s, imagine_s
                )
            )
        evaluated = None
        if cfg.eval_every and cfg.eval_episodes and (self.iteration + 1) % cfg.eval_every == 0:
            m2, s2 = stat.normaliser()
            seeds = [episode_seed(seed, k, tag=1) for k in range(cfg.eval_episodes)]
            evaluated = backend.episodes(params, m2, s2, seeds)
            record.update(summarise(evaluated, "eval_"))
            record["eval_returns"] = [e.ret for e in evaluated]
            record["eval_lengths"] = [e.length for e in evaluated]
            record["eval_forward"] = [e.forward for e in evaluated]
        # commit the new state (nothing above modified it)
        self.params, self.obs_stat = params, stat
        if self.screener is not None:
            self.screener.model = model
            self.screener.add(episodes)
        self.iteration += 1
        self.env_steps = int(record["env_steps"])
        if evaluated is not None:
            self.eval_env_steps += sum(e.length for e in evaluated)
            if self.best is None or record["eval_return_mean"] > self.best["eval_return_mean"]:
                self.best = {
                    k: record[k]
                    for k in ("iteration", "env_steps", "eval_return_mean", "eval_length_mean")
                }
                self.best["eval_forward_mean"] = record["eval_forward_mean"]
        record["eval_env_steps"] = self.eval_env_steps
        record["iteration_s"] = time.perf_counter() - t0
        return record

    @staticmethod
    def _screen_record(
        indices: list[int],
        predicted: np.ndarray | None,
        r_plus: np.ndarray,
        r_minus: np.ndarray,
        real_episodes: int,
        train_s: float,
        imagine_s: float,
    ) -> dict[str, Any]:
        """The ``screen_*`` log figures of one screened iteration.

        ``screen_active`` (a model chose the directions), ``screen_real_episodes`` (2·screen),
        ``screen_kept`` (the kept indices), ``screen_train_s``/``screen_imagine_s``/``screen_model_s``
        (wall clock of fine-tuning, of imagination, their sum; no env steps), and, when active,
        ``screen_rank_corr`` (Spearman correlation of the 2·screen predicted and real shifted
        returns of the kept directions), ``screen_rank_corr_max`` (the same for ``max(r⁺, r⁻)``, the
        figure screening ranks by) and ``screen_pred_mean``/``screen_real_mean`` (mean predicted and
        real shifted return of the kept perturbations; predictions cover only ``screen_horizon`` steps).
        """
        out: dict[str, Any] = {
            "screen_active": predicted is not None,
            "screen_real_episodes": real_episodes,
            "screen_kept": list(indices),
            "screen_train_s": train_s,
            "screen_imagine_s": imagine_s,
            "screen_model_s": train_s + imagine_s,
        }
        if predicted is not None:
            kept = predicted[indices]
            real = np.stack([r_plus, r_minus], axis=1)
            out["screen_rank_corr"] = rank_correlation(kept.ravel(), real.ravel())
            out["screen_rank_corr_max"] = rank_correlation(kept.max(axis=1), real.max(axis=1))
            out["screen_pred_mean"] = float(kept.mean())
            out["screen_real_mean"] = float(real.mean())
        return out

    def evaluate(self, backend: Backend, seeds: list[int]) -> list[EpisodeResult]:
        """Episodes of the current (unperturbed) policy, one per reset seed."""
        mean, inv_std = self.obs_stat.normaliser()
        return backend.episodes(self.params, mean, inv_std, seeds)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue bit-identically (JSON-serialisable; floats round-trip).

        With screening also ``screen``: the buffer of real episodes and the model weights.
        """
        return {
            "config": self.config.to_dict(),
            "policy": self.policy.spec(),
            "sampler": self.sampler.spec(),
            "params": self.params.tolist(),
            "obs_stat": self.obs_stat.state_dict(),
            "rng": self.rng.bit_generator.state,
            "iteration": self.iteration,
            "env_steps": self.env_steps,
            "eval_env_steps": self.eval_env_steps,
            "best": self.best,
            **({} if self.screener is None else {"screen": self.screener.state_dict()}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (the config must match this trainer's)."""
        if state["config"] != self.config.to_dict():
            raise ValueError("the state's config differs from this trainer's config")
        params = np.asarray(state["params"], dtype=np.float64)
        if params.shape != self.params.shape:
            raise ValueError(f"`params` must have shape {self.params.shape}, got {params.shape}")
        self.params = params
        self.obs_stat = RunningStat.from_state_dict(state["obs_stat"])
        self.rng.bit_generator.state = state["rng"]
        self.iteration = int(state["iteration"])
        self.env_steps = int(state["env_steps"])
        self.eval_env_steps = int(state["eval_env_steps"])
        self.best = state["best"]
        if self.screener is not None:
            if "screen" not in state:
                raise ValueError("the state has no `screen` entry (buffer and model) for screening")
            self.screener.load_state_dict(state["screen"])

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], env: dict[str, Any]) -> ARSTrainer:
        """A trainer rebuilt from its config in ``state`` and restored to ``state``."""
        cfg = dict(state["config"])
        cfg["hidden"] = tuple(cfg["hidden"])
        trainer = cls(ARSConfig(**cfg), env)
        trainer.load_state_dict(state)
        return trainer
