"""The few private torch APIs the library depends on, behind one small interface.

Each wrapper names the torch internal it uses, so that a torch upgrade that moves one breaks here, in one
place, with a fallback where a public equivalent exists. Tested against the pinned torch (2.13.0).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["functorch_transforms_active", "is_conv", "optimizer_step_dtype"]


def optimizer_step_dtype() -> torch.dtype:
    """Dtype torch's optimizers use for the ``step`` state tensor (``torch.optim.optimizer._get_scalar_dtype``).

    float32, or float64 when the default dtype is float64; same rule if the private helper disappears.
    """
    try:
        from torch.optim.optimizer import _get_scalar_dtype
    except ImportError:  # pragma: no cover - depends on the torch version
        return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
    return _get_scalar_dtype()


def functorch_transforms_active() -> bool:
    """Whether a ``torch.func`` transform (grad, vmap, jvp, …) is active around the current call.

    Custom ``autograd.Function``s without ``setup_context`` cannot run under these transforms, so the
    library's analytic backwards switch to differentiable torch ops then
    (``torch._C._are_functorch_transforms_active``).
    """
    probe = getattr(torch._C, "_are_functorch_transforms_active", None)
    return bool(probe()) if probe is not None else False


def is_conv(module: nn.Module) -> bool:
    """Whether ``module`` is a convolution (``nn.Conv1d/2d/3d`` and the transposed ones; ``_ConvNd``)."""
    conv_base = getattr(nn.modules.conv, "_ConvNd", None)
    if conv_base is None:  # pragma: no cover - depends on the torch version
        conv_base = (
            nn.Conv1d,
            nn.Conv2d,
            nn.Conv3d,
            nn.ConvTranspose1d,
            nn.ConvTranspose2d,
            nn.ConvTranspose3d,
        )
    return isinstance(module, conv_base)
