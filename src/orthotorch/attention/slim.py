"""Model-level SLiM: train a causal :class:`PerformerLM` slice by slice through all layers.

Forward: the sequence is processed in slices of ``slice_len`` tokens without building a graph, carrying
each layer's prefix state. Backward: the slices are revisited in reverse; each layer's incoming state is
rebuilt from its outgoing state by subtraction (:func:`rebuild_state`), the slice is recomputed under
autograd, and the gradient of the loss plus the gradient flowing into the outgoing states is
back-propagated to the parameters and to the incoming states. Peak memory is that of one slice plus the
per-layer states, independent of the sequence length L; the result equals back-propagation through the
full-sequence forward (up to rounding), at the cost of about one extra forward pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from orthotorch._validation import check_positive_int, check_tensor, describe
from orthotorch.attention.causal import CheckpointRule, FavorState, init_state
from orthotorch.attention.functional import rebuild_state
from orthotorch.attention.modules import FavorAttention, PerformerLM


def _attentions(model: PerformerLM) -> list[FavorAttention]:
    out = []
    for blk in model.blocks:
        attn = blk.attn
        if not isinstance(attn, FavorAttention):
            raise TypeError(
                f"every block's `attn` must be a FavorAttention, got {type(attn).__name__}"
            )
        out.append(attn)
    return out


def slim_train_step(
    model: PerformerLM,
    tokens: torch.Tensor,
    targets: torch.Tensor,
    *,
    slice_len: int = 256,
) -> torch.Tensor:
    """Accumulate into ``.grad`` the gradient of the mean next-token cross-entropy, by SLiM slicing.

    Args:
        model: a :class:`PerformerLM`.
        tokens: ``(B, L)`` int64 inputs; targets: ``(B, L)`` int64 labels (e.g. tokens shifted by one).
        slice_len: tokens per slice: memory grows with ``slice_len``, not with ``L``.

    Returns:
        The mean loss (a detached scalar tensor). Call ``optimizer.step()`` afterwards as usual. Projection
        redraws scheduled with ``redraw_interval`` are applied once, at the start of the step.
    """
    if not isinstance(model, PerformerLM):
        raise TypeError(f"`model` must be a PerformerLM, got {type(model).__name__}")
    check_tensor("tokens", tokens)
    check_tensor("targets", targets)
    if tokens.dim() != 2 or tokens.dtype != torch.int64:
        raise ValueError(f"`tokens` must be int64 (batch, length), got {describe(tokens)}")
    if targets.shape != tokens.shape or targets.dtype != torch.int64:
        raise ValueError(
            f"`targets` must be int64 with the shape of `tokens` {tuple(tokens.shape)}, got "
            f"{describe(targets)}"
        )
    check_positive_int("slice_len", slice_len)
    attns = _attentions(model)
    for attn in attns:
        attn._maybe_redraw()
    length = tokens.shape[1]
    spans = [(a, min(a + slice_len, length)) for a in range(0, length, slice_len)]
    total = targets.numel()
    nlayers = len(attns)

    # forward: states only, with the running maxima and the few checkpoints needed for exact rebuilds
    maxes: list[list[torch.Tensor]] = []
    ckpt: dict[tuple[int, int], torch.Tensor] = {}
    rules = [CheckpointRule() for _ in range(nlayers)]
    states: list[FavorState | None] = [None] * nlayers
    loss_sum = torch.zeros((), dtype=torch.float64, device=tokens.device)
    with torch.no_grad():
        for j, (a, b) in enumerate(spans):
            logits, new = model.forward_slice(tokens[:, a:b], states, offset=a)
            loss_sum += F.cross_entropy(
                logits.flatten(0, 1).float(), targets[:, a:b].flatten(), reduction="sum"
            ).double()
            row = []
            for idx in range(nlayers):
                old = states[idx]
                if old is None:
                    row.append(torch.full_like(new[idx].max_, float("-inf")))
                else:
                    row.append(old.max_)
                    if rules[idx].keep(old, new[idx]):
                        ckpt[(j, idx)] = old.kv
            maxes.append(row)
            states = list(new)

    # backward: reverse over slices, rebuilding incoming states layer by layer
    kv_out = [s.kv for s in states]  # type: ignore[union-attr]
    g_out: list[torch.Tensor | None] = [None] * nlayers
    for j in range(len(spans) - 1, -1, -1):
        a, b = spans[j]
        leaves: dict[int, FavorState] = {}

        maxes_out = [
            maxes[j + 1][i] if j + 1 < len(spans) else states[i].max_  # type: ignore[union-attr]
            for i in range(nlayers)
        ]

        def provider(
            idx: int,
            k: torch.Tensor,
            v: torch.Tensor,
            _j: int = j,
            _kv_out: list[torch.Tensor] = kv_out,
            _max_out: list[torch.Tensor] = maxes_out,
            _leaves: dict[int, FavorState] = leaves,
        ) -> FavorState:
            max_in = maxes[_j][idx]
            attn = attns[idx]
            if _j == 0:
                st = init_state(
                    k.shape[:-2], attn.features.feature_dim, v.shape[-1], device=k.device
                )
            elif (_j, idx) in ckpt:
                st = FavorState(ckpt[(_j, idx)], max_in)
            else:
                st = rebuild_state(
                    attn.features,
                    k.detach(),
                    v.detach(),
                    FavorState(_kv_out[idx], _max_out[idx]),
                    max_in,
                    chunk_size=attn.chunk_size,
                )
            leaf = FavorState(st.kv.detach().requires_grad_(), st.max_)
            _leaves[idx] = leaf
            return leaf

        with torch.enable_grad():
            logits, outs = model.forward_slice(tokens[:, a:b], None, offset=a, provider=provider)
            loss = (
                F.cross_entropy(
                    logits.flatten(0, 1).float(), targets[:, a:b].flatten(), reduction="sum"
                )
                / total
            )
            tensors: list[torch.Tensor] = [loss]
            grads: list[torch.Tensor | None] = [None]
            for idx in range(nlayers):
                if g_out[idx] is not None:
                    tensors.append(outs[idx].kv)
                    grads.append(g_out[idx])
            torch.autograd.backward(tensors, grads)
        g_out = [leaves[i].kv.grad if j > 0 else None for i in range(nlayers)]
        kv_out = [leaves[i].kv.detach() for i in range(nlayers)]
    return (loss_sum / total).to(torch.float32)
