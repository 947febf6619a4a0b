"""Modules: multi-head :class:`FavorAttention`, :class:`PerformerBlock`, :class:`Performer` and a small
causal :class:`PerformerLM` with slice-wise state passing (the building block of model-level SLiM)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from orthotorch._validation import check_positive_int, check_tensor, describe
from orthotorch.attention.features import FeatureMap
from orthotorch.attention.functional import FavorState, favor_attention

StateProvider = Callable[[int, torch.Tensor, torch.Tensor], FavorState | None]


class FavorAttention(nn.Module):
    """Multi-head FAVOR+ attention, a drop-in for ``nn.MultiheadAttention(..., batch_first=True)``.

    Args:
        embed_dim: model width ``E``; num_heads: ``H`` with ``E % H == 0`` (head dim ``E/H``).
        bias: bias of the input/output projections. kdim, vdim: key/value input widths (default ``E``).
        batch_first: must be True (inputs ``(B, L, E)``).
        num_features, kind, projection: the :class:`FeatureMap` (shared by all heads).
        causal: default causality (``is_causal`` in :meth:`forward` also switches it on).
        redraw_interval: in training mode, redraw the projection every this many forward calls
            (``None``: never; call :meth:`redraw` yourself).
        seed: seed of the module's own generator (redraws are reproducible and saved nowhere else).
        chunk_size, implementation: see :func:`favor_attention`.
        orthogonal_projections: ``None`` or a method name (e.g. ``"tcwy"``): constrain the q/k/v
            projection weights to be orthogonal with ``orthotorch.parametrize.orthogonal`` (weights are
            ``(E, in)``; wide weights are handled by that function's transposition convention).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = True,
        *,
        num_features: int = 256,
        kind: str = "positive",
        projection: str = "orthogonal",
        causal: bool = False,
        redraw_interval: int | None = None,
        seed: int = 0,
        chunk_size: int = 256,
        implementation: str = "slim",
        orthogonal_projections: str | None = None,
    ) -> None:
        super().__init__()
        check_positive_int("embed_dim", embed_dim)
        check_positive_int("num_heads", num_heads)
        if embed_dim % num_heads:
            raise ValueError(
                f"`embed_dim` ({embed_dim}) must be divisible by `num_heads` ({num_heads})"
            )
        if not batch_first:
            raise ValueError(
                "`batch_first` must be True: FavorAttention takes (batch, length, embed)"
            )
        if dropout != 0.0:
            raise ValueError(f"`dropout` is not supported by linear attention, got {dropout}")
        if redraw_interval is not None:
            check_positive_int("redraw_interval", redraw_interval)
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        self.batch_first = True
        self.causal = causal
        self.redraw_interval = redraw_interval
        self.chunk_size = chunk_size
        self.implementation = implementation
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(kdim or embed_dim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(vdim or embed_dim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.features = FeatureMap(
            self.head_dim, num_features, kind=kind, projection=projection, seed=seed
        )
        self._calls = 0
        if orthogonal_projections is not None:
            constrain_projections(self, method=orthogonal_projections)

    def redraw(self, generator: torch.Generator | None = None) -> None:
        """Redraw the random projection of the feature map now."""
        self.features.redraw(generator)

    def _maybe_redraw(self) -> None:
        """Count a training call and redraw the projection every ``redraw_interval`` calls."""
        if self.training and self.redraw_interval is not None:
            if self._calls > 0 and self._calls % self.redraw_interval == 0:
                self.redraw()
            self._calls += 1

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, length, _ = x.shape
        return x.view(b, length, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = False,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, None]:
        """Attention output ``(B, Lq, E)`` and ``None`` (no attention weights exist).

        Args:
            query: ``(B, Lq, E)``; key: ``(B, Lk, kdim)``; value: ``(B, Lk, vdim)`` (default: query).
            key_padding_mask: bool ``(B, Lk)``, True = padded (ignored).
            need_weights: must be False. attn_mask: must be None (use ``is_causal``).
            is_causal: causal self-attention (also on when the module was built with ``causal=True``).
        """
        check_tensor("query", query)
        if query.dim() != 3:
            raise ValueError(f"`query` must be (batch, length, embed_dim), got {describe(query)}")
        if need_weights:
            raise ValueError(
                "`need_weights=True` is not available: FAVOR never forms attention weights"
            )
        if attn_mask is not None:
            raise ValueError(
                "`attn_mask` is not supported; use `is_causal=True` or key_padding_mask"
            )
        key = query if key is None else key
        value = key if value is None else value
        self._maybe_redraw()
        q, k, v = (
            self._heads(self.q_proj(query)),
            self._heads(self.k_proj(key)),
            self._heads(self.v_proj(value)),
        )
        out = favor_attention(
            q,
            k,
            v,
            causal=self.causal or is_causal,
            features=self.features,
            key_padding_mask=key_padding_mask,
            chunk_size=self.chunk_size,
            implementation=self.implementation,
        )
        b, _, lq, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, lq, self.embed_dim)), None

    def forward_with_state(
        self,
        x: torch.Tensor,
        state: FavorState | None,
        *,
        provider: Callable[[torch.Tensor, torch.Tensor], FavorState | None] | None = None,
        key_padding_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, FavorState]:
        """Causal self-attention over a slice ``x`` ``(B, T, E)`` continuing from ``state``.

        ``provider(k, v)`` (optional) is called with this slice's scaled per-head keys/values to supply
        the incoming state instead of ``state`` (used by :func:`orthotorch.attention.slim_train_step`).
        It never redraws the projection (a redraw inside a sequence would invalidate the state).

        Returns:
            ``(out (B, T, E), outgoing state)``; the state has shape ``(B, H, M, E/H + 1)``.
        """
        q, k, v = (
            self._heads(self.q_proj(x)),
            self._heads(self.k_proj(x)),
            self._heads(self.v_proj(x)),
        )
        if provider is not None:
            state = provider(k, v)
        out, new = favor_attention(
            q,
            k,
            v,
            causal=True,
            features=self.features,
            state=state,
            return_state=True,
            key_padding_mask=key_padding_mask,
            chunk_size=self.chunk_size,
            implementation="chunked" if self.implementation == "prefix" else self.implementation,
        )
        b, _, t, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, t, self.embed_dim)), new


def constrain_projections(attn: FavorAttention, *, method: str = "tcwy") -> None:
    """Constrain ``attn``'s q/k/v projection weights to orthogonal matrices in place.

    Uses ``orthotorch.parametrize.orthogonal(module, "weight", method=method)`` (imported lazily: raises
    ``ImportError`` naming the module if that part of the library is unavailable).
    """
    try:
        from orthotorch.parametrize import orthogonal
    except ImportError as exc:  # pragma: no cover - depends on the installed library parts
        raise ImportError(
            "orthogonal_projections needs orthotorch.parametrize.orthogonal, which is unavailable"
        ) from exc
    for lin in (attn.q_proj, attn.k_proj, attn.v_proj):
        orthogonal(lin, "weight", method=method)


def stiefel_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The q/k/v projection weights of every :class:`FavorAttention` in ``model``.

    Put them in an ``OrthogonalSGD`` parameter group with ``manifold="stiefel"`` (weights are
    ``(E, in)``; initialise them orthogonal first, e.g. with :func:`orthogonal_init_`).
    """
    out = []
    for mod in model.modules():
        if isinstance(mod, FavorAttention):
            out += [mod.q_proj.weight, mod.k_proj.weight, mod.v_proj.weight]
    return out


@torch.no_grad()
def orthogonal_init_(model: nn.Module, *, generator: torch.Generator) -> None:
    """Initialise every :class:`FavorAttention` q/k/v weight to a Haar-random orthogonal matrix
    (tall or square; wide weights get orthonormal rows), as a starting point on the Stiefel manifold."""
    for w in stiefel_parameters(model):
        rows, cols = w.shape
        g = torch.randn(max(rows, cols), min(rows, cols), generator=generator, dtype=torch.float64)
        qm, r = torch.linalg.qr(g)
        qm = qm * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, 1.0)
        w.copy_((qm if rows >= cols else qm.T).to(w.dtype))


class PerformerBlock(nn.Module):
    """Pre-norm Transformer block with FAVOR+ attention: ``x + Attn(LN x)``, then ``x + FFN(LN x)``.

    Input/output ``(B, L, E)``; extra keyword arguments go to :class:`FavorAttention`.
    """

    def __init__(self, dim: int, heads: int, *, ff_mult: int = 4, **attn_kwargs) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = FavorAttention(dim, heads, **attn_kwargs)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(
            nn.Linear(dim, ff_mult * dim), nn.GELU(), nn.Linear(ff_mult * dim, dim)
        )

    def forward(
        self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``(B, L, E) → (B, L, E)``."""
        h = self.norm1(x)
        x = x + self.attn(h, h, h, key_padding_mask=key_padding_mask)[0]
        return x + self.ff(self.norm2(x))

    def forward_with_state(self, x, state, *, provider=None, key_padding_mask=None):
        """Causal slice step, see :meth:`FavorAttention.forward_with_state`."""
        a, new = self.attn.forward_with_state(
            self.norm1(x), state, provider=provider, key_padding_mask=key_padding_mask
        )
        x = x + a
        return x + self.ff(self.norm2(x)), new


class Performer(nn.Module):
    """A stack of :class:`PerformerBlock` (encoder if ``causal=False``, decoder if ``causal=True``),
    followed by a final LayerNorm. ``(B, L, E) → (B, L, E)``."""

    def __init__(self, dim: int, depth: int, heads: int, **block_kwargs) -> None:
        super().__init__()
        check_positive_int("depth", depth)
        self.blocks = nn.ModuleList(
            PerformerBlock(dim, heads, **block_kwargs) for _ in range(depth)
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
    length: int, dim: int, *, offset: int = 0, device=None, dtype=torch.float32
) -> torch.Tensor:
    """Sinusoidal position codes for positions ``offset … offset+length−1``: ``(length, dim)``."""
    pos = torch.arange(offset, offset + length, device=device, dtype=torch.float64)[:, None]
    half = dim // 2
    freq = torch.exp(
        -math.log(10000.0) * torch.arange(half, device=device, dtype=torch.float64) / half
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
        vocab_size, dim, depth, heads: model shape. Extra keyword arguments go to
            :class:`FavorAttention` (``num_features``, ``projection``, ``chunk_size``, ...).

    ``forward(tokens (B, L) int64) → logits (B, L, vocab)``. For slice-wise processing use
    :meth:`forward_slice` with per-layer states.
    """

    def __init__(self, vocab_size: int, dim: int = 128, depth: int = 2, heads: int = 4, **kwargs):
        super().__init__()
        check_positive_int("vocab_size", vocab_size)
        self.dim = dim
        self.embed = nn.Embedding(vocab_size, dim)
        nn.init.normal_(self.embed.weight, std=dim**-0.5)
        kwargs.setdefault("causal", True)
        self.blocks = nn.ModuleList(PerformerBlock(dim, heads, **kwargs) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def _embed(self, tokens: torch.Tensor, offset: int) -> torch.Tensor:
        check_tensor("tokens", tokens)
        if tokens.dim() != 2 or tokens.dtype != torch.int64:
            raise ValueError(f"`tokens` must be int64 (batch, length), got {describe(tokens)}")
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
        new_states = []
        for idx, blk in enumerate(self.blocks):
            prov = None if provider is None else (lambda k, v, _i=idx: provider(_i, k, v))
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
        """Sample ``steps`` tokens after ``prompt`` ``(B, T)`` with O(1) cost per new token (the
        prompt is processed once, then each token updates the per-layer prefix states)."""
        check_positive_int("steps", steps)
        logits, states = self.forward_slice(prompt, None)
        out = [prompt]
        pos = prompt.shape[1]
        for _ in range(steps):
            probs = torch.softmax(logits[:, -1] / temperature, dim=-1)
            nxt = torch.multinomial(probs.cpu(), 1, generator=generator).to(prompt.device)
            out.append(nxt)
            logits, states = self.forward_slice(nxt, states, offset=pos)
            pos += 1
        return torch.cat(out, dim=1)
