"""OrthogonalSGD: a drop-in ``torch.optim.SGD`` whose constrained weights move by Givens rotations."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch.optim.sgd import sgd as _torch_sgd

from orthotorch._validation import check_bool, check_real
from orthotorch.manifolds.givens import givens_steps_
from orthotorch.optim._base import GivensOptimizer, _descent_grad, _grad, _ParamInfo
from orthotorch.optim._docs import fill_docstring
from orthotorch.optim._tall import cayley_step_

__all__ = ["OrthogonalSGD"]


def _heavy_ball(
    state: dict[str, Any], d: torch.Tensor, mu: float, dampening: float
) -> torch.Tensor:
    """torch.optim.SGD's momentum buffer ``B`` (``state["momentum_buffer"]``) for the direction ``d``:
    a detached copy of ``d`` on the first step, then ``B ← μB + (1 − τ)d`` in place; returns ``B``."""
    buf = state.get("momentum_buffer")
    if buf is None:
        buf = torch.clone(d).detach()
        state["momentum_buffer"] = buf
    else:
        buf.mul_(mu).add_(d, alpha=1 - dampening)
    return buf


class OrthogonalSGD(GivensOptimizer):
    r"""Stochastic gradient descent that keeps orthogonal / Stiefel weights exactly on their manifold.

    A drop-in replacement for ``torch.optim.SGD``: unconstrained parameters receive exactly (bit for bit)
    torch's SGD update; constrained ones move by products of Givens rotations, so ``XᵀX = I`` holds up to
    float rounding at every step, at a cost of O(n·k) per matching (no n×n matrix on the default path).

    **Which parameters are constrained.** geoopt ``ManifoldParameter``\ s on any ``geoopt.manifolds.Stiefel``
    subclass (geoopt's EuclideanStiefel/CanonicalStiefel, orthotorch's O(d)/SO(d)/St(n, k)), plain
    parameters marked ``p._orthotorch_manifold = "stiefel" | "orthogonal" | "so"`` (what modules set; see
    :func:`~orthotorch.optim.param_groups`), and plain parameters in a param group with
    ``manifold="stiefel" | "orthogonal" | "so"`` (the group option wins over the mark). A weight of shape
    ``(..., rows, cols)`` is rotated along its longer side: a wide weight (``rows < cols``, e.g.
    ``nn.Linear(in=d, out=k)`` with ``k < d``) is handled through its transpose ``p.mT``. ``"orthogonal"`` and
    ``"so"`` require square weights; ``"so"`` also checks ``det > 0`` once. Each constrained weight is
    probed once at its first step (O(nk)): it must start on the manifold (e.g. ``nn.init.orthogonal_``).
    Givens rotations have det +1, so a square weight never changes its determinant sign: initialisation
    picks the component of O(d). Parameters on other geoopt manifolds get the generic Riemannian step
    (``egrad2rgrad`` + ``retr_transp``, as geoopt's RiemannianSGD); geoopt ``Euclidean`` ones get torch's.

    **The constrained step.** With tall view ``X`` ``(..., n, k)`` and driving direction ``D`` (the gradient,
    or the momentum buffer), for each of the step's matchings ``M`` (disjoint row pairs): ``W_ij = ⟨d_i, x_j⟩
    − ⟨x_i, d_j⟩`` for ``(i, j) ∈ M`` (O(k) each) and ``X ← Π_{(i,j)∈M} G_ij(θ_ij) X`` with ``θ_ij = −lr·W_ij``
    (times ``1/(m·p_ij)`` with ``unbiased=True``, ``p_ij`` the pair's inclusion probability and ``m =
    matchings_per_step``). This is ``X ← expm(−lr·W_M) X``, which decreases the loss to first order by
    ``lr·Σ_M W_ij²``. Batched weights share one matching across the batch.

    **Tall weights** (``tall_step``, default ``"auto"``): a Stiefel weight whose tall view has
    ``n ≥ 2k`` moves along the whole generator instead, ``X ← (I + ½lr·W)⁻¹(I − ½lr·W) X`` with
    ``W = D Xᵀ − X Dᵀ`` (rank ``≤ 2k``, never formed; ``O(nk²)`` plus ``k × k`` work, see
    :func:`~orthotorch.manifolds.stiefel.cayley_rotate`), and the momentum buffer is carried by the same
    rotation. A matching carries only ``~1/(n − 1)`` of ``‖W‖²``; on tall weights the whole generator
    is cheap and won the benchmark (docs/optim.md, "Tall weights"). The sampler options do not apply
    there. Square weights always take the Givens step; ``tall_step="givens"`` restores it everywhere.

    **Samplers** (``sampler=``; the benchmark in docs/optim.md picks the default):

    - ``"random"``: a uniform random perfect matching, O(n); every pair with probability 1/(n−1).
    - ``"round_robin"`` / ``"round_robin_shuffled"``: cycle the circle-method 1-factorisation, every pair
      exactly once per n−1 matchings (shuffled: rows relabelled each cycle). O(n). With momentum (and
      always in :class:`OrthogonalAdam`) ``"round_robin"`` relabels the rows each cycle too: a fixed
      order forces the transported buffer periodically and, on tall weights, held the loss in a limit
      cycle far from the optimum (docs/optim.md).
    - ``"greedy"``: greedy max-``|W|`` matching(s) on the dense generator ``W = D Xᵀ − X Dᵀ``: one n×n GEMM
      (O(n²k) time, O(n²) memory) plus O(n² log n) matching per step. ``matchings_per_step = m`` takes m
      successive greedy matchings of the same ``|W|`` with used pairs removed. Carries many times more of
      ``‖W‖²`` per matching than a random one.
    - ``"colouring"``: a uniformly random colour class of a proper edge colouring of ``graph`` (a
      ``networkx.Graph`` of allowed row pairs, a group option), probability ``1/C``. Rows off the graph
      never move.
    - ``"full"``: all n−1 rounds of the 1-factorisation per step (a deterministic Givens sweep, O(n²k)); the
      reference that the stochastic samplers approximate. ``matchings_per_step`` is ignored.

    **Momentum** (heavy ball, torch's dampening/Nesterov conventions). The buffer ``B ← μB + (1−τ)G`` lives in
    the ambient space, drives the rotations (``D = B``, or ``D = G + μB`` with Nesterov) and is *transported*
    by the same rotations as the weight (``B ← R B``). Transport by the rotation is the differential of the
    group action, an isometry, and it maps the velocity's generator ``W(X, B)`` to ``R W Rᵀ``: a rotation
    about the velocity's own generator leaves the velocity unchanged, as inertia should. It costs one extra
    pass over the buffer per matching, and it lets every newly sampled pair use gradient information
    accumulated over all pairs: on noisy minibatch problems it was the decisive lever (docs/optim.md).
    ``weight_decay`` is a no-op on constrained weights (``‖X‖_F² = k`` is constant on the manifold;
    ``W(X, X) = 0``) and is applied only to the other parameters.

    **Checkpoints and copies.** :meth:`state_dict` / :meth:`load_state_dict` resume bit-identically;
    ``torch.optim.SGD`` and older state dicts load (missing options keep the group's value); state of
    another shape or kind, or a saved group that changes ``manifold``, is refused with a ``ValueError``.
    ``copy.deepcopy``, ``pickle`` and ``torch.save`` of the optimizer keep the generator, step count and
    samplers. :meth:`stabilize` projects every constrained weight back now.

    **Stabilisation.** ``stabilize=N`` re-projects each constrained weight by a sign-corrected QR
    (O(nk²)) every N of its steps. Without it float32 rounding drifts slowly (figures in docs/optim.md).

    Half precision (bfloat16/float16) works (angles in float32), but each rotation rounds at the weight's
    precision (bfloat16: ‖XᵀX − I‖ ≈ 0.3 after 800 rotations at d = 16): set ``stabilize`` (e.g. 5–10).

    **Randomness and distributed training.** The default ``"round_robin"`` sampler is deterministic; the
    random samplers draw their matchings from ``generator`` (default: a CPU generator
    seeded with :data:`~orthotorch.optim.DEFAULT_SEED`, identical on every rank, so data-parallel replicas
    sample the same pairs without communication). Its state, the step count and the samplers' state are
    part of :meth:`state_dict`; after ``load_state_dict`` the next step is bit-identical.

    **Non-finite gradients.** ``nonfinite="skip"`` (default) skips the update of a parameter whose gradient
    has NaN/inf, with a warning, leaving its weight and state untouched; ``"raise"`` raises
    ``FloatingPointError``; ``"ignore"`` skips the check (saves one reduction and one host sync per group).

    Args:
        params: parameters or param-group dicts. Group keys: ``manifold``, ``sampler``,
            ``matchings_per_step``, ``unbiased``, ``stabilize``, ``graph``, ``nonfinite`` and the SGD options.
        lr: learning rate (≥ 0; a float or a one-element tensor, as torch).
        momentum: momentum factor μ (≥ 0).
        dampening: dampening τ for momentum.
        weight_decay: L2 penalty (unconstrained and Riemannian parameters only; zero on constrained
            weights, see above).
        nesterov: Nesterov momentum (needs ``momentum > 0`` and ``dampening = 0``).
    {shared}{flags}
    Example::

        opt = OrthogonalSGD([
            {"params": [rnn.weight_hh], "manifold": "orthogonal"},
            {"params": rest},
        ], lr=1e-2, momentum=0.9)  # defaults: sampler="round_robin", matchings_per_step=16
    """

    _state_keys: ClassVar[dict[str, tuple[str, ...]]] = {
        "euclidean": ("momentum_buffer",),
        "givens": ("momentum_buffer", "givens_steps"),
        "cayley": ("momentum_buffer", "givens_steps"),
        "riemannian": ("momentum_buffer",),
    }

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | torch.Tensor = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
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
    ) -> None:
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "dampening": dampening,
            "weight_decay": weight_decay,
            "nesterov": nesterov,
            "maximize": maximize,
            "foreach": foreach,
            "fused": fused,
            "differentiable": differentiable,
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
        group["momentum"] = check_real(f"momentum ({where})", group["momentum"], minimum=0.0)
        group["dampening"] = check_real(f"dampening ({where})", group["dampening"])
        group["weight_decay"] = check_real(
            f"weight_decay ({where})", group["weight_decay"], minimum=0.0
        )
        check_bool(f"nesterov ({where})", group["nesterov"])
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError(
                f"`nesterov=True` ({where}) requires momentum > 0 and dampening = 0, got "
                f"momentum={group['momentum']}, dampening={group['dampening']}"
            )

    def _transports_moment(self, group: dict[str, Any]) -> bool:
        return bool(group["momentum"] != 0)

    # ------------------------------------------------------------------------------------------------

    def _euclidean_update(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        grads = [_grad(p) for p in params]
        momentum = group["momentum"]
        bufs = [self.state[p].get("momentum_buffer") for p in params] if momentum != 0 else []
        _torch_sgd(
            params,
            grads,
            bufs,
            weight_decay=group["weight_decay"],
            momentum=momentum,
            lr=group["lr"],
            dampening=group["dampening"],
            nesterov=group["nesterov"],
            maximize=group["maximize"],
            has_sparse_grad=any(g.is_sparse for g in grads),
            foreach=group["foreach"],
            fused=group["fused"],
        )
        if momentum != 0:
            for p, b in zip(params, bufs):
                self.state[p]["momentum_buffer"] = b

    def _givens_update(self, group: dict[str, Any], p: torch.Tensor, info: _ParamInfo) -> None:
        lr, mu = float(group["lr"]), group["momentum"]
        state = self.state[p]
        grad = _descent_grad(p, group)
        x = self._tall(p.data, info)
        g = self._tall(grad, info)
        buf_t, update = None, False
        if mu != 0:
            buf_p = state.get("momentum_buffer")
            if buf_p is None:
                # in p's layout, not the gradient's (a hand-set grad may differ): the buffer is
                # walked with x at every step
                buf_p = torch.empty_like(p.data, memory_format=torch.preserve_format).copy_(grad)
                state["momentum_buffer"] = buf_p
            else:
                update = True
            buf_t = self._tall(buf_p, info)
        nesterov = group["nesterov"]
        direction = None
        if group["sampler"] == "greedy":
            # greedy matchings are read off the direction, so the buffer update happens first here
            if update:
                buf_p.mul_(mu).add_(grad, alpha=1 - group["dampening"])
                update = False
            direction = g if buf_t is None else (g + mu * buf_t if nesterov else buf_t)
        rounds, scales = self._step_rounds(info, group, x, direction)
        # one fused pass over the rows for all matchings (and the buffer update μB + (1 − τ)G)
        givens_steps_(
            x,
            g,
            rounds,
            lr,
            scales=scales,
            momentum_buffer=buf_t,
            momentum=mu,
            dampening=group["dampening"],
            nesterov=nesterov,
            update_buffer=update,
            check=False,
        )

    def _cayley_update(self, group: dict[str, Any], p: torch.Tensor, info: _ParamInfo) -> None:
        # heavy ball as in _givens_update; the buffer drives X ← Cayley(−lr·W(X, D)) X, D = B (or
        # G + μB with Nesterov), and is carried by the same rotation
        lr, mu = float(group["lr"]), group["momentum"]
        grad = _descent_grad(p, group)
        x = self._tall(p.data, info)
        if mu == 0:
            cayley_step_(x, self._tall(grad, info), lr)
            return
        buf = self._tall(_heavy_ball(self.state[p], grad, mu, group["dampening"]), info)
        if group["nesterov"]:
            cayley_step_(x, self._tall(grad, info) + mu * buf, lr, moment=buf)
        else:
            cayley_step_(x, buf, lr, moment=buf)

    def _riemannian_update(self, group: dict[str, Any], p: torch.Tensor) -> None:
        manifold = p.manifold  # type: ignore[attr-defined]  # a geoopt ManifoldParameter
        lr, mu = float(group["lr"]), group["momentum"]
        state = self.state[p]
        grad = _grad(p)
        if group["maximize"]:
            grad = -grad
        if group["weight_decay"] != 0:
            grad = grad.add(p, alpha=group["weight_decay"])
        rgrad = manifold.egrad2rgrad(p.data, grad)
        if mu == 0:
            p.data.copy_(manifold.retr(p.data, -lr * rgrad))
            return
        buf = _heavy_ball(state, rgrad, mu, group["dampening"])
        direction = rgrad.add(buf, alpha=mu) if group["nesterov"] else buf
        new_p, new_buf = manifold.retr_transp(p.data, -lr * direction, buf)
        p.data.copy_(new_p)
        buf.copy_(new_buf)


OrthogonalSGD.__doc__ = fill_docstring(OrthogonalSGD.__doc__)
