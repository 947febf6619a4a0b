"""Meta-training loops and experiments behind ``orthotorch bilevel``, the example and the benchmark.

- :func:`meta_train`: MAML-style meta-training of an ``nn.Module`` with exact / FOM / UFOM
  hypergradients (vectorised over the meta-batch), stopping at an iteration count or a compute budget
  measured in gradient-evaluation units (an HVP counts ``hvp_cost`` gradients).
- :func:`evaluate_fewshot`, :func:`evaluate_regression`: adapt on each test task's support set with
  the same inner SGD, score on its query set; mean and 95% confidence half-width over tasks.
- :func:`digits_experiment`, :func:`sinusoid_experiment`: exact vs FOM vs UFOM at stated budgets.
- :func:`fom_counterexample`: a two-task problem where FOM-SGD converges to a non-stationary point.
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

from orthotorch.bilevel.hypergrad import hypergradient, hypergradient_vmap
from orthotorch.bilevel.module import module_params
from orthotorch.apps.bilevel.tasks import DigitsFewShot, SinusoidTasks, digits_mlp, sinusoid_mlp
from orthotorch.bilevel.ufom import UFOMController

__all__ = [
    "CounterexampleResult",
    "RunResult",
    "counterexample_problem",
    "digits_experiment",
    "evaluate_fewshot",
    "evaluate_regression",
    "fom_counterexample",
    "meta_train",
    "plot_curves",
    "sinusoid_experiment",
]

SampleFn = Callable[[int, torch.Generator], tuple[Any, Any]]


@dataclass
class RunResult:
    """One meta-training run.

    Attributes:
        label: a short name (``"exact"``, ``"fom"``, ``"ufom q=0.1"``, ...).
        method: the hypergradient method.
        q: UFOM's final q (``None`` for other methods).
        iterations: meta-iterations made.
        cost: compute spent, in gradient-evaluation units (HVP = ``hvp_cost`` gradients).
        wall_s: wall-clock seconds of training (evaluation excluded).
        metric: final evaluation (accuracy in % or query MSE), ``ci``: its 95% half-width.
        curve: ``(cost, metric)`` at each evaluation.
    """

    label: str
    method: str
    q: float | None
    iterations: int
    cost: float
    wall_s: float
    metric: float = float("nan")
    ci: float = float("nan")
    curve: list[tuple[float, float]] = field(default_factory=list)


def _tqdm(total: float, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, unit="unit")


def meta_train(
    model: nn.Module,
    sample: SampleFn,
    loss: Callable[[Any, Any], Tensor],
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
        meta_lr: Adam learning rate on θ; meta_batch: tasks per meta-iteration.
        iterations, budget: stop after this many meta-iterations and/or once the compute spent
            (gradient-evaluation units) reaches ``budget``; at least one is required.
        q: UFOM's probability (float) or ``"adaptive"`` (a :class:`UFOMController`, starting at 0.2).
        floor: the adaptive controller's floor.
        coin: UFOM's coin, ``"task"`` or ``"batch"`` (see
            :func:`~orthotorch.bilevel.hypergradient_vmap`).
        generator: drives task sampling and UFOM's coins.
        evaluate: ``model -> (metric, ci)``, called every ``eval_every`` iterations and at the end.
        hvp_cost: HVP cost in gradient units, for the budget.
        label: name in the results (default: the method and q).
        progress: show a tqdm progress bar over the budget (or iterations).
    """
    if iterations is None and budget is None:
        raise ValueError("meta_train needs `iterations` or `budget` (or both)")
    controller: float | UFOMController | None = None
    if method == "ufom":
        if q == "adaptive":
            controller = UFOMController(0.2, floor=floor, hvp_cost=hvp_cost)
        elif isinstance(q, (int, float)) and not isinstance(q, bool):
            controller = float(q)
        else:
            raise ValueError(f"`q` must be a float or 'adaptive' for method='ufom', got {q!r}")
    if label is None:
        label = method if method != "ufom" else f"ufom q={q}"
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=meta_lr)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    spent, it, wall = 0.0, 0, 0.0
    curve: list[tuple[float, float]] = []
    total = budget if budget is not None else float(iterations or 0)
    bar = _tqdm(total, label, progress)
    while True:
        if iterations is not None and it >= iterations:
            break
        if budget is not None and spent >= budget:
            break
        t0 = time.perf_counter()
        inner_data, outer_data = sample(meta_batch, generator)
        theta = module_params(model)
        grads, info = hypergradient_vmap(
            loss,
            theta,
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
        for n, p in zip(names, params):
            p.grad = grads[n].to(p.dtype)
        opt.step()
        wall += time.perf_counter() - t0
        it += 1
        cost = info.cost(hvp_cost)
        spent += cost
        bar.update(cost if budget is not None else 1)
        if evaluate is not None and eval_every and it % eval_every == 0:
            curve.append((spent, evaluate(model)[0]))
    bar.close()
    q_final = controller.q if isinstance(controller, UFOMController) else controller
    res = RunResult(label=label, method=method, q=q_final, iterations=it, cost=spent, wall_s=wall)
    if evaluate is not None:
        res.metric, res.ci = evaluate(model)
        curve.append((spent, res.metric))
    res.curve = curve
    return res


def _adapt_vmapped(
    model: nn.Module,
    loss: Callable[[Any, Any], Tensor],
    data: tuple[Tensor, ...],
    steps: int,
    lr: float,
) -> dict[str, Tensor]:
    theta = module_params(model)

    def adapt(*d: Tensor) -> dict[str, Tensor]:
        grad = torch.func.grad(lambda p: loss(p, d))
        phi = theta
        for _ in range(steps):
            g = grad(phi)
            phi = {k: phi[k] - lr * g[k] for k in phi}
        return phi

    return torch.func.vmap(adapt)(*data)


def _mean_ci(values: Tensor) -> tuple[float, float]:
    n = values.numel()
    mean = float(values.mean())
    ci = 1.96 * float(values.std()) / math.sqrt(n) if n > 1 else float("nan")
    return mean, ci


def _ce_loss(model: nn.Module) -> Callable[[Any, Any], Tensor]:
    def loss(p: Any, d: Any) -> Tensor:
        x, y = d
        return F.cross_entropy(torch.func.functional_call(model, p, (x,)), y)

    return loss


def _mse_loss(model: nn.Module) -> Callable[[Any, Any], Tensor]:
    def loss(p: Any, d: Any) -> Tensor:
        x, y = d
        return F.mse_loss(torch.func.functional_call(model, p, (x,)), y)

    return loss


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
    loss = _ce_loss(model)
    accs = []
    done = 0
    while done < n_tasks:
        t = min(chunk, n_tasks - done)
        xs, ys, xq, yq = tasks.sample(
            t, ways=ways, shots=shots, queries=queries, generator=generator
        )
        with torch.no_grad():
            phi = _adapt_vmapped(model, loss, (xs, ys), steps, inner_lr)
            logits = torch.func.vmap(lambda p, x: torch.func.functional_call(model, p, (x,)))(
                phi, xq
            )
        accs.append((logits.argmax(-1) == yq).double().mean(-1) * 100.0)
        done += t
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
    loss = _mse_loss(model)
    xs, ys, xq, yq = tasks.sample(n_tasks, shots=shots, queries=queries, generator=generator)
    with torch.no_grad():
        phi = _adapt_vmapped(model, loss, (xs, ys), steps, inner_lr)
        pred = torch.func.vmap(lambda p, x: torch.func.functional_call(model, p, (x,)))(phi, xq)
    return _mean_ci((pred - yq).pow(2).mean(dim=(-1, -2)).double())


# --------------------------------------------------------------------------------------------------


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

    ``ufom_coins`` lists the UFOM variants to run (``"task"``: a coin per task, ``"batch"``: one per
    meta-batch).

    Every run starts from the same initialisation and sees task streams from the same seed. Exact
    runs ``exact_iterations`` meta-iterations; its compute C is measured, and UFOM and FOM then train
    until they have spent ``ufom_budget_fraction · C`` (FOM also at the full C, for reference).
    Meta-test tasks use the held-out classes (see :class:`~orthotorch.apps.bilevel.tasks.DigitsFewShot`
    for ``class_split``). The last row is the untrained initialisation adapted the same way.
    """
    train = DigitsFewShot("train", class_split=class_split, dtype=dtype, device=device)
    test = DigitsFewShot("test", class_split=class_split, dtype=dtype, device=device)

    def sample(n: int, gen: torch.Generator) -> tuple[Any, Any]:
        xs, ys, xq, yq = train.sample(n, ways=ways, shots=shots, queries=15, generator=gen)
        return (xs, ys), (xq, yq)

    def fresh() -> nn.Module:
        return digits_mlp(
            hidden, ways, generator=torch.Generator().manual_seed(seed), dtype=dtype
        ).to(device)

    def evaluator(model: nn.Module) -> tuple[float, float]:
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

    common: dict[str, Any] = dict(
        steps=steps,
        inner_lr=inner_lr,
        meta_lr=meta_lr,
        meta_batch=meta_batch,
        evaluate=evaluator,
        progress=progress,
    )
    results = _compare_methods(
        fresh,
        sample,
        _ce_loss,
        common,
        exact_iterations,
        ufom_q,
        ufom_coins,
        ufom_budget_fraction,
        seed,
    )
    model = fresh()
    acc = evaluator(model)
    results.append(RunResult("no meta-training", "-", None, 0, 0.0, 0.0, *acc))
    return results


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

    Same protocol as :func:`digits_experiment`; the metric is the query MSE after adaptation.
    """
    tasks = SinusoidTasks(dtype=dtype, device=device)

    def sample(n: int, gen: torch.Generator) -> tuple[Any, Any]:
        xs, ys, xq, yq = tasks.sample(n, shots=shots, queries=shots, generator=gen)
        return (xs, ys), (xq, yq)

    def fresh() -> nn.Module:
        return sinusoid_mlp(generator=torch.Generator().manual_seed(seed), dtype=dtype).to(device)

    def evaluator(model: nn.Module) -> tuple[float, float]:
        return evaluate_regression(
            model,
            tasks,
            shots=shots,
            steps=steps,
            inner_lr=inner_lr,
            n_tasks=eval_tasks,
            generator=torch.Generator().manual_seed(10_000),
        )

    common: dict[str, Any] = dict(
        steps=steps,
        inner_lr=inner_lr,
        meta_lr=meta_lr,
        meta_batch=meta_batch,
        evaluate=evaluator,
        progress=progress,
    )
    return _compare_methods(
        fresh,
        sample,
        _mse_loss,
        common,
        exact_iterations,
        ufom_q,
        ufom_coins,
        ufom_budget_fraction,
        seed,
    )


# --------------------------------------------------------------------------------------------------


@dataclass
class CounterexampleResult:
    """Outcome of :func:`fom_counterexample`: final iterates and true-objective gradients per method."""

    theta_star: float
    theta_fom_fixed_point: float
    final: dict[str, list[float]]
    grad_norm: dict[str, list[float]]
    trajectories: dict[str, Tensor]


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
    final θ (the average of the last half of the iterates) and |F'(θ)| of the true meta-objective. FOM settles at θ_F = 0 with |F'| = (1 − s_2)/2;
    UFOM and exact reach θ* (|F'| → 0).
    """
    tasks, dF, theta_star, theta_fom = counterexample_problem(steps=steps, lr=inner_lr)
    final: dict[str, list[float]] = {}
    gnorm: dict[str, list[float]] = {}
    traj: dict[str, Tensor] = {}
    from tqdm.auto import tqdm

    runs = [(m, s) for m in ("fom", "ufom", "exact") for s in seeds]
    for method, seed in tqdm(runs, desc="counterexample", disable=not progress, leave=False):
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
        if seed == seeds[0]:
            traj[method] = path
    return CounterexampleResult(theta_star, theta_fom, final, gnorm, traj)


def plot_curves(
    panels: Sequence[tuple[str, str, Sequence[RunResult]]], path: str, *, title: str = ""
) -> None:
    """Save metric-vs-compute curves, one panel per ``(title, ylabel, results)``, to a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover
        raise ImportError("plots need matplotlib: pip install 'orthotorch[bench]'") from exc
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8), squeeze=False)
    for ax, (ptitle, ylabel, results) in zip(axes[0], panels):
        for r in results:
            if r.curve:
                xs, ys = zip(*r.curve)
                ax.plot(xs, ys, marker="o", ms=3, label=r.label)
        ax.set_xlabel("compute (gradient evaluations)")
        ax.set_ylabel(ylabel)
        ax.set_title(ptitle)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _compare_methods(
    fresh: Any,
    sample: Any,
    make_loss: Any,
    common: dict[str, Any],
    exact_iterations: int,
    ufom_q: float,
    ufom_coins: Any,
    ufom_budget_fraction: float,
    seed: int,
) -> list[RunResult]:
    """Exact for ``exact_iterations``, then UFOM (one run per coin mode) and FOM at
    ``ufom_budget_fraction`` of exact's compute and FOM at 100%, each from a fresh model and the same
    task stream."""
    model = fresh()
    results = [
        meta_train(
            model,
            sample,
            make_loss(model),
            method="exact",
            iterations=exact_iterations,
            generator=torch.Generator().manual_seed(seed + 1),
            **common,
        )
    ]
    budget = results[0].cost * ufom_budget_fraction
    pct = f"{ufom_budget_fraction:.0%}"
    runs: list[tuple[str, Any, float, str, str]] = [
        (
            "ufom",
            ufom_q,
            budget,
            f"ufom q={ufom_q}{'' if c == 'task' else ' batch coin'} ({pct})",
            c,
        )
        for c in ufom_coins
    ]
    runs += [
        ("fom", None, budget, f"fom ({pct})", "task"),
        ("fom", None, results[0].cost, "fom (100%)", "task"),
    ]
    for method, q, b, label, coin in runs:
        model = fresh()
        results.append(
            meta_train(
                model,
                sample,
                make_loss(model),
                method=method,
                q=q,
                coin=coin,
                budget=b,
                generator=torch.Generator().manual_seed(seed + 1),
                label=label,
                **common,
            )
        )
    return results
