"""Shared machinery of the stochastic Givens optimizers: parameter classification, matching schedules,
non-finite handling, stabilisation, pickling and the optimizer-level ``state_dict`` (generator, step count,
samplers), including the loading of ``torch.optim`` and older state dicts.

Not public API: :class:`~orthotorch.optim.OrthogonalSGD` and :class:`~orthotorch.optim.OrthogonalAdam`
subclass :class:`GivensOptimizer` and implement the three per-kind updates.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import chain
from typing import Any, ClassVar

import geoopt
import torch

from orthotorch._numerics import compute_dtype, det_sign, qr_sign_fixed
from orthotorch._validation import (
    check_bool,
    check_choice,
    check_generator,
    check_positive_int,
    check_real,
)
from orthotorch.graph_sampling import (
    SAMPLER_ALIASES,
    GreedySampler,
    MatchingBlock,
    MatchingSampler,
    RoundRobinSampler,
    make_sampler,
    round_robin_matching,
)
from orthotorch.optim._tall import TALL_STEPS, uses_cayley
from orthotorch.optim.groups import MANIFOLDS, constraint_of

__all__ = ["DEFAULT_SEED", "MANIFOLDS", "NONFINITE", "SAMPLERS", "GivensOptimizer", "project_"]

#: Seed of the optimizer-owned generator when none is given: identical on every distributed rank, so all
#: ranks draw the same matchings without communicating.
DEFAULT_SEED = 20_241_123

#: Sampler names: the matching schedule of the constrained step (``"coloring"`` is accepted as an alias
#: of ``"colouring"``).
SAMPLERS = ("random", "round_robin", "round_robin_shuffled", "greedy", "colouring", "full")

#: Values of ``nonfinite``: what a step does when a gradient holds NaN/inf.
NONFINITE = ("skip", "raise", "ignore")

_DETERMINISTIC = ("greedy", "full")

#: Tolerance of the on-manifold probe: half-precision weights drift by rounding at every rotation
#: (bfloat16 reaches ‖XᵀX − I‖ ≈ 0.3 without ``stabilize``, docs/optim.md) and are re-probed after a load.
_PROBE_TOL = {torch.bfloat16: 0.5, torch.float16: 0.1}

#: Group options describing what the parameters *are* rather than how they are optimised: a saved group
#: missing one takes the current group's value; a saved value that differs is an error.
_STRUCTURAL = ("manifold",)


@dataclass
class _ParamInfo:
    """How one parameter is updated (a cache rebuilt from the group and the parameter)."""

    kind: str  # "givens" | "cayley" | "riemannian" | "euclidean" | "empty" (constrained, no entry)
    transpose: bool = False  # rotate rows of p.mT (wide weights)
    n: int = 0  # rows of the tall view
    k: int = 0  # columns of the tall view
    sampler: MatchingSampler | None = None
    name: str = ""  # for messages: "param_groups[g]['params'][i]"
    manifold: str | None = None  # "stiefel" | "orthogonal" | "so" for constrained weights
    checked: bool = False  # on-manifold check done (never restored from a state dict)
    laid_out: bool = False  # _ensure_row_layout done (redone after a load)


def _grad(p: torch.Tensor) -> torch.Tensor:
    """``p.grad``, for parameters the step has already selected by ``grad is not None``."""
    g = p.grad
    assert g is not None
    return g


def _descent_grad(p: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
    """The gradient a constrained step descends along: ``p.grad`` in ``p``'s dtype, negated under
    ``maximize`` (a new tensor whenever either applies; ``p.grad`` itself is never modified)."""
    grad = _grad(p)
    if grad.dtype != p.dtype:
        grad = grad.to(p.dtype)
    return -grad if group["maximize"] else grad


def _describe_param(p: torch.Tensor) -> str:
    return f"shape {tuple(p.shape)}, dtype {p.dtype}"


def _owns_dense_storage(t: torch.Tensor) -> bool:
    """Whether ``t`` is non-overlapping and dense and fills its whole storage from offset 0.

    Only such a tensor may be given a new layout: a slice, or a tensor whose storage holds more than
    itself, shares memory with a tensor we cannot see, which would silently stop seeing its updates.
    """
    if t._base is not None or t.storage_offset() != 0:
        return False
    if t.untyped_storage().nbytes() != t.numel() * t.element_size():
        return False
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz > 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _like_layout(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``t`` with the strides of ``ref`` (same shape): ``t`` itself when they already agree, else one copy."""
    if t.stride() == ref.stride():
        return t
    return torch.empty_strided(ref.shape, ref.stride(), dtype=t.dtype, device=t.device).copy_(t)


def check_lr(name: str, value: object) -> float | torch.Tensor:
    """A learning rate: a finite real ``>= 0``, or a one-element tensor (kept a tensor, as torch does)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"`{name}` must be a number or a one-element tensor, got a tensor of shape "
                f"{tuple(value.shape)}"
            )
        check_real(name, value.detach().cpu().reshape(()), minimum=0.0)
        return value
    return check_real(name, value, minimum=0.0)


def _check_flag(name: str, value: object, *, allowed: tuple[object, ...]) -> None:
    """torch's implementation flags: a bool (or None where torch allows it) we can honour."""
    if value is not None and not isinstance(value, bool):
        raise TypeError(f"`{name}` must be a bool or None, got {type(value).__name__} {value!r}")
    if value not in allowed:
        raise ValueError(
            f"`{name}={value!r}` cannot be honoured by the Givens optimizers (the constrained step is "
            f"an in-place update under no_grad that reads the step count on the host); use one of "
            f"{allowed}"
        )


class GivensOptimizer(torch.optim.Optimizer):
    """Base class: routes every parameter to the Euclidean (torch), Givens or generic Riemannian update.

    Constrained ("givens") parameters are those :func:`~orthotorch.optim.groups.constraint_of` marks
    (geoopt Stiefel-family ``ManifoldParameter``\\ s, or tensors with the ``_orthotorch_manifold``
    attribute) and plain tensors in a param group with ``manifold`` in :data:`MANIFOLDS`. Their tall view
    ``(..., n, k)`` is ``p`` or, for wide weights (``p.shape[-2] < p.shape[-1]``, Stiefel only), ``p.mT``.
    Parameters on other geoopt manifolds get the generic Riemannian step; all others get torch's update.
    """

    #: Per-parameter state keys each kind may hold (subclasses set them); used to refuse foreign state.
    _state_keys: ClassVar[dict[str, tuple[str, ...]]] = {}

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
        """Check the options common to the family (normalising them in place); subclasses extend it."""
        where = f"param_groups[{index}]"
        group["lr"] = check_lr(f"lr ({where})", group["lr"])
        name = group["sampler"]
        if not isinstance(name, str):
            raise TypeError(
                f"`sampler` ({where}) must be a str, got {type(name).__name__} {name!r}"
            )
        name = SAMPLER_ALIASES.get(name, name)
        check_choice(f"sampler ({where})", name, SAMPLERS)
        group["sampler"] = name
        check_positive_int(f"matchings_per_step ({where})", group["matchings_per_step"])
        if name == "colouring" and group.get("graph") is None:
            raise ValueError(
                f"sampler 'colouring' ({where}) needs `graph`: a networkx.Graph of allowed row pairs"
            )
        if group["stabilize"] is not None:
            check_positive_int(f"stabilize ({where})", group["stabilize"])
        check_bool(f"unbiased ({where})", group["unbiased"])
        check_bool(f"maximize ({where})", group["maximize"])
        check_choice(f"nonfinite ({where})", group["nonfinite"], NONFINITE)
        tall_step = group.setdefault("tall_step", "auto")
        if not isinstance(tall_step, str):
            raise TypeError(
                f"`tall_step` ({where}) must be a str, got {type(tall_step).__name__} {tall_step!r}"
            )
        check_choice(f"tall_step ({where})", tall_step, TALL_STEPS)
        manifold = group.get("manifold")
        if manifold is not None and manifold not in MANIFOLDS:
            raise ValueError(
                f"`manifold` ({where}) must be None or one of {MANIFOLDS}, got {manifold!r}"
            )
        _check_flag(f"foreach ({where})", group["foreach"], allowed=(None, False, True))
        _check_flag(f"fused ({where})", group["fused"], allowed=(None, False, True))
        _check_flag(f"differentiable ({where})", group["differentiable"], allowed=(False,))
        if "capturable" in group:
            _check_flag(f"capturable ({where})", group["capturable"], allowed=(False,))
        params = group["params"]
        if len(params) != len(set(params)):
            dup = next(i for i, p in enumerate(params) if any(p is q for q in params[:i]))
            raise ValueError(
                f"{where}['params'][{dup}] is the same tensor as an earlier parameter of the group; "
                "each parameter may appear once (it would be stepped twice)"
            )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (see ``torch.optim.Optimizer``); options are validated and samplers built now.

        Extra group keys: ``manifold`` (``"stiefel" | "orthogonal" | "so" | None``), ``sampler``,
        ``matchings_per_step``, ``unbiased``, ``stabilize``, ``graph`` (for ``"colouring"``), ``nonfinite``,
        ``tall_step`` (``"auto" | "givens" | "cayley"``: the step of tall Stiefel weights).
        """
        param_group.setdefault("manifold", None)
        params = param_group.get("params")
        if isinstance(params, (list, tuple)) and len(params) != len(set(params)):
            # torch only warns here; refuse before it does (a duplicate would be stepped twice)
            group = {**self.defaults, **param_group, "params": list(params)}
            self._validate_group(group, len(self.param_groups))
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

    def _info_of(self, p: torch.Tensor, group: dict[str, Any]) -> _ParamInfo:
        """The cached info of ``p``, built now for a parameter appended to a group by hand."""
        info = self._info.get(p)
        if info is None:
            gi = next(i for i, g in enumerate(self.param_groups) if g is group)
            pi = next(i for i, q in enumerate(group["params"]) if q is p)
            group.setdefault("manifold", None)
            info = self._make_info(p, group, f"param_groups[{gi}]['params'][{pi}]")
            self._info[p] = info
        return info

    def _make_info(self, p: torch.Tensor, group: dict[str, Any], name: str) -> _ParamInfo:
        manifold = getattr(p, "manifold", None)
        is_geoopt = isinstance(p, (geoopt.ManifoldParameter, geoopt.ManifoldTensor))
        if is_geoopt and manifold is not None:
            kind = constraint_of(p)
            if kind is not None:
                return self._givens_info(p, group, name, kind)
            if isinstance(manifold, geoopt.manifolds.Euclidean):
                return _ParamInfo("euclidean", name=name)
            return _ParamInfo("riemannian", name=name)
        kind = group.get("manifold") or constraint_of(p)
        if kind is None:
            return _ParamInfo("euclidean", name=name)
        return self._givens_info(p, group, name, kind)

    def _givens_info(
        self, p: torch.Tensor, group: dict[str, Any], name: str, manifold: str
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
        if manifold != "stiefel" and rows != cols:
            raise ValueError(
                f"parameter {name} constrained to manifold={manifold!r} must be square "
                f"(..., d, d), got {_describe_param(p)}; use manifold='stiefel' for rectangular weights"
            )
        transpose = rows < cols
        n, k = max(rows, cols), min(rows, cols)
        if p.numel() == 0:  # St(n, 0) (or an empty batch) is one point: nothing to rotate
            return _ParamInfo("empty", transpose=transpose, n=n, k=k, name=name, manifold=manifold)
        if n < 2:
            raise ValueError(
                f"constrained parameter {name} needs at least 2 rows to rotate, got "
                f"{_describe_param(p)}"
            )
        if uses_cayley(group.get("tall_step", "auto"), manifold, n, k):
            # the whole rank-2k generator per step (optim/_tall.py): no matchings
            return _ParamInfo("cayley", transpose=transpose, n=n, k=k, name=name, manifold=manifold)
        sampler: MatchingSampler | None = None
        sampler_name = group["sampler"]
        if sampler_name == "round_robin" and self._transports_moment(group):
            # A fixed circle order drives a transported first moment periodically (period (n-1)/m
            # steps): on tall weights heavy-ball / Adam then settles in a limit cycle far from the
            # optimum (issue 12, PCA on St(512, 16)). Relabelling the rows each cycle keeps "every
            # pair once per cycle" and removes the periodic forcing.
            sampler_name = "round_robin_shuffled"
        if sampler_name != "full":
            sampler = make_sampler(sampler_name, n, graph=group.get("graph"))
        return _ParamInfo(
            "givens", transpose=transpose, n=n, k=k, sampler=sampler, name=name, manifold=manifold
        )

    def _transports_moment(self, group: dict[str, Any]) -> bool:
        """Whether the constrained step of ``group`` carries a first moment transported by the rotations
        (SGD with momentum, Adam); then ``"round_robin"`` relabels the rows at every cycle."""
        return False

    # ------------------------------------------------------------------------------------------------
    # helpers for subclasses

    @staticmethod
    def _tall(t: torch.Tensor, info: _ParamInfo) -> torch.Tensor:
        """The tall ``(..., n, k)`` view of a parameter-shaped tensor."""
        return t.mT if info.transpose else t

    def _check_on_manifold(self, p: torch.Tensor, info: _ParamInfo) -> None:
        """One-off O(nk) probe that the constrained point satisfies XᵀX ≈ I (and det > 0 for 'so')."""
        x = self._tall(p.detach(), info)
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        x = x.to(acc)
        k = info.k
        ar = torch.arange(k, dtype=acc, device=x.device)
        probes = torch.stack([torch.cos(0.7 * ar + 0.3), torch.sin(1.3 * ar + 0.1)], dim=-1)
        resid = x.mT @ (x @ probes) - probes
        err = float(resid.norm() / probes.norm()) / math.sqrt(max(1, resid[..., 0, 0].numel()))
        tol = _PROBE_TOL.get(p.dtype, 1e-2)
        if not math.isfinite(err) or err > tol:
            raise ValueError(
                f"constrained parameter {info.name} ({_describe_param(p)}) is not on the Stiefel "
                f"manifold: its tall view X has ‖XᵀX·v − v‖/‖v‖ ≈ {err:.3g} for probe vectors v "
                f"(expected < {tol:g}). Initialise it orthogonally first, e.g. "
                "torch.nn.init.orthogonal_, or call optimizer.stabilize() to project it back"
            )
        if info.manifold == "so":
            sign = det_sign(x)
            if bool((sign <= 0).any()):
                raise ValueError(
                    f"parameter {info.name} ({_describe_param(p)}) is constrained to SO(d) but has "
                    "det <= 0; Givens rotations keep the determinant, so start from a point of SO(d) "
                    "(e.g. SpecialOrthogonalGroup(d).random(), or flip the sign of one row)"
                )
        info.checked = True

    def _ensure_row_layout(self, p: torch.Tensor, info: _ParamInfo) -> None:
        """Once per constrained parameter (at its first step, again after a load): store ``p`` so that the
        rows of its tall view are contiguous, and give its gradient and state tensors the same strides.

        The fused kernel walks rows; a column-major tall view (what ``torch.linalg.qr`` returns, or the
        ``.mT`` of a row-major wide weight) costs it 2-5x through strided tiles. A tall or square ``p``
        becomes ``p.contiguous()``; a wide one is stored so that ``p.mT`` is row-major. Values and shape
        never change; only the strides. Parameters that do not own their storage densely (views, slices,
        expanded tensors) are left as they are (the step then works on their layout). Later gradients
        follow: autograd's ``AccumulateGrad`` creates ``p.grad`` with ``p``'s strides (the layout
        contract). One copy of ``p``, ``p.grad`` and each moment, O(nk), only when the layout changes.
        """
        info.laid_out = True
        if not _owns_dense_storage(p.data):
            return
        tall = self._tall(p.data, info)
        if not tall.is_contiguous():
            # data assignment keeps the Parameter object (hooks, optimizer state, module references)
            p.data = tall.contiguous().mT if info.transpose else tall.contiguous()
        grad = p.grad
        if grad is not None and not grad.is_sparse and grad.shape == p.shape:
            # also an existing grad that zero_grad(set_to_none=False) would keep accumulating into
            converted = _like_layout(grad, p)
            if converted is not grad:
                p.grad = converted
        state = self.state.get(p)
        if state:
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape == p.shape:
                    state[key] = _like_layout(value, p)

    def _matchings(
        self,
        info: _ParamInfo,
        group: dict[str, Any],
        x: torch.Tensor,
        direction: torch.Tensor | None,
    ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """The step's matchings as ``(i, j, scale)``; ``scale`` is ``1/(m·p_e)`` when unbiased, else None.

        ``direction`` is the ambient matrix driving the step (needed only by samplers with
        ``needs_weights``, i.e. ``"greedy"``, which forms the dense ``|W| = |D Xᵀ − X Dᵀ|``: O(n²k) time,
        O(n²) memory).
        """
        name = group["sampler"]
        m = group["matchings_per_step"]
        device = x.device
        if name == "full":
            rounds = info.n - 1 if info.n % 2 == 0 else info.n
            out: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []
            for r in range(rounds):
                mt = round_robin_matching(info.n, r, device=device)
                out.append((mt.i, mt.j, None))
            return out
        sampler = info.sampler
        assert sampler is not None
        if isinstance(sampler, GreedySampler):
            assert direction is not None
            w = direction @ x.mT
            w = (w - w.mT).abs()
            if w.dim() > 2:
                w = w.reshape(-1, info.n, info.n).sum(0)
            greedy: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = [
                (mt.i, mt.j, None) for mt in sampler.sample_many(w, m, device=device)
            ]
            return greedy
        out = []
        for mt in sampler.sample_n(m, self._generator, device=device):
            scale = None
            if group["unbiased"] and name not in _DETERMINISTIC:
                scale = (1.0 / (m * mt.prob)).to(dtype=torch.float32, device=device)
            out.append((mt.i, mt.j, scale))
        return out

    def _step_rounds(
        self,
        info: _ParamInfo,
        group: dict[str, Any],
        x: torch.Tensor,
        direction: torch.Tensor | None,
    ) -> tuple[MatchingBlock | list[tuple[torch.Tensor, torch.Tensor]], Any]:
        """The step's matchings as the fused step takes them: ``(rounds, scales)``.

        Round-robin schedules come as one :class:`MatchingBlock` (``(m, P)`` indices, scales ``None`` or
        ``(m, P)``), so that a step does no Python work per matching; other samplers as the list of
        :meth:`_matchings` with per-matching scales.
        """
        sampler = info.sampler
        if isinstance(sampler, RoundRobinSampler) and group["sampler"] != "full":
            block = sampler.sample_block(
                group["matchings_per_step"], self._generator, device=x.device
            )
            scales = None
            if group["unbiased"]:
                m = block.i.shape[0]
                scales = (1.0 / (m * block.prob)).to(dtype=torch.float32, device=x.device)
                scales = scales.expand(m, -1)
            return block, scales
        matchings = self._matchings(info, group, x, direction)
        return [(i, j) for i, j, _ in matchings], [scale for _, _, scale in matchings]

    def _filter_finite(
        self, group: dict[str, Any], params: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        """Drop parameters whose gradient holds NaN/inf (warn) or raise, per ``group['nonfinite']``.

        One reduction per gradient and a single host synchronisation per group; an exact elementwise check
        runs only for gradients whose sum is not finite. Sparse gradients are checked on their values.
        """
        mode = group["nonfinite"]
        if mode == "ignore" or not params:
            return params

        def values(g: torch.Tensor) -> torch.Tensor:
            return g._values() if g.is_sparse else g

        dev = _grad(params[0]).device
        flags = torch.stack(
            [torch.isfinite(values(_grad(p)).sum()).to(dev) for p in params]
        ).tolist()
        keep = []
        for p, ok in zip(params, flags):
            if not ok and not bool(torch.isfinite(values(_grad(p))).all()):
                info = self._info.get(p)
                name = info.name if info is not None else "a parameter"
                msg = f"non-finite gradient for {name} ({_describe_param(p)}) at step {self._steps}"
                if mode == "raise":
                    raise FloatingPointError(msg + " (nonfinite='raise')")
                warnings.warn(msg + ": its update was skipped (nonfinite='skip')", stacklevel=4)
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

    @torch.no_grad()
    def stabilize(self) -> None:
        """Project every constrained weight back onto its manifold now (as geoopt's ``stabilize``).

        Givens and Cayley (tall) weights: ``X ← qr_sign_fixed(X)`` on the tall view (O(nk²), keeps the determinant sign of a
        near-orthogonal square weight, so O(d)'s component and SO(d) membership are kept; their ambient
        buffers need nothing). Parameters on other geoopt manifolds: ``projx`` of the point and ``proju``
        of their momentum / first-moment buffer. Unconstrained parameters are untouched.
        """
        for group in self.param_groups:
            for p in group["params"]:
                info = self._info_of(p, group)
                if info.kind in ("givens", "cayley"):
                    project_(self._tall(p.data, info))
                elif info.kind == "riemannian":
                    manifold = p.manifold
                    p.data.copy_(manifold.projx(p.data))
                    state = self.state.get(p, {})
                    for key in ("momentum_buffer", "exp_avg"):
                        buf = state.get(key)
                        if isinstance(buf, torch.Tensor):
                            buf.copy_(manifold.proju(p.data, buf))

    # ------------------------------------------------------------------------------------------------
    # step

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimization step over all groups; ``closure`` re-evaluates the loss (optional)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            params = self._filter_finite(group, params)
            euclid, givens, riem, cayley = [], [], [], []
            for p in params:
                info = self._info_of(p, group)
                if info.kind == "euclidean":
                    euclid.append(p)
                    continue
                if _grad(p).is_sparse:
                    raise RuntimeError(
                        f"{type(self).__name__} does not support sparse gradients on constrained "
                        f"parameter {info.name}"
                    )
                if info.kind == "givens":
                    givens.append(p)
                elif info.kind == "cayley":
                    cayley.append(p)
                elif info.kind == "riemannian":
                    riem.append(p)
            if euclid:
                self._euclidean_update(group, euclid)
            for p in givens:
                info = self._info[p]
                if not info.checked:
                    self._check_on_manifold(p, info)
                if not info.laid_out:
                    self._ensure_row_layout(p, info)
                self._givens_update(group, p, info)
                self._maybe_stabilize(p, info, group)
            for p in cayley:
                info = self._info[p]
                if not info.checked:
                    self._check_on_manifold(p, info)
                self._cayley_update(group, p, info)
                self._maybe_stabilize(p, info, group)
            for p in riem:
                self._riemannian_update(group, p)
        self._steps += 1
        return loss

    def _euclidean_update(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        raise NotImplementedError

    def _givens_update(self, group: dict[str, Any], p: torch.Tensor, info: _ParamInfo) -> None:
        raise NotImplementedError

    def _cayley_update(self, group: dict[str, Any], p: torch.Tensor, info: _ParamInfo) -> None:
        """The rank-2k Cayley step of a tall weight (``tall_step``, optim/_tall.py)."""
        raise NotImplementedError

    def _riemannian_update(self, group: dict[str, Any], p: torch.Tensor) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------------
    # pickling (copy.deepcopy, pickle, torch.save(opt))

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_orthotorch"] = {
            "generator_state": self._generator.get_state(),
            "generator_device": str(self._generator.device),
            "steps": self._steps,
            "info": self._info,
        }
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        extra = state.pop("_orthotorch", None)
        super().__setstate__(state)
        for (
            group
        ) in self.param_groups:  # older or foreign groups: missing options from the defaults
            for key, value in self.defaults.items():
                group.setdefault(key, value)
            group.setdefault("manifold", None)
        if extra is not None:
            generator = torch.Generator(device=extra["generator_device"])
            generator.set_state(extra["generator_state"])
            self._generator = generator
            self._steps = int(extra["steps"])
            self._info = extra["info"]
        elif "_generator" not in self.__dict__:
            self._generator = torch.Generator().manual_seed(DEFAULT_SEED)
            self._steps = 0
            self._info = {}

    # ------------------------------------------------------------------------------------------------
    # state dicts

    def _flat_params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _extra_state(self) -> dict[str, Any]:
        samplers = {}
        idx = 0
        for group in self.param_groups:
            for p in group["params"]:
                sampler = self._info_of(p, group).sampler
                if sampler is not None:
                    samplers[idx] = sampler.state_dict()
                idx += 1
        return {
            "generator_state": self._generator.get_state(),
            "steps": self._steps,
            "samplers": samplers,
        }

    def state_dict(self) -> dict[str, Any]:
        """torch's optimizer state plus ``"orthotorch"``: generator state, step count, sampler states.

        The ``"orthotorch"`` entry is present when torch's state-dict post-hooks run, so hooks see the
        whole dictionary.
        """

        def add_extra(optimizer: torch.optim.Optimizer, sd: dict[str, Any]) -> None:
            sd["orthotorch"] = self._extra_state()

        handle = self.register_state_dict_post_hook(add_extra, prepend=True)
        try:
            return super().state_dict()
        finally:
            handle.remove()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`: after loading, the next step is bit-identical to the saved run's.

        Also loads a ``torch.optim.SGD``/``Adam`` state dict, or one from an older version: options a
        saved group lacks keep the current group's value (``lr``, momentum buffers and Adam moments of
        unconstrained parameters map as they are). Refused with a ``ValueError`` that names the parameter
        (the optimizer is left unchanged): state of another shape, state keys this optimizer does not
        know (e.g. torch Adam's elementwise ``exp_avg_sq`` for a constrained weight), and a saved
        ``manifold`` option that differs from the current group's. The on-manifold check of every
        constrained weight runs again at the next step (it is never skipped on the word of a saved flag).
        """
        captured: dict[str, Any] = {}

        def capture(optimizer: torch.optim.Optimizer, sd: dict[str, Any]) -> dict[str, Any] | None:
            captured["sd"] = sd  # runs after every user pre-hook: what torch loads
            return None

        before = {
            "state": self.state,
            "param_groups": self.param_groups,
            "_info": self._info,
            "_steps": self._steps,
        }
        generator_state = self._generator.get_state()
        old_groups = [dict(g) for g in self.param_groups]
        handle = self.register_load_state_dict_pre_hook(capture)
        try:
            super().load_state_dict(state_dict)
            handle.remove()
            self._after_load(captured["sd"], old_groups)
        except Exception:
            handle.remove()
            self.__dict__.update(before)
            self._generator.set_state(generator_state)
            raise

    def _after_load(self, sd: dict[str, Any], old_groups: list[dict[str, Any]]) -> None:
        saved_groups = sd["param_groups"]
        for gi, (group, old, saved) in enumerate(zip(self.param_groups, old_groups, saved_groups)):
            for key, value in old.items():
                if key == "params":
                    continue
                if key not in saved:  # torch or older state dict: keep what this group has
                    group[key] = value
                elif key in _STRUCTURAL and saved[key] != value:
                    raise ValueError(
                        f"the state dict's param_groups[{gi}] has {key}={saved[key]!r} but this "
                        f"optimizer's group has {key}={value!r}; a saved group cannot change which "
                        "parameters are constrained (build the optimizer with the same groups)"
                    )
            self._validate_group(group, gi)
        self._info = {}
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                self._info[p] = self._make_info(p, group, f"param_groups[{gi}]['params'][{pi}]")
        saved_ids = list(chain.from_iterable(g["params"] for g in saved_groups))
        saved_state = sd["state"]
        for pid, (group, p) in zip(
            saved_ids, [(g, p) for g in self.param_groups for p in g["params"]]
        ):
            state = self.state.get(p)
            if state:
                self._check_loaded_state(p, self._info[p], group, state, saved_state.get(pid, {}))
        extra = sd.get("orthotorch")
        if extra is None:
            return
        self._generator.set_state(extra["generator_state"].clone())
        self._steps = int(extra["steps"])
        flat = self._flat_params()
        for idx, s in extra["samplers"].items():
            idx = int(idx)
            if not 0 <= idx < len(flat):
                raise ValueError(
                    f"the state dict has sampler state for parameter {idx} of {len(flat)}"
                )
            sampler = self._info[flat[idx]].sampler
            if sampler is not None:
                sampler.load_state_dict(s)

    def _check_loaded_state(
        self,
        p: torch.Tensor,
        info: _ParamInfo,
        group: dict[str, Any],
        state: dict[str, Any],
        saved: dict[str, Any],
    ) -> None:
        """Refuse state that does not belong to ``p``; restore the float32 row statistics."""
        kind = "givens" if info.kind == "empty" else info.kind
        allowed = self._state_keys.get(kind, ())
        unknown = sorted(str(k) for k in state if k not in allowed)
        if unknown:
            hint = ""
            if kind == "givens" and "exp_avg_sq" in unknown:
                hint = (
                    " (an elementwise second moment, e.g. torch.optim.Adam's or that of the Cayley "
                    "step of tall weights, has no per-row counterpart: the Givens step keeps one v "
                    "per row of the tall view; was it saved with another `tall_step`?)"
                )
            elif kind == "cayley" and "row_sq" in unknown:
                hint = (
                    " (a per-row second moment of the Givens step: this weight takes the Cayley step "
                    "of tall weights; load it into an optimizer with tall_step='givens')"
                )
            label = {"givens": "constrained", "cayley": "constrained (tall, Cayley step)"}
            raise ValueError(
                f"the state dict's state for {info.name} ({_describe_param(p)}, a "
                f"{label.get(kind, kind)} parameter) has keys {unknown} that "
                f"{type(self).__name__} cannot use (it keeps {list(allowed)}); it was saved by another "
                "optimizer or for another kind of parameter"
                + hint
                + ". Drop that parameter's state "
                "before loading"
            )
        shape = tuple(p.shape)
        tall_rows = (*shape[:-2], shape[-1]) if info.transpose else shape[:-1]
        for key, value in state.items():
            if not isinstance(value, torch.Tensor) or key == "step":
                continue
            if key in ("row_sq", "max_row_sq"):
                expected: tuple[int, ...] = tall_rows
            elif key == "row_count":
                expected = (info.n,)
            else:
                expected = tuple(p.shape)
            if tuple(value.shape) != expected:
                raise ValueError(
                    f"the state dict's {key!r} for {info.name} has shape {tuple(value.shape)}, but the "
                    f"parameter ({_describe_param(p)}) needs {expected}; it was saved for another "
                    "parameter"
                )
            if key in ("row_sq", "row_count", "max_row_sq"):
                # torch casts floating state to the parameter's dtype; these stay in working precision
                src = saved.get(key, value)
                state[key] = src.to(device=p.device, dtype=compute_dtype(p.dtype), copy=True)


@torch.no_grad()
def project_(x: torch.Tensor) -> torch.Tensor:
    """Re-project tall ``x`` ``(..., n, k)`` onto the Stiefel manifold in place: ``x ← Q·diag(sign(diag R))``
    with ``x = QR`` (:func:`orthotorch._numerics.qr_sign_fixed`). Keeps a near-orthogonal point's
    determinant sign (the component of O(d)). O(nk²); half-precision inputs are factorised in float32.
    Returns ``x``."""
    x.copy_(qr_sign_fixed(x))
    return x
