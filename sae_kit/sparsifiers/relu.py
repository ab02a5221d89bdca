"""ReLU SAE (the L1 baseline): f = ReLU(z), with an L1 penalty λ·Σ_i |f_i|·||d_i|| that warms up linearly."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import Tensor

from sae_kit.sparsifiers.base import Codes, RuleConfig, Sparsifier, StepContext, dense_codes, dense_preacts

if TYPE_CHECKING:
    from sae_kit.sae import SAE


@dataclass
class ReLUConfig(RuleConfig):
    """ReLU SAE training settings (cfg.json keys relu_l1_coef, relu_l1_warmup_fraction)."""

    flat_prefix = "relu_"

    l1_coef: float = 3e-3
    """L1 coefficient λ on the normalised loss, reached after `l1_warmup_fraction` of the run (3e-3 gives an L0
    near 30 on SmolLM2's residual stream)."""
    l1_warmup_fraction: float = 0.05
    """Fraction of the run over which λ ramps up linearly from zero."""

    def check(self) -> None:
        if not self.l1_coef >= 0:
            self.fail("l1_coef", self.l1_coef, "use a coefficient >= 0")
        if not 0 <= self.l1_warmup_fraction <= 1:
            self.fail("l1_warmup_fraction", self.l1_warmup_fraction, "use a fraction in [0, 1]")


class ReLU(Sparsifier):
    """Dense code ReLU(z); atoms are unit-norm, so the decoder-norm weighting of the L1 term is 1."""

    Config = ReLUConfig
    uses_k = False
    default_aux = "none"
    saelens_name = "standard"

    def forward(self, sae: SAE, xc: Tensor, grad: Tensor | None = None) -> Codes:
        z = dense_preacts(sae, xc)
        return dense_codes(self.cfg, z.relu(), z)

    def penalties(self, sae: SAE, ctx: StepContext) -> dict[str, Tensor]:
        cfg = self.config
        warm = min(1.0, (ctx.step + 1) / max(1.0, cfg.l1_warmup_fraction * ctx.total_steps))
        return {"l1": cfg.l1_coef * warm * ctx.out.codes.to_dense().abs().sum(-1).mean()}
