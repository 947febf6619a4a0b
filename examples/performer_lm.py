"""Train a small causal Performer (FAVOR+) byte-level language model on orthotorch's own source.

Run: ``python examples/performer_lm.py [--steps 300] [--slim]``. With ``--slim`` each step is trained
by model-level SLiM: the sequence is processed in slices through all layers and the per-layer prefix
states are carried forward and back-propagated, so memory does not grow with the sequence length.
The same training, with more options, is available as ``orthotorch attention``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import orthotorch
from orthotorch.attention import PerformerLM, slim_train_step


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def main() -> None:
    ap = argparse.ArgumentParser(
        description="Train a small causal Performer (FAVOR+) byte-level language model on "
        "orthotorch's own source.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--steps", type=positive_int, default=300, help="training steps")
    ap.add_argument("--seq-len", type=positive_int, default=512, help="bytes per sequence")
    ap.add_argument("--slim", action="store_true", help="train by model-level SLiM (slices of 128)")
    args = ap.parse_args()

    # the corpus: every .py file of the installed library, as bytes (vocabulary 256)
    root = Path(orthotorch.__file__).parent
    text = b"\n".join(p.read_bytes() for p in sorted(root.rglob("*.py")))
    data = torch.tensor(list(text), dtype=torch.int64)
    if args.seq_len + 2 > data.numel():
        ap.error(f"argument --seq-len: must be at most {data.numel() - 2}, got {args.seq_len}")

    gen = torch.Generator().manual_seed(0)
    # every layer draws its own random features from the model's seed; redrawn every 100 steps
    model = PerformerLM(
        256, dim=128, depth=2, heads=4, num_features=64, redraw_interval=100, seed=0
    )
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    with tqdm(total=args.steps, unit="step") as bar:
        for step in range(args.steps):
            start = torch.randint(0, data.numel() - args.seq_len - 1, (8,), generator=gen)
            batch = data[start[:, None] + torch.arange(args.seq_len + 1)]
            x, y = batch[:, :-1], batch[:, 1:]
            opt.zero_grad()
            if args.slim:
                loss = slim_train_step(model, x, y, slice_len=128)
            else:
                loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
                loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            bar.update(1)
            if step % 10 == 0:
                bar.set_postfix(loss=f"{float(loss.detach()):.3f}")

    # generation costs O(1) per token: each new byte only updates the per-layer prefix states
    prompt = torch.tensor([list(b"def ")], dtype=torch.int64)
    out = model.generate(prompt, 120, generator=gen, temperature=0.8)
    print(bytes(out[0].tolist()).decode("utf-8", errors="replace"))


if __name__ == "__main__":
    main()
