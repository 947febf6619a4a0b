"""OrthogonalAdam: the adaptive member of the stochastic Givens family (drop-in ``torch.optim.Adam``)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch.optim.adam import adam as _torch_adam
from torch.optim.optimizer import _get_scalar_dtype

from orthotorch.manifolds.givens import givens_step_, rotate_pairs_
from orthotorch.optim._base import GivensOptimizer, _check_number, _ParamInfo

__all__ = ["OrthogonalAdam"]


class OrthogonalAdam(GivensOptimizer):
    r"""Adam whose orthogonal / Stiefel weights move by Givens rotations driven by Adam's direction.

    Unconstrained parameters get exactly (bit for bit) ``torch.optim.Adam``'s update; parameters on other
    geoopt manifolds get geoopt-style Riemannian Adam (moments of the Riemannian gradient, first moment
    transported by ``retr_transp``). Parameter classification, wide-weight transposition, samplers,
    ``matchings_per_step``, ``unbiased``, ``stabilize``, ``generator``, ``nonfinite`` and the state_dict
    behave as in :class:`~orthotorch.optim.OrthogonalSGD` (see its docstring).

    **The constrained step (choice and why).** For a constrained weight with tall view ``X`` ``(..., n, k)``
    and gradient ``G``, Adam's moments are kept in the ambient space:
    ``m ← β₁m + (1−β₁)G``, ``v ← β₂v + (1−β₂)G⊙G`` (elementwise), and the preconditioned direction
    ``D = m̂ / (√v̂ + ε)`` (torch's bias corrections) drives the rotations exactly as the gradient does in
    SGD: ``θ_ij = −lr·(⟨d_i, x_j⟩ − ⟨x_i, d_j⟩)`` on each sampled pair. Then ``m`` is transported by the same
    rotations (``m ← R m``), like the SGD momentum buffer; ``v`` is not, because it is a per-coordinate
    scale statistic and one step's rotation moves each row by an angle of order ``lr``. Reasons for this
    choice over per-pair or per-row second moments of ``W``: (1) it is Adam's preconditioner, so the
    invariance to gradient scale that users rely on carries over (θ does not change when the loss is
    multiplied by a constant); (2) it needs only O(nk) state and O(nk) work per step and no n×n quantity,
    whereas per-pair statistics of W would need O(n²) memory and are observed only on the sampled pairs;
    (3) it matches geoopt's RiemannianAdam (ambient elementwise second moment, transported first
    moment), so results are comparable. ``weight_decay`` (L2, as in torch Adam) is not applied to
    constrained weights: ``W(X, X) = 0``; ``amsgrad`` is supported.

    Args:
        params: parameters or param-group dicts (group keys as in :class:`OrthogonalSGD` plus Adam's).
        lr: learning rate (≥ 0).
        betas: ``(β₁, β₂)`` in ``[0, 1)``.
        eps: term added to the denominator (> 0).
        weight_decay: L2 penalty (unconstrained and Riemannian parameters only).
        amsgrad: use the running maximum of ``v``.
        maximize, sampler, matchings_per_step, unbiased, stabilize, generator, graph, nonfinite, foreach:
            as in :class:`OrthogonalSGD`.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        sampler: str = "random",
        matchings_per_step: int = 1,
        unbiased: bool = False,
        stabilize: int | None = None,
        generator: torch.Generator | None = None,
        graph: Any = None,
        nonfinite: str = "skip",
        foreach: bool | None = None,
    ) -> None:
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "amsgrad": amsgrad,
            "maximize": maximize,
            "foreach": foreach,
            "fused": None,
            "capturable": False,
            "differentiable": False,
            "decoupled_weight_decay": False,
            "sampler": sampler,
            "matchings_per_step": matchings_per_step,
            "unbiased": unbiased,
            "stabilize": stabilize,
            "graph": graph,
            "nonfinite": nonfinite,
        }
        super().__init__(params, defaults, generator)

    def _validate_group(self, group: dict[str, Any], index: int) -> None:
        super()._validate_group(group, index)
        where = f"param_groups[{index}]"
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise TypeError(f"`betas` ({where}) must be a pair (beta1, beta2), got {betas!r}")
        for name, b in zip(("betas[0]", "betas[1]"), betas):
            b = _check_number(f"{name} ({where})", b)
            if b >= 1.0:
                raise ValueError(f"`{name}` ({where}) must be in [0, 1), got {b}")
        group["betas"] = (float(betas[0]), float(betas[1]))
        eps = _check_number(f"eps ({where})", group["eps"])
        if eps <= 0:
            raise ValueError(f"`eps` ({where}) must be > 0, got {eps}")
        group["eps"] = eps
        group["weight_decay"] = _check_number(f"weight_decay ({where})", group["weight_decay"])

    def _init_state(self, p: torch.Tensor, amsgrad: bool) -> dict[str, Any]:
        state = self.state[p]
        if len(state) == 0 or "exp_avg" not in state:
            state["step"] = torch.tensor(0.0, dtype=_get_scalar_dtype(), device="cpu")
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if amsgrad:
                state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def _euclidean_update(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        amsgrad = group["amsgrad"]
        grads, m1, m2, mx, steps = [], [], [], [], []
        for p in params:
            if p.grad.is_sparse:
                raise RuntimeError("OrthogonalAdam does not support sparse gradients")
            st = self._init_state(p, amsgrad)
            grads.append(p.grad)
            m1.append(st["exp_avg"])
            m2.append(st["exp_avg_sq"])
            if amsgrad:
                mx.append(st["max_exp_avg_sq"])
            steps.append(st["step"])
        beta1, beta2 = group["betas"]
        _torch_adam(
            params,
            grads,
            m1,
            m2,
            mx,
            steps,
            amsgrad=amsgrad,
            has_complex=any(torch.is_complex(p) for p in params),
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=group["maximize"],
            foreach=group["foreach"],
            capturable=False,
            differentiable=False,
            fused=group["fused"],
            decoupled_weight_decay=False,
        )

    def _moments(self, group: dict[str, Any], p: torch.Tensor, grad: torch.Tensor):
        """Update Adam's moments of ``grad``; return (exp_avg, direction m̂/(√v̂+ε) ·(1/bc1), step size)."""
        state = self._init_state(p, group["amsgrad"])
        beta1, beta2 = group["betas"]
        state["step"] += 1
        t = float(state["step"])  # CPU tensor: no device sync
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bc1 = 1 - beta1**t
        bc2_sqrt = math.sqrt(1 - beta2**t)
        if group["amsgrad"]:
            torch.maximum(state["max_exp_avg_sq"], exp_avg_sq, out=state["max_exp_avg_sq"])
            denom = (state["max_exp_avg_sq"].sqrt() / bc2_sqrt).add_(group["eps"])
        else:
            denom = (exp_avg_sq.sqrt() / bc2_sqrt).add_(group["eps"])
        direction = exp_avg / denom
        return exp_avg, direction, group["lr"] / bc1

    def _givens_update(self, group: dict[str, Any], p: torch.Tensor, info: _ParamInfo) -> None:
        grad = p.grad
        if grad.dtype != p.dtype:
            grad = grad.to(p.dtype)
        if group["maximize"]:
            grad = -grad
        exp_avg, direction, step_size = self._moments(group, p, grad)
        x = self._tall(p.data, info)
        d = self._tall(direction, info)
        m = self._tall(exp_avg, info)
        for i, j, scale in self._matchings(info, group, x, d):
            w = givens_step_(x, d, i, j, step_size, scale=scale)
            theta = -step_size * w if scale is None else -step_size * w * scale.to(w.dtype)
            rotate_pairs_(m, i, j, theta)

    def _riemannian_update(self, group: dict[str, Any], p: torch.Tensor) -> None:
        manifold = p.manifold
        grad = p.grad
        if group["maximize"]:
            grad = -grad
        if group["weight_decay"] != 0:
            grad = grad.add(p, alpha=group["weight_decay"])
        rgrad = manifold.egrad2rgrad(p.data, grad)
        state = self._init_state(p, group["amsgrad"])
        beta1, beta2 = group["betas"]
        state["step"] += 1
        t = float(state["step"])
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.mul_(beta1).add_(rgrad, alpha=1 - beta1)
        exp_avg_sq.mul_(beta2).add_(manifold.component_inner(p.data, rgrad), alpha=1 - beta2)
        if group["amsgrad"]:
            torch.maximum(state["max_exp_avg_sq"], exp_avg_sq, out=state["max_exp_avg_sq"])
            denom = state["max_exp_avg_sq"].div(1 - beta2**t).sqrt_()
        else:
            denom = exp_avg_sq.div(1 - beta2**t).sqrt_()
        direction = exp_avg.div(1 - beta1**t) / denom.add_(group["eps"])
        new_p, new_m = manifold.retr_transp(p.data, -group["lr"] * direction, exp_avg)
        p.data.copy_(new_p)
        exp_avg.copy_(new_m)
