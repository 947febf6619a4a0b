"""orthotorch humanoid: train, evaluate, record and plot ARS policies with orthogonal perturbations; world models.

Augmented Random Search on a Gymnasium MuJoCo task (default Humanoid-v5) with iid Gaussian, Haar-orthogonal
or Givens-product perturbation directions; rollouts of whole episodes run in worker processes (or on Ray).
Every report gives episode length, forward displacement of the torso and return together: standing still
scores about 5 per step on Humanoid, so a return alone proves nothing. Needs the extra rl.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from orthotorch.apps._argtypes import int_at_least, positive_real, real
from orthotorch.rl import world_model as wm
from orthotorch.rl._extra import INSTALL_HINT, MissingExtraError, require
from orthotorch.rl.checkpoint import load_checkpoint, save_checkpoint
from orthotorch.rl.directions import SAMPLERS
from orthotorch.rl.es import ARSConfig, ARSTrainer
from orthotorch.rl.policies import POLICIES
from orthotorch.rl.rollout import env_info, make_env, root_x
from orthotorch.rl.workers import SerialBackend, make_backend

__all__ = ["DEFAULT_ENV", "register"]

#: Environment of a new run when --env is not given.
DEFAULT_ENV = "Humanoid-v5"

#: Hyperparameters of a run: (flag dest, config field, default). On --resume the checkpoint's values
#: are used, and a flag given with a different value is an error.
_HYPER: tuple[tuple[str, str, Any], ...] = (
    ("policy", "policy", "linear"),
    ("hidden", "hidden", (32, 32)),
    ("directions", "directions", "orthogonal"),
    ("norms", "norms", "chi"),
    ("num_directions", "num_directions", 230),
    ("top_directions", "top_directions", None),
    ("step_size", "step_size", 0.02),
    ("noise", "noise", 0.0075),
    ("reward_shift", "reward_shift", None),
    ("seed", "seed", 0),
    ("max_episode_steps", "max_episode_steps", None),
    ("eval_every", "eval_every", 10),
    ("eval_episodes", "eval_episodes", 5),
    ("screen", "screen_directions", 0),
    ("screen_model", "screen_model", "orthogonal"),
    ("screen_hidden", "screen_hidden", 32),
    ("screen_horizon", "screen_horizon", 50),
    ("screen_starts", "screen_starts", 8),
    ("screen_every", "screen_every", 1),
    ("screen_updates", "screen_updates", 100),
    ("screen_buffer", "screen_buffer", 64),
)


def _clean(x: Any) -> Any:
    """JSON-safe copy: non-finite floats become null."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def _fmt_summary(ret: float, length: float, fwd: float) -> str:
    f = "n/a" if not math.isfinite(fwd) else f"{fwd:+.2f} m"
    return f"return {ret:.1f}, length {length:.0f}, forward {f}"


# ----------------------------------------------------------------------------- argument types


def _env_id(text: str) -> str:
    try:
        gym = require("gymnasium")
    except MissingExtraError:
        return text  # the command itself reports the missing extra
    if text not in gym.envs.registry:
        close = [k for k in gym.envs.registry if k.lower().startswith(text.split("-")[0].lower())]
        hint = f" (did you mean {', '.join(sorted(close)[:5])}?)" if close else ""
        raise argparse.ArgumentTypeError(f"unknown Gymnasium environment {text!r}{hint}")
    return text


def _existing_file(text: str) -> str:
    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"no such checkpoint file: {text}")
    return text


# ----------------------------------------------------------------------------- train


def _config_from_args(args: argparse.Namespace) -> ARSConfig:
    env_id = args.env or DEFAULT_ENV
    values: dict[str, Any] = {"env_id": env_id}
    for dest, field_name, default in _HYPER:
        v = getattr(args, dest)
        values[field_name] = default if v is None else v
    if values["reward_shift"] is None:
        values["reward_shift"] = 5.0 if env_id.startswith("Humanoid") else 0.0
    values["hidden"] = tuple(values["hidden"])
    return ARSConfig(**values)


def _check_resume_flags(args: argparse.Namespace, saved: dict[str, Any], parser: Any) -> None:
    if args.env is not None and args.env != saved["env_id"]:
        parser.error(
            f"--env {args.env} differs from the checkpoint's environment {saved['env_id']}"
        )
    for dest, field_name, default in _HYPER:
        v = getattr(args, dest)
        if v is None:
            continue
        have = saved.get(field_name, default)  # screen_* fields are only saved when screening
        if (list(v) if isinstance(v, tuple) else v) != have:
            flag = "--" + dest.replace("_", "-")
            parser.error(
                f"{flag} {v} differs from the checkpoint's {have}; drop the flag to resume"
            )


def _rewrite_log(log: Path, upto: int) -> None:
    """Keep only the log lines of iterations <= ``upto`` (lines written after the checkpoint go)."""
    if not log.exists():
        return
    kept = [ln for ln in log.read_text().splitlines() if ln and json.loads(ln)["iteration"] <= upto]
    tmp = log.with_name(log.name + ".tmp")
    tmp.write_text("".join(ln + "\n" for ln in kept))
    os.replace(tmp, log)


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _cmd_train(args: argparse.Namespace) -> int:
    parser = args._parser
    out = Path(args.out)
    ckpt_path, best_path, log_path = out / "checkpoint.json", out / "best.json", out / "log.jsonl"
    if args.resume:
        if not ckpt_path.is_file():
            parser.error(f"--resume: no checkpoint at {ckpt_path}")
        try:
            doc = load_checkpoint(ckpt_path)
        except ValueError as exc:
            parser.error(f"--resume: {exc}")
        _check_resume_flags(args, doc["state"]["config"], parser)
        env = make_env(doc["env_id"])
        trainer = ARSTrainer.from_state_dict(doc["state"], env_info(env))
        wall0 = float(doc.get("wall_s", 0.0))
        _rewrite_log(log_path, trainer.iteration)
    else:
        if ckpt_path.exists():
            parser.error(f"--out {out} already holds a run; pass --resume or choose another --out")
        try:
            config = _config_from_args(args)
        except (ValueError, TypeError) as exc:  # combinations, e.g. --screen above --num-directions
            parser.error(str(exc))
        try:
            env = make_env(config.env_id)
            info = env_info(env)
        except ValueError as exc:  # e.g. a discrete action space
            parser.error(f"--env {config.env_id}: {exc}")
        trainer = ARSTrainer(config, info)
        wall0 = 0.0
        out.mkdir(parents=True, exist_ok=True)
        log_path.write_text("")
    env.close()
    cfg = trainer.config
    command = _command_line(args)
    from tqdm import tqdm

    budget = args.budget_steps
    bar = tqdm(
        total=budget,
        initial=min(trainer.env_steps, budget),
        unit="step",
        desc=f"ARS {cfg.directions} {cfg.env_id}",
        disable=args.no_progress,
        dynamic_ncols=True,
    )
    t_start = time.perf_counter()

    def wall() -> float:
        return wall0 + time.perf_counter() - t_start

    def save(path: Path) -> None:
        save_checkpoint(path, trainer.state_dict(), wall_s=wall(), command=command)

    status = 0
    record: dict[str, Any] | None = None
    backend = None
    main_thread = threading.current_thread() is threading.main_thread()
    previous_term = (
        signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    )  # like Ctrl-C
    try:
        backend = make_backend(args.backend, trainer.worker_spec(), args.workers)
        while trainer.env_steps < budget:
            if args.time_budget is not None and time.perf_counter() - t_start >= args.time_budget:
                print(f"time budget of {args.time_budget:g} s reached", file=sys.stderr)
                break
            before = trainer.env_steps
            record = trainer.step(backend)
            record["wall_s"] = wall()
            with open(log_path, "a") as f:
                f.write(json.dumps(_clean(record)) + "\n")
            bar.update(min(trainer.env_steps - before, budget - bar.n))
            rho = record.get("screen_rank_corr")
            bar.set_postfix_str(
                f"ret {record['return_mean']:.0f} len {record['length_mean']:.0f} "
                f"fwd {record['forward_mean']:.2f}"
                + ("" if rho is None else f" rho {rho:+.2f} model {record['screen_model_s']:.1f}s")
            )
            if trainer.iteration % args.checkpoint_every == 0:
                save(ckpt_path)
            if trainer.best is not None and trainer.best["iteration"] == trainer.iteration:
                save(best_path)
    except KeyboardInterrupt:
        bar.close()
        save(ckpt_path)
        print(
            f"interrupted: checkpoint of iteration {trainer.iteration} "
            f"({trainer.env_steps} env steps) kept in {ckpt_path}",
            file=sys.stderr,
        )
        status = 130
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous_term)
        bar.close()
        if backend is not None:
            backend.close()
    if status:
        return status
    save(ckpt_path)
    if record is not None:
        line = _fmt_summary(record["return_mean"], record["length_mean"], record["forward_mean"])
        print(
            f"iteration {trainer.iteration}, {trainer.env_steps} env steps, {wall():.0f} s: {line}"
        )
        if "eval_return_mean" in record:
            ev = _fmt_summary(
                record["eval_return_mean"], record["eval_length_mean"], record["eval_forward_mean"]
            )
            print(f"evaluation of the current policy: {ev}")
    print(f"checkpoint: {ckpt_path}; log: {log_path}")
    return 0


# ----------------------------------------------------------------------------- eval / record


def _load_for_run(args: argparse.Namespace) -> tuple[dict[str, Any], ARSTrainer]:
    try:
        doc = load_checkpoint(args.checkpoint, env_id=args.env)
    except ValueError as exc:
        args._parser.error(f"--checkpoint: {exc}")
    env = make_env(doc["env_id"])
    trainer = ARSTrainer.from_state_dict(doc["state"], env_info(env))
    env.close()
    return doc, trainer


def _cmd_eval(args: argparse.Namespace) -> int:
    doc, trainer = _load_for_run(args)
    seeds = [args.seed + k for k in range(args.episodes)]
    with SerialBackend(trainer.worker_spec()) as backend:
        episodes = trainer.evaluate(backend, seeds)
    info = sys.stderr if args.json else sys.stdout
    for s, e in zip(seeds, episodes):
        print(f"episode seed {s}: {_fmt_summary(e.ret, e.length, e.forward)}", file=info)
    n = len(episodes)
    mean_ret = sum(e.ret for e in episodes) / n
    mean_len = sum(e.length for e in episodes) / n
    mean_fwd = sum(e.forward for e in episodes) / n
    print(f"mean over {n} episodes: {_fmt_summary(mean_ret, mean_len, mean_fwd)}", file=info)
    if args.json:
        result = {
            "env_id": doc["env_id"],
            "checkpoint": str(args.checkpoint),
            "iteration": trainer.iteration,
            "env_steps": trainer.env_steps,
            "seeds": seeds,
            "returns": [e.ret for e in episodes],
            "lengths": [e.length for e in episodes],
            "forward_distances": [e.forward for e in episodes],
        }
        print(json.dumps(_clean(result)))
    return 0


def _render_env(env_id: str, width: int, height: int, camera: str | None) -> Any:
    """An ``rgb_array`` env rendering through ``camera`` (a named MuJoCo camera), else the default view.

    The default free camera of Humanoid-v5 does not follow the body, so a policy that walks 27 m leaves
    the frame; the model's ``track`` camera follows its centre of mass. Gymnasium silently falls back to
    the free camera for an unknown name; we say so.
    """
    kwargs: dict[str, Any] = {"width": width, "height": height}
    if camera:
        kwargs["camera_name"] = camera
    try:
        env = make_env(env_id, render_mode="rgb_array", **kwargs)
    except (ValueError, TypeError):  # not a MuJoCo env: no size or camera options
        env = make_env(env_id, render_mode="rgb_array")
    model = getattr(env.unwrapped, "model", None)
    names = [model.camera(i).name for i in range(model.ncam)] if model is not None else []
    if camera and camera not in names:
        print(
            f"note: no camera {camera!r} in {env_id} (cameras: {names or 'none'}); using the default view",
            file=sys.stderr,
        )
    return env


def _cmd_record(args: argparse.Namespace) -> int:
    os.environ.setdefault("MUJOCO_GL", "egl")  # headless rendering; must precede the mujoco import
    doc, trainer = _load_for_run(args)
    env = _render_env(doc["env_id"], args.width, args.height, args.camera)
    mean, inv_std = trainer.obs_stat.normaliser()
    act = trainer.policy.actor(trainer.params)
    frames = []
    try:
        obs, _ = env.reset(seed=args.seed)
        x0 = root_x(env)
        frames.append(env.render())
        total, steps, done = 0.0, 0, False
        while not done and steps < args.max_steps:
            o = np.asarray(obs, dtype=np.float64)
            obs, r, term, trunc, _ = env.step(act((o - mean) * inv_std))
            total += float(r)
            steps += 1
            done = bool(term or trunc)
            if steps % args.every == 0 or done:
                frames.append(env.render())
        fwd = root_x(env) - x0
    except Exception as exc:  # rendering backends fail in many ways (no EGL, no display)
        print(
            f"error: rendering failed ({type(exc).__name__}: {exc}); headless rendering needs "
            f"MUJOCO_GL=egl (or osmesa) and a working EGL/OSMesa library",
            file=sys.stderr,
        )
        return 1
    finally:
        env.close()
    if not frames or frames[0] is None:
        print("error: the environment returned no frames (render_mode rgb_array)", file=sys.stderr)
        return 1
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from PIL import Image

    images = [Image.fromarray(np.asarray(f)) for f in frames]
    dt = float(getattr(env.unwrapped, "dt", 0.02)) * args.every
    images[0].save(
        out, save_all=True, append_images=images[1:], duration=max(20, round(1000 * dt)), loop=0
    )
    if args.still:
        images[min(len(images) - 1, len(images) // 2)].save(args.still)
    print(f"wrote {out} ({len(images)} frames): {_fmt_summary(total, steps, fwd)}")
    return 0


# ----------------------------------------------------------------------------- world model


def _cmd_world_model(args: argparse.Namespace) -> int:
    doc, trainer = _load_for_run(args)
    env = make_env(doc["env_id"])
    mean, inv_std = trainer.obs_stat.normaliser()
    act = trainer.policy.actor(trainer.params)
    rng = np.random.default_rng(args.seed)
    n_test = max(1, args.episodes // 4)
    seeds = [args.seed + k for k in range(args.episodes + n_test)]
    episodes = wm.record_episodes(
        env, act, mean, inv_std, seeds, action_noise=args.action_noise, rng=rng
    )
    env.close()
    train, test = episodes[: args.episodes], episodes[args.episodes :]
    out = Path(args.out)
    for name, eps in (("train", train), ("test", test)):
        wm.save_shard(
            out / f"{name}.npz", eps, policy_version=trainer.iteration, env_id=doc["env_id"]
        )
    lengths = [len(e) for e in episodes]
    print(
        f"{len(train)} + {len(test)} episodes ({sum(lengths)} transitions, lengths "
        f"{min(lengths)}–{max(lengths)}) of the policy of iteration {trainer.iteration}, "
        f"action noise {args.action_noise}; shards in {out}"
    )
    window = max(2, min(16, min(len(e) for e in train)))
    rows = []
    for kind in args.kinds:
        gen = torch.Generator().manual_seed(args.seed)
        model = wm.DynamicsModel(
            trainer.policy.obs_dim, trainer.policy.act_dim, hidden=args.hidden, kind=kind,
            generator=gen,
        )  # fmt: skip
        model.fit_normaliser(train)
        # one untimed warm-up update (first-call costs: kernel loading, allocator), then the budget
        losses = wm.train_model(model, train, steps=1, window=window, generator=gen)
        t0 = time.perf_counter()
        if args.updates is not None:
            losses += wm.train_model(model, train, steps=args.updates, window=window, generator=gen)
        else:
            losses += wm.train_model(
                model, train, seconds=args.seconds, window=window, generator=gen
            )
        train_s = time.perf_counter() - t0
        errs = {k: wm.k_step_error(model, test, k) for k in args.k}
        sizes = wm.imagine(model, test[0].obs[0], act, mean, inv_std, args.imagine_steps)
        w = model.recurrent_matrix()
        orth = (
            math.nan
            if w is None
            else float(torch.linalg.matrix_norm(w.detach().T @ w.detach() - torch.eye(w.shape[1])))
        )
        row = {
            "kind": kind,
            "parameters": sum(p.numel() for p in model.parameters()),
            "updates": len(losses),
            "train_s": train_s,
            "final_loss": float(np.mean(losses[-20:])),
            **{f"error_k{k}": v for k, v in errs.items()},
            "imagined_max_size": float(np.max(sizes)),
            "imagined_final_size": float(sizes[-1]),
            "orthogonality_error": orth,
        }
        rows.append(row)
        print(
            f"{kind:>10}: {row['parameters']} parameters, {row['updates']} updates in "
            f"{train_s:.1f} s, "
            + ", ".join(f"k={k} error {v:.3g}" for k, v in errs.items())
            + f"; imagined {args.imagine_steps} steps: max size {row['imagined_max_size']:.3g}"
            + f"; ||WᵀW − I|| {orth:.2e}",
            flush=True,
        )
    (out / "world_model.json").write_text(json.dumps(_clean({"rows": rows, "args": {
        "checkpoint": str(args.checkpoint), "episodes": args.episodes, "seconds": args.seconds, "updates": args.updates,
        "hidden": args.hidden, "action_noise": args.action_noise, "seed": args.seed,
    }}), indent=1) + "\n")  # fmt: skip
    print(f"wrote {out / 'world_model.json'}")
    return 0


# ----------------------------------------------------------------------------- plot


def _cmd_plot(args: argparse.Namespace) -> int:
    try:
        import matplotlib
    except ImportError:
        print('error: plot needs matplotlib: pip install -e ".[bench]"', file=sys.stderr)
        return 1
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fields = [
        ("return_mean", "return"),
        ("length_mean", "episode length"),
        ("forward_mean", "forward displacement (m)"),
    ]
    xs = [("env_steps", "env steps"), ("wall_s", "wall clock (s)")]
    fig, axes = plt.subplots(2, 3, figsize=(14, 7), squeeze=False)
    for log in args.logs:
        rows = [json.loads(ln) for ln in Path(log).read_text().splitlines() if ln.strip()]
        if not rows:
            print(f"warning: {log} is empty", file=sys.stderr)
            continue
        path = Path(log)  # OUT/log.jsonl is labelled OUT; NAME.log.jsonl is labelled NAME
        label = path.parent.name if path.name == "log.jsonl" else path.name.split(".")[0]
        for r, (xkey, xlabel) in enumerate(xs):
            for c, (key, ylabel) in enumerate(fields):
                ax = axes[r][c]
                x = [row[xkey] for row in rows]
                y = [math.nan if row[key] is None else row[key] for row in rows]
                (line,) = ax.plot(x, y, label=f"{label} (training episodes)", alpha=0.6)
                ev = [row for row in rows if row.get(f"eval_{key}") is not None]
                if ev:
                    ax.plot(
                        [row[xkey] for row in ev],
                        [row[f"eval_{key}"] for row in ev],
                        "o-",
                        color=line.get_color(),
                        label=f"{label} (evaluation)",
                    )
                ax.set_xlabel(xlabel)
                ax.set_ylabel(ylabel)
                ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(args.title)
    fig.tight_layout()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=args.dpi)
    print(f"wrote {out}")
    return 0


# ----------------------------------------------------------------------------- parser


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except ``None`` ones (their help text says what they mean)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None:
            return action.help or ""
        return super()._get_help_string(action) or ""


def _command_line(args: argparse.Namespace) -> str:
    """The train command with every flag that was given or defaulted (recorded in checkpoints)."""
    parts = ["orthotorch", "humanoid", "train"]
    for key, value in vars(args).items():
        if key.startswith("_") or key in ("func", "handler", "humanoid_command", "command"):
            continue
        if value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            parts.append(flag)
        elif isinstance(value, (list, tuple)):
            parts += [flag, *map(str, value)]
        else:
            parts += [flag, str(value)]
    return " ".join(parts)


def _run(args: argparse.Namespace) -> int:
    try:
        return int(args.handler(args))
    except MissingExtraError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _add_env(p: argparse.ArgumentParser, train: bool) -> None:
    p.add_argument(
        "--env",
        type=_env_id,
        default=None,
        help="Gymnasium environment id (any task with flat Box spaces); "
        + (
            f"default {DEFAULT_ENV} for a new run, the checkpoint's on --resume (must match if given)"
            if train
            else "if given, the checkpoint must belong to it"
        ),
    )


def register(subparsers: Any) -> None:
    """Add ``humanoid train | eval | record | world-model | plot`` to the ``orthotorch`` command's subparsers."""
    fmt = _HelpFormatter
    top = subparsers.add_parser(
        "humanoid",
        help="ARS with orthogonal perturbations on Humanoid-v5 (train, eval, record, world-model, plot)",
        description="T"
        + __doc__.splitlines()[0].split(": t", 1)[1]
        + f" Install the extra with: {INSTALL_HINT}",
        formatter_class=fmt,
    )
    sub = top.add_subparsers(dest="humanoid_command", metavar="COMMAND", required=True)

    t = sub.add_parser(
        "train",
        help="train (or --resume) an ARS policy",
        description="Train an ARS policy until --budget-steps training env steps (or --time-budget "
        "seconds of this invocation); logs one JSON line per iteration to OUT/log.jsonl and writes "
        "OUT/checkpoint.json (and OUT/best.json, the best evaluated policy). Hyperparameter flags left "
        "out take the defaults shown for a new run and the checkpoint's values on --resume. Ctrl-C "
        "keeps the checkpoint of the last finished iteration and exits with status 130.",
        formatter_class=fmt,
    )
    _add_env(t, True)
    t.add_argument("--out", default="runs/humanoid/default", help="run folder")
    t.add_argument("--resume", action="store_true", help="continue the run in --out")
    t.add_argument(
        "--budget-steps",
        type=int_at_least(1),
        default=200_000,
        help="total training env steps of the run (across resumes)",
    )
    t.add_argument(
        "--time-budget",
        type=positive_real,
        default=None,
        help="stop after this many seconds of this invocation (checked between iterations)",
    )
    t.add_argument(
        "--directions",
        choices=tuple(SAMPLERS),
        default=None,
        help="perturbation directions [orthogonal]",
    )
    t.add_argument(
        "--norms",
        choices=("chi", "fixed"),
        default=None,
        help="row norms of orthogonal/givens directions [chi]",
    )
    t.add_argument("--policy", choices=tuple(POLICIES), default=None, help="policy [linear]")
    t.add_argument(
        "--hidden",
        type=int_at_least(1),
        nargs="+",
        default=None,
        help="MLP hidden sizes [32 32]",
    )
    t.add_argument(
        "--num-directions",
        type=int_at_least(1),
        default=None,
        help="directions per iteration N [230]",
    )
    t.add_argument(
        "--top-directions",
        type=int_at_least(1),
        default=None,
        help="best directions used b [N]",
    )
    t.add_argument(
        "--step-size",
        type=positive_real,
        default=None,
        help="step size alpha [0.02]",
    )
    t.add_argument(
        "--noise",
        type=positive_real,
        default=None,
        help="perturbation scale nu [0.0075]",
    )
    t.add_argument(
        "--reward-shift",
        type=real(),
        default=None,
        help="subtracted from every training reward [5 for Humanoid*, else 0]",
    )
    t.add_argument("--seed", type=int_at_least(0), default=None, help="run seed [0]")
    t.add_argument(
        "--max-episode-steps",
        type=int_at_least(1),
        default=None,
        help="cap below the env's time limit [env's]",
    )
    t.add_argument(
        "--eval-every",
        type=int_at_least(0),
        default=None,
        help="evaluate the policy every that many iterations, 0: never [10]",
    )
    t.add_argument(
        "--eval-episodes",
        type=int_at_least(0),
        default=None,
        help="episodes per evaluation [5]",
    )
    t.add_argument(
        "--screen",
        type=int_at_least(0),
        default=None,
        metavar="N_KEPT",
        help="world-model screening: the --num-directions candidates are scored in imagination and "
        "only the N_KEPT best get real rollouts (0: off; --top-directions must be <= N_KEPT) [0]",
    )
    t.add_argument(
        "--screen-model",
        choices=wm.MODEL_KINDS,
        default=None,
        help="core of the screening world model [orthogonal]",
    )
    t.add_argument(
        "--screen-hidden", type=int_at_least(1), default=None, help="world model width [32]"
    )
    t.add_argument(
        "--screen-horizon",
        type=int_at_least(1),
        default=None,
        help="imagined steps per screened perturbation [50]",
    )
    t.add_argument(
        "--screen-starts",
        type=int_at_least(1),
        default=None,
        help="real start states (from the buffer) per screened perturbation [8]",
    )
    t.add_argument(
        "--screen-every",
        type=int_at_least(1),
        default=None,
        help="fine-tune the world model every that many iterations [1]",
    )
    t.add_argument(
        "--screen-updates",
        type=int_at_least(1),
        default=None,
        help="world model training updates per fine-tuning [100]",
    )
    t.add_argument(
        "--screen-buffer",
        type=int_at_least(1),
        default=None,
        help="real episodes kept to train the world model and draw start states from [64]",
    )
    t.add_argument(
        "--backend",
        choices=("process", "ray", "serial"),
        default="process",
        help="where rollouts run: one process per worker, Ray actors, or in this process",
    )
    t.add_argument(
        "--workers",
        type=int_at_least(1),
        default=min(2, os.cpu_count() or 1),
        help="worker processes / Ray actors",
    )
    t.add_argument(
        "--checkpoint-every",
        type=int_at_least(1),
        default=1,
        help="checkpoint every that many iterations",
    )
    t.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    t.set_defaults(func=_run, handler=_cmd_train, _parser=t)

    for name, helptext in (
        ("eval", "evaluate a checkpoint's policy"),
        ("record", "write a GIF of one episode (MUJOCO_GL=egl)"),
    ):
        p = sub.add_parser(
            name,
            help=helptext,
            description=helptext[0].upper() + helptext[1:] + ".",
            formatter_class=fmt,
        )
        p.add_argument(
            "--checkpoint", type=_existing_file, required=True, help="checkpoint JSON file"
        )
        _add_env(p, False)
        p.add_argument(
            "--seed",
            type=int_at_least(0),
            default=0,
            help="reset seed of the first episode (then +1, +2, ...)",
        )
        p.set_defaults(func=_run, _parser=p)
        if name == "eval":
            p.add_argument("--episodes", type=int_at_least(1), default=3, help="episodes")
            p.add_argument(
                "--json",
                action="store_true",
                help="end with one JSON line (returns, lengths, forward_distances)",
            )
            p.set_defaults(handler=_cmd_eval)
        else:
            p.add_argument("--out", default="runs/humanoid/episode.gif", help="GIF path")
            p.add_argument("--still", default=None, help="also write the middle frame to this PNG")
            p.add_argument(
                "--max-steps",
                type=int_at_least(1),
                default=1000,
                help="episode cap",
            )
            p.add_argument("--every", type=int_at_least(1), default=3, help="keep every n-th frame")
            p.add_argument(
                "--camera",
                default="track",
                help="named MuJoCo camera ('track' follows Humanoid's and the walkers' centre of mass; "
                "'' for the environment's default view)",
            )
            p.add_argument("--width", type=int_at_least(16), default=240, help="frame width")
            p.add_argument("--height", type=int_at_least(16), default=180, help="frame height")
            p.set_defaults(handler=_cmd_record)

    w = sub.add_parser(
        "world-model",
        help="record transitions of a checkpoint's policy and fit four dynamics models",
        description="Record episodes of a checkpoint's policy (with Gaussian action noise) as .npz "
        "shards, train an orthogonal RNN, an RNN, an LSTM and an MLP dynamics model for the same wall "
        "clock each, and report k-step open-loop prediction errors on held-out episodes and whether "
        "imagined closed-loop rollouts stay bounded.",
        formatter_class=fmt,
    )
    w.add_argument("--checkpoint", type=_existing_file, required=True, help="checkpoint JSON file")
    _add_env(w, False)
    w.add_argument(
        "--out", default="runs/humanoid/world-model", help="folder for shards and results"
    )
    w.add_argument(
        "--episodes",
        type=int_at_least(1),
        default=20,
        help="training episodes (a quarter more are held out)",
    )
    w.add_argument(
        "--action-noise",
        type=real(0.0),
        default=0.1,
        help="action noise, fraction of the half-width of the action box",
    )
    w.add_argument(
        "--updates",
        type=int_at_least(1),
        default=None,
        help="train every model for this many updates instead of --seconds",
    )
    w.add_argument(
        "--seconds",
        type=positive_real,
        default=30.0,
        help="training wall clock per model",
    )
    w.add_argument("--hidden", type=int_at_least(1), default=64, help="width of every model")
    w.add_argument(
        "--kinds", nargs="+", choices=wm.MODEL_KINDS, default=list(wm.MODEL_KINDS), help="models"
    )
    w.add_argument(
        "--k",
        type=int_at_least(1),
        nargs="+",
        default=[1, 10, 50],
        help="prediction horizons",
    )
    w.add_argument(
        "--imagine-steps",
        type=int_at_least(1),
        default=1000,
        help="length of the imagined rollout",
    )
    w.add_argument("--seed", type=int_at_least(0), default=0, help="seed")
    w.set_defaults(func=_run, handler=_cmd_world_model, _parser=w)

    pl = sub.add_parser(
        "plot",
        help="learning curves (PNG) from log.jsonl files",
        description="Plot return, episode length and forward displacement against env steps and wall "
        "clock for one or more run logs.",
        formatter_class=fmt,
    )
    pl.add_argument("logs", nargs="+", help="log.jsonl files")
    pl.add_argument("--out", default="runs/humanoid/curves.png", help="PNG path")
    pl.add_argument("--title", default="ARS learning curves", help="figure title")
    pl.add_argument("--dpi", type=int_at_least(30), default=100, help="resolution")
    pl.set_defaults(func=_run, handler=_cmd_plot, _parser=pl)
