"""g-SAE (Olmo et al. 2024): TopK whose support is chosen by a gradient-boosted score."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

from torch import Tensor

from sae_kit.sparsifiers.topk import TopK

if TYPE_CHECKING:
    from sae_kit.sae import SAE, SAEConfig


class GSAE(TopK):
    """Support = top-k of s = z + β·z·|W_dec·g|, kept values ReLU(z); g = dLoss/dx at the hook (detached).

    With cfg.gsae_grad_norm == "rms" each token's g is first scaled to unit RMS, so β does not depend on the loss
    reduction. β = 0 is exactly TopK. Without `grad` the rule falls back to plain TopK and warns once.
    """

    config_fields = ("k", "gsae_beta", "gsae_grad_norm")
    uses_grad = True

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        self._warned = False

    def selection_score(self, sae: SAE, z: Tensor, grad: Tensor | None) -> Tensor:
        beta = self.cfg.gsae_beta
        if beta == 0:
            return z
        if grad is None:
            if not self._warned:
                warnings.warn("gsae: encode() got no grad=; selecting the support as plain TopK (beta=0). "
                              "Pass grad=dLoss/dx to use the gradient-boosted selection.", stacklevel=2)
                self._warned = True
            return z
        g = grad
        if self.cfg.gsae_grad_norm == "rms":
            g = g * g.square().mean(-1, keepdim=True).clamp_min(1e-30).rsqrt()
        influence = (g @ sae.W_dec.detach().t()).abs_()
        return influence.mul_(z).mul_(beta).add_(z)
