"""Train a small causal Performer (FAVOR+) byte-level language model on orthotorch's own source.

Run: ``python examples/performer_lm.py [--steps 300] [--slim]``. With ``--slim`` each step is trained
by model-level SLiM: the sequence is processed in slices through all layers and the per-layer prefix
states are carried forward and back-propagated, so memory does not grow with the sequence length.
The same training is available as ``orthotorch attention``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import orthotorch
from orthotorch.attention import PerformerLM, slim_train_step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--slim", action="store_true", help="train by model-level SLiM (slices of 128)")
    args = ap.parse_args()

    # the corpus: every .py file of the installed library, as bytes (vocabulary 256)
    root = Path(orthotorch.__file__).parent
    text = b"\n".join(p.read_bytes() for p in sorted(root.rglob("*.py")))
    data = torch.tensor(list(text), dtype=torch.int64)

    gen = torch.Generator().manual_seed(0)
    model = PerformerLM(256, dim=128, depth=2, heads=4, num_features=64, redraw_interval=100)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    bar = tqdm(range(args.steps), unit="step")
    for step in bar:
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
        if step % 10 == 0:
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}")

    # generation costs O(1) per token: each new byte only updates the per-layer prefix states
    prompt = torch.tensor([list(b"def ")], dtype=torch.int64)
    out = model.generate(prompt, 120, generator=gen, temperature=0.8)
    print(bytes(out[0].tolist()).decode("utf-8", errors="replace"))


if __name__ == "__main__":
    main()
