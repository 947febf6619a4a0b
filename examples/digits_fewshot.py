"""Few-shot digits with MAML-style meta-learning: exact vs FOM vs UFOM hypergradients.

    python examples/digits_fewshot.py --shots 1 --iterations 300

Each meta-iteration samples 16 five-way tasks from the meta-train classes (a class is a digit under
one of the 8 symmetries of the square; half of the 80 classes are meta-train), adapts a small MLP
with r inner SGD steps on each task's support set, and updates the initialisation θ with Adam on the
hypergradient of the query loss. Meta-test tasks use the other 40 classes. Runs offline (the digits
ship with scikit-learn).
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F

from orthotorch.apps.bilevel.cli import MAX_SHOTS
from orthotorch.apps.bilevel.experiments import evaluate_fewshot
from orthotorch.apps.bilevel.tasks import DigitsFewShot, digits_mlp
from orthotorch.bilevel import UFOMController, hypergradient_vmap, module_params


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--shots", type=int, default=1, help="support images per class (5-way)")
    parser.add_argument("--steps", type=int, default=10, help="inner SGD steps r")
    parser.add_argument("--inner-lr", type=float, default=0.1, help="inner step size α")
    parser.add_argument("--iterations", type=int, default=300, help="meta-iterations per method")
    parser.add_argument("--q", type=float, default=0.1, help="UFOM probability in (0, 1]")
    parser.add_argument(
        "--adaptive", action="store_true", help="adapt q (floor 0.05), start at --q"
    )
    args = parser.parse_args()
    if not 1 <= args.shots <= MAX_SHOTS:
        parser.error(f"argument --shots: must lie in 1..{MAX_SHOTS}, got {args.shots}")
    if args.steps < 0 or args.iterations < 1:
        parser.error("arguments --steps (>= 0) and --iterations (>= 1) out of range")
    if not (0.0 < args.q <= 1.0):
        parser.error(f"argument --q: must lie in (0, 1], got {args.q}")
    if not (math.isfinite(args.inner_lr) and args.inner_lr >= 0):
        parser.error(f"argument --inner-lr: must be finite and >= 0, got {args.inner_lr}")

    train, test = DigitsFewShot("train"), DigitsFewShot("test")
    for method in ("exact", "fom", "ufom"):
        gen = torch.Generator().manual_seed(1)
        model = digits_mlp(64, 5, generator=torch.Generator().manual_seed(0))

        def loss(params, data, model=model):
            x, y = data
            return F.cross_entropy(torch.func.functional_call(model, params, (x,)), y)

        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        mode = "adaptive" if args.adaptive else "fixed"
        q = UFOMController(args.q, mode=mode, floor=0.05) if method == "ufom" else None
        cost, t0 = 0.0, time.perf_counter()
        for _ in range(args.iterations):
            xs, ys, xq, yq = train.sample(16, shots=args.shots, generator=gen)
            grads, info = hypergradient_vmap(
                loss,
                module_params(model),
                (xs, ys),
                (xq, yq),
                steps=args.steps,
                lr=args.inner_lr,
                method=method,
                q=q,
                generator=gen,
                return_info=True,
            )
            for name, p in model.named_parameters():
                p.grad = grads[name]
            opt.step()
            cost += info.cost()
        acc, ci = evaluate_fewshot(
            model,
            test,
            ways=5,
            shots=args.shots,
            steps=args.steps,
            inner_lr=args.inner_lr,
            n_tasks=400,
            generator=torch.Generator().manual_seed(123),
        )
        extra = f", final q {q.q:.3f}" if q is not None else ""
        print(
            f"{method:6s} meta-test accuracy {acc:5.1f}% ± {ci:.1f}  compute {cost:9.0f} grad evals"
            f"  {time.perf_counter() - t0:5.1f} s{extra}"
        )


if __name__ == "__main__":
    main()
