"""``orthotorch rnn train | eval | plot``: orthogonal RNNs on the copying, adding and sequential-digits tasks.

``train`` writes into its output directory ``config.json``, ``log.jsonl`` (one JSON line per iteration:
loss, accuracy, wall time, orthogonality error, gradient norm), ``checkpoint.pt`` (model, optimizer and
data-generator state) and ``curve.png``; ``--resume`` continues from the checkpoint and reproduces the
next loss bit for bit. ``eval`` scores a checkpoint on fresh data; ``plot`` draws one or more logs.

The same :func:`train` drives the main demo (``orthotorch demo``) and ``benchmarks/rnn.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
import types
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import geoopt
import torch
from torch import nn
from torch.nn import functional as F

from orthotorch._threads import torch_threads
from orthotorch.apps._argtypes import int_at_least, positive_real, real
from orthotorch.nn import OrthogonalRNN, orthogonality_error
from orthotorch.nn import tasks as T_
from orthotorch.nn.cells import INPUT_INITS
from orthotorch.nn.constraints import CONSTRAINTS
from orthotorch.nn.init import INITS
from orthotorch.nn.nonlinearities import NONLINEARITIES
from orthotorch.optim import SAMPLERS, OrthogonalAdam, OrthogonalSGD

__all__ = [
    "MODELS",
    "OPTIMIZERS",
    "RESUMABLE",
    "TASKS",
    "RunConfig",
    "RunResult",
    "SequenceModel",
    "build_model",
    "build_optimizer",
    "evaluate",
    "lstm_hidden_for",
    "plot_logs",
    "recurrent_orthogonality_error",
    "register",
    "resumed_config",
    "train",
]

TASKS = ("copying", "adding", "digits", "digits-permuted")
MODELS = ("orthogonal", "lstm")
OPTIMIZERS = ("orthogonal_adam", "orthogonal_sgd", "adam", "rmsprop", "riemannian_adam", "sgd")


@dataclass
class RunConfig:
    """Everything a training run depends on (saved as ``config.json``)."""

    task: str = "copying"
    T: int = 100
    hidden: int = 128
    model: str = "orthogonal"
    constraint: str = "givens"
    nonlinearity: str = "modrelu"
    init: str = "henaff"
    input_init: str = "uniform"
    optimizer: str = "orthogonal_adam"
    lr: float = 1e-3
    lr_orth: float | None = None
    momentum: float = 0.9
    sampler: str = "round_robin"
    matchings: int = 16
    stabilize: int | None = None
    batch: int = 128
    steps: int = 200
    seconds: float | None = None
    seed: int = 0
    checkpoint_every: int = 100
    threads: int | None = 1


@dataclass
class RunResult:
    """Summary of a run: last-iteration figures plus the trace ``(iteration, wall, loss)``."""

    config: RunConfig
    iterations: int = 0
    wall: float = 0.0
    loss: float = math.nan
    accuracy: float = math.nan
    orth_error: float = math.nan
    final_loss: float = math.nan  # mean loss of the last 5% of iterations (at least 10)
    final_accuracy: float = math.nan
    interrupted: bool = False
    trace: list[tuple[int, float, float]] = field(default_factory=list)
    model: nn.Module | None = field(default=None, repr=False)

    @property
    def ms_per_iteration(self) -> float:
        return 1e3 * self.wall / max(self.iterations, 1)


# ----------------------------------------------------------------------------------------------------
# models


def _task_dims(task: str) -> tuple[int, int, bool]:
    """``(input features, outputs, output at every step)``."""
    if task == "copying":
        return 10, 9, True
    if task == "adding":
        return 2, 1, False
    return 1, 10, False


class SequenceModel(nn.Module):
    """An RNN (orthogonal or ``nn.LSTM``) and a linear readout, batch first.

    ``forward(x (B, L, F)) → (B, L, C)`` when ``every_step`` (copying), else ``(B, C)`` from the last state.
    """

    def __init__(self, rnn: nn.Module, hidden: int, outputs: int, every_step: bool) -> None:
        super().__init__()
        self.rnn = rnn
        self.readout = nn.Linear(hidden, outputs)
        self.every_step = every_step

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.readout(out if self.every_step else out[:, -1])


def lstm_hidden_for(n_params: int, inputs: int, outputs: int) -> int:
    """Hidden size of a one-layer ``nn.LSTM`` + linear readout with about ``n_params`` parameters."""
    # 4h(h + inputs) + 8h + (h + 1)·outputs = n
    a, b, c = 4.0, 4.0 * inputs + 8.0 + outputs, outputs - n_params
    return max(1, round((-b + math.sqrt(b * b - 4 * a * c)) / (2 * a)))


def build_model(cfg: RunConfig, generator: torch.Generator) -> SequenceModel:
    """The model of ``cfg`` (``model="orthogonal"``: :class:`OrthogonalRNN`; ``"lstm"``: same parameter count)."""
    inputs, outputs, every = _task_dims(cfg.task)
    if cfg.model == "lstm":
        ref = build_model(
            RunConfig(**{**asdict(cfg), "model": "orthogonal"}), torch.Generator().manual_seed(0)
        )
        h = lstm_hidden_for(sum(p.numel() for p in ref.parameters()), inputs, outputs)
        torch_rng = torch.random.fork_rng()  # nn.LSTM's init uses the global RNG: isolate it
        with torch_rng:
            torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
            rnn: nn.Module = nn.LSTM(inputs, h, batch_first=True)
            model = SequenceModel(rnn, h, outputs, every)
        return model
    rnn = OrthogonalRNN(
        inputs,
        cfg.hidden,
        nonlinearity=cfg.nonlinearity,
        bias=cfg.nonlinearity != "modrelu",
        batch_first=True,
        constraint=cfg.constraint,
        init=cfg.init,
        input_init=cfg.input_init,
        generator=generator,
    )
    model = SequenceModel(rnn, cfg.hidden, outputs, every)
    with torch.no_grad():  # readout init from the run's generator, not the global RNG
        bound = 1.0 / math.sqrt(cfg.hidden)
        w = (torch.rand(model.readout.weight.shape, generator=generator) * 2 - 1) * bound
        model.readout.weight.copy_(w)
        model.readout.bias.zero_()
    return model


def _is_orth(p: torch.Tensor) -> bool:
    return (
        isinstance(p, geoopt.ManifoldParameter)
        or getattr(p, "_orthotorch_manifold", None) is not None
    )


def _recurrent_params(model: nn.Module) -> list[nn.Parameter]:
    """Parameters of the constraint (the Givens-marked weight or the parametrization's originals)."""
    out = []
    for name, p in model.named_parameters():
        if _is_orth(p) or ".parametrizations." in name:
            out.append(p)
    return out


def build_optimizer(cfg: RunConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer of ``cfg``; recurrent (constrained) parameters get ``lr_orth`` (default ``lr``)."""
    rec = _recurrent_params(model)
    rec_ids = {id(p) for p in rec}
    rest = [p for p in model.parameters() if id(p) not in rec_ids]
    lr_orth = cfg.lr if cfg.lr_orth is None else cfg.lr_orth
    groups: list[dict[str, Any]] = [{"params": rest}]
    name = cfg.optimizer
    if rec:
        rec_group: dict[str, Any] = {"params": rec, "lr": lr_orth}
        if name in ("orthogonal_adam", "orthogonal_sgd"):
            rec_group.update(
                sampler=cfg.sampler, matchings_per_step=cfg.matchings, stabilize=cfg.stabilize
            )
        groups.append(rec_group)
    if name == "orthogonal_adam":
        return OrthogonalAdam(groups, lr=cfg.lr)
    if name == "orthogonal_sgd":
        return OrthogonalSGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    if name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr)
    if name == "rmsprop":
        return torch.optim.RMSprop(groups, lr=cfg.lr)
    if name == "riemannian_adam":
        return geoopt.optim.RiemannianAdam(groups, lr=cfg.lr)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)


def check_config(cfg: RunConfig) -> None:
    """Raise ``ValueError`` for inconsistent combinations (the CLI reports them as usage errors)."""
    if (
        cfg.model == "orthogonal"
        and cfg.constraint == "givens"
        and cfg.optimizer in ("adam", "rmsprop", "sgd")
    ):
        raise ValueError(
            f"--optimizer {cfg.optimizer} would move the Givens-constrained weight off the manifold; "
            "use orthogonal_adam, orthogonal_sgd or riemannian_adam (or a parametrized --constraint)"
        )
    if (
        cfg.optimizer == "riemannian_adam"
        and cfg.constraint != "givens"
        and cfg.model == "orthogonal"
    ):
        raise ValueError(
            "--optimizer riemannian_adam needs --constraint givens (a manifold parameter)"
        )


# ----------------------------------------------------------------------------------------------------
# data


class _Data:
    def __init__(self, cfg: RunConfig, generator: torch.Generator) -> None:
        self.cfg = cfg
        self.gen = generator
        self.digits: tuple[torch.Tensor, ...] | None = None
        if cfg.task.startswith("digits"):
            self.digits = T_.sequential_digits(
                permuted=cfg.task == "digits-permuted", seed=cfg.seed
            )

    def batch(self, gen: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        cfg, g = self.cfg, gen or self.gen
        if cfg.task == "copying":
            x, y = T_.copying_batch(cfg.batch, cfg.T, generator=g)
            return T_.one_hot(x, 10), y
        if cfg.task == "adding":
            return T_.adding_batch(cfg.batch, cfg.T, generator=g)
        assert self.digits is not None
        xtr, ytr = self.digits[0], self.digits[1]
        idx = torch.randint(0, xtr.shape[0], (cfg.batch,), generator=g)
        return xtr[idx], ytr[idx]


def _loss_acc(cfg: RunConfig, out: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, float]:
    if cfg.task == "copying":
        return T_.copying_loss(out, y), float(T_.copying_accuracy(out, y))
    if cfg.task == "adding":
        loss = F.mse_loss(out.squeeze(-1), y)
        return loss, math.nan
    return F.cross_entropy(out, y), float((out.argmax(-1) == y).float().mean())


def baseline(cfg: RunConfig) -> float:
    """No-memory baseline of the task (copying cross-entropy, adding MSE; digits: log 10)."""
    if cfg.task == "copying":
        return T_.copying_baseline(cfg.T)
    if cfg.task == "adding":
        return T_.ADDING_BASELINE
    return math.log(10)


# ----------------------------------------------------------------------------------------------------
# training


def recurrent_orthogonality_error(model: nn.Module) -> float:
    """max ‖WᵀW − I‖_F over the recurrent matrices of an orthogonal-RNN model (constrained or not);
    NaN for an LSTM."""
    rnn = getattr(model, "rnn", None)
    if not isinstance(rnn, OrthogonalRNN):
        return math.nan
    return max(float(orthogonality_error(cell.weight_hh)) for cell in rnn.cells)


def _grad_norm(params: Sequence[torch.Tensor]) -> float:
    grads = [p.grad.detach().reshape(-1) for p in params if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.linalg.vector_norm(torch.cat(grads)))


def _save(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def train(
    cfg: RunConfig,
    out_dir: Path | str | None = None,
    *,
    resume: bool = False,
    progress: Callable[[int, float, float], None] | None = None,
    log_every: int = 1,
) -> RunResult:
    """Train ``cfg``; stop after ``cfg.steps`` iterations or ``cfg.seconds`` of training wall clock.

    With ``out_dir``: writes ``config.json``, ``log.jsonl``, ``checkpoint.pt`` (every
    ``cfg.checkpoint_every`` iterations, at the end, and on Ctrl-C, which stops the run and sets
    ``RunResult.interrupted``) and ``curve.png``. ``resume=True`` continues from the checkpoint: the next
    iteration is bit-identical to the uninterrupted run's.
    ``progress(iteration, wall, loss)`` is called after every iteration. Wall time counts the
    training step only (data, forward, backward, optimizer), not the logging.
    """
    with torch_threads(cfg.threads or None):  # 0, like None, keeps the caller's count
        return _train(cfg, out_dir, resume, progress, log_every)


def _train(
    cfg: RunConfig,
    out_dir: Path | str | None,
    resume: bool,
    progress: Callable[[int, float, float], None] | None,
    log_every: int,
) -> RunResult:
    """The body of :func:`train`, which sets and restores the thread count (defaults live there)."""
    check_config(cfg)
    out = Path(out_dir) if out_dir is not None else None
    model_gen = torch.Generator().manual_seed(cfg.seed)
    data_gen = torch.Generator().manual_seed(cfg.seed + 1)
    model = build_model(cfg, model_gen)
    opt = build_optimizer(cfg, model)
    data = _Data(cfg, data_gen)
    res = RunResult(cfg)
    start_iter, wall = 0, 0.0
    ckpt = out / "checkpoint.pt" if out is not None else None
    log_path = out / "log.jsonl" if out is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    if resume:
        if ckpt is None or not ckpt.exists():
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt}")
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        # torch's load_state_dict restores the saved groups' options; the run's config is ``cfg``
        # (a resumed run may change lr, stabilize, ...; with the same config nothing changes)
        options = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
        opt.load_state_dict(state["optimizer"])
        for group, opts in zip(opt.param_groups, options, strict=True):
            group.update(opts)
        if isinstance(opt, geoopt.optim.RiemannianAdam):
            # torch's load_state_dict turns geoopt's integer step counts into float32 tensors, which
            # changes its bias corrections in the last bit: restore the ints
            for st in opt.state.values():
                if isinstance(st.get("step"), torch.Tensor):
                    st["step"] = int(st["step"])
        data_gen.set_state(state["data_generator"])
        start_iter, wall = int(state["iteration"]), float(state["wall"])
        res.trace = [(int(t[0]), float(t[1]), float(t[2])) for t in state.get("trace", [])]
        if log_path is not None and log_path.exists():  # drop lines written after the checkpoint
            lines = [ln for ln in log_path.read_text().splitlines() if ln.strip()]
            keep = [ln for ln in lines if json.loads(ln)["iter"] <= start_iter]
            log_path.write_text("".join(ln + "\n" for ln in keep))
    elif log_path is not None and log_path.exists():
        log_path.unlink()

    def checkpoint(iteration: int) -> None:
        if ckpt is None:
            return
        _save(
            ckpt,
            {
                "config": asdict(cfg),
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "data_generator": data_gen.get_state(),
                "iteration": iteration,
                "wall": wall,
                "trace": res.trace,
            },
        )

    params = list(model.parameters())
    log = log_path.open("a") if log_path is not None else None
    it = start_iter
    recent: list[tuple[float, float]] = []
    stepping = in_iteration = False
    gen_before = data_gen.get_state()
    try:
        while it < cfg.steps and (cfg.seconds is None or wall < cfg.seconds):
            gen_before = data_gen.get_state()
            in_iteration = True
            t0 = time.perf_counter()
            x, y = data.batch()
            outp = model(x)
            loss, acc = _loss_acc(cfg, outp, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = _grad_norm(params)
            stepping = True
            opt.step()
            it += 1
            stepping = in_iteration = False
            wall += time.perf_counter() - t0
            lv = float(loss.detach())
            res.trace.append((it, wall, lv))
            recent.append((lv, acc))
            if log is not None and (it % log_every == 0 or it == cfg.steps):
                oerr = recurrent_orthogonality_error(model)
                rec = {
                    "iter": it,
                    "loss": lv,
                    "accuracy": None if math.isnan(acc) else acc,
                    "wall": round(wall, 6),
                    "orth_error": None if math.isnan(oerr) else oerr,
                    "grad_norm": gnorm,
                }
                log.write(json.dumps(rec) + "\n")
            if progress is not None:
                progress(it, wall, lv)
            if ckpt is not None and it % cfg.checkpoint_every == 0:
                log.flush() if log is not None else None
                checkpoint(it)
    except KeyboardInterrupt:
        res.interrupted = True
        if (
            in_iteration and not stepping
        ):  # the interrupted iteration never happened: rewind its data
            data_gen.set_state(gen_before)
    finally:
        if log is not None:
            log.close()
        if not stepping:  # a weight half-way through an optimizer step is not saved
            checkpoint(it)
    res.iterations, res.wall = it, wall
    if res.trace:
        res.loss = res.trace[-1][2]
    if recent:
        res.accuracy = recent[-1][1]
        tail = recent[-max(10, len(recent) // 20) :]
        res.final_loss = sum(t[0] for t in tail) / len(tail)
        res.final_accuracy = sum(t[1] for t in tail) / len(tail)
    res.orth_error = recurrent_orthogonality_error(model)
    if out is not None and res.trace:
        with contextlib.suppress(ImportError):  # matplotlib (the bench extra) draws curve.png
            plot_logs([log_path], out / "curve.png", baseline=baseline(cfg))  # type: ignore[list-item]
    res.model = model
    return res


@torch.no_grad()
def evaluate(
    cfg: RunConfig, model: nn.Module, *, batches: int = 4, seed: int = 10**6
) -> dict[str, float]:
    """Loss and accuracy of ``model`` on fresh data (copying/adding: ``batches`` batches from ``seed``;
    digits: the test split)."""
    model.eval()
    data = _Data(cfg, torch.Generator().manual_seed(seed))
    if data.digits is not None:
        out = model(data.digits[2])
        loss, acc = _loss_acc(cfg, out, data.digits[3])
        return {"loss": float(loss), "accuracy": acc, "baseline": baseline(cfg)}
    losses, accs = [], []
    for _ in range(batches):
        x, y = data.batch()
        loss, acc = _loss_acc(cfg, model(x), y)
        losses.append(float(loss))
        accs.append(acc)
    model.train()
    return {
        "loss": sum(losses) / len(losses),
        "accuracy": sum(accs) / len(accs),
        "baseline": baseline(cfg),
    }


def plot_logs(
    logs: Sequence[Path | str],
    png: Path | str,
    *,
    labels: Sequence[str] | None = None,
    baseline: float | None = None,
    title: str | None = None,
) -> Path:
    """Learning curves (loss vs iteration and vs wall clock, log scale) of JSONL logs into ``png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for i, path in enumerate(logs):
        rows = [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]
        # a run's log.jsonl is named by its directory, a renamed log (docs/.../rnn_logs) by its file
        stem = Path(path).stem
        label = (
            labels[i] if labels is not None else (Path(path).parent.name if stem == "log" else stem)
        )
        its = [r["iter"] for r in rows]
        walls = [r["wall"] for r in rows]
        losses = [r["loss"] for r in rows]
        axes[0].plot(its, losses, label=label, lw=1)
        axes[1].plot(walls, losses, label=label, lw=1)
    for ax, xl in zip(axes, ("iteration", "training wall clock (s)")):
        if baseline is not None:
            ax.axhline(baseline, color="k", ls="--", lw=1, label="no-memory baseline")
        ax.set_yscale("log")
        ax.set_xlabel(xl)
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


# ----------------------------------------------------------------------------------------------------
# command line


def _one_line_error(self: argparse.ArgumentParser, message: str) -> None:
    sys.stderr.write(f"{self.prog}: error: {message}\n")
    sys.exit(2)


#: Options a resumed run may change: the stopping rule, threads, checkpointing and ``stabilize`` (a
#: numerical safeguard that can be switched on when the drift shows in the log).
RESUMABLE = ("steps", "seconds", "threads", "checkpoint_every", "stabilize")


def resumed_config(stored: RunConfig, given: RunConfig) -> RunConfig:
    """The config of a resumed run: ``stored`` with the :data:`RESUMABLE` options of ``given``.

    ``steps`` and ``seconds`` always come from ``given``; the other resumable options where they differ
    from the defaults. Any other option given with a non-default value that differs from the stored run
    raises ``ValueError`` naming the flag (the stored run defines the experiment).
    """
    default = RunConfig()
    merged = asdict(stored)
    for name, value in asdict(given).items():
        if name in ("steps", "seconds"):
            merged[name] = value
        elif value == getattr(default, name) or value == merged[name]:
            continue
        elif name in RESUMABLE:
            merged[name] = value
        else:
            flag = "--" + name.replace("_", "-")
            raise ValueError(
                f"--resume: {flag} {value} differs from the stored run's {merged[name]}; a resumed run "
                f"keeps its config (only {', '.join('--' + r.replace('_', '-') for r in RESUMABLE)} "
                "may change): drop the flag or start a new --out"
            )
    return RunConfig(**merged)


def _config_from_args(args: argparse.Namespace) -> RunConfig:
    return RunConfig(
        task=args.task,
        T=args.T,
        hidden=args.hidden,
        model=args.model,
        constraint=args.constraint,
        nonlinearity=args.nonlinearity,
        init=args.init,
        input_init=args.input_init,
        optimizer=args.optimizer,
        lr=args.lr,
        lr_orth=args.lr_orth,
        momentum=args.momentum,
        sampler=args.sampler,
        matchings=args.matchings,
        stabilize=args.stabilize,
        batch=args.batch,
        steps=args.steps,
        seconds=args.seconds,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
        threads=args.threads,
    )


def _cmd_train(args: argparse.Namespace) -> int:
    out = Path(args.out)
    cfg = _config_from_args(args)
    if args.resume:
        saved = out / "config.json"
        if not saved.exists():
            print(f"orthotorch rnn train: error: --resume: no run in {out}", file=sys.stderr)
            return 2
        stored = RunConfig(**json.loads(saved.read_text()))
        try:
            cfg = resumed_config(stored, cfg)
        except ValueError as e:
            print(f"orthotorch rnn train: error: {e}", file=sys.stderr)
            return 2
    try:
        check_config(cfg)
    except ValueError as e:
        print(f"orthotorch rnn train: error: {e}", file=sys.stderr)
        return 2
    from tqdm import tqdm

    bar = tqdm(
        total=cfg.steps,
        desc=f"{cfg.task} T={cfg.T} {cfg.model}/{cfg.constraint}",
        unit="it",
        disable=args.quiet,
    )

    def progress(it: int, wall: float, loss: float) -> None:
        bar.n = it
        bar.set_postfix(loss=f"{loss:.4g}", refresh=False)
        bar.refresh()

    res = train(cfg, out, resume=args.resume, progress=progress, log_every=args.log_every)
    bar.close()
    if res.interrupted:
        print(
            f"interrupted at iteration {res.iterations}: checkpoint and log kept in {out} "
            "(continue with --resume)",
            file=sys.stderr,
        )
        return 130
    print(
        f"{res.iterations} iterations, {res.wall:.1f} s ({res.ms_per_iteration:.1f} ms/it): loss "
        f"{res.loss:.5g} (no-memory baseline {baseline(cfg):.4g}), accuracy {res.accuracy:.3f}, "
        f"‖WᵀW − I‖ {res.orth_error:.2e}; log, checkpoint and curve.png in {out}"
    )
    return 0


def _load_run(out: Path) -> tuple[RunConfig, nn.Module, dict[str, Any]]:
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    cfg = RunConfig(**state["config"])
    model = build_model(cfg, torch.Generator().manual_seed(cfg.seed))
    model.load_state_dict(state["model"])
    return cfg, model, state


def _cmd_eval(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if not (out / "checkpoint.pt").exists():
        print(f"orthotorch rnn eval: error: no checkpoint.pt in {out}", file=sys.stderr)
        return 2
    cfg, model, state = _load_run(out)
    metrics = evaluate(cfg, model, batches=args.batches, seed=args.seed)
    metrics["iteration"] = state["iteration"]
    metrics["orth_error"] = recurrent_orthogonality_error(model)
    print(
        json.dumps(
            {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}
        )
    )
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    logs = []
    for run in args.runs:
        p = Path(run)
        p = p / "log.jsonl" if p.is_dir() else p
        if not p.exists():
            print(f"orthotorch rnn plot: error: no log at {p}", file=sys.stderr)
            return 2
        logs.append(p)
    base = None
    cfg_path = logs[0].parent / "config.json"
    if cfg_path.exists():
        base = baseline(RunConfig(**json.loads(cfg_path.read_text())))
    png = plot_logs(logs, args.png or logs[0].parent / "curve.png", baseline=base)
    print(f"wrote {png}")
    return 0


def _add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", choices=TASKS, default="copying", help="benchmark task")
    p.add_argument(
        "--T",
        type=int_at_least(0),
        default=100,
        help="copying: number of blanks; adding: sequence length",
    )
    p.add_argument(
        "--hidden", type=int_at_least(1), default=128, help="hidden size of the orthogonal RNN"
    )
    p.add_argument(
        "--model",
        choices=MODELS,
        default="orthogonal",
        help="orthogonal RNN or nn.LSTM of equal parameter count",
    )
    p.add_argument(
        "--constraint",
        choices=[c for c in CONSTRAINTS],
        default="givens",
        help="how the recurrent matrix stays orthogonal (none: unconstrained)",
    )
    p.add_argument(
        "--nonlinearity", choices=NONLINEARITIES, default="modrelu", help="pointwise nonlinearity"
    )
    p.add_argument("--init", choices=INITS, default="henaff", help="initial recurrent matrix")
    p.add_argument(
        "--input-init",
        choices=INPUT_INITS,
        default="uniform",
        help="initial input map: uniform (nn.RNN's U[-1/sqrt(hidden), 1/sqrt(hidden)]) or kaiming "
        "(expRNN's N(0, 2/input_size))",
    )
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="orthogonal_adam", help="optimizer")
    p.add_argument("--lr", type=positive_real, default=1e-3, help="learning rate")
    p.add_argument(
        "--lr-orth",
        type=positive_real,
        default=None,
        help="learning rate of the recurrent (constrained) parameters; default: --lr",
    )
    p.add_argument(
        "--momentum",
        type=real(0.0, 1.0, max_inclusive=False),
        default=0.9,
        help="momentum of sgd / orthogonal_sgd",
    )
    p.add_argument(
        "--sampler",
        choices=SAMPLERS,
        default="round_robin",
        help="matching schedule of orthogonal_adam / orthogonal_sgd (full: all d − 1 rounds per step)",
    )
    p.add_argument(
        "--matchings",
        type=int_at_least(1),
        default=16,
        help="matchings per step of orthogonal_adam / orthogonal_sgd (ignored by --sampler full)",
    )
    p.add_argument(
        "--stabilize",
        type=int_at_least(1),
        default=None,
        metavar="N",
        help="orthogonal_adam / orthogonal_sgd: re-project the recurrent matrix by QR every N steps "
        "(O(d³); bounds float32 drift, which grows with the number of rotations per step)",
    )
    p.add_argument("--batch", type=int_at_least(1), default=128, help="batch size")
    p.add_argument(
        "--steps",
        type=int_at_least(1),
        default=200,
        help="total iterations (including those before --resume)",
    )
    p.add_argument(
        "--seconds",
        type=positive_real,
        default=None,
        help="training wall-clock budget in seconds (total)",
    )
    p.add_argument(
        "--seed",
        type=int_at_least(0),
        default=0,
        help="seed of the model init and of the data stream",
    )
    p.add_argument(
        "--checkpoint-every",
        type=int_at_least(1),
        default=100,
        help="iterations between checkpoints",
    )
    p.add_argument(
        "--log-every", type=int_at_least(1), default=1, help="iterations between log lines"
    )
    p.add_argument(
        "--threads",
        type=int_at_least(1),
        default=1,
        help="torch threads (1 is fastest for these small GEMMs on a busy CPU: a second thread's per-step synchronisation costs more than it saves)",
    )
    p.add_argument(
        "--out", default="runs/rnn", help="output directory (log.jsonl, checkpoint.pt, curve.png)"
    )
    p.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its checkpoint"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``rnn train | eval | plot`` to the ``orthotorch`` command."""
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = subparsers.add_parser(
        "rnn",
        help="orthogonal RNNs on copying / adding / sequential digits",
        formatter_class=fmt,
        description="Train, evaluate and plot orthogonal RNNs on long-memory tasks.",
    )
    sub = p.add_subparsers(dest="rnn_command", metavar="COMMAND")
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])
    pt = sub.add_parser(
        "train",
        help="train a model, log every iteration, checkpoint",
        formatter_class=fmt,
        description="Train an orthogonal RNN (or an LSTM baseline); Ctrl-C keeps the partial run (exit 130).",
    )
    _add_train_args(pt)
    pt.set_defaults(func=_cmd_train)
    pe = sub.add_parser(
        "eval",
        help="score a checkpoint on fresh data",
        formatter_class=fmt,
        description="Loss and accuracy of a run's checkpoint on fresh data (digits: the test split), as JSON.",
    )
    pe.add_argument("--out", default="runs/rnn", help="run directory holding checkpoint.pt")
    pe.add_argument("--batches", type=int_at_least(1), default=4, help="number of fresh batches")
    pe.add_argument(
        "--seed", type=int_at_least(0), default=10**6, help="seed of the evaluation data"
    )
    pe.set_defaults(func=_cmd_eval)
    pp = sub.add_parser(
        "plot",
        help="learning-curve PNG of one or more runs",
        formatter_class=fmt,
        description="Loss vs iteration and vs wall clock of one or more runs.",
    )
    pp.add_argument("runs", nargs="+", help="run directories or log.jsonl files")
    pp.add_argument("--png", default=None, help="output PNG (default: curve.png in the first run)")
    pp.set_defaults(func=_cmd_plot)
    for parser in (p, pt, pe, pp):
        setattr(parser, "error", types.MethodType(_one_line_error, parser))  # noqa: B010  (mypy rejects assigning a method)
