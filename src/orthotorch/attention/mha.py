""":class:`FavorAttention`: FAVOR+ multi-head attention with ``nn.MultiheadAttention``'s constructor,
call and ``state_dict``, so that a model built (or trained) with exact attention switches to FAVOR+ line
for line.

What linear attention cannot do raises a clear error instead of computing something else: an arbitrary
``attn_mask`` (only "no mask" and the causal mask are recognised), additive float padding masks other
than ``0``/``-inf``, attention-weight dropout, and ``need_weights=True`` at long sequences (FAVOR+ never
forms the ``Lq × Lk`` weights; at short ones they are formed on request, see :meth:`FavorAttention.forward`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from orthotorch._numerics import compute_dtype
from orthotorch._validation import (
    check_bool,
    check_choice,
    check_generator,
    check_positive_int,
    check_real,
    check_tensor,
    describe,
)
from orthotorch.attention.features import FeatureMap
from orthotorch.attention.functional import FavorState, favor_attention
from orthotorch.parametrize import Method, orthogonal

#: Values of ``FavorAttention(implementation=...)``: the causal FAVOR+ paths of :func:`favor_attention`
#: plus ``"softmax"``, exact O(L²) softmax attention (for verification and A/B comparisons).
IMPLEMENTATIONS = ("slim", "chunked", "prefix", "softmax")

_INT64_SEEDS = 2**63
# Weyl increment: the seed of draw r is seed + r·_SEED_STEP (mod 2^63); draw 0 uses the seed itself.
_SEED_STEP = 0x9E3779B97F4A7C15
_NEG_INF = float("-inf")

# keys of a torch.nn.MultiheadAttention state_dict that FavorAttention translates on load
_MHA_PACKED = ("in_proj_weight", "in_proj_bias")
_MHA_SEPARATE = ("q_proj_weight", "k_proj_weight", "v_proj_weight")


def _optional_dim(name: str, value: object, default: int) -> int:
    if value is None:
        return default
    return check_positive_int(name, value)


def _zero_or_neg_inf(name: str, mask: torch.Tensor) -> torch.Tensor:
    """For a float mask holding only ``0`` (attend) and ``-inf`` (ignore): the bool "ignore" mask."""
    blocked = mask == _NEG_INF
    ok = blocked | (mask == 0)
    if not bool(ok.all()):
        bad = mask[~ok].flatten()[0].item()
        raise ValueError(
            f"`{name}` as a float mask may hold only 0.0 (attend) and -inf (ignore), got a value "
            f"{bad!r}: FAVOR+ never forms the attention scores, so it cannot add a bias to them "
            "(use a bool mask, or nn.MultiheadAttention for additive biases)"
        )
    return blocked


class FavorAttention(nn.Module):
    """Multi-head FAVOR+ attention, a drop-in for :class:`torch.nn.MultiheadAttention`.

    ``FavorAttention(embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn, kdim, vdim,
    batch_first, device, dtype)`` takes ``nn.MultiheadAttention``'s arguments in its order, with its
    defaults (in particular ``batch_first=False``: inputs ``(L, N, E)`` unless ``batch_first=True``), and
    :meth:`forward` takes its call. Attention itself is FAVOR+ (:func:`favor_attention`) with one
    :class:`FeatureMap` shared by all heads; the keyword-only arguments configure it.

    Args:
        embed_dim: model width ``E``. num_heads: ``H``, with ``E % H == 0`` (head dim ``E/H``).
        dropout: must be 0.0 (dropout acts on attention weights, which linear attention never forms).
        bias: biases of the input and output projections.
        add_bias_kv: learnt key/value vectors ``bias_k``, ``bias_v`` ``(1, 1, E)`` appended to the keys
            and values (visible to every query, also in causal mode).
        add_zero_attn: a zero key/value appended per head (after ``bias_k``), as in MHA.
        kdim, vdim: key/value input widths (default ``E``).
        batch_first: inputs and outputs ``(N, L, E)`` instead of ``(L, N, E)``.
        device, dtype: of the parameters (a float64 module also keeps its projection in float64).
        num_features, kind, projection: the :class:`FeatureMap` (``m`` rows, kernel, sampler).
        causal: always causal (``is_causal=True`` or a causal ``attn_mask`` switch it on per call).
        implementation: ``"slim"``, ``"chunked"``, ``"prefix"`` (causal FAVOR+ paths, see
            :func:`favor_attention`) or ``"softmax"``: exact softmax attention, O(L²), to verify a
            converted model against the original or to compare both.
        chunk_size: causal chunk length of :func:`favor_attention`.
        redraw_interval: in training mode, redraw the projection before every ``redraw_interval``-th
            forward call after the first (performer-pytorch's ``feature_redraw_interval``); ``None``
            (default): never redraw automatically (call :meth:`redraw`).
        generator: draws this module's feature seed (so a stack built from one generator gets
            distinct, reproducible projections per layer); mutually exclusive with ``seed``.
        seed: the feature seed (default 0 when no generator is given).
        orthogonal_projections: ``None`` or a method of :func:`orthotorch.parametrize.orthogonal`
            (e.g. ``"tcwy"``): constrain the q/k/v projection weights to orthonormal rows/columns.

    The projection is drawn once at construction and cached in the buffer ``features.weight``
    ``(m, E/H)``; redraw ``r`` is drawn from a generator seeded ``seed + r·c`` (draw 0 from ``seed``
    itself), so the schedule is reproducible. The seed, the count of training calls and the count of
    draws are buffers (``feature_seed``, ``num_calls``, ``num_draws``) saved in ``state_dict``: a
    reloaded module continues the same redraw schedule.

    Parameters are ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj`` (``nn.Linear``) and, with
    ``add_bias_kv``, ``bias_k``, ``bias_v``. :meth:`load_state_dict` also accepts the ``state_dict`` of an
    ``nn.MultiheadAttention`` of the same shape (``in_proj_weight``/``in_proj_bias``, or
    ``q_proj_weight``/``k_proj_weight``/``v_proj_weight`` when ``kdim``/``vdim`` differ from ``E``,
    ``out_proj.*``, ``bias_k``/``bias_v``) and keeps this module's own projection and counters;
    :meth:`from_mha` builds the matching module and loads it.
    """

    #: ``need_weights=True`` forms the weights only when ``Lq·Lk`` is at most this (per batch and head);
    #: set it on an instance to change the limit.
    max_weights_size: int = 1 << 20

    #: MHA's packed in-projection does not exist here (q/k/v projections are separate modules); these
    #: MHA attributes also keep ``nn.TransformerEncoderLayer``'s exact-attention fast path, which reads
    #: them, from bypassing this module in eval mode.
    in_proj_weight: None = None
    in_proj_bias: None = None
    _qkv_same_embed_dim: bool = False

    feature_seed: torch.Tensor
    num_calls: torch.Tensor
    num_draws: torch.Tensor

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        num_features: int = 256,
        kind: str = "positive",
        projection: str = "orthogonal",
        causal: bool = False,
        implementation: str = "slim",
        chunk_size: int = 256,
        redraw_interval: int | None = None,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        orthogonal_projections: Method | None = None,
    ) -> None:
        super().__init__()
        check_positive_int("embed_dim", embed_dim)
        check_positive_int("num_heads", num_heads)
        if embed_dim % num_heads:
            raise ValueError(
                f"`embed_dim` ({embed_dim}) must be divisible by `num_heads` ({num_heads})"
            )
        if check_real("dropout", dropout, minimum=0.0, maximum=1.0) != 0.0:
            raise ValueError(
                f"`dropout` must be 0.0, got {dropout}: it drops attention weights, which linear "
                "attention never forms (apply dropout to the output instead)"
            )
        for name, flag in (
            ("bias", bias),
            ("add_bias_kv", add_bias_kv),
            ("add_zero_attn", add_zero_attn),
            ("batch_first", batch_first),
            ("causal", causal),
        ):
            check_bool(name, flag)
        self.kdim = _optional_dim("kdim", kdim, embed_dim)
        self.vdim = _optional_dim("vdim", vdim, embed_dim)
        check_choice("implementation", implementation, IMPLEMENTATIONS)
        check_positive_int("chunk_size", chunk_size)
        if redraw_interval is not None:
            check_positive_int("redraw_interval", redraw_interval)
        check_generator("generator", generator)
        if generator is not None and seed is not None:
            raise ValueError("pass either `generator` or `seed`, not both")
        if seed is None:
            seed = 0
            if generator is not None:
                high = _INT64_SEEDS // 2  # (randint cannot reach 2**63)
                seed = int(torch.randint(0, high, (), generator=generator, device=generator.device))
        check_positive_int("seed", seed, minimum=0)
        if seed >= _INT64_SEEDS:
            raise ValueError(f"`seed` must be < 2**63, got {seed}")
        if orthogonal_projections is not None and not isinstance(orthogonal_projections, str):
            raise TypeError(
                "`orthogonal_projections` must be None or a method name such as 'tcwy', got "
                f"{type(orthogonal_projections).__name__} {orthogonal_projections!r}"
            )

        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = 0.0
        self.batch_first = batch_first
        self.add_zero_attn = add_zero_attn
        self.causal = causal
        self.implementation = implementation
        self.chunk_size = chunk_size
        self.redraw_interval = redraw_interval
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(self.kdim, embed_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(self.vdim, embed_dim, bias=bias, **factory)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.bias_k: nn.Parameter | None
        self.bias_v: nn.Parameter | None
        if add_bias_kv:
            # nn.MultiheadAttention's initialisation of the extra key/value
            self.bias_k = nn.Parameter(torch.empty(1, 1, embed_dim, **factory))
            self.bias_v = nn.Parameter(torch.empty(1, 1, embed_dim, **factory))
            nn.init.xavier_normal_(self.bias_k)
            nn.init.xavier_normal_(self.bias_v)
        else:
            self.bias_k = self.bias_v = None
        self._seed, self._calls, self._draws = seed, 0, 0
        features = FeatureMap(
            self.head_dim,
            num_features,
            kind=kind,
            projection=projection,
            generator=self._draw_generator(0),
        )
        fdtype = torch.float64 if dtype == torch.float64 else None
        self.features = features.to(device=device, dtype=fdtype)
        self.register_buffer("feature_seed", torch.tensor(seed, dtype=torch.int64, device=device))
        self.register_buffer("num_calls", torch.zeros((), dtype=torch.int64, device=device))
        self.register_buffer("num_draws", torch.zeros((), dtype=torch.int64, device=device))
        self.register_load_state_dict_post_hook(_sync_counters)
        if orthogonal_projections is not None:
            constrain_projections(self, method=orthogonal_projections)

    # ------------------------------------------------------------------ features and redraws

    def _draw_generator(self, index: int) -> torch.Generator:
        return torch.Generator().manual_seed((self._seed + index * _SEED_STEP) % _INT64_SEEDS)

    def redraw(self, generator: torch.Generator | None = None) -> None:
        """Redraw the projection of the feature map now.

        Without ``generator`` the next draw of the module's reproducible schedule is used; with one, the
        draw comes from it (the counter still advances, so later scheduled draws stay distinct).
        """
        check_generator("generator", generator)
        self._draws += 1
        self.features.redraw(
            generator if generator is not None else self._draw_generator(self._draws)
        )
        self.num_draws.fill_(self._draws)

    def _maybe_redraw(self) -> None:
        """Count a training call and redraw every ``redraw_interval`` calls (never in eval mode)."""
        if self.training and self.redraw_interval is not None:
            if self._calls > 0 and self._calls % self.redraw_interval == 0:
                self.redraw()
            self._calls += 1
            self.num_calls.fill_(self._calls)

    # ------------------------------------------------------------------ MHA state_dict

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention, **kwargs: Any) -> FavorAttention:
        """A :class:`FavorAttention` with ``mha``'s shape and weights.

        Args:
            mha: a ``torch.nn.MultiheadAttention``.
            **kwargs: FavorAttention's own options (``num_features``, ``kind``, ``causal``, ...), or
                overrides of the copied ones (e.g. ``dropout=0.0`` for a model trained with dropout).
        """
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(
                f"`mha` must be a torch.nn.MultiheadAttention, got {type(mha).__name__}"
            )
        ref = mha.out_proj.weight
        config: dict[str, Any] = {
            "dropout": mha.dropout,
            "bias": mha.in_proj_bias is not None,
            "add_bias_kv": mha.bias_k is not None,
            "add_zero_attn": mha.add_zero_attn,
            "kdim": mha.kdim,
            "vdim": mha.vdim,
            "batch_first": mha.batch_first,
            "device": ref.device,
            "dtype": ref.dtype,
        }
        config.update(kwargs)
        out = cls(mha.embed_dim, mha.num_heads, **config)
        out.load_state_dict(mha.state_dict())
        return out

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        """Translate an ``nn.MultiheadAttention`` state_dict, and fill the redraw counters of
        state_dicts saved before they existed, then load as usual."""
        is_mha = any(prefix + key in state_dict for key in _MHA_PACKED + _MHA_SEPARATE)
        if is_mha:
            names = ("q_proj", "k_proj", "v_proj")
            packed = state_dict.pop(prefix + "in_proj_weight", None)
            if packed is not None:
                if packed.shape != (3 * self.embed_dim, self.embed_dim) or (
                    self.kdim != self.embed_dim or self.vdim != self.embed_dim
                ):
                    error_msgs.append(
                        f"{prefix}in_proj_weight of shape {tuple(packed.shape)} needs a FavorAttention "
                        f"with kdim = vdim = embed_dim = {packed.shape[-1]} (this one: embed_dim "
                        f"{self.embed_dim}, kdim {self.kdim}, vdim {self.vdim})"
                    )
                    return
                for name, w in zip(names, packed.chunk(3)):
                    state_dict[f"{prefix}{name}.weight"] = w
            for name in names:
                w = state_dict.pop(f"{prefix}{name}_weight", None)
                if w is not None:
                    state_dict[f"{prefix}{name}.weight"] = w
            packed_bias = state_dict.pop(prefix + "in_proj_bias", None)
            if packed_bias is not None:
                for name, b in zip(names, packed_bias.chunk(3)):
                    state_dict[f"{prefix}{name}.bias"] = b
            # an MHA has no projection: keep this module's own draw
            state_dict.setdefault(prefix + "features.weight", self.features.weight)
        for name in ("feature_seed", "num_calls", "num_draws"):
            state_dict.setdefault(prefix + name, getattr(self, name))
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    # ------------------------------------------------------------------ forward

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, L, E) → (N, H, L, E/H)``."""
        n, length, _ = x.shape
        return x.reshape(n, length, self.num_heads, self.head_dim).transpose(1, 2)

    def _valid_keys(self, mask: object, n: int, s: int, batched: bool) -> torch.Tensor | None:
        """``key_padding_mask`` → bool ``(N, S)`` True = attend (or None)."""
        if mask is None:
            return None
        mask = check_tensor("key_padding_mask", mask)
        expected = (n, s) if batched else (s,)
        if tuple(mask.shape) != expected:
            raise ValueError(
                f"`key_padding_mask` must have shape {expected} (batch, key length), got "
                f"{describe(mask)}"
            )
        if mask.dtype == torch.bool:
            blocked = mask
        elif mask.is_floating_point():
            blocked = _zero_or_neg_inf("key_padding_mask", mask)
        else:
            raise TypeError(
                "`key_padding_mask` must be a bool tensor (True = ignore) or a float tensor "
                f"(-inf = ignore, 0 = attend), got {describe(mask)}"
            )
        return ~blocked.reshape(n, s)

    def _mask_is_causal(self, mask: object, n: int, lq: int, s: int, batched: bool) -> bool:
        """Whether ``attn_mask`` is the causal mask (False for no mask or a mask that blocks nothing);
        any other mask raises."""
        if mask is None:
            return False
        mask = check_tensor("attn_mask", mask)
        shapes = [(lq, s), ((n if batched else 1) * self.num_heads, lq, s)]
        if tuple(mask.shape) not in shapes:
            raise ValueError(
                f"`attn_mask` must have shape {shapes[0]} or {shapes[1]}, got {describe(mask)}"
            )
        if mask.dtype == torch.bool:
            blocked = mask
        elif mask.is_floating_point():
            blocked = _zero_or_neg_inf("attn_mask", mask)
        else:
            raise TypeError(f"`attn_mask` must be a bool or float tensor, got {describe(mask)}")
        if not bool(blocked.any()):
            return False
        if lq == s:
            upper = torch.ones(lq, s, dtype=torch.bool, device=mask.device).triu(1)
            if bool((blocked == upper).all()):
                return True
        raise ValueError(
            f"`attn_mask` ({describe(mask)}) is neither empty nor the causal mask: linear attention "
            "can honour only those (use is_causal=True or "
            "nn.Transformer.generate_square_subsequent_mask for causal attention, key_padding_mask "
            "for padding, or nn.MultiheadAttention for arbitrary masks)"
        )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool | None = None,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``nn.MultiheadAttention``'s call: ``(attn_output, attn_weights)``.

        Args:
            query: ``(L, N, E)`` (``(N, L, E)`` with ``batch_first``) or unbatched ``(L, E)``.
            key: ``(S, N, kdim)`` / ``(N, S, kdim)`` / ``(S, kdim)``; value: the same with ``vdim``.
                ``forward(x)`` with neither is self-attention (``key = value = x``).
            key_padding_mask: ``(N, S)`` (``(S,)`` unbatched): bool, True = ignore that key; or float,
                ``-inf`` = ignore, ``0`` = attend (other values raise). Ignored keys and values never
                touch the result (NaN there is harmless); a query with no key left gets output 0.
            need_weights: also return the attention weights. Default: True for the MHA call
                (``key`` given), False for ``forward(x)``. FAVOR+ never forms them: with True they are
                computed on the side as ``φ(q_i)ᵀφ(k_j) / Σ_j φ(q_i)ᵀφ(k_j)``, the weights the FAVOR+
                output applies (``attn_output = out_proj(weights @ v)`` up to rounding), in
                O(N·H·Lq·Lk·M) time; only when ``Lq·Lk ≤ max_weights_size`` (2²⁰), else ValueError:
                pass ``need_weights=False``. With ``implementation="softmax"`` they are the exact
                softmax weights.
            attn_mask: ``None``, or the causal mask (bool, True above the diagonal, or float with
                ``-inf`` there; ``(L, S)`` or ``(N·H, L, S)``), which switches causal attention on;
                any other mask raises ValueError.
            average_attn_weights: average the weights over heads (``(N, L, S')``), else
                ``(N, H, L, S')``; ``S' = S`` plus one per ``add_bias_kv``/``add_zero_attn``.
            is_causal: causal self-attention (needs ``L == S``); unlike MHA, no ``attn_mask`` needed.

        Returns:
            ``attn_output`` with ``query``'s layout and ``attn_weights`` (``None`` when not needed);
            unbatched inputs give unbatched outputs (weights ``(L, S')`` or ``(H, L, S')``).
        """
        query = check_tensor("query", query)
        if key is None and value is not None:
            raise ValueError("`key` is None but `value` is given: pass both, or neither")
        shorthand = key is None
        key = check_tensor("key", query if key is None else key)
        value = check_tensor("value", key if value is None else value)
        need = (not shorthand) if need_weights is None else check_bool("need_weights", need_weights)
        check_bool("average_attn_weights", average_attn_weights)
        check_bool("is_causal", is_causal)
        layout = "(N, L, E)" if self.batch_first else "(L, N, E)"
        if query.dim() not in (2, 3):
            raise ValueError(f"`query` must be {layout} or unbatched (L, E), got {describe(query)}")
        if key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(
                f"`key` and `value` must have `query`'s number of dimensions ({query.dim()}), got "
                f"key {describe(key)}, value {describe(value)}"
            )
        batched = query.dim() == 3
        if not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        n, lq, _ = query.shape
        for name, t, width in (
            ("query", query, self.embed_dim),
            ("key", key, self.kdim),
            ("value", value, self.vdim),
        ):
            if t.shape[-1] != width:
                raise ValueError(f"`{name}` must have last dimension {width}, got {describe(t)}")
        if key.shape[:2] != value.shape[:2] or key.shape[0] != n:
            raise ValueError(
                f"`query`, `key` and `value` must share the batch size, and `key`/`value` the "
                f"length; got query {tuple(query.shape)}, key {tuple(key.shape)}, value "
                f"{tuple(value.shape)} (as {layout})"
            )
        s = key.shape[1]
        valid = self._valid_keys(key_padding_mask, n, s, batched)
        causal = self.causal or is_causal or self._mask_is_causal(attn_mask, n, lq, s, batched)
        if causal and lq != s:
            raise ValueError(
                f"causal attention needs query and key of one length, got L = {lq}, S = {s}"
            )
        n_extra = int(self.bias_k is not None) + int(self.add_zero_attn)
        if need and self.implementation != "softmax" and lq * (s + n_extra) > self.max_weights_size:
            raise ValueError(
                f"`need_weights=True` needs the (N, H, L, S) = ({n}, {self.num_heads}, {lq}, "
                f"{s + n_extra}) attention weights, which FAVOR+ never forms; L·S = "
                f"{lq * (s + n_extra)} exceeds max_weights_size = {self.max_weights_size}: pass "
                "need_weights=False"
            )
        self._maybe_redraw()
        q = self._heads(self.q_proj(query))
        k = self._heads(self.k_proj(key))
        v = self._heads(self.v_proj(value))
        if valid is not None:  # padded keys/values never touch the result, even NaN ones
            keep = valid[:, None, :, None]
            k = torch.where(keep, k, torch.zeros((), dtype=k.dtype, device=k.device))
            v = torch.where(keep, v, torch.zeros((), dtype=v.dtype, device=v.device))
        extra_k, extra_v = self._extras(n, q)
        out, weights = self._attend(q, k, v, extra_k, extra_v, valid, causal, need)
        out = self.out_proj(out.transpose(1, 2).reshape(n, lq, self.embed_dim))
        if not batched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        if weights is not None:
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not batched:
                weights = weights.squeeze(0)
        return out, weights

    def _extras(self, n: int, q: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The appended keys/values ``(N, H, 1, E/H)`` each: ``bias_k``/``bias_v``, then zero attention."""
        ks: list[torch.Tensor] = []
        vs: list[torch.Tensor] = []
        shape = (n, self.num_heads, 1, self.head_dim)
        if self.bias_k is not None and self.bias_v is not None:
            ks.append(self.bias_k.reshape(1, self.num_heads, 1, self.head_dim).expand(shape))
            vs.append(self.bias_v.reshape(1, self.num_heads, 1, self.head_dim).expand(shape))
        if self.add_zero_attn:
            zero = q.new_zeros(shape)
            ks.append(zero)
            vs.append(zero)
        return ks, vs

    def _attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        extra_k: list[torch.Tensor],
        extra_v: list[torch.Tensor],
        valid: torch.Tensor | None,
        causal: bool,
        need: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-head attention ``(N, H, L, E/H)`` and weights ``(N, H, L, S')`` (or None)."""
        n, _, lq, _ = q.shape
        s, n_extra = k.shape[-2], len(extra_k)
        k_all = torch.cat([k, *extra_k], dim=-2)
        v_all = torch.cat([v, *extra_v], dim=-2)
        valid_all = valid
        if valid is not None and n_extra:
            valid_all = torch.cat([valid, valid.new_ones(n, n_extra)], dim=-1)
        allowed = None
        if causal:
            allowed = torch.ones(lq, s, dtype=torch.bool, device=q.device).tril()
            allowed = torch.cat([allowed, allowed.new_ones(lq, n_extra)], dim=-1)[None, None]
        if valid_all is not None:
            cols = valid_all[:, None, None, :]
            allowed = cols if allowed is None else allowed & cols
        if self.implementation == "softmax":
            w = _softmax_weights(q, k_all, allowed)
            return (w @ v_all.to(w.dtype)).to(q.dtype), (w.to(q.dtype) if need else None)
        weights = _favor_weights(self.features, q, k_all, valid_all, allowed) if need else None
        if lq == 0 or s + n_extra == 0:
            return q.new_zeros(n, self.num_heads, lq, self.head_dim), weights
        kpm = None if valid is None else ~valid
        impl = self.implementation
        if not causal:
            if kpm is not None and n_extra:
                kpm = torch.cat([kpm, kpm.new_zeros(n, n_extra)], dim=-1)
            out = favor_attention(
                q, k_all, v_all, features=self.features, key_padding_mask=kpm,
                chunk_size=self.chunk_size, implementation=impl,
            )  # fmt: skip
            assert isinstance(out, torch.Tensor)  # (no state requested)
            return out, weights
        state = None
        if n_extra:
            # the appended keys are visible to every query: they start the causal prefix state
            impl = "chunked" if impl == "prefix" else impl
            ke, ve = k_all[..., s:, :], v_all[..., s:, :]
            _, state = favor_attention(
                ke, ke, ve, causal=True, features=self.features, return_state=True,
                chunk_size=self.chunk_size, implementation=impl,
            )  # fmt: skip
        out = favor_attention(
            q, k, v, causal=True, features=self.features, key_padding_mask=kpm, state=state,
            chunk_size=self.chunk_size, implementation=impl,
        )  # fmt: skip
        assert isinstance(out, torch.Tensor)  # (no state requested)
        return out, weights

    def forward_with_state(
        self,
        x: torch.Tensor,
        state: FavorState | None,
        *,
        provider: Callable[[torch.Tensor, torch.Tensor], FavorState | None] | None = None,
        key_padding_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, FavorState]:
        """Causal self-attention over a slice ``x`` ``(B, T, E)`` (always batch first) continuing
        from ``state``.

        ``provider(k, v)`` (optional) is called with this slice's per-head keys/values to supply the
        incoming state instead of ``state`` (used by :func:`orthotorch.attention.slim_train_step`). It
        never redraws the projection (a redraw inside a sequence would invalidate the state).

        Returns:
            ``(out (B, T, E), outgoing state)``; the state has shape ``(B, H, M, E/H + 1)``.
        """
        check_tensor("x", x)
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"`x` must be (batch, length, {self.embed_dim}), got {describe(x)}")
        if self.implementation == "softmax":
            raise ValueError(
                "forward_with_state needs a FAVOR+ implementation (a recurrent state), got "
                "implementation='softmax'"
            )
        if self.bias_k is not None or self.add_zero_attn:
            raise ValueError(
                "forward_with_state does not support add_bias_kv/add_zero_attn; use forward"
            )
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

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}, "
            f"causal={self.causal}, implementation={self.implementation!r}"
        )


def _sync_counters(module: nn.Module, incompatible_keys: object) -> None:
    """Load post-hook: refresh the Python copies of the redraw counters from the loaded buffers."""
    assert isinstance(module, FavorAttention)
    module._seed = int(module.feature_seed)
    module._calls = int(module.num_calls)
    module._draws = int(module.num_draws)


def _softmax_weights(
    q: torch.Tensor, k: torch.Tensor, allowed: torch.Tensor | None
) -> torch.Tensor:
    """Exact softmax weights ``(N, H, L, S)`` in the compute dtype; rows with no allowed key are 0."""
    cd = compute_dtype(q.dtype)
    logits = (q.to(cd) @ k.to(cd).transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if allowed is None:
        return torch.softmax(logits, dim=-1)
    any_ok = allowed.any(dim=-1, keepdim=True)
    logits = logits.masked_fill(~allowed, _NEG_INF).masked_fill(~any_ok, 0.0)
    return torch.softmax(logits, dim=-1) * any_ok.to(cd)


def _favor_weights(
    fmap: FeatureMap,
    q: torch.Tensor,
    k: torch.Tensor,
    valid: torch.Tensor | None,
    allowed: torch.Tensor | None,
) -> torch.Tensor:
    """The weights the FAVOR+ output applies, ``φ(q_i)ᵀφ(k_j) / Σ_j φ(q_i)ᵀφ(k_j)``, ``(N, H, L, S)``.

    Computed in float64 with the stabilisers of bidirectional FAVOR+ (a per-feature key maximum moved to
    the query side, then the query row maximum), which cancel in the ratio. Rows with no allowed key
    (or a zero normaliser) are 0, as the FAVOR+ output is.
    """
    if q.shape[-2] == 0 or k.shape[-2] == 0:
        return q.new_zeros(*q.shape[:-1], k.shape[-2])
    root = q.shape[-1] ** -0.25
    eq, bq = fmap.parts(q.to(torch.float64) * root)
    ek, bk = fmap.parts(k.to(torch.float64) * root)
    if valid is not None:
        ek = ek.masked_fill(~valid[:, None, :, None], _NEG_INF)
    with torch.no_grad():
        c = ek.amax(dim=-2, keepdim=True)
        c = torch.where(torch.isfinite(c), c, torch.zeros_like(c))
        r = (eq + c).amax(dim=-1, keepdim=True)
    fk = torch.exp(ek - c)
    fq = torch.exp(eq + c - r)
    if bk is not None:
        fk = fk * bk
    if bq is not None:
        fq = fq * bq
    width = max(fq.shape[-1], fk.shape[-1])
    fq = fq.expand(*fq.shape[:-1], width)
    fk = fk.expand(*fk.shape[:-1], width)
    raw = fq @ fk.transpose(-1, -2)
    if allowed is not None:
        raw = raw * allowed.to(raw.dtype)
    den = raw.sum(dim=-1, keepdim=True)
    ok = den != 0
    w = torch.where(ok, raw / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(raw))
    return w.to(q.dtype)


def constrain_projections(attn: FavorAttention, *, method: Method = "tcwy") -> None:
    """Constrain ``attn``'s q/k/v projection weights ``(E, in)`` to orthonormal rows/columns in place,
    with :func:`orthotorch.parametrize.orthogonal` (``method``: ``"tcwy"``, ``"cwy"``, ...).

    Load an ``nn.MultiheadAttention`` state_dict *before* constraining (the parametrized weights are
    stored under ``parametrizations.weight.original``).
    """
    if not isinstance(attn, FavorAttention):
        raise TypeError(f"`attn` must be a FavorAttention, got {type(attn).__name__}")
    for lin in (attn.q_proj, attn.k_proj, attn.v_proj):
        orthogonal(lin, "weight", method=method)
