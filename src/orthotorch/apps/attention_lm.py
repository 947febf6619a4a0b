"""``orthotorch attention``: train a small causal Performer language model on the library's own source.

The corpus is the ``.py`` files of the installed ``orthotorch`` package (bytes, vocabulary 256), so
nothing is downloaded. With ``--slice-len`` the model is trained by model-level SLiM
(:func:`orthotorch.attention.slim_train_step`), otherwise by ordinary back-propagation.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

import orthotorch
from orthotorch._validation import check_positive_int, check_real
from orthotorch.apps._argtypes import int_at_least, positive_real
from orthotorch.attention import PerformerLM, slim_train_step

DESCRIPTION = (
    "Train a small causal Performer (FAVOR+) byte-level language model on the .py files of the "
    "installed orthotorch package (nothing is downloaded). With --slice-len the model is trained by "
    "model-level SLiM (memory independent of the sequence length), otherwise by ordinary "
    "back-propagation. Prints the mean loss of the first and last tenth of the steps; exit status 0 "
    "if the loss fell (or with fewer than 2 steps), 1 if it did not, 2 for invalid arguments, 130 "
    "when interrupted (Ctrl-C: the steps done so far are summarised)."
)


def load_corpus(root: Path | None = None) -> torch.Tensor:
    """Bytes of every ``.py`` file under ``root`` (default: the orthotorch package) as int64 ``(N,)``."""
    if root is None:
        root = Path(orthotorch.__file__).resolve().parent
    data = b"\n".join(p.read_bytes() for p in sorted(root.rglob("*.py")))
    if len(data) < 1024:
        raise ValueError(f"corpus under {root} is too small ({len(data)} bytes)")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int64)


def train_char_lm(
    *,
    steps: int = 200,
    seq_len: int = 256,
    batch_size: int = 8,
    slice_len: int | None = None,
    dim: int = 128,
    depth: int = 2,
    heads: int = 4,
    num_features: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    progress: bool = True,
    log_every: int = 20,
    data: torch.Tensor | None = None,
    losses: list[float] | None = None,
) -> list[float]:
    """Train a byte-level :class:`PerformerLM`; return the training loss of every step (nats/byte).

    Batches are random windows of ``data`` (default :func:`load_corpus`) drawn from a generator seeded
    with ``seed``; the model's random features are seeded with ``seed`` too. ``losses``, if given, is
    appended to step by step, so a caller keeps the partial record when training is interrupted.
    """
    for name, value in (
        ("steps", steps), ("seq_len", seq_len), ("batch_size", batch_size), ("dim", dim),
        ("depth", depth), ("heads", heads), ("num_features", num_features), ("log_every", log_every),
    ):  # fmt: skip
        check_positive_int(name, value)
    if slice_len is not None:
        check_positive_int("slice_len", slice_len)
    check_real("lr", lr, minimum=0.0, min_inclusive=False)
    check_positive_int("seed", seed, minimum=0)
    gen = torch.Generator().manual_seed(seed)
    data = load_corpus() if data is None else data
    if seq_len + 2 > data.numel():
        raise ValueError(
            f"`seq_len` must be at most {data.numel() - 2} (corpus size − 2), got {seq_len}"
        )
    model = PerformerLM(
        256,
        dim=dim,
        depth=depth,
        heads=heads,
        num_features=num_features,
        redraw_interval=100,
        seed=seed,
        chunk_size=64,
    )
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    losses = [] if losses is None else losses
    x = data[None, :seq_len]  # (replaced by every batch; the sample's prompt comes from the last)
    with tqdm(total=steps, disable=not progress, desc="performer-lm", unit="step") as bar:
        for step in range(steps):
            starts = torch.randint(0, data.numel() - seq_len - 1, (batch_size,), generator=gen)
            chunk = data[starts[:, None] + torch.arange(seq_len + 1)]
            x, y = chunk[:, :-1], chunk[:, 1:]
            opt.zero_grad(set_to_none=True)
            if slice_len is None:
                logits = model(x)
                loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
                loss.backward()
            else:
                loss = slim_train_step(model, x, y, slice_len=slice_len)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            bar.update(1)
            if step % log_every == 0 or step == steps - 1:
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
    if progress:
        sample = model.generate(x[:1, :32], 64, generator=gen, temperature=0.8)
        text = bytes(sample[0].tolist()).decode("utf-8", errors="replace")
        print(f"sample: {text!r}")
    return losses


def _summary(losses: list[float]) -> tuple[str, float, float]:
    k = max(1, len(losses) // 10)
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    text = (
        f"loss (nats/byte): first {k} steps {first:.3f} -> last {k} steps {last:.3f} "
        f"(uniform = {math.log(256):.3f})"
    )
    return text, first, last


def _cmd(args: argparse.Namespace) -> int:
    if args.dim % args.heads:
        args.parser.error(
            f"argument --dim: must be divisible by --heads ({args.heads}), got {args.dim}"
        )
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    losses: list[float] = []
    try:
        data = load_corpus()
        if args.seq_len + 2 > data.numel():
            args.parser.error(
                f"argument --seq-len: must be at most {data.numel() - 2} (corpus size − 2), "
                f"got {args.seq_len}"
            )
        train_char_lm(
            steps=args.steps,
            seq_len=args.seq_len,
            batch_size=args.batch_size,
            slice_len=args.slice_len,
            dim=args.dim,
            depth=args.depth,
            heads=args.heads,
            num_features=args.num_features,
            lr=args.lr,
            seed=args.seed,
            progress=not args.quiet,
            data=data,
            losses=losses,
        )
    except KeyboardInterrupt:
        done = f"; {_summary(losses)[0]}" if losses else ""
        print(f"interrupted after {len(losses)}/{args.steps} steps{done}", file=sys.stderr)
        return 130
    text, first, last = _summary(losses)
    print(f"{text}; {time.perf_counter() - t0:.1f} s")
    return 0 if len(losses) < 2 or last < first else 1


def register(subparsers: Any) -> None:
    """Add the ``attention`` subcommand to the ``orthotorch`` command's subparsers."""
    p = subparsers.add_parser(
        "attention",
        help="train a small causal Performer LM on the library's own source (FAVOR+, SLiM)",
        description=DESCRIPTION,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--steps", type=int_at_least(1), default=200, help="training steps")
    p.add_argument(
        "--seq-len", type=int_at_least(1), default=256, help="tokens (bytes) per sequence"
    )
    p.add_argument("--batch-size", type=int_at_least(1), default=8, help="sequences per step")
    p.add_argument(
        "--slice-len",
        type=int_at_least(1),
        default=None,
        help="train by model-level SLiM with slices of this many tokens (None: plain back-propagation)",
    )
    p.add_argument("--dim", type=int_at_least(1), default=128, help="model width")
    p.add_argument("--depth", type=int_at_least(1), default=2, help="number of layers")
    p.add_argument(
        "--heads",
        type=int_at_least(1),
        default=4,
        help="attention heads (must divide --dim)",
    )
    p.add_argument(
        "--num-features",
        type=int_at_least(1),
        default=64,
        help="FAVOR+ random features per head",
    )
    p.add_argument("--lr", type=positive_real, default=3e-3, help="AdamW learning rate")
    p.add_argument(
        "--seed", type=int_at_least(0), default=0, help="seed of the batches and features"
    )
    p.add_argument(
        "--threads",
        type=int_at_least(0),
        default=0,
        help="torch threads (0: torch default)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar and no sample")
    p.set_defaults(func=_cmd, parser=p)
