"""g-SAE (Olmo et al. 2024): TopK whose support is chosen by a gradient-boosted score."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from torch import Tensor

from sae_kit.sparsifiers.base import RuleConfig
from sae_kit.sparsifiers.topk import TopK

if TYPE_CHECKING:
    from sae_kit.sae import SAE, SAEConfig


@dataclass
class GSAEConfig(RuleConfig):
    """g-SAE settings (cfg.json keys gsae_beta, gsae_grad_norm)."""

    flat_prefix = "gsae_"

    beta: float = 1.0
    """Weight β of the gradient term in the selection score z + β·z·|W_dec·g| (0 = plain TopK)."""
    grad_norm: Literal["rms", "none"] = "rms"
    """How g is normalised per token before scoring: "rms" (unit RMS, so β does not depend on the loss reduction) or "none"."""

    def check(self) -> None:
        if not (isinstance(self.beta, (int, float)) and math.isfinite(self.beta) and self.beta >= 0):
            self.fail("beta", self.beta, "use a finite value >= 0")
        if self.grad_norm not in ("rms", "none"):
            self.fail("grad_norm", self.grad_norm, "use 'rms' or 'none'")


class GSAE(TopK):
    """Support = top-k of s = z + β·z·|W_dec·g|, kept values ReLU(z); g = dLoss/dx at the hook (detached).

    β = 0 is exactly TopK. Without `grad` the rule falls back to plain TopK and warns once. SAELens's encode takes no
    gradient, so a g-SAE is not exported there (copy its weights into a topk SAE: what it does without grad=).
    """

    Config = GSAEConfig
    uses_grad = True
    saelens_name = None

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        self._warned = False

    def selection_score(self, sae: SAE, z: Tensor, grad: Tensor | None) -> Tensor:
        beta = self.config.beta
        if beta == 0:
            return z
        if grad is None:
            if not self._warned:
                warnings.warn(
                    "gsae: encode() got no grad=; selecting the support as plain TopK (beta=0). "
                    "Pass grad=dLoss/dx to use the gradient-boosted selection.",
                    stacklevel=2,
                )
                self._warned = True
            return z
        g = grad
        if self.config.grad_norm == "rms":
            g = g * g.square().mean(-1, keepdim=True).clamp_min(1e-30).rsqrt()
        influence = (g @ sae.W_dec.detach().t()).abs_()
        return influence.mul_(z).mul_(beta).add_(z)
