"""JumpReLU (Rajamanoharan et al. 2024): f = z·H(z − θ) with learned per-latent θ, trained by straight-through
estimators with a rectangle kernel of bandwidth ε and an L0 penalty λ·L0 or λ·(L0/L0_target − 1)².

Two choices differ from a literal port of Gemma Scope, both because our training inputs are scaled to E‖x‖ = √d
(Gemma Scope's ε = 0.001 assumed E‖x‖² = 1):
- ε scales with the input norm: ε = bandwidth·E‖x‖ of the training inputs (measured on the first batch), so the
  default window is √d times wider than the raw setting and as wide, relative to the data, as Gemma Scope's;
- θ is learned directly (clamped positive after each step), not as log θ: Adam moves a log-parameter by ~lr per
  step, i.e. θ by only ~θ·lr, which left thresholds stuck (a known SAELens problem). θ starts at the pre-activation
  quantile that gives the target L0 on the first batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from sae_kit.sparsifiers.base import Codes, RuleConfig, Sparsifier, StepContext, dense_codes, dense_preacts

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
    def forward(ctx, z: Tensor, threshold: Tensor, bandwidth: float | Tensor) -> Tensor:
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
    def forward(ctx, z: Tensor, threshold: Tensor, bandwidth: float | Tensor) -> Tensor:
        ctx.save_for_backward(z, threshold)
        ctx.bandwidth = bandwidth
        return (z > threshold).to(z.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        z, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_t = _sum_to(-(1.0 / eps) * _rectangle((z - threshold) / eps) * grad, threshold)
        return None, grad_t, None


def jumprelu(z: Tensor, threshold: Tensor, bandwidth: float | Tensor) -> Tensor:
    """z·H(z − θ); STE: ∂/∂z = H(z − θ), ∂/∂θ = −(θ/ε)·K((z − θ)/ε)."""
    return _JumpReLU.apply(z, threshold, bandwidth)


def heaviside_step(z: Tensor, threshold: Tensor, bandwidth: float | Tensor) -> Tensor:
    """H(z − θ) as 0/1 floats; STE: no gradient to z, ∂/∂θ = −(1/ε)·K((z − θ)/ε)."""
    return _Step.apply(z, threshold, bandwidth)


def l0_penalty(
    z: Tensor, threshold: Tensor, bandwidth: float | Tensor, coefficient: float = 1.0, target_l0: float | None = None
) -> Tensor:
    """JumpReLU sparsity penalty from the pre-activations z [N, d_sae] and the thresholds θ [d_sae].

    L0 = mean_t Σ_i H(z_ti − θ_i), differentiable in θ only, through the rectangle-kernel STE with bandwidth ε
    (∂H/∂θ = −K((z − θ)/ε)/ε). Returns coefficient·L0, or coefficient·(L0/target_l0 − 1)² when `target_l0` is set.
    """
    l0 = heaviside_step(z.detach(), threshold, bandwidth).sum(-1).mean()
    return coefficient * (l0 if target_l0 is None else (l0 / target_l0 - 1).square())


@dataclass
class JumpReLUConfig(RuleConfig):
    """JumpReLU settings (cfg.json keys jumprelu_<field>)."""

    flat_prefix = "jumprelu_"

    bandwidth: float = 0.001
    """STE rectangle-kernel bandwidth in units of E‖x‖ of the training inputs (Gemma Scope's 0.001 for E‖x‖² = 1):
    the kernel's width is bandwidth·E‖x‖."""
    init_threshold: float = 0.001
    """Initial θ of every latent, in units of the training inputs, when `target_l0` is None."""
    target_l0: float | None = 32.0
    """Penalise λ·(L0/target − 1)² (dictionary_learning's form) and start θ at the pre-activation quantile that gives
    this L0 on the first batch; None: plain λ·L0 and θ = init_threshold."""
    l0_coef: float = 1.0
    """Coefficient λ of the L0 penalty (on the normalised reconstruction loss)."""
    threshold_lr_scale: float = 50.0
    """θ's learning rate as a multiple of the SAE's: Adam moves a parameter by about its LR per step, and θ (of order
    1 in our units) must follow the encoder within a few hundred steps, not the 10⁵ of Gemma Scope's runs."""

    def check(self) -> None:
        for name in ("bandwidth", "init_threshold", "l0_coef", "threshold_lr_scale"):
            if not getattr(self, name) > 0:
                self.fail(name, getattr(self, name), "use a value > 0")
        if self.target_l0 is not None and not self.target_l0 > 0:
            self.fail("target_l0", self.target_l0, "use a positive L0 or None (plain L0 penalty)")


class JumpReLU(Sparsifier):
    """Per-latent learned thresholds θ > 0, saved as `threshold`."""

    input_norm: Tensor

    Config = JumpReLUConfig
    uses_k = False
    default_aux = "none"
    saelens_name = "jumprelu"

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        self.threshold = nn.Parameter(
            torch.full((cfg.d_sae,), self.config.init_threshold, dtype=cfg.torch_dtype, device=cfg.device)
        )
        self.register_buffer(
            "input_norm", torch.ones((), dtype=cfg.torch_dtype, device=cfg.device)
        )  # E‖x‖ of the training inputs: ε's unit

    @property
    def bandwidth(self) -> Tensor:
        """The kernel width ε in input units (a device scalar: reading it on the host would stall a GPU step)."""
        return self.config.bandwidth * self.input_norm

    def state_tensors(self) -> dict[str, Tensor]:
        return {"threshold": self.threshold}

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        if (tensors["threshold"] <= 0).any():
            raise ValueError("jumprelu thresholds must be > 0; the saved `threshold` holds a non-positive entry")
        super().load_state_tensors(tensors)

    @torch.no_grad()
    def fold_scale(self, scale: float) -> None:
        self.threshold.div_(scale)
        self.input_norm.div_(scale)

    def forward(self, sae: SAE, xc: Tensor, grad: Tensor | None = None) -> Codes:
        z = dense_preacts(sae, xc)
        return dense_codes(self.cfg, jumprelu(z, self.threshold, self.bandwidth), z)

    @torch.no_grad()
    def init_from_sample(self, sae: SAE, x: Tensor) -> None:
        self.input_norm.fill_(float(x.norm(dim=-1).mean()))
        target = self.config.target_l0
        if target:
            z = dense_preacts(sae, x[:4096] - sae.b_dec if self.cfg.apply_b_dec_to_input else x[:4096])
            q = 1 - min(1.0, target / self.cfg.d_sae)
            theta = torch.quantile(z.flatten()[: 2**24].float(), q).clamp_min(1e-6)
            self.threshold.fill_(float(theta))

    def penalties(self, sae: SAE, ctx: StepContext) -> dict[str, Tensor]:
        cfg = self.config
        z = ctx.out.codes.z
        assert z is not None  # dense codes carry their pre-activations
        return {"l0_penalty": l0_penalty(z, self.threshold, self.bandwidth, cfg.l0_coef, cfg.target_l0)}

    def lr_scales(self) -> dict[str, float]:
        return {"threshold": self.config.threshold_lr_scale}

    @torch.no_grad()
    def after_step(self, sae: SAE) -> None:
        self.threshold.clamp_min_(1e-6)
