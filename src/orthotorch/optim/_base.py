"""Shared machinery of the stochastic Givens optimizers: parameter classification, matching schedules,
non-finite handling, stabilisation and the optimizer-level ``state_dict`` (generator, step count, samplers).

Not public API: :class:`~orthotorch.optim.OrthogonalSGD` and :class:`~orthotorch.optim.OrthogonalAdam`
subclass :class:`GivensOptimizer` and implement the three per-kind updates.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import geoopt
import torch

from orthotorch._validation import check_generator, check_positive_int
from orthotorch.graph_sampling import (
    Matching,
    MatchingSampler,
    greedy_matching,
    make_sampler,
    round_robin_matching,
)
from orthotorch.manifolds.stiefel import det_sign

__all__ = ["DEFAULT_SEED", "MANIFOLDS", "NONFINITE", "SAMPLERS", "GivensOptimizer"]

#: Seed of the optimizer-owned generator when none is given: identical on every distributed rank, so all
#: ranks draw the same matchings without communicating.
DEFAULT_SEED = 20_241_123

#: Values of the ``manifold`` param-group option that mark plain parameters as constrained.
MANIFOLDS = ("stiefel", "orthogonal", "so")

#: Sampler names: the matching schedule of the constrained step.
SAMPLERS = ("random", "round_robin", "round_robin_shuffled", "greedy", "colouring", "full")

#: Values of ``nonfinite``: what a step does when a gradient holds NaN/inf.
NONFINITE = ("skip", "raise", "ignore")

_DETERMINISTIC = ("greedy", "full")


@dataclass
class _ParamInfo:
    """How one parameter is updated."""

    kind: str  # "givens" | "riemannian" | "euclidean"
    transpose: bool = False  # rotate rows of p.mT (wide weights)
    n: int = 0  # rows of the tall view
    k: int = 0  # columns of the tall view
    sampler: MatchingSampler | None = None
    name: str = ""  # for messages: "param_groups[g]['params'][i]"
    checked: bool = False  # on-manifold check done


def _describe_param(p: torch.Tensor) -> str:
    return f"shape {tuple(p.shape)}, dtype {p.dtype}"


def _check_number(name: str, value: object, *, minimum: float = 0.0) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"`{name}` must be a scalar, got a tensor of shape {tuple(value.shape)}"
            )
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{name}` must be a float, got {type(value).__name__} {value!r}")
    if not math.isfinite(value) or value < minimum:
        raise ValueError(f"`{name}` must be a finite number >= {minimum}, got {value!r}")
    return float(value)


class GivensOptimizer(torch.optim.Optimizer):
    """Base class: routes every parameter to the Euclidean (torch), Givens or generic Riemannian update.

    Constrained ("givens") parameters are geoopt ``ManifoldParameter``/``ManifoldTensor`` on any
    ``geoopt.manifolds.Stiefel`` subclass (EuclideanStiefel, CanonicalStiefel, orthotorch's O(d)/SO(d)/St),
    and plain tensors in a param group with ``manifold`` in :data:`MANIFOLDS`. Their tall view
    ``(..., n, k)`` is ``p`` or, for wide weights (``p.shape[-2] < p.shape[-1]``, Stiefel only), ``p.mT``.
    Parameters on other geoopt manifolds get the generic Riemannian step; all others get torch's update.
    """

    _sampler_defaults = ("sampler", "matchings_per_step", "unbiased", "stabilize", "graph")

    def __init__(
        self,
        params: Iterable[Any],
        defaults: dict[str, Any],
        generator: torch.Generator | None,
    ) -> None:
        check_generator("generator", generator)
        if generator is None:
            generator = torch.Generator().manual_seed(DEFAULT_SEED)
        self._generator = generator
        self._info: dict[torch.Tensor, _ParamInfo] = {}
        self._steps = 0
        super().__init__(params, defaults)

    # ------------------------------------------------------------------------------------------------
    # groups and parameters

    @property
    def generator(self) -> torch.Generator:
        """The generator all matchings are drawn from (saved in :meth:`state_dict`)."""
        return self._generator

    @property
    def steps(self) -> int:
        """Number of completed :meth:`step` calls (saved in :meth:`state_dict`)."""
        return self._steps

    def _validate_group(self, group: dict[str, Any], index: int) -> None:
        """Check the options common to the family; subclasses extend it."""
        where = f"param_groups[{index}]"
        group["lr"] = _check_number(f"lr ({where})", group["lr"])
        name = group["sampler"]
        if not isinstance(name, str) or name not in SAMPLERS:
            raise ValueError(f"`sampler` ({where}) must be one of {SAMPLERS}, got {name!r}")
        check_positive_int(f"matchings_per_step ({where})", group["matchings_per_step"])
        if name == "colouring" and group.get("graph") is None:
            raise ValueError(
                f"sampler 'colouring' ({where}) needs `graph`: a networkx.Graph of allowed row pairs"
            )
        if group["stabilize"] is not None:
            check_positive_int(f"stabilize ({where})", group["stabilize"])
        if not isinstance(group["unbiased"], bool):
            raise TypeError(f"`unbiased` ({where}) must be a bool, got {group['unbiased']!r}")
        if group["nonfinite"] not in NONFINITE:
            raise ValueError(
                f"`nonfinite` ({where}) must be one of {NONFINITE}, got {group['nonfinite']!r}"
            )
        manifold = group.get("manifold")
        if manifold is not None and manifold not in MANIFOLDS:
            raise ValueError(
                f"`manifold` ({where}) must be None or one of {MANIFOLDS}, got {manifold!r}"
            )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (see ``torch.optim.Optimizer``); options are validated and samplers built now.

        Extra group keys: ``manifold`` (``"stiefel" | "orthogonal" | "so" | None``), ``sampler``,
        ``matchings_per_step``, ``unbiased``, ``stabilize``, ``graph`` (for ``"colouring"``), ``nonfinite``.
        """
        param_group.setdefault("manifold", None)
        super().add_param_group(param_group)
        index = len(self.param_groups) - 1
        group = self.param_groups[index]
        try:
            self._validate_group(group, index)
            for pi, p in enumerate(group["params"]):
                self._info[p] = self._make_info(p, group, f"param_groups[{index}]['params'][{pi}]")
        except Exception:
            self.param_groups.pop()
            raise

    def _make_info(self, p: torch.Tensor, group: dict[str, Any], name: str) -> _ParamInfo:
        manifold = getattr(p, "manifold", None)
        if (
            isinstance(p, (geoopt.ManifoldParameter, geoopt.ManifoldTensor))
            and manifold is not None
        ):
            if isinstance(manifold, geoopt.manifolds.Stiefel):
                return self._givens_info(p, group, name, square=False)
            if isinstance(manifold, geoopt.manifolds.Euclidean):
                return _ParamInfo("euclidean", name=name)
            return _ParamInfo("riemannian", name=name)
        if group["manifold"] is None:
            return _ParamInfo("euclidean", name=name)
        return self._givens_info(p, group, name, square=group["manifold"] != "stiefel")

    def _givens_info(
        self, p: torch.Tensor, group: dict[str, Any], name: str, *, square: bool
    ) -> _ParamInfo:
        if not p.is_floating_point() or p.dtype not in (
            torch.float16,
            torch.bfloat16,
            torch.float32,
            torch.float64,
        ):
            raise TypeError(
                f"constrained parameter {name} must be float16/bfloat16/float32/float64, got "
                f"{_describe_param(p)}"
            )
        if p.dim() < 2:
            raise ValueError(
                f"constrained parameter {name} must be a matrix (..., n, k), got {_describe_param(p)}"
            )
        rows, cols = p.shape[-2], p.shape[-1]
        if square and rows != cols:
            raise ValueError(
                f"parameter {name} in a group with manifold={group['manifold']!r} must be square "
                f"(..., d, d), got {_describe_param(p)}; use manifold='stiefel' for rectangular weights"
            )
        transpose = rows < cols
        n, k = max(rows, cols), min(rows, cols)
        if n < 2:
            raise ValueError(
                f"constrained parameter {name} needs at least 2 rows to rotate, got "
                f"{_describe_param(p)}"
            )
        sampler = None
        if group["sampler"] != "full":
            sampler = make_sampler(group["sampler"], n, graph=group.get("graph"))
        return _ParamInfo("givens", transpose=transpose, n=n, k=k, sampler=sampler, name=name)

    # ------------------------------------------------------------------------------------------------
    # helpers for subclasses

    @staticmethod
    def _tall(t: torch.Tensor, info: _ParamInfo) -> torch.Tensor:
        """The tall ``(..., n, k)`` view of a parameter-shaped tensor."""
        return t.mT if info.transpose else t

    def _check_on_manifold(self, p: torch.Tensor, info: _ParamInfo, group: dict[str, Any]) -> None:
        """One-off O(nk) probe that the constrained point satisfies XᵀX ≈ I (and det > 0 for 'so')."""
        info.checked = True
        x = self._tall(p.detach(), info)
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        x = x.to(acc)
        k = info.k
        ar = torch.arange(k, dtype=acc, device=x.device)
        probes = torch.stack([torch.cos(0.7 * ar + 0.3), torch.sin(1.3 * ar + 0.1)], dim=-1)
        resid = x.mT @ (x @ probes) - probes
        err = float(resid.norm() / probes.norm()) / math.sqrt(max(1, resid[..., 0, 0].numel()))
        if not math.isfinite(err) or err > 1e-2:
            raise ValueError(
                f"constrained parameter {info.name} ({_describe_param(p)}) is not on the Stiefel "
                f"manifold: its tall view X has ‖XᵀX·v − v‖/‖v‖ ≈ {err:.3g} for probe vectors v "
                "(expected < 1e-2). Initialise it orthogonally first, e.g. torch.nn.init.orthogonal_"
            )
        if group.get("manifold") == "so":
            sign = det_sign(x)
            if bool((sign <= 0).any()):
                raise ValueError(
                    f"parameter {info.name} is in a group with manifold='so' but has det <= 0; Givens "
                    "rotations keep the determinant, so start from a point of SO(d)"
                )

    def _matchings(
        self,
        info: _ParamInfo,
        group: dict[str, Any],
        x: torch.Tensor,
        direction: torch.Tensor | None,
    ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """The step's matchings as ``(i, j, scale)``; ``scale`` is ``1/(m·p_e)`` when unbiased, else None.

        ``direction`` is the ambient matrix driving the step (needed only by ``"greedy"``, which forms the
        dense ``|W| = |D Xᵀ − X Dᵀ|``: O(n²k) time, O(n²) memory).
        """
        name = group["sampler"]
        m = group["matchings_per_step"]
        device = x.device
        if name == "full":
            rounds = info.n - 1 if info.n % 2 == 0 else info.n
            out = []
            for r in range(rounds):
                mt = round_robin_matching(info.n, r, device=device)
                out.append((mt.i, mt.j, None))
            return out
        if name == "greedy":
            assert direction is not None
            w = direction @ x.mT
            w = (w - w.mT).abs()
            if w.dim() > 2:
                w = w.reshape(-1, info.n, info.n).sum(0)
            out = []
            for t in range(m):
                mt = greedy_matching(w)
                if len(mt) == 0:
                    break
                out.append((mt.i, mt.j, None))
                if t + 1 < m:
                    w[mt.i, mt.j] = 0.0
                    w[mt.j, mt.i] = 0.0
            return out
        sampler = info.sampler
        assert sampler is not None
        out = []
        for _ in range(m):
            mt: Matching = sampler.sample(self._generator, device=device)
            scale = None
            if group["unbiased"] and name not in _DETERMINISTIC:
                scale = (1.0 / (m * mt.prob)).to(dtype=torch.float32, device=device)
            out.append((mt.i, mt.j, scale))
        return out

    def _filter_finite(
        self, group: dict[str, Any], params: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        """Drop parameters whose gradient holds NaN/inf (warn) or raise, per ``group['nonfinite']``.

        One reduction per gradient and a single host synchronisation per group; an exact elementwise check
        runs only for gradients whose sum is not finite.
        """
        mode = group["nonfinite"]
        if mode == "ignore" or not params:
            return params
        dev = params[0].grad.device
        flags = torch.stack([torch.isfinite(p.grad.sum()).to(dev) for p in params]).tolist()
        keep = []
        for p, ok in zip(params, flags):
            if not ok and not bool(torch.isfinite(p.grad).all()):
                info = self._info.get(p)
                name = info.name if info is not None else "a parameter"
                msg = f"non-finite gradient for {name} ({_describe_param(p)}) at step {self._steps}"
                if mode == "raise":
                    raise FloatingPointError(msg + " (nonfinite='raise')")
                warnings.warn(msg + ": its update was skipped (nonfinite='skip')", stacklevel=3)
                continue
            keep.append(p)
        return keep

    def _maybe_stabilize(self, p: torch.Tensor, info: _ParamInfo, group: dict[str, Any]) -> None:
        """Every ``stabilize`` steps of this parameter, re-project it by a sign-corrected QR: O(nk²)."""
        every = group["stabilize"]
        if every is None:
            return
        state = self.state[p]
        count = state.get("givens_steps", 0) + 1
        state["givens_steps"] = count
        if count % every == 0:
            project_(self._tall(p.data, info))

    # ------------------------------------------------------------------------------------------------
    # step

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One optimization step over all groups; ``closure`` re-evaluates the loss (optional)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            params = self._filter_finite(group, params)
            euclid, givens, riem = [], [], []
            for p in params:
                info = self._info[p]
                if info.kind == "euclidean":
                    euclid.append(p)
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(
                        f"{type(self).__name__} does not support sparse gradients on constrained "
                        f"parameter {info.name}"
                    )
                (givens if info.kind == "givens" else riem).append(p)
            if euclid:
                self._euclidean_update(group, euclid)
            for p in givens:
                info = self._info[p]
                if not info.checked:
                    self._check_on_manifold(p, info, group)
                self._givens_update(group, p, info)
                self._maybe_stabilize(p, info, group)
            for p in riem:
                self._riemannian_update(group, p)
        self._steps += 1
        return loss

    def _euclidean_update(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        raise NotImplementedError

    def _givens_update(self, group: dict[str, Any], p: torch.Tensor, info: _ParamInfo) -> None:
        raise NotImplementedError

    def _riemannian_update(self, group: dict[str, Any], p: torch.Tensor) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------------
    # state

    def _flat_params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def state_dict(self) -> dict[str, Any]:
        """torch's optimizer state plus ``"orthotorch"``: generator state, step count, sampler states."""
        sd = super().state_dict()
        samplers = {}
        for idx, p in enumerate(self._flat_params()):
            info = self._info[p]
            if info.sampler is not None:
                samplers[idx] = info.sampler.state_dict()
        sd["orthotorch"] = {
            "generator_state": self._generator.get_state(),
            "steps": self._steps,
            "samplers": samplers,
            "checked": [self._info[p].checked for p in self._flat_params()],
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`: after loading, the next step is bit-identical to the saved run's."""
        sd = dict(state_dict)
        extra = sd.pop("orthotorch", None)
        super().load_state_dict(sd)
        for gi, group in enumerate(self.param_groups):
            self._validate_group(group, gi)
            for pi, p in enumerate(group["params"]):
                self._info[p] = self._make_info(p, group, f"param_groups[{gi}]['params'][{pi}]")
        if extra is None:
            return
        self._generator.set_state(extra["generator_state"].clone())
        self._steps = int(extra["steps"])
        flat = self._flat_params()
        for idx, s in extra["samplers"].items():
            sampler = self._info[flat[int(idx)]].sampler
            if sampler is not None:
                sampler.load_state_dict(s)
        for p, checked in zip(flat, extra.get("checked", [])):
            self._info[p].checked = bool(checked)


@torch.no_grad()
def project_(x: torch.Tensor) -> torch.Tensor:
    """Re-project tall ``x`` ``(..., n, k)`` onto the Stiefel manifold in place: ``x ← Q·diag(sign(diag R))``
    with ``x = QR``. Keeps a near-orthogonal point's determinant sign (the component of O(d)). O(nk²);
    half-precision inputs are factorised in float32. Returns ``x``."""
    acc = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    q, r = torch.linalg.qr(x.to(acc))
    d = torch.diagonal(r, dim1=-2, dim2=-1)
    sign = torch.where(d < 0, -1.0, 1.0).to(acc)
    x.copy_(q * sign.unsqueeze(-2))
    return x
