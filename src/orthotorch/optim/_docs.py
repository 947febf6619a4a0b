"""Docstring fragments shared by the Givens optimizers (as ``torch.optim`` builds its optimizer docs).

Each fragment documents one option that :class:`~orthotorch.optim.OrthogonalSGD`,
:class:`~orthotorch.optim.OrthogonalAdam` and :class:`~orthotorch.optim.OrthogonalAdamW` share; the classes
format them into their ``Args:`` sections, so the shared options are described once.
"""

from __future__ import annotations

__all__ = ["LAYOUT", "SHARED_ARGS", "TORCH_FLAGS_ARGS", "fill_docstring"]

#: Paragraph on the memory layout of constrained weights, placed before each class's ``Args:`` block.
LAYOUT = """\
    **Memory layout.** At its first Givens step (and the first after :meth:`load_state_dict`) each
    Givens-stepped weight is stored so that the rows of its tall view are contiguous: a tall or square
    weight becomes ``p.contiguous()`` (``torch.linalg.qr`` returns column-major tensors), a wide one is
    stored with ``p.mT`` row-major (so ``nn.Linear``'s ``(out, in)`` weight becomes column-major), by one
    copy (``p.data = …``); ``p.grad`` and the moment (``momentum_buffer`` / ``exp_avg``) get the same
    strides. The values, the shape and the Parameter object never change, only ``p.stride()``. Why: the
    fused step walks rows, and on a column-major tall view it cost 2-4× (docs/optim.md, "Memory
    layout"); autograd then creates every later ``p.grad`` in ``p``'s strides, so later steps run at the
    row-major cost, and a wide ``F.linear`` layer's whole training step was faster so. A weight that does
    not own its storage densely (a slice or view of another tensor) is left as it is, so the other
    tensor keeps seeing its updates; its step works on its own layout (~3× slower when column-major).

"""

#: ``Args:`` entries of the options every Givens optimizer has (indented for an ``Args:`` block).
SHARED_ARGS = """\
        maximize: maximise the objective instead (as torch's ``maximize``).
        sampler: matching schedule of the constrained step: ``"round_robin"`` (default: it beat
            ``"random"`` at equal cost on every square problem of the benchmark and draws no random
            numbers), ``"random"``, ``"round_robin_shuffled"``, ``"greedy"``, ``"colouring"`` (alias
            ``"coloring"``), ``"full"``. See :data:`~orthotorch.optim.SAMPLERS` and docs/optim.md.
        matchings_per_step: m ≥ 1 matchings per step, all driven by the same gradient (each one O(nk)
            pass). Default 16, chosen by ``benchmarks/optimizers.py``: one matching moves only about
            1/(n−1) of the gradient. Use 1 for the cheapest possible step. Ignored by ``"full"``.
        unbiased: scale angles by ``1/(m·p_e)`` (``p_e`` the pair's inclusion probability) so that the
            expected step equals the full step ``−lr·W``; use a correspondingly smaller lr.
        stabilize: re-project each constrained weight by a sign-fixed QR (O(nk²)) every N of its steps
            (None: never). See also :meth:`stabilize`, which does it for every weight now.
        generator: ``torch.Generator`` for the random samplers (default: a CPU generator seeded with
            :data:`~orthotorch.optim.DEFAULT_SEED`, identical on every distributed rank). Saved in
            :meth:`state_dict`.
        graph: ``networkx.Graph`` of allowed row pairs, for ``sampler="colouring"``.
        nonfinite: ``"skip"`` (default: skip, with a warning, the update of a parameter whose gradient holds
            NaN/inf), ``"raise"`` (``FloatingPointError``) or ``"ignore"`` (no check).
        tall_step: the step of tall Stiefel weights (tall view ``(n, k)``, ``n > k``): ``"auto"``
            (default: the rank-2k Cayley step along the whole generator when ``n ≥ 2k``, the Givens
            step otherwise), ``"cayley"`` (for every non-square Stiefel weight) or ``"givens"``
            (matchings for every weight). Square weights always take the Givens step. The Cayley step
            costs ``O(nk²)`` plus a ``2k × 2k`` solve and ignores the sampler options; see
            docs/optim.md, "Tall weights".
"""

#: ``Args:`` entries of torch's implementation flags, accepted for drop-in compatibility.
TORCH_FLAGS_ARGS = """\
        foreach: forwarded to torch's implementation for unconstrained parameters.
        fused: forwarded to torch's implementation for unconstrained parameters (None/False/True, as
            torch; torch raises where its fused kernel is unavailable).
        differentiable: must be False: the Givens step is an in-place update under ``no_grad`` and cannot
            be differentiated through (``ValueError`` for True).
"""


#: Placeholder in a class docstring's ``Args:`` block (at the docstring's indentation, as ruff keeps it).
PLACEHOLDER = "    {shared}{flags}"


def fill_docstring(doc: str | None) -> str:
    """``doc`` with :data:`PLACEHOLDER` replaced by the shared and torch-flag ``Args:`` entries, and
    :data:`LAYOUT` placed before its ``Args:`` block."""
    if doc is None or PLACEHOLDER not in doc:
        raise ValueError("docstring has no shared-arguments placeholder")
    if "\n    Args:\n" not in doc:
        raise ValueError("docstring has no `Args:` block")
    doc = doc.replace("\n    Args:\n", "\n" + LAYOUT + "    Args:\n", 1)
    return doc.replace(PLACEHOLDER, SHARED_ARGS + TORCH_FLAGS_ARGS)
