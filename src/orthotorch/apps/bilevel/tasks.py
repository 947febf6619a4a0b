"""Task distributions for meta-learning demos: few-shot digits (scikit-learn's 8×8 set) and sinusoids.

Everything ships with the installed packages: the digits images (1,797 of them, 10 classes) are part of
scikit-learn (extra ``bilevel``), nothing is downloaded. All sampling takes a ``torch.Generator``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from orthotorch._validation import check_choice, check_generator, check_positive_int

__all__ = ["DigitsFewShot", "SinusoidTasks", "digits_mlp", "sinusoid_mlp"]


def _check_gen(generator: object) -> torch.Generator:
    """A required generator: ``TypeError`` for ``None`` or anything that is not a torch.Generator."""
    gen = check_generator("generator", generator)
    if gen is None:
        raise TypeError(
            "`generator` must be a torch.Generator (sampling never uses the global RNG), got None"
        )
    return gen


def _counts(n_tasks: object, shots: object, queries: object) -> tuple[int, int, int]:
    return (
        check_positive_int("n_tasks", n_tasks),
        check_positive_int("shots", shots),
        check_positive_int("queries", queries),
    )


def _load_digits() -> tuple[Tensor, Tensor]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the digits few-shot tasks need scikit-learn: pip install 'orthotorch[bilevel]'"
        ) from exc
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float64) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    return x, y


class DigitsFewShot:
    """N-way K-shot classification tasks from the 8×8 digits, with disjoint class splits.

    A class is a (digit, symmetry) pair: with ``augment="dihedral"`` (default) each digit under each
    of the 8 symmetries of the square (4 rotations × optional transpose) is its own class, 80 classes
    in all (the Omniglot recipe of rotated classes); ``"rotations"`` gives 40, ``"none"`` 10. The
    classes are split into disjoint meta-train and meta-test sets:

    - ``class_split="random"`` (default): a random half of the classes (from ``split_seed``) is
      meta-train, the rest meta-test. A digit may appear in both splits under different symmetries
      (e.g. "3" in train, "3 rotated 90°" in test), so low-level stroke features transfer.
    - ``class_split="digit"``: the digits in ``test_classes`` (default 5–9, with all their
      symmetries) are meta-test, the others meta-train; no digit is shared. With only five digits
      to learn from, the MLP meta-overfits here (see ``docs/bilevel.md``).

    A task picks ``ways`` classes of its split, assigns them labels ``0..ways−1`` in a random order and
    draws ``shots`` support and ``queries`` query images per class without replacement. Images are
    standardised with the mean/std of all pixels (two scalars), transformed and flattened to 64.

    Args:
        split: ``"train"`` or ``"test"``.
        class_split: ``"random"`` or ``"digit"``.
        test_classes: meta-test digits for ``class_split="digit"``.
        augment: ``"dihedral"``, ``"rotations"`` or ``"none"``.
        split_seed: seed of the random class split (the same seed gives complementary splits).
        dtype: floating dtype of the images.
        device: where sampled tensors live.
    """

    def __init__(
        self,
        split: str = "train",
        *,
        class_split: str = "random",
        test_classes: Sequence[int] = (5, 6, 7, 8, 9),
        augment: str = "dihedral",
        split_seed: int = 0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        check_choice("split", split, ("train", "test"))
        check_choice("class_split", class_split, ("random", "digit"))
        check_choice("augment", augment, ("none", "rotations", "dihedral"))
        n_tf = {"none": 1, "rotations": 4, "dihedral": 8}[augment]
        test = sorted({int(c) for c in test_classes})
        if not test or any(c < 0 or c > 9 for c in test) or len(test) == 10:
            raise ValueError(
                f"`test_classes` must be a proper subset of 0..9, got {test_classes!r}"
            )
        x, y = _load_digits()
        x = (x - x.mean()) / x.std()
        imgs = x.reshape(-1, 8, 8)
        all_classes = [(c, k) for c in range(10) for k in range(n_tf)]
        if class_split == "digit":
            in_test = [c in test for c, _ in all_classes]
        else:
            perm = torch.randperm(
                len(all_classes), generator=torch.Generator().manual_seed(split_seed)
            )
            test_idx = set(perm[len(all_classes) // 2 :].tolist())
            in_test = [i in test_idx for i in range(len(all_classes))]
        self.split = split
        self.classes = [c for c, t in zip(all_classes, in_test) if t == (split == "test")]
        self.by_class = [
            _transform(imgs[y == c], k).reshape(-1, 64).to(dtype=dtype, device=device)
            for c, k in self.classes
        ]
        self.dtype, self.device = dtype, device

    def sample(
        self,
        n_tasks: int,
        *,
        ways: int = 5,
        shots: int = 1,
        queries: int = 15,
        generator: torch.Generator,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Draw ``n_tasks`` tasks.

        Returns:
            ``(xs, ys, xq, yq)``: support images ``(T, ways·shots, 64)``, labels ``(T, ways·shots)``
            int64, query images ``(T, ways·queries, 64)``, labels ``(T, ways·queries)``.
        """
        n_tasks, shots, queries = _counts(n_tasks, shots, queries)
        _check_gen(generator)
        if check_positive_int("ways", ways) < 2 or ways > len(self.classes):
            raise ValueError(
                f"`ways` must be an int in [2, {len(self.classes)}] for the "
                f"{self.split} split, got {ways!r}"
            )
        smallest = min(len(c) for c in self.by_class)
        if shots + queries > smallest:
            raise ValueError(
                f"`shots + queries` must be <= {smallest} (images per class), got {shots + queries}"
            )
        xs, ys, xq, yq = [], [], [], []
        for _ in range(n_tasks):
            chosen = torch.randperm(len(self.classes), generator=generator)[:ways].tolist()
            s_x, q_x = [], []
            for c in chosen:
                imgs = self.by_class[c]
                perm = torch.randperm(len(imgs), generator=generator)[: shots + queries]
                perm = perm.to(imgs.device)
                s_x.append(imgs[perm[:shots]])
                q_x.append(imgs[perm[shots:]])
            xs.append(torch.cat(s_x))
            xq.append(torch.cat(q_x))
            ys.append(torch.arange(ways).repeat_interleave(shots))
            yq.append(torch.arange(ways).repeat_interleave(queries))
        dev = self.by_class[0].device
        return (torch.stack(xs), torch.stack(ys).to(dev), torch.stack(xq), torch.stack(yq).to(dev))


def _transform(imgs: Tensor, k: int) -> Tensor:
    """The k-th symmetry of the square (k in 0..7) applied to ``(N, 8, 8)`` images."""
    if k >= 4:
        imgs = imgs.transpose(-1, -2)
    return torch.rot90(imgs, k % 4, dims=(-2, -1))


class SinusoidTasks:
    """Sinusoid regression tasks y = A·sin(x − φ), A ~ U[0.1, 5], φ ~ U[0, π], x ~ U[−5, 5] (MAML).

    Args:
        dtype: floating dtype; device: where samples live.
    """

    def __init__(
        self, *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
    ) -> None:
        self.dtype, self.device = dtype, device

    def sample(
        self, n_tasks: int, *, shots: int = 10, queries: int = 10, generator: torch.Generator
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Draw ``n_tasks`` tasks: ``(xs (T, shots, 1), ys (T, shots, 1), xq (T, queries, 1), yq)``."""
        n_tasks, shots, queries = _counts(n_tasks, shots, queries)
        gen, f64 = _check_gen(generator), torch.float64
        amp = 0.1 + 4.9 * torch.rand(n_tasks, 1, 1, generator=gen, dtype=f64)
        phase = math.pi * torch.rand(n_tasks, 1, 1, generator=gen, dtype=f64)
        x = -5.0 + 10.0 * torch.rand(n_tasks, shots + queries, 1, generator=gen, dtype=f64)
        y = amp * torch.sin(x - phase)
        x, y = (t.to(dtype=self.dtype, device=self.device) for t in (x, y))
        return x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:]


def digits_mlp(
    hidden: int = 64,
    ways: int = 5,
    *,
    generator: torch.Generator,
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """``64 → hidden → hidden → ways`` tanh MLP, initialised from ``generator`` (Glorot uniform)."""
    return _mlp([64, hidden, hidden, ways], nn.Tanh, generator, dtype)


def sinusoid_mlp(
    hidden: int = 40, *, generator: torch.Generator, dtype: torch.dtype = torch.float32
) -> nn.Module:
    """``1 → hidden → hidden → 1`` ReLU MLP (the MAML sinusoid model), initialised from ``generator``."""
    return _mlp([1, hidden, hidden, 1], nn.ReLU, generator, dtype)


def _mlp(
    sizes: list[int], act: type[nn.Module], generator: torch.Generator, dtype: torch.dtype
) -> nn.Module:
    _check_gen(generator)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        lin = nn.Linear(a, b, dtype=dtype)
        bound = math.sqrt(6.0 / (a + b))
        with torch.no_grad():
            lin.weight.copy_(
                (torch.rand(b, a, generator=generator, dtype=torch.float64) * 2 - 1) * bound
            )
            lin.bias.zero_()
        layers.append(lin)
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers)
