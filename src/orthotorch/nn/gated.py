"""``StiefelGRU``: a GRU whose three d×d recurrent gate blocks are each kept on O(d) / SO(d).

Gating with the same guarantee as :class:`~orthotorch.nn.OrthogonalRNN`: ``W_hr``, ``W_hz``, ``W_hn`` are
orthogonal at every step of training (``constraint="tcwy"``/``"cwy"``/``"matrix_exp"``/``"cayley"``: one
batched parametrization ``(3, d, d)``; ``"givens"``: one batched weight that the Givens optimizers rotate,
one matching shared by the three blocks). The time loop is torch's fused GRU kernel (``torch._VF.gru``)
called with these weights, so the per-step cost is ``nn.GRU``'s plus one evaluation of the constraint per
forward.
"""

from __future__ import annotations

import math

import torch
from torch import _VF, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from orthotorch._validation import (
    check_bool,
    check_choice,
    check_generator,
    check_positive_int,
    check_tensor,
    describe,
)
from orthotorch.nn.constraints import constrain_, normalize_constraint
from orthotorch.nn.init import INITS, orthogonal_init

__all__ = ["StiefelGRU"]


class StiefelGRU(nn.Module):
    """Multi-layer GRU (``nn.GRU``'s equations and call signature) with orthogonal recurrent gate blocks.

    ``out, h_n = gru(x, h_0)``; shapes as in ``nn.GRU`` (``x (T, B, input_size)``, ``(B, T, ·)`` with
    ``batch_first``, ``(T, input_size)`` unbatched, or a ``PackedSequence``; ``h_0 (num_layers, B, d)``).
    ``lengths (B,)`` may be passed with a padded ``x`` instead of packing.

    Layer ``l`` holds ``weight_ih_l{l}`` ``(3d, in)`` (unconstrained, ``nn.GRU`` init), ``weight_hh_l{l}``
    ``(3, d, d)`` (the reset, update and new-gate blocks, each orthogonal) and the biases
    ``bias_ih_l{l}``/``bias_hh_l{l}`` ``(3d,)``.

    Args:
        input_size, hidden_size, num_layers, bias, batch_first: as in ``nn.GRU``.
        constraint: ``"tcwy"`` (default), ``"cwy"``, ``"givens"``, ``"matrix_exp"``, ``"cayley"`` or ``None``.
        group: ``"O"`` or ``"SO"`` for each block.
        init: ``"haar"`` (default), ``"henaff"`` or ``"cayley"`` (each block drawn independently).
        generator: generator of every init (default: a fresh one seeded 0).
        dtype, device: of the parameters.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        *,
        constraint: str | None = "tcwy",
        group: str = "O",
        init: str = "haar",
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.input_size = check_positive_int("input_size", input_size)
        self.hidden_size = d = check_positive_int("hidden_size", hidden_size)
        self.num_layers = check_positive_int("num_layers", num_layers)
        self.bias = check_bool("bias", bias)
        self.batch_first = check_bool("batch_first", batch_first)
        self.constraint = normalize_constraint(constraint)
        check_choice("group", group, ("O", "SO"))
        check_choice("init", init, INITS)
        check_generator("generator", generator)
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        dtype = dtype or torch.get_default_dtype()
        bound = 1.0 / math.sqrt(d)
        for layer in range(num_layers):
            fan_in = input_size if layer == 0 else d
            w_ih = (torch.rand(3 * d, fan_in, generator=gen, dtype=torch.float64) * 2 - 1) * bound
            self.register_parameter(f"weight_ih_l{layer}", nn.Parameter(w_ih.to(dtype).to(device)))
            blocks = torch.stack(
                [
                    orthogonal_init(init, d, generator=gen, dtype=dtype, group=group)
                    for _ in range(3)
                ]
            )
            constrain_(
                self,
                f"weight_hh_l{layer}",
                blocks.to(device),
                self.constraint,
                square=True,
                group=group,
            )
            if bias:
                for name in ("bias_ih", "bias_hh"):
                    b = (torch.rand(3 * d, generator=gen, dtype=torch.float64) * 2 - 1) * bound
                    self.register_parameter(
                        f"{name}_l{layer}", nn.Parameter(b.to(dtype).to(device))
                    )

    def extra_repr(self) -> str:
        return (
            f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, "
            f"constraint={self.constraint!r}, bias={self.bias}, batch_first={self.batch_first}"
        )

    def _flat_weights(self) -> list[torch.Tensor]:
        d = self.hidden_size
        params: list[torch.Tensor] = []
        for layer in range(self.num_layers):
            params += [
                getattr(self, f"weight_ih_l{layer}"),
                getattr(self, f"weight_hh_l{layer}").reshape(
                    3 * d, d
                ),  # evaluated once per forward
            ]
            if self.bias:
                params += [getattr(self, f"bias_ih_l{layer}"), getattr(self, f"bias_hh_l{layer}")]
        return params

    def forward(
        self,
        input: torch.Tensor | PackedSequence,
        hx: torch.Tensor | None = None,
        lengths: torch.Tensor | list[int] | None = None,
    ) -> tuple[torch.Tensor | PackedSequence, torch.Tensor]:
        params = self._flat_weights()
        L, d = self.num_layers, self.hidden_size
        if isinstance(input, PackedSequence):
            if lengths is not None:
                raise ValueError("pass either a PackedSequence or `lengths`, not both")
            B = int(input.batch_sizes[0])
            h0 = self._h0(hx, (L, B, d), input.data)
            if input.sorted_indices is not None:
                h0 = h0.index_select(1, input.sorted_indices)
            self._check_features(input.data)
            data, h_n = _VF.gru(
                input.data, input.batch_sizes, h0, params, self.bias, L, 0.0, self.training, False
            )
            if input.unsorted_indices is not None:
                h_n = h_n.index_select(1, input.unsorted_indices)
            out = PackedSequence(
                data, input.batch_sizes, input.sorted_indices, input.unsorted_indices
            )
            return out, h_n
        x = check_tensor("input", input)
        if x.dim() not in (2, 3):
            raise ValueError(
                f"`input` must be (T, B, {self.input_size}) (batch_first: (B, T, ...)) or "
                f"(T, {self.input_size}), got {describe(x)}"
            )
        self._check_features(x)
        unbatched = x.dim() == 2
        xt = x.unsqueeze(1) if unbatched else (x.transpose(0, 1) if self.batch_first else x)
        T, B = xt.shape[0], xt.shape[1]
        h0 = self._h0(hx, (L, d) if unbatched else (L, B, d), xt)
        h0 = h0.unsqueeze(1) if unbatched else h0
        if lengths is not None:
            lens = torch.as_tensor(lengths)
            if lens.dtype not in (torch.int32, torch.int64) or tuple(lens.shape) != (B,):
                raise ValueError(f"`lengths` must be {B} integers, got {describe(lens)}")
            if bool((lens < 1).any()) or bool((lens > T).any()):
                raise ValueError(f"`lengths` must lie in 1..{T}, got {lens.tolist()}")
            packed_out, h_n = self.forward(
                pack_padded_sequence(xt, lens.cpu(), enforce_sorted=False), h0
            )
            assert isinstance(packed_out, PackedSequence)
            seq, _ = pad_packed_sequence(packed_out, total_length=T)
        else:
            seq, h_n = _VF.gru(xt, h0, params, self.bias, L, 0.0, self.training, False, False)
        if unbatched:
            return seq[:, 0], h_n[:, 0]
        return (seq.transpose(0, 1) if self.batch_first else seq), h_n

    def _check_features(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.input_size:
            raise ValueError(
                f"`input` must have {self.input_size} features in its last dimension, got {describe(x)}"
            )

    def _h0(
        self, hx: torch.Tensor | None, want: tuple[int, ...], like: torch.Tensor
    ) -> torch.Tensor:
        if hx is None:
            return like.new_zeros(want)
        check_tensor("h_0", hx)
        if tuple(hx.shape) != want:
            raise ValueError(
                f"`h_0` must have shape (num_layers, batch, hidden_size) = {want}, got {describe(hx)}"
            )
        return hx
