"""Meta-training loops and experiments behind ``orthotorch bilevel``, the example and the benchmark.

- :func:`meta_train`: MAML-style meta-training of an ``nn.Module`` with exact / FOM / UFOM
  hypergradients (vectorised over the meta-batch), stopping at an iteration count or a compute budget
  measured in gradient-evaluation units (an HVP counts ``hvp_cost`` gradients).
- :func:`evaluate_fewshot`, :func:`evaluate_regression`: adapt on each test task's support set with
  the same inner SGD, score on its query set; mean and 95% confidence half-width over tasks.
- :func:`digits_experiment`, :func:`sinusoid_experiment`: exact vs FOM vs UFOM at stated budgets, one
  protocol (:func:`compare_methods`) for both.
- :func:`fom_counterexample`: a two-task problem where FOM-SGD converges to a non-stationary point.
- :func:`plot_results`, :func:`plot_counterexample`: figures with 95% confidence intervals and one
  colour per method (:func:`method_colour`) in every panel and figure.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from orthotorch._validation import check_choice, check_positive_int, check_real
from orthotorch.apps.bilevel.tasks import DigitsFewShot, SinusoidTasks, digits_mlp, sinusoid_mlp
from orthotorch.bilevel import (
    METHODS,
    UFOMController,
    hypergradient,
    hypergradient_vmap,
    inner_adapt,
    module_params,
)

__all__ = [
    "CounterexampleResult",
    "Panel",
    "RunResult",
    "compare_methods",
    "counterexample_problem",
    "digits_experiment",
    "evaluate_fewshot",
    "evaluate_regression",
    "fom_counterexample",
    "meta_train",
    "method_colour",
    "plot_counterexample",
    "plot_results",
    "sinusoid_experiment",
]

SampleFn = Callable[[int, torch.Generator], tuple[Any, Any]]
DataLoss = Callable[[Any, Any], Tensor]


@dataclass
class RunResult:
    """One meta-training run.

    Attributes:
        label: a short name (``"exact"``, ``"fom (50%)"``, ``"ufom q=0.1 (50%)"``, ...).
        method: the hypergradient method (``"-"`` for the untrained baseline).
        q: UFOM's final q (``None`` for other methods).
        iterations: meta-iterations made.
        cost: compute spent, in gradient-evaluation units (HVP = ``hvp_cost`` gradients).
        wall_s: wall-clock seconds of training (evaluation excluded).
        metric: final evaluation (accuracy in % or query MSE), ``ci``: its 95% half-width over the
            evaluation tasks.
        curve: ``(cost, metric, ci)`` at each evaluation.
    """

    label: str
    method: str
    q: float | None
    iterations: int
    cost: float
    wall_s: float
    metric: float = float("nan")
    ci: float = float("nan")
    curve: list[tuple[float, float, float]] = field(default_factory=list)


class _Progress:
    """A tqdm bar with an integer total that never runs past it (hidden when not ``enabled``)."""

    def __init__(self, total: float, desc: str, enabled: bool) -> None:
        from tqdm.auto import tqdm  # optional dependency of the applications

        self.total = max(1, math.ceil(total))
        self.n = 0
        self.bar = tqdm(total=self.total, desc=desc, disable=not enabled, leave=False, unit="")

    def to(self, done: float) -> None:
        """Advance the bar to ``min(total, ⌈done⌉)``."""
        n = min(self.total, math.ceil(done))
        if n > self.n:
            self.bar.update(n - self.n)
            self.n = n

    def close(self) -> None:
        self.bar.close()


def _resolve_q(
    method: str, q: object, floor: float, hvp_cost: float
) -> float | UFOMController | None:
    if method != "ufom":
        return None
    if q == "adaptive":
        return UFOMController(0.2, floor=floor, hvp_cost=hvp_cost)
    if isinstance(q, str):
        raise ValueError(
            f"`q` must be a float in (0, 1] or 'adaptive' for method='ufom', got {q!r}"
        )
    return check_real("q", q, minimum=0.0, min_inclusive=False, maximum=1.0)


def meta_train(
    model: nn.Module,
    sample: SampleFn,
    loss: DataLoss,
    *,
    method: str,
    steps: int,
    inner_lr: float,
    meta_lr: float = 1e-3,
    meta_batch: int = 16,
    iterations: int | None = None,
    budget: float | None = None,
    q: float | str | None = None,
    floor: float = 0.05,
    coin: str = "task",
    generator: torch.Generator,
    evaluate: Callable[[nn.Module], tuple[float, float]] | None = None,
    eval_every: int | None = None,
    hvp_cost: float = 2.0,
    label: str | None = None,
    progress: bool = False,
) -> RunResult:
    """Meta-train ``model`` in place with Adam on hypergradients; stop at ``iterations`` or ``budget``.

    Args:
        model: the network; its (unconstrained) parameters are θ.
        sample: ``(n_tasks, generator) -> (inner_data, outer_data)``, each a tuple of ``(T, ...)``
            tensors (see :func:`~orthotorch.bilevel.hypergradient_vmap`).
        loss: ``(params dict, data) -> scalar`` for one task's data.
        method: ``"exact"``, ``"fom"``, ``"ufom"`` or ``"unrolled"``.
        steps, inner_lr: the inner loop (r, α).
        meta_lr: Adam learning rate on θ; meta_batch: tasks per meta-iteration (>= 1).
        iterations, budget: stop after this many meta-iterations (>= 1) and/or once the compute
            spent (gradient-evaluation units, finite and > 0) reaches ``budget``; at least one is
            required.
        q: UFOM's probability (float) or ``"adaptive"`` (a :class:`UFOMController`, starting at 0.2).
        floor: the adaptive controller's floor.
        coin: UFOM's coin, ``"task"`` or ``"batch"`` (see
            :func:`~orthotorch.bilevel.hypergradient_vmap`).
        generator: drives task sampling and UFOM's coins.
        evaluate: ``model -> (metric, ci)``, called every ``eval_every`` iterations and at the end.
        hvp_cost: HVP cost in gradient units, for the budget.
        label: name in the results (default: the method and q).
        progress: show a progress bar over the budget (or the iterations), integer total.

    Raises:
        ValueError: neither ``iterations`` nor ``budget``, a non-finite or non-positive ``budget``,
            ``iterations < 1``, an unknown ``method``, a bad ``q``.
    """
    check_choice("method", method, METHODS)
    if iterations is None and budget is None:
        raise ValueError("meta_train needs `iterations` or `budget` (or both)")
    if iterations is not None:
        iterations = check_positive_int("iterations", iterations)
    if budget is not None:  # NaN or inf would never be reached: the loop would not stop
        budget = check_real("budget", budget, minimum=0.0, min_inclusive=False)
    meta_batch = check_positive_int("meta_batch", meta_batch)
    controller = _resolve_q(method, q, floor, hvp_cost)
    if label is None:
        label = method if method != "ufom" else f"ufom q={q}"
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = torch.optim.Adam([p for _, p in named], lr=meta_lr)
    spent, it, wall = 0.0, 0, 0.0
    curve: list[tuple[float, float, float]] = []
    bar = _Progress(budget if budget is not None else float(iterations or 0), label, progress)
    try:
        while (iterations is None or it < iterations) and (budget is None or spent < budget):
            t0 = time.perf_counter()
            inner_data, outer_data = sample(meta_batch, generator)
            grads, info = hypergradient_vmap(
                loss,
                module_params(model),
                inner_data,
                outer_data,
                steps=steps,
                lr=inner_lr,
                method=method,
                q=controller,
                generator=generator,
                coin=coin if method == "ufom" else "task",
                return_info=True,
            )
            opt.zero_grad(set_to_none=True)
            for n, p in named:
                p.grad = grads[n].to(p.dtype)
            opt.step()
            wall += time.perf_counter() - t0
            it += 1
            spent += info.cost(hvp_cost)
            bar.to(spent if budget is not None else it)
            if evaluate is not None and eval_every and it % eval_every == 0:
                curve.append((spent, *evaluate(model)))
    finally:
        bar.close()
    q_final = controller.q if isinstance(controller, UFOMController) else controller
    res = RunResult(label=label, method=method, q=q_final, iterations=it, cost=spent, wall_s=wall)
    if evaluate is not None:
        res.metric, res.ci = evaluate(model)
        curve.append((spent, res.metric, res.ci))
    res.curve = curve
    return res


def _functional_loss(model: nn.Module, fn: Callable[[Tensor, Tensor], Tensor]) -> DataLoss:
    """``(params, (x, y)) -> fn(model(x) with params, y)``."""

    def loss(p: Any, d: Any) -> Tensor:
        x, y = d
        return fn(torch.func.functional_call(model, p, (x,)), y)

    return loss


def _ce_loss(model: nn.Module) -> DataLoss:
    return _functional_loss(model, F.cross_entropy)


def _mse_loss(model: nn.Module) -> DataLoss:
    return _functional_loss(model, F.mse_loss)


def _adapted_predictions(
    model: nn.Module,
    loss: DataLoss,
    support: tuple[Tensor, Tensor],
    xq: Tensor,
    steps: int,
    lr: float,
) -> Tensor:
    """Adapt θ on each task's support set (vmapped :func:`~orthotorch.bilevel.inner_adapt`), then
    predict its queries: ``(T, Q, ...)``."""
    theta = module_params(model)

    def adapt(*d: Tensor) -> dict[str, Tensor]:
        return inner_adapt(lambda p: loss(p, d), theta, steps=steps, lr=lr)

    with torch.no_grad():
        phi = torch.func.vmap(adapt)(*support)
        return torch.func.vmap(lambda p, x: torch.func.functional_call(model, p, (x,)))(phi, xq)


def _mean_ci(values: Tensor) -> tuple[float, float]:
    """Mean and 95% half-width (normal approximation) over the entries of ``values``."""
    n = values.numel()
    mean = float(values.mean())
    ci = 1.96 * float(values.std()) / math.sqrt(n) if n > 1 else float("nan")
    return mean, ci


def evaluate_fewshot(
    model: nn.Module,
    tasks: DigitsFewShot,
    *,
    ways: int,
    shots: int,
    steps: int,
    inner_lr: float,
    n_tasks: int = 400,
    queries: int = 15,
    generator: torch.Generator,
    chunk: int = 100,
) -> tuple[float, float]:
    """Mean query accuracy (%) after ``steps`` inner SGD steps, and its 95% half-width over tasks."""
    n_tasks, chunk = check_positive_int("n_tasks", n_tasks), check_positive_int("chunk", chunk)
    loss = _ce_loss(model)
    accs = []
    for done in range(0, n_tasks, chunk):
        t = min(chunk, n_tasks - done)
        xs, ys, xq, yq = tasks.sample(
            t, ways=ways, shots=shots, queries=queries, generator=generator
        )
        logits = _adapted_predictions(model, loss, (xs, ys), xq, steps, inner_lr)
        accs.append((logits.argmax(-1) == yq).double().mean(-1) * 100.0)
    return _mean_ci(torch.cat(accs))


def evaluate_regression(
    model: nn.Module,
    tasks: SinusoidTasks,
    *,
    shots: int,
    steps: int,
    inner_lr: float,
    n_tasks: int = 400,
    queries: int = 50,
    generator: torch.Generator,
) -> tuple[float, float]:
    """Mean query MSE after ``steps`` inner SGD steps on the support set, and its 95% half-width."""
    xs, ys, xq, yq = tasks.sample(n_tasks, shots=shots, queries=queries, generator=generator)
    pred = _adapted_predictions(model, _mse_loss(model), (xs, ys), xq, steps, inner_lr)
    return _mean_ci((pred - yq).pow(2).mean(dim=(-1, -2)).double())


# --------------------------------------------------------------------------------------------------


def compare_methods(
    fresh: Callable[[], nn.Module],
    sample: SampleFn,
    make_loss: Callable[[nn.Module], DataLoss],
    evaluate: Callable[[nn.Module], tuple[float, float]],
    *,
    steps: int,
    inner_lr: float,
    meta_lr: float = 1e-3,
    meta_batch: int = 16,
    exact_iterations: int = 300,
    ufom_q: float | str = 0.1,
    ufom_coins: Sequence[str] = ("task",),
    ufom_budget_fraction: float = 0.5,
    seed: int = 0,
    baseline: bool = False,
    progress: bool = False,
) -> list[RunResult]:
    """The protocol of :func:`digits_experiment` and :func:`sinusoid_experiment`.

    Exact runs ``exact_iterations`` meta-iterations and its compute C is measured; UFOM (one run per
    entry of ``ufom_coins``) and FOM then train until they have spent ``ufom_budget_fraction · C``, and
    FOM once more until C. Every run starts from ``fresh()`` and sees the task stream of the same seed.
    With ``baseline``, a last row scores the untrained initialisation adapted the same way.

    Args:
        fresh: builds the initial model (the same one every call).
        sample: ``(n_tasks, generator) -> (inner_data, outer_data)`` (see :func:`meta_train`).
        make_loss: ``model -> (params, data) -> scalar``.
        evaluate: ``model -> (metric, 95% half-width)``.
        steps, inner_lr, meta_lr, meta_batch: as in :func:`meta_train`.
        exact_iterations: exact's meta-iterations (>= 1).
        ufom_q: UFOM's q (a float in (0, 1]) or ``"adaptive"``.
        ufom_coins: ``"task"`` and/or ``"batch"``.
        ufom_budget_fraction: the budget of UFOM and the first FOM run, a fraction of exact's
            compute (finite, > 0).
        seed: seeds the task stream and UFOM's coins (the model's seed is ``fresh``'s business).
        progress: progress bars.
    """
    exact_iterations = check_positive_int("exact_iterations", exact_iterations)
    fraction = check_real(
        "ufom_budget_fraction", ufom_budget_fraction, minimum=0.0, min_inclusive=False
    )
    for c in ufom_coins:
        check_choice("ufom_coins[...]", c, ("task", "batch"))
    common: dict[str, Any] = dict(
        steps=steps,
        inner_lr=inner_lr,
        meta_lr=meta_lr,
        meta_batch=meta_batch,
        evaluate=evaluate,
        progress=progress,
    )

    def train(method: str, label: str, **kw: Any) -> RunResult:
        model = fresh()
        return meta_train(
            model,
            sample,
            make_loss(model),
            method=method,
            label=label,
            generator=torch.Generator().manual_seed(seed + 1),
            **common,
            **kw,
        )

    results = [train("exact", "exact", iterations=exact_iterations)]
    full = results[0].cost
    pct = f"{fraction:.0%}"
    for c in ufom_coins:
        tag = "" if c == "task" else " batch coin"
        label = f"ufom q={ufom_q}{tag} ({pct})"
        results.append(train("ufom", label, q=ufom_q, coin=c, budget=full * fraction))
    results.append(train("fom", f"fom ({pct})", budget=full * fraction))
    results.append(train("fom", "fom (100%)", budget=full))
    if baseline:
        metric, ci = evaluate(fresh())
        results.append(RunResult("no meta-training", "-", None, 0, 0.0, 0.0, metric, ci))
    return results


def digits_experiment(
    *,
    shots: int = 1,
    ways: int = 5,
    steps: int = 10,
    inner_lr: float = 0.1,
    meta_lr: float = 1e-3,
    meta_batch: int = 16,
    exact_iterations: int = 300,
    ufom_q: float | str = 0.1,
    ufom_budget_fraction: float = 0.5,
    ufom_coins: Sequence[str] = ("task",),
    eval_tasks: int = 400,
    hidden: int = 64,
    class_split: str = "random",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> list[RunResult]:
    """5-way K-shot digits: exact, UFOM and FOM (both at ``ufom_budget_fraction`` of exact's compute).

    The protocol is :func:`compare_methods` (``ufom_coins`` lists the UFOM variants: ``"task"``, a
    coin per task, ``"batch"``, one per meta-batch). Meta-test tasks use the held-out classes (see
    :class:`~orthotorch.apps.bilevel.tasks.DigitsFewShot` for ``class_split``). The last row is the
    untrained initialisation adapted the same way.
    """
    train = DigitsFewShot("train", class_split=class_split, dtype=dtype, device=device)
    test = DigitsFewShot("test", class_split=class_split, dtype=dtype, device=device)

    def sample(n: int, gen: torch.Generator) -> tuple[Any, Any]:
        xs, ys, xq, yq = train.sample(n, ways=ways, shots=shots, queries=15, generator=gen)
        return (xs, ys), (xq, yq)

    def fresh() -> nn.Module:
        gen = torch.Generator().manual_seed(seed)
        return digits_mlp(hidden, ways, generator=gen, dtype=dtype).to(device)

    def evaluate(model: nn.Module) -> tuple[float, float]:
        return evaluate_fewshot(
            model,
            test,
            ways=ways,
            shots=shots,
            steps=steps,
            inner_lr=inner_lr,
            n_tasks=eval_tasks,
            generator=torch.Generator().manual_seed(10_000),
        )

    return compare_methods(
        fresh,
        sample,
        _ce_loss,
        evaluate,
        steps=steps,
        inner_lr=inner_lr,
        meta_lr=meta_lr,
        meta_batch=meta_batch,
        exact_iterations=exact_iterations,
        ufom_q=ufom_q,
        ufom_coins=ufom_coins,
        ufom_budget_fraction=ufom_budget_fraction,
        seed=seed,
        baseline=True,
        progress=progress,
    )


def sinusoid_experiment(
    *,
    shots: int = 10,
    steps: int = 5,
    inner_lr: float = 0.02,
    meta_lr: float = 1e-3,
    meta_batch: int = 16,
    exact_iterations: int = 300,
    ufom_q: float | str = 0.1,
    ufom_budget_fraction: float = 0.5,
    ufom_coins: Sequence[str] = ("task",),
    eval_tasks: int = 400,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> list[RunResult]:
    """Sinusoid regression (MAML's toy problem): exact, UFOM and FOM at stated compute budgets.

    Same protocol as :func:`digits_experiment` (:func:`compare_methods`, no baseline row); the metric
    is the query MSE after adaptation.
    """
    tasks = SinusoidTasks(dtype=dtype, device=device)

    def sample(n: int, gen: torch.Generator) -> tuple[Any, Any]:
        xs, ys, xq, yq = tasks.sample(n, shots=shots, queries=shots, generator=gen)
        return (xs, ys), (xq, yq)

    def fresh() -> nn.Module:
        return sinusoid_mlp(generator=torch.Generator().manual_seed(seed), dtype=dtype).to(device)

    def evaluate(model: nn.Module) -> tuple[float, float]:
        return evaluate_regression(
            model,
            tasks,
            shots=shots,
            steps=steps,
            inner_lr=inner_lr,
            n_tasks=eval_tasks,
            generator=torch.Generator().manual_seed(10_000),
        )

    return compare_methods(
        fresh,
        sample,
        _mse_loss,
        evaluate,
        steps=steps,
        inner_lr=inner_lr,
        meta_lr=meta_lr,
        meta_batch=meta_batch,
        exact_iterations=exact_iterations,
        ufom_q=ufom_q,
        ufom_coins=ufom_coins,
        ufom_budget_fraction=ufom_budget_fraction,
        seed=seed,
        progress=progress,
    )


# --------------------------------------------------------------------------------------------------


@dataclass
class CounterexampleResult:
    """Outcome of :func:`fom_counterexample`: final iterates and true-objective gradients per method.

    ``final[m]`` and ``grad_norm[m]`` hold one value per seed; ``trajectories[m]`` the iterates of
    every seed, ``(seeds, sgd_steps + 1)``.
    """

    theta_star: float
    theta_fom_fixed_point: float
    final: dict[str, list[float]]
    grad_norm: dict[str, list[float]]
    trajectories: dict[str, Tensor]  # (seeds, sgd_steps + 1) float64 iterates per method


def counterexample_problem(
    *, steps: int = 5, lr: float = 0.1, contraction: float = 0.1
) -> tuple[list[tuple[Callable, Callable]], Callable[[float], float], float, float]:
    """Two tasks where FOM's fixed point is not stationary for the true meta-objective.

    Task 1: ``L_in = 0`` (no adaptation, s_1 = 1), ``L_out = ½(φ − 1)²``. Task 2:
    ``L_in = ½aφ²`` with ``(1 − αa)^r = s_2 = contraction``, ``L_out = ½(φ + 1)²``. Then
    ``φ_r = s_i θ`` and the meta-objective ``F(θ) = ½ Σ_i ½(s_i θ − b_i)²`` (b = (1, −1)) has

        F'(θ) = ½ Σ s_i (s_i θ − b_i),   θ* = Σ s_i b_i / Σ s_i²,

    while the FOM direction ``½ Σ (s_i θ − b_i)`` vanishes at ``θ_F = Σ b_i / Σ s_i = 0``, where
    ``F'(0) = −½ Σ s_i b_i = −(1 − s_2)/2 ≠ 0``.

    Returns:
        ``(tasks, F', θ*, θ_F)`` with ``tasks`` as ``(inner_loss, outer_loss)`` pairs on a 1-element
        float64 tensor.
    """
    a = (1.0 - contraction ** (1.0 / steps)) / lr
    s = [1.0, contraction]
    b = [1.0, -1.0]
    tasks = [
        (lambda p: 0.0 * p.sum(), lambda p: 0.5 * (p - b[0]).pow(2).sum()),
        (lambda p: 0.5 * a * p.pow(2).sum(), lambda p: 0.5 * (p - b[1]).pow(2).sum()),
    ]

    def dF(theta: float) -> float:
        return 0.5 * sum(si * (si * theta - bi) for si, bi in zip(s, b))

    theta_star = sum(si * bi for si, bi in zip(s, b)) / sum(si * si for si in s)
    theta_fom = sum(b) / sum(s)
    return tasks, dF, theta_star, theta_fom


def fom_counterexample(
    *,
    sgd_steps: int = 3000,
    seeds: Sequence[int] = (0, 1, 2, 3, 4),
    q: float = 0.2,
    lr0: float = 0.5,
    steps: int = 5,
    inner_lr: float = 0.1,
    progress: bool = False,
) -> CounterexampleResult:
    """SGD on θ with one random task per step and step size ``lr0/(1 + t/100)`` (Robbins–Monro).

    Runs FOM, UFOM (fixed ``q``) and exact hypergradients from θ_0 = 2 for each seed; reports the
    final θ (the average of the last half of the iterates) and |F'(θ)| of the true meta-objective.
    FOM settles at θ_F = 0 with |F'| = (1 − s_2)/2; UFOM and exact reach θ* (|F'| → 0).
    """
    sgd_steps = check_positive_int("sgd_steps", sgd_steps)
    if not seeds:
        raise ValueError("`seeds` must list at least one seed, got none")
    tasks, dF, theta_star, theta_fom = counterexample_problem(steps=steps, lr=inner_lr)
    final: dict[str, list[float]] = {}
    gnorm: dict[str, list[float]] = {}
    paths: dict[str, list[Tensor]] = {}
    runs = [(m, s) for m in ("fom", "ufom", "exact") for s in seeds]
    bar = _Progress(len(runs), "counterexample", progress)
    for done, (method, seed) in enumerate(runs, start=1):
        gen = torch.Generator().manual_seed(seed)
        theta = torch.full((1,), 2.0, dtype=torch.float64)
        path = torch.empty(sgd_steps + 1, dtype=torch.float64)
        path[0] = theta[0]
        picks = torch.randint(0, len(tasks), (sgd_steps,), generator=gen).tolist()
        for t, i in enumerate(picks):
            inner, outer = tasks[i]
            g = hypergradient(
                inner,
                outer,
                theta,
                steps=steps,
                lr=inner_lr,
                method=method,
                q=q if method == "ufom" else None,
                generator=gen if method == "ufom" else None,
                check_finite=False,
            )
            theta = theta - lr0 / (1.0 + t / 100.0) * g
            path[t + 1] = theta[0]
        th = float(path[sgd_steps // 2 :].mean())  # tail (Polyak) average of the iterates
        final.setdefault(method, []).append(th)
        gnorm.setdefault(method, []).append(abs(dF(th)))
        paths.setdefault(method, []).append(path)
        bar.to(done)
    bar.close()
    traj = {m: torch.stack(p) for m, p in paths.items()}
    return CounterexampleResult(theta_star, theta_fom, final, gnorm, traj)


#: One colour per method family, the same in every panel and figure (matplotlib's tab10 names).
_COLOURS = {
    "exact": "tab:blue",
    "ufom": "tab:orange",
    "ufom batch": "tab:brown",
    "fom": "tab:red",
    "fom 100%": "tab:purple",
    "baseline": "tab:gray",
}


def method_colour(label: str) -> str:
    """The colour of a run in every figure, from its label (``"ufom q=0.1 batch coin (50%)"``...)."""
    if label.startswith("exact") or label == "unrolled":
        return _COLOURS["exact"]
    if label.startswith("ufom"):
        return _COLOURS["ufom batch" if "batch" in label else "ufom"]
    if label.startswith("fom"):
        return _COLOURS["fom 100%" if "100%" in label else "fom"]
    return _COLOURS["baseline"]


@dataclass
class Panel:
    """One panel of :func:`plot_results`: a title, the metric's name and the runs to compare.

    ``log_x`` plots the metric on a log axis (query MSE, whose outliers span decades).
    """

    title: str
    metric: str
    results: Sequence[RunResult]
    log_x: bool = False


def _pyplot() -> Any:
    try:
        import matplotlib  # optional dependency (extra `bench`)

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("plots need matplotlib: pip install 'orthotorch[bench]'") from exc
    return plt


def plot_results(panels: Sequence[Panel], path: str) -> None:
    """Save the final metric of every run with its 95% confidence interval, one panel per task.

    Each panel lists the runs top to bottom (label, with the compute relative to the first run where
    the label does not state it), a dot at the metric and a bar over its 95% interval over evaluation
    tasks; a run's colour is :func:`method_colour` of its label, so a method keeps its colour across
    panels. On a log axis an interval that reaches 0 is drawn to the panel's left edge.
    """
    plt = _pyplot()
    rows = max(len(p.results) for p in panels)
    fig, axes = plt.subplots(
        1, len(panels), figsize=(5.4 * len(panels), 0.42 * rows + 1.4), squeeze=False
    )
    for ax, panel in zip(axes[0], panels):
        ref = panel.results[0].cost or 1.0
        ys = list(range(len(panel.results)))[::-1]
        # on a log axis an interval reaching 0 is drawn to the left edge, half the smallest metric
        edge = 0.5 * min(r.metric for r in panel.results) if panel.log_x else -math.inf
        names = []
        for y, r in zip(ys, panel.results):
            lo = min(r.ci, r.metric - edge)
            ax.errorbar(
                r.metric,
                y,
                xerr=[[lo], [r.ci]],
                fmt="o",
                ms=5,
                color=method_colour(r.label),
                capsize=3,
                lw=1.5,
            )
            share = "" if r.method == "-" or "%" in r.label else f" ({100 * r.cost / ref:.0f}%)"
            names.append(r.label + share)
        if panel.log_x:
            ax.set_xscale("log")
            ax.set_xlim(left=edge)
        ax.set_yticks(ys, names, fontsize=8)
        ax.set_ylim(-0.6, len(panel.results) - 0.4)
        ax.set_xlabel(f"{panel.metric} (95% CI over test tasks)")
        ax.set_title(panel.title)
        ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _t95(n: int) -> float:
    """Two-sided 95% quantile of Student's t with ``n − 1`` degrees of freedom (n >= 2)."""
    table = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571, 7: 2.447, 8: 2.365, 9: 2.306}
    return table.get(n, 1.96 + 2.5 / max(n - 1, 1))


def plot_counterexample(res: CounterexampleResult, path: str) -> None:
    """Save θ against the SGD step for each method: mean over seeds and its 95% band (t-interval)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for method, paths in res.trajectories.items():
        n = paths.shape[0]
        mean = paths.mean(0).numpy()
        steps = range(len(mean))
        colour = method_colour(method)
        label = f"{method} (mean of {n} seeds)" if n > 1 else method
        ax.plot(steps, mean, color=colour, lw=1.2, label=label)
        if n > 1:
            half = (_t95(n) * paths.std(0) / math.sqrt(n)).numpy()
            ax.fill_between(steps, mean - half, mean + half, color=colour, alpha=0.2, lw=0)
    ax.axhline(res.theta_star, color="k", ls="--", lw=0.8, label="θ* (stationary)")
    ax.axhline(res.theta_fom_fixed_point, color="gray", ls=":", lw=0.8, label="FOM fixed point θ_F")
    ax.set_xlabel("SGD step (one random task per step)")
    ax.set_ylabel("θ (band: 95% CI over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
