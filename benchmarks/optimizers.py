"""The optimizer race (issue 12 §5): wall clock to a target, with each method's learning rate tuned.

Problems (float32; every method sees the same initial point and the same data stream for a seed):

- ``regression-<d>``: minibatch orthogonal regression ``y = Q* x + 0.01·ε`` on O(d), ``x ~ N(0, I_d)``,
  batch 32 drawn fresh at every step from a generator seeded by (seed, step index); loss
  ``½‖X x − y‖²`` averaged over the batch; metric ``‖X − Q*‖²_F / ‖X₀ − Q*‖²_F``; d ∈ {256, 512, 1024, 2048}.
- ``brockett-<k>``: ``f(X) = −tr(XᵀAXN)`` on St(1024, k), A symmetric with eigenvalues evenly spaced in
  [0, 1], ``N = diag(linspace(1, ½, k))``; metric the relative gap ``(f − f*)/(−f*)`` with ``f*`` from
  ``torch.linalg.eigvalsh(A)`` (float64); k ∈ {16, 64, 256}.
- ``copying``: the orthogonal RNN of ``orthotorch.nn`` (hidden 128, modReLU, Henaff init) with a linear
  readout on the copying task, T = 100, batch 32 (``orthotorch.nn.tasks``); the recurrent matrix is the
  constrained weight, every other parameter gets the optimizer's plain update; metric the cross-entropy
  on a fixed held-out batch of 64 sequences divided by the no-memory baseline ``10·log 8/(T + 20)``
  (the plateau a model without memory reaches; the full run's target, 0.9 of it, asks for recall).

Targets (the full run's; ``--quick`` uses looser ones, printed with its tables): regression 1e-2
(0.5 at d = 2048), Brockett 1e-3, copying 0.9.

Protocol, per (problem, method): the learning rate comes from a log grid (values 1, 3, 10, 30, … × 10ᵉ, a
factor ≈ 3 apart) of three points around the method's centre for the problem family, run on seed 0; when
the best lr sits on an edge of the grid the grid grows by one point on that side, up to a cap (then the
table flags the edge). The score that picks the lr is the time to target; runs that miss the target are
ranked after those that reach it, by their metric at the end of the budget; diverged runs last. The best
lr is then run on the other seeds (``--seeds``; seed 0's run is the grid's). Every run gets the same
budget of optimizer clock: the clock counts the forward pass, the gradient and the optimizer step (for a
parametrization, the weight's forward and backward too), not the data generation nor the metric, which
is evaluated at fixed clock checkpoints. The time to target is interpolated log-linearly between the two
checkpoints that bracket the first crossing.

    python benchmarks/optimizers.py --quick   # ≈ 4 min on 2 cores → docs/benchmarks/optimizers.quick.md
    python benchmarks/optimizers.py           # ≈ 40 min → docs/benchmarks/optimizers.md + optimizers.png
    python benchmarks/optimizers.py --list    # problems, methods and their lr grid centres
    python benchmarks/optimizers.py --problems brockett-16,copying --methods 'ours-*,tcwy-adam' \\
        --budget 2 --seeds 1                  # any filter or override → optimizers.custom.md / .png

Step costs by layout and the default-step ratio are in benchmarks/givens_step.py.
"""

from __future__ import annotations

import argparse
import fnmatch
import inspect
import math
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import geoopt
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import DOCS, env_header, fmt, markdown_table
from orthotorch import parametrize as ot_parametrize
from orthotorch._numerics import det_sign, haar
from orthotorch.optim import OrthogonalAdam, OrthogonalSGD

DTYPE = torch.float32
AREA = "optimizers"

# ====================================================================================================
# learning-rate grid (pure helpers)

#: Score of one run: ``(0, time to target)`` when it reached the target, ``(1, metric at the end of the
#: budget)`` when not, ``(2, inf)`` when it diverged. Lower is better.
Score = tuple[int, float]


def lr_value(j: int) -> float:
    """Grid point ``j`` of the learning-rate grid: 1, 3, 10, 30, … for j = 0, 1, 2, 3 (0.3, 0.1 for j = −1, −2).

    Consecutive points are a factor 3 or 10/3 apart.
    """
    return float(f"{(1, 3)[j % 2]}e{j // 2}")  # via the decimal text: 0.3, not 0.30000000000000004


def lr_index(lr: float) -> int:
    """The grid index whose value is nearest to ``lr`` on a log scale."""
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"`lr` must be a positive finite number, got {lr!r}")
    guess = round(2 * math.log10(lr))
    return min(range(guess - 2, guess + 3), key=lambda j: abs(math.log(lr_value(j) / lr)))


def score_of(time_to_target: float, final: float, diverged: bool) -> Score:
    """The :data:`Score` of a run (``time_to_target`` NaN when the target was not reached)."""
    if diverged or not math.isfinite(final):
        return (2, math.inf)
    if math.isfinite(time_to_target):
        return (0, time_to_target)
    return (1, final)


def best_index(scores: dict[int, Score]) -> int:
    """Grid index of the best score (ties: the smaller lr)."""
    if not scores:
        raise ValueError("`scores` is empty")
    return min(scores, key=lambda j: (scores[j], j))


def next_lr_index(scores: dict[int, Score], *, max_points: int) -> int | None:
    """The grid point to run next, or None when the best lr is bracketed or ``max_points`` were run.

    The best lr (:func:`best_index`) must have a worse neighbour on both sides; if it sits on the lower
    (upper) edge of the indices tried, the grid grows by one point below (above) — unless its inner
    neighbour scores the same (a flat grid, e.g. no step fits in the budget: more points tell nothing).
    """
    if len(scores) >= max_points:
        return None
    flag = edge_flag(scores)
    best = best_index(scores)
    if flag == "low":
        return best - 1
    if flag == "high":
        return best + 1
    return None


def search_grid(
    evaluate: Callable[[int], Score], centre: int, *, max_points: int
) -> dict[int, Score]:
    """Scores of the grid points ``centre − 1, centre, centre + 1``, then of the points
    :func:`next_lr_index` asks for, until the best is bracketed or ``max_points`` were evaluated."""
    scores = {j: evaluate(j) for j in (centre - 1, centre, centre + 1)}
    while (j := next_lr_index(scores, max_points=max_points)) is not None:
        scores[j] = evaluate(j)
    return scores


def edge_flag(scores: dict[int, Score]) -> str:
    """Where the best lr of a contiguous grid sits: ``"low"`` / ``"high"`` on that edge (not bracketed),
    ``"flat"`` on an edge but tied with its neighbour (the grid cannot tell), ``""`` bracketed."""
    if len(scores) < 2:
        return ""
    best = best_index(scores)
    for edge, inner, name in (
        (min(scores), min(scores) + 1, "low"),
        (max(scores), max(scores) - 1, "high"),
    ):
        if best == edge:
            return "flat" if scores.get(inner) == scores[best] else name
    return ""


def time_to_target(curve: Sequence[tuple[float, float]], target: float) -> float:
    """Clock time at which ``curve`` (``(time, metric)`` checkpoints, time increasing) first reaches ``target``.

    Interpolated linearly in ``log(metric)`` between the last checkpoint above the target and the first
    at or below it (linearly in the metric if either value is not positive); NaN if never reached.
    """
    prev: tuple[float, float] | None = None
    for t, v in curve:
        if v <= target:
            if prev is None:
                return t
            t0, v0 = prev
            if v0 > 0 and v > 0 and target > 0:
                a, b, c = math.log(v0), math.log(v), math.log(target)
            else:
                a, b, c = v0, v, target
            return t0 + (t - t0) * (a - c) / (a - b) if a != b else t
        prev = (t, v)
    return math.nan


def checkpoints(budget: float, linear: int, geometric: int) -> list[float]:
    """Clock times at which the metric is evaluated: ``linear`` evenly spaced up to ``budget`` plus
    ``geometric`` log-spaced from ``budget/300`` up to (excluded) ``budget`` (early progress of fast
    methods)."""
    pts = {budget * (i + 1) / linear for i in range(linear)}
    if geometric > 0:
        lo = budget / 300
        pts |= {lo * (budget / lo) ** (i / geometric) for i in range(geometric)}
    return sorted(pts)


# ====================================================================================================
# problems


class Instance:
    """One seed of a problem: builds fresh copies of the initial model, draws data, scores models.

    Subclasses set ``square`` and implement :meth:`build` (a fresh module and the ``(owner, name)`` of its
    constrained weight), :meth:`batch` (data for a step, not timed), :meth:`loss` (timed) and
    :meth:`metric` (relative, not timed).
    """

    square: bool

    def build(self) -> tuple[nn.Module, nn.Module, str]:
        raise NotImplementedError

    def batch(self, step: int) -> Any:
        raise NotImplementedError

    def loss(self, module: nn.Module, data: Any) -> torch.Tensor:
        raise NotImplementedError

    def metric(self, module: nn.Module) -> float:
        raise NotImplementedError


class _Holder(nn.Module):
    """A module holding one weight ``(n, k)``, so that every method constrains it the same way."""

    def __init__(self, x0: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(x0.clone())


def _so(n: int, gen: torch.Generator) -> torch.Tensor:
    """Haar point of SO(n) (det +1: Givens rotations cannot leave the component), float64, contiguous."""
    q = haar(n, n, generator=gen, dtype=torch.float64)
    if det_sign(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _step_generator(seed: int, step: int) -> torch.Generator:
    """The generator of step ``step`` of seed ``seed``: the same data for every method."""
    return torch.Generator().manual_seed(1_000_003 * (seed + 1) + step)


class RegressionInstance(Instance):
    """Minibatch orthogonal regression on O(d) (see the module docstring); ``Q*`` and ``X₀`` in SO(d)."""

    square = True

    def __init__(self, d: int, seed: int, batch: int = 32, noise: float = 0.01) -> None:
        gen = torch.Generator().manual_seed(10_000 + 97 * seed + d)
        self.d, self.seed, self.batch_size, self.noise = d, seed, batch, noise
        self.q_star = _so(d, gen).to(DTYPE)
        self.x0 = _so(d, gen).to(DTYPE)
        self.d0 = float(((self.x0.double() - self.q_star.double()) ** 2).sum())

    def build(self) -> tuple[nn.Module, nn.Module, str]:
        h = _Holder(self.x0)
        return h, h, "weight"

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)`` of shape ``(batch, d)``; O(batch·d²) for the product with Q*."""
        g = _step_generator(self.seed, step)
        x = torch.randn(self.batch_size, self.d, generator=g, dtype=DTYPE)
        eps = torch.randn(self.batch_size, self.d, generator=g, dtype=DTYPE)
        return x, x @ self.q_star.mT + self.noise * eps

    def loss(self, module: nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = data
        return 0.5 * ((x @ module.weight.mT - y) ** 2).sum() / x.shape[0]

    def metric(self, module: nn.Module) -> float:
        with torch.no_grad():  # float32: ample for a relative distance (and 5× cheaper at d = 2048)
            return float(((module.weight - self.q_star) ** 2).sum()) / self.d0


class BrockettInstance(Instance):
    """``f(X) = −tr(XᵀAXN)`` on St(n, k) (see the module docstring); exact gradients, no data."""

    square = False

    def __init__(self, n: int, k: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(20_000 + 97 * seed + n + k)
        q = _so(n, gen)
        lam = torch.linspace(0.0, 1.0, n, dtype=torch.float64)
        a64 = (q * lam) @ q.mT
        self.a64 = (a64 + a64.mT) / 2
        self.a = self.a64.to(DTYPE)
        self.nw64 = torch.linspace(1.0, 0.5, k, dtype=torch.float64)
        self.nw = self.nw64.to(DTYPE)
        self.f_star = brockett_optimum(self.a64, self.nw64)
        self.x0 = haar(n, k, generator=gen, dtype=torch.float64).to(DTYPE).contiguous()

    def build(self) -> tuple[nn.Module, nn.Module, str]:
        h = _Holder(self.x0)
        return h, h, "weight"

    def batch(self, step: int) -> None:
        return None

    def loss(self, module: nn.Module, data: None) -> torch.Tensor:
        x = module.weight
        return -(((self.a @ x) * x).sum(0) * self.nw).sum()

    def value64(self, x: torch.Tensor) -> float:
        """``f(X)`` in float64 (O(n²k))."""
        x = x.detach().double()
        return float(-(((self.a64 @ x) * x).sum(0) * self.nw64).sum())

    def metric(self, module: nn.Module) -> float:
        """Relative gap; ``AX`` in float32 (a float64 GEMM would cost 60 ms per checkpoint at k = 256),
        the rest in float64: accurate to ≈ 1e-6, far below the targets."""
        with torch.no_grad():
            x = module.weight.detach()
            f = -float((((self.a @ x).double() * x.double()).sum(0) * self.nw64).sum())
            return (f - self.f_star) / abs(self.f_star)


def brockett_optimum(a: torch.Tensor, nw: torch.Tensor) -> float:
    """``min over St(n, k)`` of ``−tr(XᵀAXN)`` for symmetric ``A (n, n)`` and decreasing positive weights
    ``nw (k,)``: ``−Σ_i λ_i nw_i`` with ``λ`` the k largest eigenvalues in decreasing order (eigvalsh,
    O(n³))."""
    lam = torch.linalg.eigvalsh(a.double()).flip(0)[: nw.shape[0]]
    return -float((lam * nw.double()).sum())


class CopyingInstance(Instance):
    """Orthogonal RNN + readout on the copying task (see the module docstring)."""

    square = True

    def __init__(
        self, seed: int, T: int = 100, hidden: int = 128, batch: int = 32, eval_batch: int = 64
    ) -> None:
        from orthotorch.nn import tasks

        self.tasks = tasks
        self.seed, self.T, self.hidden, self.batch_size = seed, T, hidden, batch
        self.baseline = tasks.copying_baseline(T)
        x, y = tasks.copying_batch(
            eval_batch, T, generator=torch.Generator().manual_seed(30_000 + seed)
        )
        self.eval = (tasks.one_hot(x, 10), y)

    def build(self) -> tuple[nn.Module, nn.Module, str]:
        from orthotorch.apps.rnn import RunConfig, build_model

        cfg = RunConfig(task="copying", T=self.T, hidden=self.hidden, constraint="none")
        model = build_model(cfg, torch.Generator().manual_seed(40_000 + self.seed))
        return model, model.rnn.cells[0], "weight_hh"

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.tasks.copying_batch(
            self.batch_size, self.T, generator=_step_generator(self.seed, step)
        )
        return self.tasks.one_hot(x, 10), y

    def loss(self, module: nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = data
        return self.tasks.copying_loss(module(x), y)

    def metric(self, module: nn.Module) -> float:
        with torch.no_grad():
            return (
                float(self.tasks.copying_loss(module(self.eval[0]), self.eval[1])) / self.baseline
            )


@dataclass
class Problem:
    """A problem of the race: its name, family (picks the lr grid centre), target and budget."""

    name: str
    family: str  # "regression" | "brockett" | "copying"
    n: int
    k: int
    target: float
    budget: float  # seconds of optimizer clock per run
    make: Callable[[int], Instance]
    metric_name: str
    target_text: str
    linear_checkpoints: int = 30
    geometric_checkpoints: int = 15
    _cache: dict[int, Instance] = field(default_factory=dict, repr=False)

    @property
    def square(self) -> bool:
        return self.n == self.k

    def instance(self, seed: int) -> Instance:
        if seed not in self._cache:
            self._cache[seed] = self.make(seed)
        return self._cache[seed]


def regression(d: int, budget: float, target: float) -> Problem:
    return Problem(
        f"regression-{d}",
        "regression",
        d,
        d,
        target,
        budget,
        lambda seed: RegressionInstance(d, seed),
        "‖X − Q*‖² / ‖X₀ − Q*‖²",
        f"‖X − Q*‖² ≤ {target:g}·‖X₀ − Q*‖²",
    )


def brockett(k: int, budget: float, target: float, n: int = 1024) -> Problem:
    return Problem(
        f"brockett-{k}",
        "brockett",
        n,
        k,
        target,
        budget,
        lambda seed: BrockettInstance(n, k, seed),
        "(f − f*)/(−f*)",
        f"relative gap ≤ {target:g}",
        linear_checkpoints=25,
        geometric_checkpoints=12,
    )


def copying(budget: float, target: float) -> Problem:
    return Problem(
        "copying",
        "copying",
        128,
        128,
        target,
        budget,
        lambda seed: CopyingInstance(seed),
        "cross-entropy / no-memory baseline",
        f"held-out cross-entropy ≤ {target:g} × the no-memory baseline",
        linear_checkpoints=10,
        geometric_checkpoints=3,
    )


def problems(quick: bool) -> list[Problem]:
    """The race's problems (``quick``: one size of each family, short budgets)."""
    if quick:
        # looser targets than the full run's, so that the short budgets still separate the methods
        return [regression(1024, 1.5, 0.5), brockett(64, 1.5, 1e-2), copying(3.0, 2.0)]
    return [
        regression(256, 2.0, 1e-2),
        regression(512, 3.0, 1e-2),
        regression(1024, 4.0, 1e-2),
        regression(2048, 5.0, 0.5),
        brockett(16, 3.0, 1e-3),
        brockett(64, 3.0, 1e-3),
        brockett(256, 3.0, 1e-3),
        copying(8.0, 0.9),
    ]


# ====================================================================================================
# methods


def _mark(owner: nn.Module, name: str, square: bool) -> None:
    """orthotorch optimizers: mark the weight (what ``orthotorch.nn`` modules do)."""
    getattr(owner, name)._orthotorch_manifold = "orthogonal" if square else "stiefel"


def _geoopt_manifold(cls: type) -> Callable[[nn.Module, str, bool], None]:
    def constrain(owner: nn.Module, name: str, square: bool) -> None:
        p = getattr(owner, name)
        setattr(owner, name, geoopt.ManifoldParameter(p.detach().clone(), manifold=cls()))

    return constrain


def _torch_param(omap: str) -> Callable[[nn.Module, str, bool], None]:
    def constrain(owner: nn.Module, name: str, square: bool) -> None:
        torch.nn.utils.parametrizations.orthogonal(owner, name, orthogonal_map=omap)

    return constrain


def _geotorch(owner: nn.Module, name: str, square: bool) -> None:
    import geotorch

    x0 = getattr(owner, name).detach().clone()
    geotorch.orthogonal(owner, name)
    setattr(owner, name, x0)  # geotorch draws a random point; start where everybody starts


def _tcwy(owner: nn.Module, name: str, square: bool) -> None:
    ot_parametrize.orthogonal(owner, name, method="tcwy")


def _available(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


OptFactory = Callable[[list[dict[str, Any]], float, int], torch.optim.Optimizer]


def _ours(cls: type, group: dict[str, Any] | None = None, **kw: Any) -> OptFactory:
    """An orthotorch optimizer with constructor options ``kw`` and param-group options ``group`` for
    the constrained weight's group (the first); its generator is seeded by the run's seed."""

    def make(groups: list[dict[str, Any]], lr: float, seed: int) -> torch.optim.Optimizer:
        gen = torch.Generator().manual_seed(seed)
        if group:
            groups = [{**groups[0], **group}, *groups[1:]]
        opt: torch.optim.Optimizer = cls(groups, lr=lr, generator=gen, **kw)
        return opt

    return make


def _plain(cls: type, **kw: Any) -> OptFactory:
    def make(groups: list[dict[str, Any]], lr: float, seed: int) -> torch.optim.Optimizer:
        opt: torch.optim.Optimizer = cls(groups, lr=lr, **kw)
        return opt

    return make


def _always(pr: Problem) -> bool:
    return True


def _matrix(pr: Problem) -> bool:
    return pr.family != "copying"


@dataclass(frozen=True)
class Method:
    """One row of the race.

    ``constrain(owner, name, square)`` turns ``owner.<name>`` (a plain parameter at the common initial
    point) into what the method optimizes; ``optimizer(groups, lr, seed)`` builds the optimizer;
    ``centre`` is the lr grid centre per problem family (a family without a centre is not run);
    ``applies`` filters problems further; ``constrained_lr_scale`` multiplies the lr of the constrained
    weight on models with other parameters (the copying RNN), where all others share ``lr``.
    ``ours`` marks the orthotorch optimizers (``orthotorch.optim``), the rows the summary compares.
    """

    key: str
    name: str
    constrain: Callable[[nn.Module, str, bool], None]
    optimizer: OptFactory
    centre: dict[str, float]
    applies: Callable[[Problem], bool] = _always
    quick: bool = True
    ours: bool = False
    constrained_lr_scale: float = 1.0
    needs: str | None = None  # an optional package

    def runs_on(self, pr: Problem) -> bool:
        return pr.family in self.centre and self.applies(pr)


def _radam_rnn_scale() -> float:
    # geoopt's RiemannianAdam keeps one scalar second moment per manifold tensor (‖grad‖²), so a d×d
    # weight moves ≈ lr in Frobenius norm per step where elementwise Adam moves ≈ lr per entry (≈ lr·d in
    # norm). On the RNN every other parameter shares the lr: scale the recurrent weight's lr by d = 128.
    return 128.0


def _tall(pr: Problem) -> bool:
    return not pr.square


def _square(pr: Problem) -> bool:
    return pr.square


def ours_rows(
    key: str = "",
    name: str = "",
    *,
    group: dict[str, Any] | None = None,
    applies: Callable[[Problem], bool] = _always,
    quick: bool = True,
) -> list[Method]:
    """The three orthotorch optimizer rows (SGD with and without momentum, Adam), with param-group
    options ``group`` for the constrained weight; ``key``/``name`` are appended to the rows' keys and
    names. E.g. a forced-Givens variant on tall weights:
    ``ours_rows("-givens", ", Givens", group={"tall_step": "givens"}, applies=_tall)`` (in
    :func:`methods` when the optimizers have that option)."""
    return [
        Method(
            f"ours-sgd-mom{key}",
            f"OrthogonalSGD μ=0.9{name}",
            _mark,
            _ours(OrthogonalSGD, group, momentum=0.9),
            {"regression": 0.1, "brockett": 1.0, "copying": 0.1},
            applies=applies,
            quick=quick,
            ours=True,
        ),
        Method(
            f"ours-sgd{key}",
            f"OrthogonalSGD{name}",
            _mark,
            _ours(OrthogonalSGD, group),
            {"regression": 0.3, "brockett": 3.0},
            applies=applies,
            quick=False,
            ours=True,
        ),
        Method(
            f"ours-adam{key}",
            f"OrthogonalAdam{name}",
            _mark,
            _ours(OrthogonalAdam, group),
            {"regression": 0.1, "brockett": 0.1, "copying": 0.03},
            applies=applies,
            quick=quick,
            ours=True,
        ),
    ]


def methods() -> list[Method]:
    """The table of methods. Add a row (or a :func:`ours_rows` variant) here to race another
    configuration; the orthotorch optimizers run with their defaults."""
    E, C = geoopt.EuclideanStiefel, geoopt.CanonicalStiefel
    rsgd, radam = geoopt.optim.RiemannianSGD, geoopt.optim.RiemannianAdam
    rows = [*ours_rows()]
    if "tall_step" in inspect.signature(OrthogonalSGD.__init__).parameters:
        # the default routes tall weights to another step (tall_step="auto"); race the Givens step too
        rows += ours_rows(
            "-givens",
            ", tall_step='givens'",
            group={"tall_step": "givens"},
            applies=_tall,
            quick=False,
        )
    # fewer matchings per gradient: cheaper steps that move less (docs/optim.md, "how many matchings")
    for m in (1, 4):
        rows += ours_rows(
            f"-m{m}", f", m={m}", group={"matchings_per_step": m}, applies=_square, quick=False
        )
    rows += [
        Method(
            "geoopt-rsgd-mom-euc",
            "geoopt RSGD μ=0.9, Euclidean",
            _geoopt_manifold(E),
            _plain(rsgd, momentum=0.9),
            {"regression": 0.03, "brockett": 1.0, "copying": 0.03},
        ),
        Method(
            "geoopt-rsgd-euc",
            "geoopt RSGD, Euclidean",
            _geoopt_manifold(E),
            _plain(rsgd),
            {"regression": 0.1, "brockett": 1.0},
            quick=False,
        ),
        Method(
            "geoopt-rsgd-mom-can",
            "geoopt RSGD μ=0.9, Canonical",
            _geoopt_manifold(C),
            _plain(rsgd, momentum=0.9),
            {"regression": 0.03, "brockett": 1.0},
            quick=False,
        ),
        Method(
            "geoopt-rsgd-can",
            "geoopt RSGD, Canonical",
            _geoopt_manifold(C),
            _plain(rsgd),
            {"regression": 0.1, "brockett": 1.0},
            quick=False,
        ),
        Method(
            "geoopt-radam-euc",
            "geoopt RAdam, Euclidean",
            _geoopt_manifold(E),
            _plain(radam),
            {"regression": 10.0, "brockett": 10.0, "copying": 0.03},
            constrained_lr_scale=_radam_rnn_scale(),
        ),
        Method(
            "geoopt-radam-can",
            "geoopt RAdam, Canonical",
            _geoopt_manifold(C),
            _plain(radam),
            {"regression": 10.0, "brockett": 10.0},
            quick=False,
        ),
        Method(
            "torch-expm-adam",
            "torch orthogonal(matrix_exp) + Adam",
            _torch_param("matrix_exp"),
            _plain(torch.optim.Adam),
            {"regression": 0.03, "brockett": 0.01, "copying": 0.03},
            quick=False,
        ),
        Method(
            "torch-cayley-adam",
            "torch orthogonal(cayley) + Adam",
            _torch_param("cayley"),
            _plain(torch.optim.Adam),
            {"regression": 0.03, "brockett": 0.01, "copying": 0.03},
        ),
        Method(
            "geotorch-adam",
            "geotorch orthogonal + Adam",
            _geotorch,
            _plain(torch.optim.Adam),
            {"regression": 0.03, "brockett": 0.01, "copying": 0.03},
            needs="geotorch",
        ),
        Method(
            "tcwy-adam",
            "orthotorch (T-)CWY + Adam",
            _tcwy,
            _plain(torch.optim.Adam),
            {"regression": 3e-3, "brockett": 0.01, "copying": 0.03},
        ),
    ]
    return [m for m in rows if m.needs is None or _available(m.needs)]


def select(items: Sequence[Any], patterns: str | None, what: str) -> list[Any]:
    """Items whose ``key``/``name`` matches one of the comma-separated shell ``patterns``
    (a bare family name such as ``regression`` matches ``regression-*``); all when ``patterns`` is None."""
    if patterns is None:
        return list(items)
    pats = [p.strip() for p in patterns.split(",") if p.strip()]
    out = []
    for it in items:
        key = getattr(it, "key", None) or it.name
        if any(fnmatch.fnmatch(key, p) or fnmatch.fnmatch(key, p + "-*") for p in pats):
            out.append(it)
    if not out:
        names = ", ".join(getattr(it, "key", None) or it.name for it in items)
        raise SystemExit(f"--{what}: {patterns!r} matches none of: {names}")
    return out


# ====================================================================================================
# runs


@dataclass
class RunResult:
    lr: float
    seed: int
    curve: list[tuple[float, float]]  # (clock, metric) checkpoints, the first at (0, metric at X₀)
    steps: int  # steps completed within the budget
    ms_per_step: float  # over every step run (the last may end past the budget)
    time_to_target: float  # NaN: not reached within the budget
    final: float  # metric at the last checkpoint within the budget
    diverged: bool
    wall: dict[str, float] = field(default_factory=dict)  # seconds, keys WALL_PARTS

    WALL_PARTS = ("clock", "setup", "data", "metric and checks")

    @property
    def score(self) -> Score:
        return score_of(self.time_to_target, self.final, self.diverged)


def _groups(
    module: nn.Module, owner: nn.Module, name: str, method: Method, lr: float, square: bool
) -> list[dict[str, Any]]:
    """Constrain ``owner.<name>`` by ``method`` and split ``module``'s parameters into param groups."""
    target = getattr(owner, name)
    rest = [p for p in module.parameters() if p is not target]
    rest_ids = {id(p) for p in rest}
    method.constrain(owner, name, square)
    constrained = [p for p in module.parameters() if id(p) not in rest_ids]
    if not rest:
        return [{"params": constrained}]
    return [{"params": constrained, "lr": lr * method.constrained_lr_scale}, {"params": rest}]


def run_once(pr: Problem, method: Method, lr: float, seed: int, budget: float) -> RunResult:
    """One run of ``method`` at ``lr`` on seed ``seed`` of ``pr`` for ``budget`` seconds of optimizer clock."""
    t_start = time.perf_counter()
    inst = pr.instance(seed)
    torch.manual_seed(seed)  # for any baseline that draws from the global RNG (geotorch's init)
    module, owner, name = inst.build()
    groups = _groups(module, owner, name, method, lr, inst.square)
    opt = method.optimizer(groups, lr, seed)
    cps = checkpoints(budget, pr.linear_checkpoints, pr.geometric_checkpoints)
    t_setup = time.perf_counter()
    curve = [(0.0, inst.metric(module))]
    data_time = 0.0
    clock, steps, ci, diverged = 0.0, 0, 0, False
    steps_in_budget, last = 0, 0.0
    while clock < budget:
        if last > 0.05 * budget and clock + last > budget:
            # a slow method's next step would end past the budget, where it does not count: skip it
            # (fast methods run to the end; their overshoot is negligible)
            break
        t_data = time.perf_counter()
        data = inst.batch(steps)
        t0 = time.perf_counter()
        data_time += t0 - t_data
        opt.zero_grad(set_to_none=True)
        loss = inst.loss(module, data)
        loss.backward()
        opt.step()
        last = time.perf_counter() - t0
        clock += last
        steps += 1
        if clock <= budget:
            steps_in_budget = steps
        if not math.isfinite(float(loss.detach())):
            diverged = True
        if diverged or clock >= cps[ci] or clock >= budget:
            value = inst.metric(module)
            curve.append((clock, value))
            while ci < len(cps) - 1 and cps[ci] <= clock:
                ci += 1
            if not math.isfinite(value) or value > 1e6:
                diverged = True
            if diverged:
                break
    if not diverged and curve[-1][0] < clock:
        curve.append((clock, inst.metric(module)))  # stopped early (skipped step): the final state
    # the step that crosses the budget ran to its end; what it reached is not the method's at the budget
    in_budget = [(t, v) for t, v in curve if t <= budget]
    ttt = time_to_target(curve, pr.target)
    total = time.perf_counter() - t_start
    setup = t_setup - t_start
    wall = {
        "clock": clock,
        "setup": setup,
        "data": data_time,
        "metric and checks": total - setup - data_time - clock,
    }
    return RunResult(
        lr,
        seed,
        curve,
        steps_in_budget,
        1e3 * clock / max(steps, 1),
        ttt if ttt <= budget else math.nan,
        in_budget[-1][1],
        diverged,
        wall,
    )


@dataclass
class MethodResult:
    method: Method
    grid: dict[int, RunResult]  # seed 0
    best: int
    edge: str
    seeds: list[RunResult]  # at the best lr, seed 0 first

    @property
    def lr(self) -> float:
        return lr_value(self.best)

    def times(self) -> list[float]:
        return [r.time_to_target if r.score[0] == 0 else math.inf for r in self.seeds]

    def median_time(self) -> float:
        return statistics.median(self.times())

    def finals(self) -> list[float]:
        return [r.final if not r.diverged else math.inf for r in self.seeds]

    def rank(self) -> tuple[float, float]:
        """Order of methods: median time to target, then median metric at the budget."""
        return (self.median_time(), statistics.median(self.finals()))

    def median_seed(self) -> RunResult:
        """The seed run of median score (the worse of the two middle ones: the conservative curve)."""
        ordered = sorted(self.seeds, key=lambda r: r.score)
        return ordered[len(ordered) // 2]


def race_method(
    pr: Problem, method: Method, *, seeds: int, budget: float, max_points: int, log: bool = True
) -> MethodResult:
    """The lr grid on seed 0 (widened while the best sits on an edge, up to ``max_points``), then the
    best lr on seeds ``1 … seeds − 1``. The centre runs first: when not one step of it fits in the
    budget, no lr can do better and the method gets that single run (edge ``"no step"``)."""
    j0 = lr_index(method.centre[pr.family])
    grid: dict[int, RunResult] = {}

    def run(j: int, seed: int) -> RunResult:
        r = run_once(pr, method, lr_value(j), seed, budget)
        if log:
            s = r.score
            what = (
                f"target at {s[1]:.3g} s"
                if s[0] == 0
                else ("diverged" if s[0] == 2 else f"final {s[1]:.3g}")
            )
            print(
                f"  {pr.name:15s} {method.key:22s} lr={lr_value(j):<7g} seed={seed} {what:22s} "
                f"steps={r.steps} ms/step={r.ms_per_step:.3g}",
                flush=True,
            )
        return r

    def evaluate(j: int) -> Score:
        if j not in grid:
            grid[j] = run(j, 0)
        return grid[j].score

    evaluate(j0)
    if grid[j0].steps == 0 and not grid[j0].diverged:
        return MethodResult(method, grid, j0, "no step", [grid[j0]])
    scores = search_grid(evaluate, j0, max_points=max_points)
    best = best_index(scores)
    runs = [grid[best]] + [run(best, s) for s in range(1, seeds)]
    return MethodResult(method, grid, best, edge_flag(scores), runs)


def warm_up(methods_: Sequence[Method]) -> None:
    """Run every method a few steps on tiny problems first (native kernel build, lazy inits), untimed."""
    tiny = [
        Problem("w-r", "regression", 16, 16, 0.0, 1.0, lambda s: RegressionInstance(16, s), "", ""),
        Problem("w-b", "brockett", 32, 4, 0.0, 1.0, lambda s: BrockettInstance(32, 4, s), "", ""),
    ]
    for m in methods_:
        for pr in tiny:
            inst = pr.instance(0)
            module, owner, name = inst.build()
            opt = m.optimizer(_groups(module, owner, name, m, 1e-3, inst.square), 1e-3, 0)
            for step in range(3):
                opt.zero_grad()
                inst.loss(module, inst.batch(step)).backward()
                opt.step()


def planned_seconds(
    prs: Sequence[Problem], ms: Sequence[Method], seeds: int, budget: float | None, extra: float
) -> float:
    """Optimizer clock the race plans: Σ over (problem, method) of (3 + ``extra`` expected widenings +
    seeds − 1) × budget (checkpoints, data and setup come on top)."""
    return sum(
        (3 + extra + seeds - 1) * (budget or pr.budget) for pr in prs for m in ms if m.runs_on(pr)
    )


# ====================================================================================================
# report


def _fmt_lr(lr: float) -> str:
    return f"{lr:g}"


def _grid_text(res: MethodResult) -> str:
    parts = []
    for j in sorted(res.grid):
        t = _fmt_lr(lr_value(j))
        if res.grid[j].diverged:
            t += "†"
        parts.append(f"**{t}**" if j == res.best else t)
    return ", ".join(parts)


def _time_text(res: MethodResult) -> str:
    times = res.times()
    reached = sum(math.isfinite(t) for t in times)
    med = res.median_time()
    if not math.isfinite(med):
        return f"not reached ({reached}/{len(times)})"
    return f"{fmt(med)} ({reached}/{len(times)})"


def _loss_text(res: MethodResult) -> str:
    finals = res.finals()
    med = statistics.median(finals)
    if len(finals) == 1:
        return fmt(med) if math.isfinite(med) else "diverged"
    lo, hi = min(finals), max(finals)
    return f"{fmt(med)} ({fmt(lo)}–{fmt(hi)})" if math.isfinite(hi) else f"{fmt(med)} (diverged)"


def problem_table(pr: Problem, results: Sequence[MethodResult]) -> str:
    """Markdown table of one problem, best method first."""
    rows = []
    for res in sorted(results, key=lambda r: r.rank()):
        rows.append(
            [
                res.method.name,
                _fmt_lr(res.lr),
                _grid_text(res),
                {"low": "↓ low edge", "high": "↑ high edge"}.get(res.edge, res.edge),
                _time_text(res),
                _loss_text(res),
                str(int(statistics.median(r.steps for r in res.seeds))),
                fmt(statistics.median(r.ms_per_step for r in res.seeds)),
            ]
        )
    return markdown_table(
        [
            "method",
            "best lr",
            "lr grid (seed 0)",
            "edge",
            "time to target, s (median; seeds reached)",
            f"{pr.metric_name} at budget, median (min–max)",
            "steps",
            "ms/step",
        ],
        rows,
    )


def summary_rows(prs: Sequence[Problem], results: dict[str, list[MethodResult]]) -> list[list[str]]:
    """Per problem: the best method and its result, the best orthotorch optimizer and the ratio."""
    rows = []
    for pr in prs:
        rs = sorted(results.get(pr.name, []), key=lambda r: r.rank())
        if not rs:
            continue
        best = rs[0]
        ours = [r for r in rs if r.method.ours]

        def result(r: MethodResult) -> str:
            t = r.median_time()
            if math.isfinite(t):
                return f"{fmt(t)} s"
            return f"not reached ({fmt(statistics.median(r.finals()))})"

        if ours:
            o = ours[0]
            tb, to = best.median_time(), o.median_time()
            if o is best:
                ratio = "ours is best"
            elif math.isfinite(tb) and math.isfinite(to):
                ratio = f"{to / tb:.2g}× slower"
            elif math.isfinite(tb):
                ratio = "ours not reached"
            else:
                ratio = f"final {statistics.median(o.finals()) / statistics.median(best.finals()):.2g}× best"
            ours_cells = [f"{o.method.name} (lr {_fmt_lr(o.lr)})", result(o), ratio]
        else:
            ours_cells = ["–", "–", "–"]
        rows.append(
            [
                f"{pr.name} ({pr.target_text}; {pr.budget:g} s)",
                f"{best.method.name} (lr {_fmt_lr(best.lr)})",
                result(best),
                *ours_cells,
            ]
        )
    return rows


def plot(prs: Sequence[Problem], results: dict[str, list[MethodResult]], path: Path) -> bool:
    """Loss vs optimizer clock, one panel per problem, each method at its best lr (median seed)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    prs = [pr for pr in prs if results.get(pr.name)]
    if not prs:
        return False
    cols = min(4, len(prs))
    nrows = math.ceil(len(prs) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.8 * nrows), squeeze=False)
    names = sorted({r.method.name for rs in results.values() for r in rs})
    cmap = plt.get_cmap("tab20")
    # the dark half of tab20 first: the first ten methods get ten distinct hues
    colour = {name: cmap((2 * i) % 20 + (2 * i) // 20 % 2) for i, name in enumerate(names)}
    for ax, pr in zip(axes.flat, prs):
        for res in sorted(results[pr.name], key=lambda r: r.method.name):
            run = res.median_seed()
            pts = [(t, v) for t, v in run.curve if t <= pr.budget]  # what counts for the race
            ts = [t for t, _ in pts]
            vs = [max(v, 1e-9) for _, v in pts]
            ax.plot(
                ts,
                vs,
                ("-" if res.method.ours else "--") + ("o" if len(pts) == 1 else ""),
                color=colour[res.method.name],
                label=f"{res.method.name} ({_fmt_lr(res.lr)})",
                linewidth=1.6 if res.method.ours else 1.1,
            )
        ax.axhline(pr.target, color="grey", linewidth=0.8, linestyle=":")
        ax.set_yscale("log")
        ax.set_xlim(0, pr.budget)
        ax.set_title(f"{pr.name}: {pr.metric_name}", fontsize=9)
        ax.set_xlabel("optimizer clock (s)")
        ax.legend(fontsize=5.5)
    for ax in list(axes.flat)[len(prs) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def ours_defaults() -> str:
    """The orthotorch optimizers' defaults that shape a step, as markdown (from the signature)."""
    params = inspect.signature(OrthogonalSGD.__init__).parameters
    keys = ("sampler", "matchings_per_step", "tall_step", "nonfinite")
    return ", ".join(f"`{k}={params[k].default!r}`" for k in keys if k in params)


def tall_step_note() -> str:
    """The optimizers' constructor options about tall weights (a tall-weight route; its forced-Givens
    rows go in :func:`methods` through :func:`ours_rows`), or ``"none"``."""
    names = {
        n
        for cls in (OrthogonalSGD, OrthogonalAdam)
        for n in inspect.signature(cls.__init__).parameters
        if "tall" in n
    }
    return ", ".join(f"`{n}`" for n in sorted(names)) or "none"


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=(__doc__ or "").splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--quick", action="store_true", help="3 problems, 8 methods, 1 seed (≤ 5 min)")
    ap.add_argument("--problems", help="comma-separated patterns, e.g. 'regression,brockett-16'")
    ap.add_argument("--methods", help="comma-separated patterns over method keys, e.g. 'ours-*'")
    ap.add_argument(
        "--budget", type=float, help="seconds of optimizer clock per run (all problems)"
    )
    ap.add_argument("--seeds", type=int, help="seeds at the chosen lr (default 2; 1 with --quick)")
    ap.add_argument(
        "--max-grid", type=int, help="lr grid points per method at most (default 6; 5 quick)"
    )
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    ap.add_argument("--list", action="store_true", help="list problems and methods, then exit")
    ap.add_argument(
        "--out", type=Path, default=DOCS, help="output directory (default docs/benchmarks)"
    )
    args = ap.parse_args(argv)
    for flag in ("budget", "seeds", "max_grid", "threads"):
        v = getattr(args, flag)
        if v is not None and v <= 0:
            ap.error(f"--{flag.replace('_', '-')} must be positive, got {v}")
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)
    quick = args.quick
    all_methods = methods()
    if args.list:
        for pr in problems(quick):
            print(f"problem {pr.name:15s} target {pr.target_text}, budget {pr.budget:g} s")
        for m in all_methods:
            print(f"method  {m.key:22s} {m.name}; centres {m.centre}")
        return
    prs = select(problems(quick), args.problems, "problems")
    ms = [m for m in all_methods if m.quick or not quick]
    ms = select(all_methods if args.methods else ms, args.methods, "methods")
    seeds = args.seeds or (1 if quick else 2)
    max_points = args.max_grid or (5 if quick else 6)
    custom = any(
        v is not None for v in (args.problems, args.methods, args.budget, args.seeds, args.max_grid)
    )
    tag = "custom" if custom else ("quick" if quick else "")
    plan = planned_seconds(prs, ms, seeds, args.budget, extra=0.7)
    print(
        f"planned optimizer clock ≈ {plan / 60:.1f} min (+ setup, data and checkpoints)", flush=True
    )

    t_start = time.perf_counter()
    warm_up(ms)
    results: dict[str, list[MethodResult]] = {}
    for pr in prs:
        budget = args.budget or pr.budget
        pr.budget = budget
        for m in ms:
            if m.runs_on(pr):
                res = race_method(pr, m, seeds=seeds, budget=budget, max_points=max_points)
                results.setdefault(pr.name, []).append(res)
        pr._cache.clear()
    total = time.perf_counter() - t_start

    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"{AREA}.{tag}" if tag else AREA
    png = args.out / f"{stem}.png"
    have_png = plot(prs, results, png)
    all_runs = [
        run for rs in results.values() for r in rs for run in [*r.grid.values(), *r.seeds[1:]]
    ]
    n_runs = len(all_runs)
    parts = {key: sum(run.wall.get(key, 0.0) for run in all_runs) for key in RunResult.WALL_PARTS}
    split = ", ".join(f"{key} {v / 60:.1f}" for key, v in parts.items())
    cmd = "python benchmarks/optimizers.py" + (" " + " ".join(sys.argv[1:]) if argv is None else "")
    lines = [
        f"# Optimizer race ({tag or 'full'})",
        "",
        env_header(extra=("geotorch",)),
        f"- command: `{cmd}`; wall time {total / 60:.1f} min for {n_runs} runs "
        f"(planned optimizer clock {plan / 60:.1f} min); in the runs, minutes of {split}",
        f"- seeds at the chosen lr: {seeds}"
        + (" (one seed only: a quick look, not a result)" if seeds == 1 else "")
        + f"; lr grid on seed 0, at most {max_points} points per method; float32",
        f"- tall-weight options of OrthogonalSGD/OrthogonalAdam: {tall_step_note()}",
        "",
        "Protocol (the script's docstring has it in full): each method's lr comes from a grid a factor ≈ 3",
        "apart that must bracket its best (widened automatically; `↓`/`↑ edge` = still on an edge at the",
        "cap; `flat` = the grid's scores tie; `no step` = not one step fitted in the budget, so only",
        "one run; `†` = diverged); the",
        "score is the time to target, else the metric at the end of the budget.",
        "Every run gets the same optimizer clock (forward, gradient, step; not the data or the metric,",
        "which is evaluated at fixed clock checkpoints). Same initial point and data stream for every",
        f"method on a seed. The orthotorch optimizers use their defaults ({ours_defaults()}) unless",
        "the row says otherwise; geoopt, torch and geotorch theirs. On the copying RNN one lr serves",
        "all parameters (geoopt RAdam: × 128 on the recurrent matrix, see the source).",
        "",
        "## Summary",
        "",
        markdown_table(
            [
                "problem (target; budget)",
                "best method",
                "its time to target",
                "best orthotorch optimizer",
                "its time",
                "ours vs best",
            ],
            summary_rows(prs, results),
        ),
        "",
    ]
    for pr in prs:
        if pr.name not in results:
            continue
        lines += [
            f"## {pr.name}: {pr.target_text}, budget {pr.budget:g} s",
            "",
            problem_table(pr, results[pr.name]),
            "",
        ]
    if have_png:
        lines += [f"![metric vs optimizer clock]({png.name})", ""]
    body = "\n".join(lines)
    path = args.out / f"{stem}.md"
    path.write_text(body)
    print(body)
    print(f"wrote {path}" + (f" and {png}" if have_png else ""))


if __name__ == "__main__":
    main()
