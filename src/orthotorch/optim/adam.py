"""OrthogonalAdam: the adaptive member of the stochastic Givens family (drop-in ``torch.optim.Adam``)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch.optim.adam import adam as _torch_adam

from orthotorch._compat import optimizer_step_dtype
from orthotorch._numerics import compute_dtype
from orthotorch._validation import check_bool, check_real
from orthotorch.manifolds.givens import givens_adam_steps_
from orthotorch.optim._base import GivensOptimizer, _descent_grad, _grad, _ParamInfo
from orthotorch.optim._docs import fill_docstring
from orthotorch.optim._tall import canonical_rgrad, cayley_step_

__all__ = ["OrthogonalAdam", "OrthogonalAdamW"]


class OrthogonalAdam(GivensOptimizer):
    r"""Adam whose orthogonal / Stiefel weights move by Givens rotations driven by Adam's direction.

    Unconstrained parameters get exactly (bit for bit) ``torch.optim.Adam``'s update; parameters on other
    geoopt manifolds get geoopt-style Riemannian Adam (moments of the Riemannian gradient, first moment
    transported by ``retr_transp``). Parameter classification, wide-weight transposition, samplers,
    ``matchings_per_step``, ``unbiased``, ``stabilize``, ``generator``, ``nonfinite`` and the state_dict
    behave as in :class:`~orthotorch.optim.OrthogonalSGD` (see its docstring).

    **The constrained step (choice and why).** For a constrained weight with tall view ``X`` ``(..., n, k)``
    and gradient ``G``:

    - first moment in the ambient space, ``M ← β₁M + (1−β₁)G``, transported by the step's rotations
      (``M ← R M``) exactly like the SGD momentum buffer; its generator coefficients
      ``W̃_ij = ⟨m_i, x_j⟩ − ⟨x_i, m_j⟩`` drive the rotations;
    - second moment *per row*, from the generator of the fresh gradient: for each sampled pair,
      ``v_i ← β₂v_i + (1−β₂)W_ij²`` and the same for ``v_j`` (``W_ij = ⟨g_i, x_j⟩ − ⟨x_i, g_j⟩``), with a per-row
      bias correction (rows not covered by a matching keep their value);
    - angle ``θ_ij = −lr/(1−β₁ᵗ) · W̃_ij / (√((v̂_i + v̂_j)/2) + ε)``.

    Every angle keeps the sign of the momentum's coefficient, so the step is a per-pair positive rescaling
    of the momentum step: descent to first order, fixed points exactly where the generator vanishes, and
    Adam's invariance to the gradient scale (θ does not change when the loss is multiplied by a constant).
    State O(nk + n), work O(k) per pair, no n×n quantity; on CPU the m matchings, the moment update
    and the row statistics are one fused pass over X, G and M
    (:func:`~orthotorch.manifolds.givens.givens_adam_steps_`).
    The alternative, Adam's elementwise ``v`` of the ambient gradient driving ``D = m̂/√v̂``, was tried and
    rejected: at an optimum the ambient gradient ``G = X·S`` (S symmetric) is not zero, and elementwise
    rescaling gives it a skew part, so the optimum is no longer a fixed point. On the d = 12 Procrustes
    test it stalled 4–6 % above the optimal loss even with full sweeps, while this variant converges.
    (geoopt's RiemannianAdam avoids it by rescaling the projected Riemannian gradient, at O(nk²).)
    **Weight decay on constrained weights is zero, by design.** Coupled (L2, ``G + λX``) or decoupled
    (AdamW, ``X ← (1 − lr·λ)X``), its Riemannian part vanishes on the manifold: ``‖X‖_F² = k`` is constant
    there, the generator of ``G = λX`` is ``W(X, λX) = λ(XXᵀ − XXᵀ) = 0``, and the tangent projection of
    ``X`` is zero. Shrinking X would only leave the manifold (and the next projection would undo it), so
    constrained weights take exactly the step they take with ``weight_decay=0``; unconstrained parameters
    get torch's decay (L2, or decoupled with ``decoupled_weight_decay=True`` / :class:`OrthogonalAdamW`).
    On other geoopt manifolds the decay is the Riemannian gradient of ``λ/2‖p‖²``: added to the gradient
    (coupled), or to the normalised direction (decoupled). ``amsgrad`` keeps the running maximum of the
    per-row ``v``.

    **Tall weights** (``tall_step``, default ``"auto"``: Stiefel weights whose tall view has ``n ≥ 2k``)
    take a different step, along the whole generator: torch Adam's elementwise moments (``exp_avg``,
    ``exp_avg_sq``, ``max_exp_avg_sq``, in the parameter's shape) of the canonical Riemannian gradient
    ``R = G − X GᵀX``, ``D = m̂/(√v̂ + ε)``, and ``X ← (I + ½lr·W)⁻¹(I − ½lr·W) X`` with
    ``W = D Xᵀ − X Dᵀ``; the first moment is carried by the same rotation (the Cayley Adam of Li, Fuxin
    & Todorovic, ICLR 2020, with an elementwise second moment). ``R`` vanishes at stationary points, so
    they stay fixed (rescaling ``G`` itself stalled at a gap of 6e-2). ``O(nk²)`` per step; see
    docs/optim.md, "Tall weights".

    State: the constrained weight's ``row_sq``/``row_count``/``max_row_sq`` are kept in float32 for
    float16/bfloat16 weights (float64 for float64), also across ``state_dict``/``load_state_dict``
    (torch's loader would cast them to the weight's dtype; a bfloat16 count cannot pass 256).

    Args:
        params: parameters or param-group dicts (group keys as in :class:`OrthogonalSGD` plus Adam's).
        lr: learning rate (≥ 0; a float or a one-element tensor, kept a tensor as torch does).
        betas: ``(β₁, β₂)`` in ``[0, 1)``.
        eps: term added to the denominator (> 0).
        weight_decay: decay factor λ (≥ 0; zero on constrained weights, see above).
        amsgrad: use the running maximum of ``v``.
    {shared}{flags}        capturable: must be False (``ValueError`` for True: the constrained step reads the step count
            on the host).
        decoupled_weight_decay: AdamW's decay (``p ← p − lr·λ·p``) instead of L2 for unconstrained
            parameters, as ``torch.optim.Adam(decoupled_weight_decay=True)``.

    Half precision (bfloat16/float16) works with angles in float32, but every rotation rounds at the
    weight's precision: set ``stabilize`` (e.g. 5–10) there.
    """

    _state_keys: ClassVar[dict[str, tuple[str, ...]]] = {
        "euclidean": ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
        "givens": ("step", "exp_avg", "row_sq", "row_count", "max_row_sq", "givens_steps"),
        "cayley": ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "givens_steps"),
        "riemannian": ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
    }

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        sampler: str = "round_robin",
        matchings_per_step: int = 16,
        unbiased: bool = False,
        stabilize: int | None = None,
        generator: torch.Generator | None = None,
        graph: Any = None,
        nonfinite: str = "skip",
        tall_step: str = "auto",
        foreach: bool | None = None,
        fused: bool | None = None,
        differentiable: bool = False,
        capturable: bool = False,
        decoupled_weight_decay: bool = False,
    ) -> None:
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "amsgrad": amsgrad,
            "maximize": maximize,
            "foreach": foreach,
            "fused": fused,
            "capturable": capturable,
            "differentiable": differentiable,
            "decoupled_weight_decay": decoupled_weight_decay,
            "sampler": sampler,
            "matchings_per_step": matchings_per_step,
            "unbiased": unbiased,
            "stabilize": stabilize,
            "graph": graph,
            "nonfinite": nonfinite,
            "tall_step": tall_step,
        }
        super().__init__(params, defaults, generator)

    def _validate_group(self, group: dict[str, Any], index: int) -> None:
        super()._validate_group(group, index)
        where = f"param_groups[{index}]"
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise TypeError(f"`betas` ({where}) must be a pair (beta1, beta2), got {betas!r}")
        b1, b2 = (
            check_real(f"{name} ({where})", b, minimum=0.0, maximum=1.0, max_inclusive=False)
            for name, b in zip(("betas[0]", "betas[1]"), betas)
        )
        group["betas"] = (b1, b2)
        group["eps"] = check_real(f"eps ({where})", group["eps"], minimum=0.0, min_inclusive=False)
        group["weight_decay"] = check_real(
            f"weight_decay ({where})", group["weight_decay"], minimum=0.0
        )
        check_bool(f"amsgrad ({where})", group["amsgrad"])
        check_bool(f"decoupled_weight_decay ({where})", group["decoupled_weight_decay"])

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # older state dicts stored ``step`` as a number (as torch)
            for p in group["params"]:
                p_state = self.state.get(p, {})
                if "step" in p_state and not torch.is_tensor(p_state["step"]):
                    p_state["step"] = self._step_tensor(p, group, float(p_state["step"]))

    def _transports_moment(self, group: dict[str, Any]) -> bool:
        return True

    @staticmethod
    def _step_tensor(p: torch.Tensor, group: dict[str, Any], value: float = 0.0) -> torch.Tensor:
        """torch Adam's ``step`` tensor: on the host, except with ``fused`` (then on the parameter's device)."""
        if group.get("fused"):
            return torch.tensor(value, dtype=torch.float32, device=p.device)
        return torch.tensor(value, dtype=optimizer_step_dtype())

    def _init_state(
        self, p: torch.Tensor, group: dict[str, Any], info: _ParamInfo | None = None
    ) -> dict[str, Any]:
        """The one place Adam's state is created: torch's layout for unconstrained and Riemannian
        parameters; for a constrained weight (``info`` given) the ambient first moment plus the per-row
        second moment ``row_sq`` ``(..., n)``, its per-row count ``row_count`` ``(n,)`` (and ``max_row_sq``
        with amsgrad), in :func:`~orthotorch._numerics.compute_dtype`."""
        state = self.state[p]
        amsgrad = group["amsgrad"]
        if "exp_avg" not in state:
            state["step"] = self._step_tensor(p, group)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if info is None:
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            else:
                rows = self._tall(p, info).shape[:-1]
                acc = compute_dtype(p.dtype)
                state["row_sq"] = torch.zeros(rows, dtype=acc, device=p.device)
                state["row_count"] = torch.zeros(info.n, dtype=acc, device=p.device)
        if amsgrad:  # also when amsgrad is switched on after some steps
            if info is None and "max_exp_avg_sq" not in state:
                state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            elif info is not None and "max_row_sq" not in state:
                state["max_row_sq"] = state["row_sq"].clone()
        return state

    def _euclidean_update(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        amsgrad = group["amsgrad"]
        grads, m1, m2, mx, steps = [], [], [], [], []
        for p in params:
            if _grad(p).is_sparse:
                raise RuntimeError(
                    f"{type(self).__name__} does not support sparse gradients (as torch.optim.Adam); "
                    f"{self._info[p].name} has one"
                )
            st = self._init_state(p, group)
            grads.append(_grad(p))
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
            decoupled_weight_decay=group["decoupled_weight_decay"],
        )

    def _givens_update(self, group: dict[str, Any], p: torch.Tensor, info: _ParamInfo) -> None:
        grad = _descent_grad(p, group)
        beta1, beta2 = group["betas"]
        state = self._init_state(p, group, info)
        state["step"] += 1
        t = float(state["step"])  # CPU tensor: no device sync
        exp_avg = state["exp_avg"]
        x, g, m = self._tall(p.data, info), self._tall(grad, info), self._tall(exp_avg, info)
        update = True
        if group["sampler"] == "greedy":
            # greedy matchings are read off the first moment, so its update happens first here
            exp_avg.lerp_(grad, 1 - beta1)
            update = False
        rounds, scales = self._step_rounds(info, group, x, m)
        # one fused pass over the rows for all matchings, the moment update and the per-row v
        givens_adam_steps_(
            x,
            g,
            m,
            rounds,
            float(group["lr"]) / (1 - beta1**t),
            row_sq=state["row_sq"],
            row_count=state["row_count"],
            betas=(beta1, beta2),
            eps=group["eps"],
            max_row_sq=state["max_row_sq"] if group["amsgrad"] else None,
            scales=scales,
            update_moment=update,
            check=False,
        )

    def _cayley_update(self, group: dict[str, Any], p: torch.Tensor, info: _ParamInfo) -> None:
        # Adam's elementwise moments (torch's layout and bias corrections) of the canonical Riemannian
        # gradient R = G − X GᵀX; D = m̂/(√v̂ + ε) drives X ← Cayley(−lr·W(X, D)) X and the first moment
        # is carried by the same rotation. Rescaling R, not G, keeps the stationary points fixed (R = 0
        # there, G = X·S is not): on the ambient G this step stalled at a gap of 6e-2 (docs/optim.md).
        grad = _descent_grad(p, group)
        beta1, beta2 = group["betas"]
        state = self._init_state(p, group)
        state["step"] += 1
        t = float(state["step"])  # CPU tensor: no device sync
        acc = compute_dtype(p.dtype)
        x = self._tall(p.data, info)
        r = canonical_rgrad(x.to(acc), self._tall(grad, info).to(acc))
        m = self._tall(state["exp_avg"], info)
        v = self._tall(state["exp_avg_sq"], info)
        m.lerp_(r.to(m.dtype), 1 - beta1)
        v.mul_(beta2).add_((r * r).to(v.dtype), alpha=1 - beta2)
        if group["amsgrad"]:
            v_max = self._tall(state["max_exp_avg_sq"], info)
            torch.maximum(v_max, v, out=v_max)
            v = v_max
        denom = (v.to(acc) / (1 - beta2**t)).sqrt_().add_(group["eps"])
        # m̂ = m/(1 − β₁ᵗ): the bias correction is folded into the step (W is linear in D)
        cayley_step_(x, m.to(acc) / denom, float(group["lr"]) / (1 - beta1**t), moment=m)

    def _riemannian_update(self, group: dict[str, Any], p: torch.Tensor) -> None:
        manifold = p.manifold  # type: ignore[attr-defined]  # a geoopt ManifoldParameter
        grad = _grad(p)
        if group["maximize"]:
            grad = -grad
        wd, decoupled = group["weight_decay"], group["decoupled_weight_decay"]
        if wd != 0 and not decoupled:
            grad = grad.add(p, alpha=wd)
        rgrad = manifold.egrad2rgrad(p.data, grad)
        state = self._init_state(p, group)
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
        if wd != 0 and decoupled:
            direction = direction + wd * manifold.egrad2rgrad(p.data, p.data)
        new_p, new_m = manifold.retr_transp(p.data, -float(group["lr"]) * direction, exp_avg)
        p.data.copy_(new_p)
        exp_avg.copy_(new_m)


class OrthogonalAdamW(OrthogonalAdam):
    r"""``OrthogonalAdam`` with decoupled weight decay (``torch.optim.AdamW``'s defaults and update for
    unconstrained parameters: ``weight_decay=1e-2``, ``p ← p − lr·λ·p``).

    Constrained weights take no decay (the decoupled decay ``X ← (1 − lr·λ)X`` has no component along the
    manifold; see :class:`OrthogonalAdam`), so they move exactly as with ``weight_decay=0``. Arguments as
    :class:`OrthogonalAdam`; ``decoupled_weight_decay`` is always True.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        **kwargs: Any,
    ) -> None:
        if not kwargs.pop("decoupled_weight_decay", True):
            raise ValueError(
                "OrthogonalAdamW always uses decoupled weight decay; use OrthogonalAdam for L2 decay "
                "(got decoupled_weight_decay=False)"
            )
        super().__init__(
            params, lr, betas, eps, weight_decay, amsgrad, decoupled_weight_decay=True, **kwargs
        )


OrthogonalAdam.__doc__ = fill_docstring(OrthogonalAdam.__doc__)
