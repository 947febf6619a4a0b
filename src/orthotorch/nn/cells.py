"""``OrthogonalRNNCell``: one step (and the whole-sequence loop) of an RNN with an orthogonal recurrent matrix.

``h_t = f(W_ih x_t + b + W_hh h_{t−1})`` with ``W_hh ∈ O(d)`` or ``SO(d)`` kept there by ``constraint`` (see
:mod:`orthotorch.nn.constraints`), ``f`` one of :data:`~orthotorch.nn.nonlinearities.NONLINEARITIES`, and the
input map ``W_ih`` unconstrained or on a Stiefel manifold (``input_constraint``).
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
from orthotorch.nn.constraints import (
    ConstrainedModule,
    constrain_,
    normalize_constraint,
    stiefel_init,
)
from orthotorch.nn.init import INITS, orthogonal_init
from orthotorch.nn.nonlinearities import NONLINEARITIES, ModReLU
from orthotorch.nn.recurrence import recurrence

__all__ = ["INPUT_INITS", "OrthogonalRNNCell"]

#: Inits of an unconstrained input map (see :class:`OrthogonalRNNCell`'s ``input_init``).
INPUT_INITS = ("uniform", "kaiming")


class OrthogonalRNNCell(ConstrainedModule):
    """RNN cell ``h' = f(W_ih x + b + W_hh h)`` with ``W_hh`` on O(d) / SO(d).

    Args:
        input_size: features of ``x``.
        hidden_size: ``d``, size of the state and of the square recurrent matrix.
        bias: add a learned pre-activation bias ``b`` ``(d,)`` (initialised to 0). ``modrelu`` has its own
            learned bias (``activation.bias``) either way.
        nonlinearity: ``"modrelu"`` (default, as in expRNN), ``"tanh"``, ``"relu"`` or ``"identity"``.
        constraint: how ``W_hh`` stays orthogonal: ``"givens"`` (default; a marked leaf weight that
            ``OrthogonalSGD``/``OrthogonalAdam`` rotate), ``"cwy"``/``"tcwy"``/``"matrix_exp"``/``"cayley"``
            (a parametrization, any optimizer), or ``None`` (unconstrained baseline).
        group: ``"O"`` (the component of the initial matrix) or ``"SO"``.
        init: ``"henaff"`` (default), ``"cayley"``, ``"haar"`` (see :mod:`orthotorch.nn.init`), or a
            ``(d, d)`` orthogonal tensor.
        input_constraint: ``None`` (unconstrained ``W_ih``, initialised by ``input_init``) or a
            constraint name: ``W_ih`` ``(d, input_size)`` gets orthonormal columns (``d ≥ input_size``) or rows.
        input_init: init of an unconstrained ``W_ih``: ``"uniform"`` (default: ``U[−1/√d, 1/√d]``,
            ``nn.RNN``'s) or ``"kaiming"`` (``N(0, 2 / input_size)``, expRNN's; each input then adds ≈ 10×
            more to the state at ``d = 190``, 10 inputs). ``None`` means ``"uniform"``; a constrained input
            map starts with orthonormal columns and takes no ``input_init``. Which one learns the copying
            task faster is measured in docs/benchmarks/rnn.md ("Input init").
        generator: generator of every random init (default: a fresh one seeded 0).
        dtype, device: of the parameters.

    Shapes: :meth:`forward` maps ``input (B, input_size)`` or ``(input_size,)`` and ``hx (B, d)`` / ``(d,)``
    (default zeros) to ``h' (B, d)`` / ``(d,)``. A parametrized ``W_hh`` is evaluated at every call:
    when stepping a cell by hand over a sequence, wrap the loop in
    ``torch.nn.utils.parametrize.cached()``, or use :meth:`sequence` / :class:`OrthogonalRNN`, which
    evaluate it once per sequence.

    Raises:
        ValueError: unknown nonlinearity/constraint/init/group, a non-square or non-orthogonal ``init``
            tensor.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        nonlinearity: str = "modrelu",
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
        self.hidden_size = d = check_positive_int("hidden_size", hidden_size)
        check_bool("bias", bias)
        check_choice("nonlinearity", nonlinearity, NONLINEARITIES)
        self.constraint = normalize_constraint(constraint)
        self.input_constraint = normalize_constraint(input_constraint, "input_constraint")
        check_choice("group", group, ("O", "SO"))
        if input_init is not None:
            check_choice("input_init", input_init, INPUT_INITS)
            if self.input_constraint != "none":
                raise ValueError(
                    f"`input_init` applies to an unconstrained input map, got input_init={input_init!r} "
                    f"with input_constraint={input_constraint!r}; a constrained W_ih starts with "
                    "orthonormal columns (leave input_init=None)"
                )
        self.input_init = input_init or ("uniform" if self.input_constraint == "none" else None)
        check_generator("generator", generator)
        self.nonlinearity = nonlinearity
        self.group = group
        dtype = dtype or torch.get_default_dtype()
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        if isinstance(init, torch.Tensor):
            if init.dim() != 2 or init.shape[0] != init.shape[1]:
                raise ValueError(
                    f"`init` must be a square (hidden_size, hidden_size) = ({d}, {d}) orthogonal matrix "
                    f"for O(d)/SO(d), got {describe(init)}"
                )
            if init.shape[0] != d:
                raise ValueError(f"`init` must have shape ({d}, {d}), got {describe(init)}")
            w_hh = init.detach().to(dtype)
            self.init = "tensor"
        else:
            if not isinstance(init, str):
                raise TypeError(f"`init` must be a str or a tensor, got {type(init).__name__}")
            check_choice("init", init, INITS)
            w_hh = orthogonal_init(init, d, generator=gen, dtype=dtype, group=group)
            self.init = init
        if self.input_init == "kaiming":
            std = math.sqrt(2.0 / self.input_size)
            w_ih = torch.randn(d, self.input_size, generator=gen, dtype=torch.float64) * std
            w_ih = w_ih.to(dtype)
        elif self.input_init == "uniform":
            bound = 1.0 / math.sqrt(d)
            w_ih = (
                torch.rand(d, self.input_size, generator=gen, dtype=torch.float64) * 2 - 1
            ) * bound
            w_ih = w_ih.to(dtype)
        else:
            w_ih = stiefel_init(d, self.input_size, generator=gen, dtype=dtype)
        constrain_(self, "weight_ih", w_ih.to(device), self.input_constraint, square=False)
        constrain_(self, "weight_hh", w_hh.to(device), self.constraint, square=True, group=group)
        self.bias: nn.Parameter | None = (
            nn.Parameter(torch.zeros(d, dtype=dtype, device=device)) if bias else None
        )
        self.activation: nn.Module | None = (
            ModReLU(d, generator=gen, dtype=dtype, device=device)
            if nonlinearity == "modrelu"
            else None
        )

    def extra_repr(self) -> str:
        return (
            f"{self.input_size}, {self.hidden_size}, nonlinearity={self.nonlinearity!r}, "
            f"constraint={self.constraint!r}, group={self.group!r}, init={self.init!r}, "
            f"input_constraint={self.input_constraint!r}, bias={self.bias is not None}"
        )

    def _modrelu_bias(self) -> torch.Tensor | None:
        return self.activation.bias if self.activation is not None else None  # type: ignore[return-value]

    def forward(self, input: torch.Tensor, hx: torch.Tensor | None = None) -> torch.Tensor:
        check_tensor("input", input)
        if input.dim() not in (1, 2) or input.shape[-1] != self.input_size:
            raise ValueError(
                f"`input` must have shape (batch, {self.input_size}) or ({self.input_size},), got "
                f"{describe(input)}"
            )
        unbatched = input.dim() == 1
        x = input.unsqueeze(0) if unbatched else input
        if hx is None:
            h = x.new_zeros(x.shape[0], self.hidden_size)
        else:
            check_tensor("hx", hx)
            want = (self.hidden_size,) if unbatched else (x.shape[0], self.hidden_size)
            if tuple(hx.shape) != want:
                raise ValueError(f"`hx` must have shape {want}, got {describe(hx)}")
            h = hx.unsqueeze(0) if unbatched else hx
        out = self.sequence(x.unsqueeze(0), h)[0]
        return out[0] if unbatched else out

    def sequence(
        self, x: torch.Tensor, h0: torch.Tensor, lengths: torch.Tensor | None = None
    ) -> torch.Tensor:
        """States over a whole sequence: ``x (T, B, input_size)``, ``h0 (B, d)``, ``lengths (B,)`` int64.

        Returns ``(T, B, d)``. With ``lengths``, sequence ``b`` holds its state after step
        ``lengths[b]`` (the caller zeroes those outputs). ``W_hh`` and ``W_ih`` are evaluated once, the
        input map is one GEMM over all steps, and the loop runs in C++ (``tanh``/``relu``: torch's fused
        RNN kernel, packed when ``lengths`` is given) or in :func:`~orthotorch.nn.recurrence.recurrence`.
        """
        dtype = self._dtype()
        if x.dtype != dtype or h0.dtype != dtype:
            raise TypeError(
                f"`input` and `h_0` must have the module's dtype {dtype}, got input {x.dtype} and "
                f"h_0 {h0.dtype}"
            )
        w_ih = self.weight_ih
        w_hh = self.weight_hh
        if self.nonlinearity in ("tanh", "relu"):
            fn = _VF.rnn_tanh if self.nonlinearity == "tanh" else _VF.rnn_relu
            params = [w_ih, w_hh]
            if self.bias is not None:
                params += [self.bias, torch.zeros_like(self.bias)]
            has_b = self.bias is not None
            if lengths is None:
                out, _ = fn(x, h0.unsqueeze(0), params, has_b, 1, 0.0, self.training, False, False)
                return out
            packed = pack_padded_sequence(x, lengths.cpu(), enforce_sorted=False)
            hx = h0.index_select(0, packed.sorted_indices).unsqueeze(0)  # type: ignore[arg-type]
            data, _ = fn(
                packed.data, packed.batch_sizes, hx, params, has_b, 1, 0.0, self.training, False
            )
            out_packed = PackedSequence(
                data, packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices
            )
            padded, _ = pad_packed_sequence(out_packed, total_length=x.shape[0])
            # hold the final state after each sequence's end, like the masked loop
            steps = torch.arange(x.shape[0], device=x.device).unsqueeze(1)
            last = padded.gather(
                0, (lengths.to(x.device) - 1).view(1, -1, 1).expand(1, -1, padded.shape[-1])
            )
            return torch.where((steps < lengths.to(x.device)).unsqueeze(-1), padded, last)
        xproj = torch.nn.functional.linear(x, w_ih, self.bias)
        mask = None
        if lengths is not None:
            mask = torch.arange(x.shape[0], device=x.device).unsqueeze(1) < lengths.to(x.device)
        return recurrence(xproj, h0, w_hh, self.nonlinearity, self._modrelu_bias(), mask)

    def _dtype(self) -> torch.dtype:
        return next(iter(self.parameters())).dtype
