"""JumpReLU (Rajamanoharan et al. 2024): f = z·H(z − θ) with learned per-latent θ, trained by straight-through
estimators with a rectangle kernel of bandwidth ε (pair it with `jumprelu_l0_loss` in sae_kit.training.losses)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from sae_kit.sparsifiers.base import Codes, Sparsifier, dense_codes, dense_preacts

if TYPE_CHECKING:
    from sae_kit.sae import SAE, SAEConfig


def _rectangle(u: Tensor) -> Tensor:
    """K(u) = 1[|u| < 1/2]."""
    return (u.abs() < 0.5).to(u.dtype)


def _sum_to(grad: Tensor, like: Tensor) -> Tensor:
    """Sum a broadcast gradient [..., F] back to the shape of θ [F]."""
    return grad.reshape(-1, like.shape[-1]).sum(0)


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(z, threshold)
        ctx.bandwidth = bandwidth
        return z * (z > threshold)

    @staticmethod
    def backward(ctx, grad: Tensor):
        z, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_z = grad * (z > threshold)
        grad_t = _sum_to(-(threshold / eps) * _rectangle((z - threshold) / eps) * grad, threshold)
        return grad_z, grad_t, None


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(z, threshold)
        ctx.bandwidth = bandwidth
        return (z > threshold).to(z.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        z, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_t = _sum_to(-(1.0 / eps) * _rectangle((z - threshold) / eps) * grad, threshold)
        return None, grad_t, None


def jumprelu(z: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """z·H(z − θ); STE: ∂/∂z = H(z − θ), ∂/∂θ = −(θ/ε)·K((z − θ)/ε)."""
    return _JumpReLU.apply(z, threshold, bandwidth)


def heaviside_step(z: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """H(z − θ) as 0/1 floats; STE: no gradient to z, ∂/∂θ = −(1/ε)·K((z − θ)/ε)."""
    return _Step.apply(z, threshold, bandwidth)


class JumpReLU(Sparsifier):
    """Per-latent learned thresholds, parametrised as log θ (so θ > 0) and saved as `threshold`."""

    config_fields = ("jumprelu_init_threshold", "jumprelu_bandwidth")

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        self.log_threshold = nn.Parameter(torch.full((cfg.d_sae,), math.log(cfg.jumprelu_init_threshold),
                                                     dtype=cfg.torch_dtype, device=cfg.device))

    @property
    def threshold(self) -> Tensor:
        return self.log_threshold.exp()

    def set_threshold(self, threshold: Tensor) -> None:
        if (threshold <= 0).any():
            raise ValueError("jumprelu thresholds must be > 0; the saved `threshold` holds a non-positive entry")
        with torch.no_grad():
            self.log_threshold.copy_(threshold.log())

    def fold_scale(self, scale: float) -> None:
        with torch.no_grad():
            self.log_threshold.sub_(math.log(scale))

    def forward(self, sae: SAE, xc: Tensor, grad: Tensor | None = None) -> Codes:
        z = dense_preacts(sae, xc)
        return dense_codes(self.cfg, jumprelu(z, self.threshold, self.cfg.jumprelu_bandwidth), z)
