"""Rollout workers and the backends that run them: in-process, one process per core, or Ray actors.

A :class:`RolloutWorker` owns one environment, the policy and the direction sampler. Per ES iteration it
receives the iteration seed, the current parameters and the frozen observation normalisation, and returns
per-episode returns, lengths, forward displacements and observation statistics; it regenerates each
perturbation from ``(seed, index)`` itself, so no perturbation and no per-step data crosses a process
boundary. Every episode's environment seed is derived from ``(iteration seed, index)``; an episode is a
deterministic function of what the worker receives, so every backend and every worker count gives
bit-identical results for the same seeds.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from orthotorch._validation import check_choice, check_positive_int
from orthotorch.rl._extra import require
from orthotorch.rl.directions import make_sampler
from orthotorch.rl.policies import make_policy
from orthotorch.rl.rollout import EpisodeResult, make_env, rollout

__all__ = [
    "BACKENDS",
    "Backend",
    "PairTask",
    "ProcessBackend",
    "RayBackend",
    "RolloutWorker",
    "SerialBackend",
    "WorkerSpec",
    "episode_seed",
    "make_backend",
]


def episode_seed(seed: int, index: int, tag: int = 0) -> int:
    """Environment reset seed of episode ``index`` of iteration seed ``seed`` (both signs share it)."""
    return int(np.random.SeedSequence([int(seed), int(index), int(tag)]).generate_state(1)[0])


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker needs to build its environment, policy and sampler (picklable, JSON-friendly)."""

    env_id: str
    policy: dict[str, Any]
    sampler: dict[str, Any]
    env_kwargs: dict[str, Any] = field(default_factory=dict)
    max_episode_steps: int | None = None


@dataclass
class PairTask:
    """Antithetic rollouts ``θ ± noise·δ_k`` for the direction indices ``indices`` of one iteration.

    ``record``: the episodes also carry their transitions (``EpisodeResult.trace``, for world models).
    """

    seed: int
    num_directions: int
    noise: float
    indices: list[int]
    params: np.ndarray
    mean: np.ndarray
    inv_std: np.ndarray
    record: bool = False


class RolloutWorker:
    """One environment plus the policy and sampler of :class:`WorkerSpec`; runs whole episodes."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.env = make_env(spec.env_id, **spec.env_kwargs)
        self.policy = make_policy(**spec.policy)
        self.sampler = make_sampler(**spec.sampler)
        self._cache_key: tuple[int, int] | None = None
        self._blocks: dict[int, np.ndarray] = {}

    def _direction(self, seed: int, num: int, index: int) -> np.ndarray:
        if self._cache_key != (seed, num):
            self._cache_key, self._blocks = (seed, num), {}
        size = self.sampler.block_size(num)
        b = index // size
        if b not in self._blocks:
            self._blocks[b] = self.sampler.block(seed, b, num)
        return self._blocks[b][index - b * size]

    def pairs(self, task: PairTask) -> list[tuple[EpisodeResult, EpisodeResult]]:
        """``(plus, minus)`` episodes for each index of ``task``, in order, with observation statistics."""
        out = []
        for k in task.indices:
            delta = self._direction(task.seed, task.num_directions, k)
            env_seed = episode_seed(task.seed, k)
            pair = []
            for sign in (1.0, -1.0):
                act = self.policy.actor(task.params + (sign * task.noise) * delta)
                pair.append(
                    rollout(
                        self.env,
                        act,
                        task.mean,
                        task.inv_std,
                        seed=env_seed,
                        max_steps=self.spec.max_episode_steps,
                        collect_stats=True,
                        record=task.record,
                    )
                )
            out.append((pair[0], pair[1]))
        return out

    def episodes(
        self, params: np.ndarray, mean: np.ndarray, inv_std: np.ndarray, seeds: Sequence[int]
    ) -> list[EpisodeResult]:
        """Unperturbed episodes of ``params``, one per reset seed (no statistics collected)."""
        act = self.policy.actor(params)
        return [
            rollout(self.env, act, mean, inv_std, seed=s, max_steps=self.spec.max_episode_steps)
            for s in seeds
        ]

    def close(self) -> None:
        """Close the environment."""
        self.env.close()


def _chunks(items: Sequence[Any], parts: int) -> list[list[Any]]:
    parts = max(1, min(parts, len(items)))
    size = math.ceil(len(items) / parts)
    return [list(items[k : k + size]) for k in range(0, len(items), size)]


class Backend:
    """Runs :class:`RolloutWorker` calls; results come back in task order whatever ran them.

    Use as a context manager (or call :meth:`close`) so worker processes are shut down.
    """

    workers: int = 1

    def _map(self, method: str, calls: list[tuple[Any, ...]]) -> list[Any]:
        raise NotImplementedError

    def pairs(self, task: PairTask) -> list[tuple[EpisodeResult, EpisodeResult]]:
        """Run the antithetic pairs of ``task`` split over the workers; results in index order."""
        calls = [
            (
                PairTask(
                    task.seed,
                    task.num_directions,
                    task.noise,
                    part,
                    task.params,
                    task.mean,
                    task.inv_std,
                    task.record,
                ),
            )
            for part in _chunks(task.indices, 4 * self.workers)
        ]
        return [r for chunk in self._map("pairs", calls) for r in chunk]

    def episodes(
        self, params: np.ndarray, mean: np.ndarray, inv_std: np.ndarray, seeds: Sequence[int]
    ) -> list[EpisodeResult]:
        """Unperturbed episodes, one per seed, in seed order."""
        calls = [(params, mean, inv_std, part) for part in _chunks(list(seeds), self.workers)]
        return [r for chunk in self._map("episodes", calls) for r in chunk]

    def close(self) -> None:
        """Release the workers."""

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SerialBackend(Backend):
    """Everything in the calling process (tests, evaluation, debugging)."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.worker = RolloutWorker(spec)

    def _map(self, method: str, calls: list[tuple[Any, ...]]) -> list[Any]:
        return [getattr(self.worker, method)(*c) for c in calls]

    def close(self) -> None:
        self.worker.close()


_PROCESS_WORKER: RolloutWorker | None = None


def _exit_with_parent(parent: int) -> None:
    while True:  # a killed parent must not leave its workers behind
        time.sleep(1.0)
        if os.getppid() != parent:
            os._exit(1)


def _process_init(spec: WorkerSpec) -> None:
    global _PROCESS_WORKER
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    _PROCESS_WORKER = RolloutWorker(spec)


def _process_call(method: str, args: tuple[Any, ...]) -> Any:
    assert _PROCESS_WORKER is not None
    return getattr(_PROCESS_WORKER, method)(*args)


class ProcessBackend(Backend):
    """One worker process per core (``spawn``), each with its own environment; whole episodes per call.

    Args:
        spec: the worker description.
        workers: number of processes.
    """

    def __init__(self, spec: WorkerSpec, workers: int) -> None:
        self.workers = check_positive_int("workers", workers)
        self._pool = ProcessPoolExecutor(
            max_workers=workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_process_init,
            initargs=(spec,),
        )

    def _map(self, method: str, calls: list[tuple[Any, ...]]) -> list[Any]:
        futures = [self._pool.submit(_process_call, method, c) for c in calls]
        return [f.result() for f in futures]

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class RayBackend(Backend):
    """The same workers as Ray actors (one CPU each) on a running or a new local Ray instance.

    Args:
        spec: the worker description.
        workers: number of actors.
        address: Ray cluster address; ``None`` joins an initialised Ray or starts a local one with
            ``workers`` CPUs (shut down again by :meth:`close`).
    """

    def __init__(self, spec: WorkerSpec, workers: int, *, address: str | None = None) -> None:
        ray = require("ray")
        self.workers = check_positive_int("workers", workers)
        self._ray = ray
        self._owns_ray = False
        if not ray.is_initialized():
            if address is None:
                ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
            else:
                ray.init(address=address, log_to_driver=False)
            self._owns_ray = True
        actor_cls = ray.remote(num_cpus=1)(RolloutWorker)
        self._actors = [actor_cls.remote(spec) for _ in range(workers)]

    def _map(self, method: str, calls: list[tuple[Any, ...]]) -> list[Any]:
        refs = [
            getattr(self._actors[k % self.workers], method).remote(*c) for k, c in enumerate(calls)
        ]
        return list(self._ray.get(refs))

    def close(self) -> None:
        for a in self._actors:
            self._ray.kill(a)
        self._actors = []
        if self._owns_ray:
            self._ray.shutdown()


#: Backend names (the ``--backend`` choices of the command line, plus ``serial``).
BACKENDS = ("serial", "process", "ray")


def make_backend(name: str, spec: WorkerSpec, workers: int = 1) -> Backend:
    """Backend ``name`` (``serial``, ``process`` or ``ray``) running ``workers`` workers of ``spec``."""
    check_choice("name", name, BACKENDS)
    if name == "serial":
        return SerialBackend(spec)
    if name == "process":
        return ProcessBackend(spec, workers)
    return RayBackend(spec, workers)
