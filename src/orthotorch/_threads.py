"""The torch thread count of one run, restored afterwards (shared by the demo, ``orthotorch rnn`` and the RL screening model)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["torch_threads"]


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(threads)``; ``None`` leaves the count as it is.

    The previous count is restored on exit, also on an exception or Ctrl-C: these runs are library
    functions too (tests, notebooks), and a caller's own thread setting must survive them.
    ``torch.set_num_threads`` itself rejects a count below 1 (``RuntimeError``).
    """
    before = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        yield
    finally:
        torch.set_num_threads(before)
