"""Numpy policies for evolution strategies and the running observation normaliser they share.

A policy is a stateless map from a flat float64 parameter vector ``θ`` ``(num_params,)`` and a normalised
observation ``(obs_dim,)`` to an action ``(act_dim,)`` clipped to the action box; ES perturbs ``θ``. One
numpy matrix-vector product per layer and step (a torch call per MuJoCo step would add ~15 %).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import ClassVar

import numpy as np

from orthotorch._validation import check_choice, check_positive_int

__all__ = [
    "POLICIES",
    "Actor",
    "LinearPolicy",
    "MLPPolicy",
    "Policy",
    "RunningStat",
    "make_policy",
]


#: ``act(x) -> action``: a policy with its parameters bound, for normalised observations ``(obs_dim,)``.
Actor = Callable[[np.ndarray], np.ndarray]


class RunningStat:
    """Running mean and variance of observations ``(dim,)`` (Chan et al.'s parallel merge, float64).

    ``count == 0`` means "no data": :meth:`normalise` is then the identity. Coordinates whose standard
    deviation is below ``1e-7`` (constant so far) are mapped to 0, as in ARS.
    """

    def __init__(self, dim: int) -> None:
        self.dim = check_positive_int("dim", dim)
        self.count = 0
        self.mean = np.zeros(dim)
        self.m2 = np.zeros(dim)

    @classmethod
    def of(cls, x: np.ndarray) -> RunningStat:
        """Statistics of the rows of ``x`` ``(n, dim)``."""
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[0] == 0:
            raise ValueError(f"`x` must be a non-empty (n, dim) array, got shape {x.shape}")
        s = cls(x.shape[1])
        s.count = int(x.shape[0])
        s.mean = x.mean(axis=0)
        s.m2 = ((x - s.mean) ** 2).sum(axis=0)
        return s

    def merge(self, other: RunningStat) -> None:
        """Add ``other``'s observations to these statistics (in place)."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge statistics of dim {other.dim} into dim {self.dim}")
        if other.count == 0:
            return
        n = self.count + other.count
        delta = other.mean - self.mean
        self.mean = self.mean + delta * (other.count / n)
        self.m2 = self.m2 + other.m2 + delta**2 * (self.count * other.count / n)
        self.count = n

    @property
    def std(self) -> np.ndarray:
        """Standard deviation ``(dim,)`` (``inf`` where below 1e-7 or with fewer than 2 samples)."""
        if self.count < 2:
            return np.ones(self.dim)
        std = np.sqrt(self.m2 / (self.count - 1))
        std[std < 1e-7] = np.inf
        return std

    def normaliser(self) -> tuple[np.ndarray, np.ndarray]:
        """``(mean, 1/std)``, each ``(dim,)``: the frozen normalisation ``(o − mean)·inv_std``."""
        if self.count < 2:
            return np.zeros(self.dim), np.ones(self.dim)
        return self.mean.copy(), 1.0 / self.std

    def state_dict(self) -> dict[str, object]:
        """JSON-serialisable state (floats round-trip exactly)."""
        return {"count": self.count, "mean": self.mean.tolist(), "m2": self.m2.tolist()}

    @classmethod
    def from_state_dict(cls, state: dict[str, object]) -> RunningStat:
        """Inverse of :meth:`state_dict`."""
        mean = np.asarray(state["mean"], dtype=np.float64)
        s = cls(mean.shape[0])
        s.count = int(state["count"])  # type: ignore[call-overload]
        s.mean = mean
        s.m2 = np.asarray(state["m2"], dtype=np.float64)
        return s


class Policy:
    """Base class of the numpy policies.

    Args:
        obs_dim, act_dim: observation and action sizes.
        low, high: action box ``(act_dim,)``; actions are clipped to it.
    """

    name: ClassVar[str] = ""

    def __init__(
        self, obs_dim: int, act_dim: int, low: Sequence[float], high: Sequence[float]
    ) -> None:
        self.obs_dim = check_positive_int("obs_dim", obs_dim)
        self.act_dim = check_positive_int("act_dim", act_dim)
        self.low = np.asarray(low, dtype=np.float64).reshape(act_dim)
        self.high = np.asarray(high, dtype=np.float64).reshape(act_dim)

    @property
    def num_params(self) -> int:
        """Length of the flat parameter vector."""
        raise NotImplementedError

    def init_params(self, rng: np.random.Generator) -> np.ndarray:
        """Initial parameters ``(num_params,)`` float64 drawn from ``rng``."""
        raise NotImplementedError

    def actor(self, params: np.ndarray) -> Actor:
        """A fast ``act(x) -> action`` closure for normalised observations ``x`` ``(obs_dim,)``."""
        raise NotImplementedError

    def spec(self) -> dict[str, object]:
        """JSON-serialisable description; :func:`make_policy` rebuilds the policy from it."""
        return {
            "name": self.name,
            "obs_dim": self.obs_dim,
            "act_dim": self.act_dim,
            "low": self.low.tolist(),
            "high": self.high.tolist(),
        }

    def _check(self, params: np.ndarray) -> np.ndarray:
        params = np.asarray(params, dtype=np.float64)
        if params.shape != (self.num_params,):
            raise ValueError(
                f"`params` must have shape ({self.num_params},) for this {self.name} policy, "
                f"got {params.shape}"
            )
        return params


class LinearPolicy(Policy):
    """``a = clip(W x)`` with ``W`` ``(act_dim, obs_dim)`` stored row-major in ``θ``; zero initialised (ARS)."""

    name = "linear"

    @property
    def num_params(self) -> int:
        return self.act_dim * self.obs_dim

    def init_params(self, rng: np.random.Generator) -> np.ndarray:
        return np.zeros(self.num_params)

    def actor(self, params: np.ndarray) -> Actor:
        w = self._check(params).reshape(self.act_dim, self.obs_dim)
        low, high = self.low, self.high

        def act(x: np.ndarray) -> np.ndarray:
            return np.clip(w @ x, low, high)

        return act


class MLPPolicy(Policy):
    """``a = clip(W_L tanh(… tanh(W_1 x + b_1) …) + b_L)``: tanh hidden layers, linear output.

    ``θ`` holds ``(W_1, b_1, …, W_L, b_L)`` row-major. Hidden weights start at ``N(0, 1/fan_in)``, biases
    and the output layer at zero (a zero hidden layer would make antithetic ES blind to first order).
    """

    name = "mlp"

    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        low: Sequence[float],
        high: Sequence[float],
        *,
        hidden: Sequence[int] = (32, 32),
    ) -> None:
        super().__init__(obs_dim, act_dim, low, high)
        self.hidden = tuple(check_positive_int("hidden", int(h)) for h in hidden)
        sizes = (obs_dim, *self.hidden, act_dim)
        self.shapes = [(sizes[k + 1], sizes[k]) for k in range(len(sizes) - 1)]

    @property
    def num_params(self) -> int:
        return sum(o * i + o for o, i in self.shapes)

    def _unpack(self, params: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        out, k = [], 0
        for o, i in self.shapes:
            w = params[k : k + o * i].reshape(o, i)
            k += o * i
            out.append((w, params[k : k + o]))
            k += o
        return out

    def init_params(self, rng: np.random.Generator) -> np.ndarray:
        parts = []
        for n, (o, i) in enumerate(self.shapes):
            last = n == len(self.shapes) - 1
            parts.append(np.zeros(o * i) if last else rng.standard_normal(o * i) / math.sqrt(i))
            parts.append(np.zeros(o))
        return np.concatenate(parts)

    def actor(self, params: np.ndarray) -> Actor:
        layers = [(np.ascontiguousarray(w), b.copy()) for w, b in self._unpack(self._check(params))]
        *hidden, (w_out, b_out) = layers
        low, high = self.low, self.high

        def act(x: np.ndarray) -> np.ndarray:
            for w, b in hidden:
                x = np.tanh(w @ x + b)
            return np.clip(w_out @ x + b_out, low, high)

        return act

    def spec(self) -> dict[str, object]:
        return {**super().spec(), "hidden": list(self.hidden)}


#: Policy classes by name (the ``--policy`` choices of the command line).
POLICIES: dict[str, type[Policy]] = {"linear": LinearPolicy, "mlp": MLPPolicy}


def make_policy(name: str, **spec: object) -> Policy:
    """The policy called ``name`` (``linear`` or ``mlp``); ``make_policy(**policy.spec())`` round-trips."""
    check_choice("name", name, tuple(POLICIES))
    return POLICIES[name](**spec)  # type: ignore[arg-type]
