"""``OrthogonalRNN``: a multi-layer RNN with orthogonal recurrent matrices and ``nn.RNN``'s call signature."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from orthotorch._validation import (
    check_bool,
    check_generator,
    check_positive_int,
    check_tensor,
    describe,
)
from orthotorch.nn.cells import OrthogonalRNNCell

__all__ = ["OrthogonalRNN"]


class OrthogonalRNN(nn.Module):
    """Stack of :class:`~orthotorch.nn.OrthogonalRNNCell` layers with ``nn.RNN``'s interface.

    ``out, h_n = rnn(x, h_0)``; ``x`` is ``(T, B, input_size)`` (``(B, T, input_size)`` with
    ``batch_first``), ``(T, input_size)`` unbatched, or a ``PackedSequence``; ``h_0`` is
    ``(num_layers, B, hidden_size)`` (``(num_layers, hidden_size)`` unbatched; default zeros). ``out``
    holds the last layer's states ``(T, B, hidden_size)`` (a ``PackedSequence`` for packed input) and
    ``h_n`` the final state of every layer ``(num_layers, B, hidden_size)``. Variable lengths: pass a
    ``PackedSequence`` or ``lengths`` ``(B,)`` (ints in ``1..T``) with a padded ``x``: outputs past a
    sequence's end are zero and ``h_n`` is its state at its last step, exactly as with packing.

    Per forward, each layer evaluates its recurrent matrix once (a parametrization is not recomputed
    per step) and its input map as one GEMM over all steps; the loop itself runs in torch's fused C++
    kernel for ``tanh``/``relu`` and in a hand-written autograd function for ``modrelu``/``identity``.

    Args:
        input_size, hidden_size: as in ``nn.RNN``.
        num_layers: stacked layers (layer ``l > 0`` reads layer ``l − 1``'s states).
        nonlinearity, bias, constraint, group, init, input_constraint, input_init: as in
            :class:`~orthotorch.nn.OrthogonalRNNCell` (shared by every layer).
        batch_first: ``x`` and ``out`` are ``(B, T, ·)``.
        generator: generator of every random init (default: a fresh one seeded 0).
        dtype, device: of the parameters.

    Attributes:
        cells: the ``nn.ModuleList`` of cells; ``cells[l].weight_hh`` is layer ``l``'s recurrent matrix.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        nonlinearity: str = "modrelu",
        bias: bool = True,
        batch_first: bool = False,
        *,
        constraint: str | None = "givens",
        group: str = "O",
        init: str | torch.Tensor = "henaff",
        input_constraint: str | None = None,
        input_init: str | None = None,
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.input_size = check_positive_int("input_size", input_size)
        self.hidden_size = check_positive_int("hidden_size", hidden_size)
        self.num_layers = check_positive_int("num_layers", num_layers)
        self.batch_first = check_bool("batch_first", batch_first)
        check_generator("generator", generator)
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        self.cells = nn.ModuleList(
            OrthogonalRNNCell(
                input_size if layer == 0 else hidden_size,
                hidden_size,
                bias,
                nonlinearity,
                constraint=constraint,
                group=group,
                init=init,
                input_constraint=input_constraint,
                input_init=input_init,
                generator=gen,
                dtype=dtype,
                device=device,
            )
            for layer in range(num_layers)
        )
        self.nonlinearity = nonlinearity
        self.constraint = self.cells[0].constraint

    def extra_repr(self) -> str:
        return f"num_layers={self.num_layers}, batch_first={self.batch_first}"

    def forward(
        self,
        input: torch.Tensor | PackedSequence,
        hx: torch.Tensor | None = None,
        lengths: torch.Tensor | list[int] | None = None,
    ) -> tuple[torch.Tensor | PackedSequence, torch.Tensor]:
        packed = isinstance(input, PackedSequence)
        if packed:
            if lengths is not None:
                raise ValueError("pass either a PackedSequence or `lengths`, not both")
            assert isinstance(input, PackedSequence)
            sorted_idx, unsorted_idx, batch_sizes = (
                input.sorted_indices,
                input.unsorted_indices,
                input.batch_sizes,
            )
            x, lens = pad_packed_sequence(input)  # (T, B, F), original batch order
            unbatched = False
        else:
            x = check_tensor("input", input)
            if x.dim() not in (2, 3):
                raise ValueError(
                    f"`input` must be (T, B, {self.input_size}) (batch_first: (B, T, ...)) or "
                    f"(T, {self.input_size}), got {describe(x)}"
                )
            unbatched = x.dim() == 2
            x = x.unsqueeze(1) if unbatched else (x.transpose(0, 1) if self.batch_first else x)
            lens = None
        if x.shape[-1] != self.input_size:
            raise ValueError(
                f"`input` must have {self.input_size} features in its last dimension, got {describe(x)}"
            )
        T, B = x.shape[0], x.shape[1]
        if lengths is not None:
            lens = torch.as_tensor(lengths)
            if lens.dtype not in (torch.int32, torch.int64) or tuple(lens.shape) != (B,):
                raise ValueError(
                    f"`lengths` must be {B} integers (one per sequence), got {describe(lens)}"
                )
            if bool((lens < 1).any()) or bool((lens > T).any()):
                raise ValueError(f"`lengths` must lie in 1..{T}, got {lens.tolist()}")
            lens = lens.to(torch.int64)
        want = (
            (self.num_layers, self.hidden_size)
            if unbatched
            else (self.num_layers, B, self.hidden_size)
        )
        if hx is None:
            h0 = x.new_zeros(self.num_layers, B, self.hidden_size)
        else:
            check_tensor("h_0", hx)
            if tuple(hx.shape) != want:
                raise ValueError(
                    f"`h_0` must have shape (num_layers, batch, hidden_size) = {want}, got {describe(hx)}"
                )
            h0 = hx.unsqueeze(1) if unbatched else hx
        if T == 0:
            raise ValueError(f"`input` must have at least one time step, got {describe(x)}")
        layer_in = x
        finals = []
        for layer, cell in enumerate(self.cells):
            assert isinstance(cell, OrthogonalRNNCell)
            hs = cell.sequence(layer_in, h0[layer], lens)
            finals.append(hs[-1])
            layer_in = hs
        out = layer_in
        h_n = torch.stack(finals)
        if lens is not None:
            valid = torch.arange(T, device=out.device).unsqueeze(1) < lens.to(out.device)
            out = out * valid.unsqueeze(-1).to(out.dtype)
        if packed:
            assert lens is not None
            # same element order as the input: sort by the input's own permutation
            ordered = out if sorted_idx is None else out.index_select(1, sorted_idx)
            olens = lens if sorted_idx is None else lens.index_select(0, sorted_idx.cpu())
            repacked = pack_padded_sequence(ordered, olens.cpu(), enforce_sorted=True)
            out_packed = PackedSequence(repacked.data, batch_sizes, sorted_idx, unsorted_idx)
            return out_packed, h_n
        if unbatched:
            return out[:, 0], h_n[:, 0]
        return (out.transpose(0, 1) if self.batch_first else out), h_n
