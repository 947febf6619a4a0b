"""orthotorch.nn.tasks: generators correct by construction, baselines equal the optimal no-memory loss."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from orthotorch.nn import tasks


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("T", [0, 7, 100])
def test_copying_target_is_the_copied_symbols(T):
    x, y = tasks.copying_batch(64, T, generator=gen(T))
    L = T + 20
    assert x.shape == y.shape == (64, L) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y[:, -10:], x[:, :10])  # the target is exactly the first 10 inputs
    assert ((x[:, :10] >= 1) & (x[:, :10] <= 8)).all()  # alphabet 1..8
    assert (x[:, T + 10] == tasks.COPY_MARKER).all()  # the marker after T blanks
    blank_x = torch.ones(L, dtype=torch.bool)
    blank_x[:10] = False
    blank_x[T + 10] = False
    assert (x[:, blank_x] == tasks.COPY_BLANK).all()
    assert (y[:, : T + 10] == tasks.COPY_BLANK).all()
    assert set(x[:, :10].unique().tolist()) == set(range(1, 9))  # every symbol occurs
    x2, _ = tasks.copying_batch(64, T, generator=gen(T))
    assert torch.equal(x, x2)  # seeded


@pytest.mark.parametrize("T", [10, 100])
def test_copying_baseline_is_the_loss_of_the_optimal_no_memory_predictor(T):
    # the best predictor that ignores the inputs outputs, at each position, the marginal distribution
    # of the target there; estimate it on a large sample and score it on an independent one
    n = 20000
    _, y_fit = tasks.copying_batch(n, T, generator=gen(1))
    _, y = tasks.copying_batch(n, T, generator=gen(2))
    counts = torch.zeros(T + 20, 9, dtype=torch.float64)
    counts.scatter_add_(1, y_fit.T, torch.ones(T + 20, n, dtype=torch.float64))
    probs = counts / n
    loss = -torch.log(probs.gather(1, y.T)).mean()
    assert float(loss) == pytest.approx(tasks.copying_baseline(T), rel=0.01)
    # and a logits version of the predictor scored by the task's own loss
    logits = torch.log(probs.clamp_min(1e-300)).float().unsqueeze(0).expand(n, -1, -1)
    assert float(tasks.copying_loss(logits, y)) == pytest.approx(
        tasks.copying_baseline(T), rel=0.01
    )


def test_copying_baseline_values_from_the_papers():
    assert tasks.copying_baseline(1000) == pytest.approx(10 * math.log(8) / 1020)
    assert round(tasks.copying_baseline(1000), 4) == 0.0204
    assert round(tasks.copying_baseline(2000), 4) == 0.0103


def test_copying_accuracy_counts_only_the_copied_symbols():
    _, y = tasks.copying_batch(8, 5, generator=gen(3))
    perfect = torch.nn.functional.one_hot(y, 9).float()
    assert float(tasks.copying_accuracy(perfect, y)) == 1.0
    blanks = torch.nn.functional.one_hot(torch.zeros_like(y), 9).float()
    assert (
        float(tasks.copying_accuracy(blanks, y)) == 0.0
    )  # predicting blank everywhere copies nothing


def test_adding_target_is_the_sum_of_the_two_marked_values():
    T = 750
    x, y = tasks.adding_batch(256, T, generator=gen(4), dtype=torch.float64)
    assert x.shape == (256, T, 2) and y.shape == (256,)
    marks = x[..., 1]
    assert (marks.sum(1) == 2).all()
    assert (marks[:, : T // 2].sum(1) == 1).all() and (marks[:, T // 2 :].sum(1) == 1).all()
    torch.testing.assert_close(y, (x[..., 0] * marks).sum(1))
    assert ((x[..., 0] >= 0) & (x[..., 0] <= 1)).all()


def test_adding_baseline_is_the_mse_of_the_best_constant():
    _, y = tasks.adding_batch(100000, 20, generator=gen(5), dtype=torch.float64)
    assert float(((y - 1.0) ** 2).mean()) == pytest.approx(tasks.ADDING_BASELINE, rel=0.02)
    assert round(tasks.ADDING_BASELINE, 3) == 0.167


def test_sequential_digits_pixel_and_permuted():
    pytest.importorskip("sklearn")
    xtr, ytr, xte, _ = tasks.sequential_digits()
    assert xtr.shape[1:] == (64, 1) and xtr.shape[0] + xte.shape[0] == 1797
    assert xte.shape[0] == round(0.2 * 1797)
    assert float(xtr.min()) >= 0 and float(xtr.max()) <= 1
    assert set(ytr.unique().tolist()) == set(range(10))
    from sklearn.datasets import load_digits

    imgs = torch.as_tensor(load_digits().images, dtype=torch.float32).reshape(-1, 64) / 16
    # pixel order: every training sequence is one image read row by row
    assert any(torch.equal(xtr[0, :, 0], im) for im in imgs)
    pxtr, pytr, _, _ = tasks.sequential_digits(permuted=True)
    assert torch.equal(pytr, ytr)  # same split
    # one fixed permutation of the 64 positions, the same for every image and every call
    # (the first matching column: a few border pixels are 0 in every image, so matches can repeat)
    order = [int((xtr[:, :, 0] == pxtr[:, j : j + 1, 0]).all(0).nonzero()[0]) for j in range(64)]
    assert order != list(range(64))
    torch.testing.assert_close(pxtr, xtr[:, order], rtol=0, atol=0)
    cols = sorted(tuple(c.tolist()) for c in xtr[:, :, 0].T)
    assert cols == sorted(tuple(c.tolist()) for c in pxtr[:, :, 0].T)  # same columns, reordered
    assert torch.equal(tasks.sequential_digits(permuted=True)[0], pxtr)


def test_sequential_digits_without_sklearn_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r"orthotorch\[bilevel\]"):
        tasks.sequential_digits()


def test_bad_task_arguments():
    with pytest.raises(ValueError, match="batch"):
        tasks.copying_batch(0, 5, generator=gen())
    with pytest.raises(TypeError, match="T"):
        tasks.copying_batch(4, 5.0, generator=gen())
    with pytest.raises(ValueError, match="T"):
        tasks.adding_batch(4, 1, generator=gen())
    with pytest.raises(TypeError, match="generator"):
        tasks.adding_batch(4, 10, generator=1)
