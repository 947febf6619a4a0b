"""``orthotorch attention``: train a small causal Performer language model on the library's own source.

The corpus is the ``.py`` files of the installed ``orthotorch`` package (bytes, vocabulary 256), so
nothing is downloaded. With ``--slice-len`` the model is trained by model-level SLiM
(:func:`orthotorch.attention.slim_train_step`), otherwise by ordinary back-propagation.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch


def load_corpus(root: Path | None = None) -> torch.Tensor:
    """Bytes of every ``.py`` file under ``root`` (default: the orthotorch package) as int64 ``(N,)``."""
    if root is None:
        import orthotorch

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
) -> list[float]:
    """Train a byte-level :class:`PerformerLM`; return the training loss of every step (nats/byte).

    Batches are random windows of the corpus drawn from a generator seeded with ``seed``.
    """
    from tqdm import tqdm

    from orthotorch.attention import PerformerLM, slim_train_step

    gen = torch.Generator().manual_seed(seed)
    data = load_corpus()
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
    losses: list[float] = []
    bar = tqdm(range(steps), disable=not progress, desc="performer-lm", unit="step")
    for step in bar:
        starts = torch.randint(0, data.numel() - seq_len - 1, (batch_size,), generator=gen)
        idx = starts[:, None] + torch.arange(seq_len + 1)
        chunk = data[idx]
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
        if progress and (step % log_every == 0 or step == steps - 1):
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    if progress:
        sample = model.generate(x[:1, :32], 64, generator=gen, temperature=0.8)
        text = bytes(sample[0].tolist()).decode("utf-8", errors="replace")
        print(f"sample: {text!r}")
    return losses


def _cmd(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    losses = train_char_lm(
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
    )
    k = max(1, len(losses) // 10)
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    print(
        f"loss (nats/byte): first {k} steps {first:.3f} -> last {k} steps {last:.3f} "
        f"(uniform = {math.log(256):.3f}); {time.perf_counter() - t0:.1f} s"
    )
    return 0 if last < first else 1


def register(subparsers) -> None:
    """Add the ``attention`` subcommand to the ``orthotorch`` command's subparsers."""
    p = subparsers.add_parser(
        "attention",
        help="train a small causal Performer LM on the library's own source (FAVOR+, SLiM)",
        description=__doc__.splitlines()[0],
    )
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument(
        "--slice-len", type=int, default=None, help="train by model-level SLiM with these slices"
    )
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--num-features", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or sample")
    p.set_defaults(func=_cmd)
