"""Long-memory benchmark tasks, generated on the fly from a ``torch.Generator``.

- :func:`copying_batch`: the copying memory task exactly as in expRNN / scoRNN: 10 symbols from an
  alphabet of 8, then ``T`` blanks... (see the function); no-memory baseline ``10·log(8)/(T + 20)``
  (:func:`copying_baseline`).
- :func:`adding_batch`: the adding problem (T = 750 in the literature); baseline MSE 1/6 ≈ 0.167
  (:data:`ADDING_BASELINE`, predicting the mean 1).
- :func:`sequential_digits`: scikit-learn's 8×8 digits read pixel by pixel (64 steps), optionally under a
  fixed random permutation; no download (the images ship with scikit-learn, the ``bilevel``/``dev``
  extra).
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from orthotorch._validation import check_bool, check_generator, check_positive_int, check_tensor

__all__ = [
    "ADDING_BASELINE",
    "COPY_BLANK",
    "COPY_MARKER",
    "adding_batch",
    "copying_accuracy",
    "copying_baseline",
    "copying_batch",
    "copying_loss",
    "one_hot",
    "sequential_digits",
]

#: Input/target code of the blank symbol in the copying task.
COPY_BLANK = 0
#: Input code of the marker ("start copying now"); the alphabet is ``1..n_symbols``.
COPY_MARKER = 9
#: MSE of the best constant prediction on the adding task (``Var(u₁ + u₂) = 2/12``).
ADDING_BASELINE = 1.0 / 6.0


def copying_baseline(T: int, *, n_copy: int = 10, n_symbols: int = 8) -> float:
    """Cross-entropy of the optimal no-memory predictor: ``n_copy·log(n_symbols)/(T + 2·n_copy)``.

    It predicts blank with certainty for the first ``T + n_copy`` outputs and the uniform distribution over
    the alphabet for the last ``n_copy``; 0.0204 at T = 1000 and 0.0103 at T = 2000.
    """
    T = check_positive_int("T", T, minimum=0)
    return n_copy * math.log(n_symbols) / (T + 2 * n_copy)


def copying_batch(
    batch: int,
    T: int,
    *,
    generator: torch.Generator | None,
    n_copy: int = 10,
    n_symbols: int = 8,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch of the copying task (expRNN's ``copying_data``): ``(x, y)``, both ``(batch, T + 2·n_copy)`` int64.

    ``x = [s_1 … s_n, 0 × T, marker, 0 × (n − 1)]`` with ``s_i`` uniform in ``1..n_symbols`` and the marker
    ``n_symbols + 1`` (9); ``y = [0 × (T + n), s_1 … s_n]``. Inputs take ``n_symbols + 2`` values (one-hot
    them with :func:`one_hot`), targets ``n_symbols + 1`` (blank + alphabet).
    """
    batch = check_positive_int("batch", batch)
    T = check_positive_int("T", T, minimum=0)
    n_copy = check_positive_int("n_copy", n_copy)
    n_symbols = check_positive_int("n_symbols", n_symbols)
    check_generator("generator", generator)
    gen_device = generator.device if generator is not None else torch.device("cpu")
    seq = torch.randint(1, n_symbols + 1, (batch, n_copy), generator=generator, device=gen_device)
    L = T + 2 * n_copy
    x = torch.zeros(batch, L, dtype=torch.int64, device=gen_device)
    y = torch.zeros(batch, L, dtype=torch.int64, device=gen_device)
    x[:, :n_copy] = seq
    x[:, n_copy + T] = n_symbols + 1
    y[:, T + n_copy :] = seq
    return x.to(device or gen_device), y.to(device or gen_device)


def one_hot(x: torch.Tensor, num_classes: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(..., L)`` int64 → ``(..., L, num_classes)`` one-hot in ``dtype``."""
    check_tensor("x", x)
    return F.one_hot(x, num_classes).to(dtype)


def copying_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over every position (expRNN's loss); ``logits (B, L, C)``, ``y (B, L)``."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def copying_accuracy(logits: torch.Tensor, y: torch.Tensor, *, n_copy: int = 10) -> torch.Tensor:
    """Fraction of the last ``n_copy`` positions (the copied symbols) predicted exactly; 0-d tensor."""
    return (logits[:, -n_copy:].argmax(-1) == y[:, -n_copy:]).to(torch.float32).mean()


def adding_batch(
    batch: int,
    T: int = 750,
    *,
    generator: torch.Generator | None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch of the adding problem: ``x (batch, T, 2)``, ``y (batch,)``.

    Channel 0 holds ``u_t ~ U[0, 1]``, channel 1 marks two positions, one uniform in the first half
    ``[0, T/2)`` and one in the second ``[T/2, T)``; ``y`` is the sum of the two marked values. Predicting the
    mean 1 gives MSE :data:`ADDING_BASELINE` = 1/6.
    """
    batch = check_positive_int("batch", batch)
    T = check_positive_int("T", T, minimum=2)
    check_generator("generator", generator)
    gen_device = generator.device if generator is not None else torch.device("cpu")
    u = torch.rand(batch, T, generator=generator, device=gen_device, dtype=torch.float64)
    half = T // 2
    i = torch.randint(0, half, (batch,), generator=generator, device=gen_device)
    j = torch.randint(half, T, (batch,), generator=generator, device=gen_device)
    marks = torch.zeros(batch, T, dtype=torch.float64, device=gen_device)
    rows = torch.arange(batch, device=gen_device)
    marks[rows, i] = 1.0
    marks[rows, j] = 1.0
    y = u[rows, i] + u[rows, j]
    x = torch.stack([u, marks], dim=-1)
    target_device = device or gen_device
    return x.to(dtype=dtype, device=target_device), y.to(dtype=dtype, device=target_device)


def sequential_digits(
    *,
    permuted: bool = False,
    seed: int = 0,
    test_fraction: float = 0.2,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's 8×8 digits as sequences: ``(x_train, y_train, x_test, y_test)``.

    ``x (N, 64, 1)`` holds the pixels in ``[0, 1]`` read row by row (or in the order of a fixed random
    permutation of the 64 positions drawn from ``seed`` when ``permuted``); ``y (N,)`` int64 in ``0..9``.
    The split (test ``test_fraction`` of the 1,797 images) is drawn from ``seed``, the same for both orders.

    Raises:
        ImportError: scikit-learn is missing (install the ``bilevel`` extra: ``pip install orthotorch[bilevel]``).
    """
    check_bool("permuted", permuted)
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"`test_fraction` must lie in (0, 1), got {test_fraction!r}")
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # heavy optional dependency
        raise ImportError(
            "sequential_digits needs scikit-learn: pip install 'orthotorch[bilevel]' (or scikit-learn)"
        ) from e
    data = load_digits()
    x = torch.as_tensor(data.images, dtype=torch.float64).reshape(-1, 64) / 16.0
    y = torch.as_tensor(data.target, dtype=torch.int64)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(x.shape[0], generator=gen)  # the split does not depend on `permuted`
    if permuted:
        x = x[:, torch.randperm(64, generator=gen)]
    n_test = round(test_fraction * x.shape[0])
    test, train = order[:n_test], order[n_test:]
    x = x.to(dtype).unsqueeze(-1)
    return x[train], y[train], x[test], y[test]
