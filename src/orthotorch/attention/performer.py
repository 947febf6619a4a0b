"""Performer models built on :class:`FavorAttention`: :class:`PerformerBlock`, :class:`Performer` and
a small causal :class:`PerformerLM` with slice-wise state passing (the building block of model-level
SLiM).

Every layer draws its own random projection: a stack takes one ``generator`` (or ``seed``) and each
:class:`FavorAttention` draws its feature seed from it in layer order, so layers differ and runs repeat.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from orthotorch._validation import (
    check_generator,
    check_positive_int,
    check_real,
    check_tensor,
    describe,
)
from orthotorch.attention.functional import FavorState
from orthotorch.attention.mha import FavorAttention

StateProvider = Callable[[int, torch.Tensor, torch.Tensor], FavorState | None]
SliceProvider = Callable[[torch.Tensor, torch.Tensor], FavorState | None]


def _stack_generator(generator: torch.Generator | None, seed: int) -> torch.Generator:
    """The generator a stack draws its layers' feature seeds from."""
    check_generator("generator", generator)
    if generator is not None:
        return generator
    check_positive_int("seed", seed, minimum=0)
    return torch.Generator().manual_seed(seed)


class PerformerBlock(nn.Module):
    """Pre-norm Transformer block with FAVOR+ attention: ``x + Attn(LN x)``, then ``x + FFN(LN x)``.

    Input/output ``(B, L, E)`` (batch first). Extra keyword arguments go to :class:`FavorAttention`
    (``num_features``, ``kind``, ``causal``, ``generator``/``seed``, ...; not ``batch_first``).
    """

    def __init__(self, dim: int, heads: int, *, ff_mult: int = 4, **attn_kwargs: Any) -> None:
        super().__init__()
        check_positive_int("dim", dim)
        check_positive_int("ff_mult", ff_mult)
        if "batch_first" in attn_kwargs:
            raise ValueError(
                "PerformerBlock takes (batch, length, dim) inputs: do not pass `batch_first`"
            )
        self.norm1 = nn.LayerNorm(dim)
        self.attn = FavorAttention(dim, heads, batch_first=True, **attn_kwargs)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(
            nn.Linear(dim, ff_mult * dim), nn.GELU(), nn.Linear(ff_mult * dim, dim)
        )

    def forward(
        self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``(B, L, E) → (B, L, E)``; ``key_padding_mask`` ``(B, L)``, True = padded."""
        h = self.norm1(x)
        x = x + self.attn(h, h, h, key_padding_mask=key_padding_mask, need_weights=False)[0]
        return x + self.ff(self.norm2(x))

    def forward_with_state(
        self,
        x: torch.Tensor,
        state: FavorState | None,
        *,
        provider: SliceProvider | None = None,
        key_padding_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, FavorState]:
        """Causal slice step ``(B, T, E) → (B, T, E)``, see :meth:`FavorAttention.forward_with_state`."""
        a, new = self.attn.forward_with_state(
            self.norm1(x), state, provider=provider, key_padding_mask=key_padding_mask
        )
        x = x + a
        return x + self.ff(self.norm2(x)), new


class Performer(nn.Module):
    """A stack of :class:`PerformerBlock` (encoder if ``causal=False``, decoder if ``causal=True``),
    followed by a final LayerNorm. ``(B, L, E) → (B, L, E)``.

    Args:
        dim, depth, heads: width, number of blocks, heads per block.
        generator: the layers' feature seeds are drawn from it in order (default: a generator seeded
            ``seed``): every layer has its own projection and the same arguments give the same model.
        seed: seed of the default generator.
        **block_kwargs: :class:`PerformerBlock` / :class:`FavorAttention` options.
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        heads: int,
        *,
        generator: torch.Generator | None = None,
        seed: int = 0,
        **block_kwargs: Any,
    ) -> None:
        super().__init__()
        check_positive_int("depth", depth)
        gen = _stack_generator(generator, seed)
        self.blocks = nn.ModuleList(
            PerformerBlock(dim, heads, generator=gen, **block_kwargs) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(
        self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``(B, L, E) → (B, L, E)``."""
        for blk in self.blocks:
            x = blk(x, key_padding_mask=key_padding_mask)
        return self.norm(x)


def sinusoidal_positions(
    length: int,
    dim: int,
    *,
    offset: int = 0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Sinusoidal position codes for positions ``offset … offset+length−1``: ``(length, dim)``."""
    check_positive_int("length", length, minimum=0)
    check_positive_int("dim", dim)
    check_positive_int("offset", offset, minimum=0)
    pos = torch.arange(offset, offset + length, device=device, dtype=torch.float64)[:, None]
    half = dim // 2
    freq = torch.exp(
        -math.log(10000.0) * torch.arange(half, device=device, dtype=torch.float64) / max(half, 1)
    )
    ang = pos * freq
    out = torch.zeros(length, dim, device=device, dtype=torch.float64)
    out[:, 0 : 2 * half : 2] = torch.sin(ang)
    out[:, 1 : 2 * half : 2] = torch.cos(ang)
    return out.to(dtype)


class PerformerLM(nn.Module):
    """Causal Performer language model: token embedding + sinusoidal positions, ``depth`` causal
    :class:`PerformerBlock`, LayerNorm, tied output projection.

    Args:
        vocab_size, dim, depth, heads: model shape.
        generator, seed: the layers' feature seeds, as in :class:`Performer`.
        **kwargs: :class:`FavorAttention` options (``num_features``, ``projection``, ``chunk_size``,
            ``redraw_interval``, ...).

    ``forward(tokens (B, L) int64) → logits (B, L, vocab)``. For slice-wise processing use
    :meth:`forward_slice` with per-layer states.
    """

    def __init__(
        self,
        vocab_size: int,
        dim: int = 128,
        depth: int = 2,
        heads: int = 4,
        *,
        generator: torch.Generator | None = None,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        check_positive_int("vocab_size", vocab_size)
        check_positive_int("dim", dim)
        check_positive_int("depth", depth)
        self.vocab_size = vocab_size
        self.dim = dim
        self.embed = nn.Embedding(vocab_size, dim)
        nn.init.normal_(self.embed.weight, std=dim**-0.5)
        kwargs.setdefault("causal", True)
        gen = _stack_generator(generator, seed)
        self.blocks = nn.ModuleList(
            PerformerBlock(dim, heads, generator=gen, **kwargs) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)

    def _embed(self, tokens: torch.Tensor, offset: int) -> torch.Tensor:
        check_tensor("tokens", tokens)
        if tokens.dim() != 2 or tokens.dtype != torch.int64:
            raise ValueError(f"`tokens` must be int64 (batch, length), got {describe(tokens)}")
        if tokens.numel() and bool((tokens.min() < 0) | (tokens.max() >= self.vocab_size)):
            raise ValueError(
                f"`tokens` must lie in [0, {self.vocab_size}), got values in "
                f"[{int(tokens.min())}, {int(tokens.max())}]"
            )
        x = self.embed(tokens) * math.sqrt(self.dim)
        return x + sinusoidal_positions(
            tokens.shape[1], self.dim, offset=offset, device=tokens.device, dtype=x.dtype
        )

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x) @ self.embed.weight.T

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, L)`` int64 → logits ``(B, L, vocab)`` (full-sequence causal forward)."""
        x = self._embed(tokens, 0)
        for blk in self.blocks:
            x = blk(x)
        return self._logits(x)

    def forward_slice(
        self,
        tokens: torch.Tensor,
        states: list[FavorState | None] | None,
        *,
        offset: int = 0,
        provider: StateProvider | None = None,
    ) -> tuple[torch.Tensor, list[FavorState]]:
        """One slice ``(B, T)`` of a longer sequence starting at position ``offset``.

        Args:
            states: per-layer incoming states (``None``: start of the sequence).
            provider: optional ``provider(layer, k, v)`` returning layer ``layer``'s incoming state
                from the slice's keys/values (used to rebuild states in the SLiM backward).

        Returns:
            ``(logits (B, T, vocab), outgoing per-layer states)``; chaining slices equals
            :meth:`forward` on the concatenation.
        """
        x = self._embed(tokens, offset)
        states = states if states is not None else [None] * len(self.blocks)
        if len(states) != len(self.blocks):
            raise ValueError(
                f"`states` must hold one state per layer ({len(self.blocks)}), got {len(states)}"
            )
        new_states = []
        for idx, blk in enumerate(self.blocks):
            assert isinstance(blk, PerformerBlock)
            prov: SliceProvider | None = None
            if provider is not None:
                prov = _layer_provider(provider, idx)
            x, st = blk.forward_with_state(x, states[idx], provider=prov)
            new_states.append(st)
        return self._logits(x), new_states

    @torch.no_grad()
    def generate(
        self,
        prompt: torch.Tensor,
        steps: int,
        *,
        generator: torch.Generator,
        temperature: float = 1.0,
    ) -> torch.Tensor:
        """Sample ``steps`` tokens after ``prompt`` with O(1) cost per new token (the prompt is
        processed once, then each token updates the per-layer prefix states).

        Args:
            prompt: int64 ``(B, T)`` with ``B, T >= 1`` (the first token is sampled from the logits
                after the last prompt token, so an empty prompt is an error).
            steps: number of new tokens, ``>= 1``.
            generator: source of the sampling randomness (required).
            temperature: ``> 0``; logits are divided by it.

        Returns:
            int64 ``(B, T + steps)``: the prompt followed by the samples.
        """
        check_tensor("prompt", prompt)
        if prompt.dim() != 2 or prompt.dtype != torch.int64:
            raise ValueError(f"`prompt` must be int64 (batch, length), got {describe(prompt)}")
        if prompt.shape[0] == 0 or prompt.shape[1] == 0:
            raise ValueError(
                "`prompt` must be (batch, length) with batch >= 1 and length >= 1 (the first new "
                f"token is sampled from the logits after the last prompt token), got {describe(prompt)}"
            )
        check_positive_int("steps", steps)
        if not isinstance(generator, torch.Generator):
            raise TypeError(
                f"`generator` must be a torch.Generator, got {type(generator).__name__}"
            )
        temperature = check_real("temperature", temperature, minimum=0.0, min_inclusive=False)
        logits, states = self.forward_slice(prompt, None)
        out = [prompt]
        pos = prompt.shape[1]
        for _ in range(steps):
            probs = torch.softmax(logits[:, -1].double() / temperature, dim=-1)
            nxt = torch.multinomial(probs.to(generator.device), 1, generator=generator)
            nxt = nxt.to(prompt.device)
            out.append(nxt)
            logits, states = self.forward_slice(nxt, list(states), offset=pos)
            pos += 1
        return torch.cat(out, dim=1)


def _layer_provider(provider: StateProvider, idx: int) -> SliceProvider:
    """``provider`` bound to layer ``idx``."""

    def bound(k: torch.Tensor, v: torch.Tensor) -> FavorState | None:
        return provider(idx, k, v)

    return bound
