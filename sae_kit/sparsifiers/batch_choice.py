"""What Mutual Choice and Feature Choice share: a batch-level allocation in training, a learned threshold at inference.

In training mode the rule picks (token, latent) matches over the whole batch of ReLU(z) and keeps an EMA of the
smallest kept activation (one global value for MC, one per latent for FC) in the `threshold` buffer [d_sae]. In eval
mode the code is the JumpReLU r·1[r > θ], r = ReLU(z), so single tokens encode without a batch.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from sae_kit.sparsifiers.base import Codes, Sparsifier, dense_codes, dense_preacts

if TYPE_CHECKING:
    from sae_kit.sae import SAE, SAEConfig


class BatchChoice(Sparsifier):
    """Base for batch-allocating rules; subclasses implement `allocate`."""

    config_fields = ("k", "threshold_ema")

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        self.register_buffer("threshold", torch.zeros(cfg.d_sae, dtype=cfg.torch_dtype, device=cfg.device))
        self.register_buffer("threshold_updates", torch.zeros((), dtype=torch.int64, device=cfg.device))

    def allocate(self, r: Tensor) -> tuple[Tensor, Tensor]:
        """From ReLU(z) [B, F] (differentiable), return the code [B, F] and the smallest kept value (scalar or [F])."""
        raise NotImplementedError

    def set_threshold(self, threshold: Tensor) -> None:
        with torch.no_grad():
            self.threshold.copy_(threshold)
            # A saved threshold is a trained one: further training continues at the EMA rate.
            self.threshold_updates.fill_(math.ceil(1 / self.cfg.threshold_ema))

    def fold_scale(self, scale: float) -> None:
        self.threshold.div_(scale)

    @torch.no_grad()
    def update_threshold(self, smallest_kept: Tensor) -> None:
        """θ ← θ + rate·(smallest_kept − θ), rate = max(threshold_ema, 1/(updates + 1)): a plain running mean over
        the first 1/threshold_ema batches, then an EMA."""
        rate = max(self.cfg.threshold_ema, 1.0 / (int(self.threshold_updates) + 1))
        self.threshold.lerp_(smallest_kept.detach().to(self.threshold.dtype).expand_as(self.threshold), rate)
        self.threshold_updates += 1

    def forward(self, sae: SAE, xc: Tensor, grad: Tensor | None = None) -> Codes:
        z = dense_preacts(sae, xc)
        r = z.relu()
        if not self.training:
            return dense_codes(self.cfg, r * (r > self.threshold), z)
        f, smallest_kept = self.allocate(r)
        self.update_threshold(smallest_kept)
        with torch.no_grad():
            inference_l0 = (r > self.threshold).sum(-1, dtype=torch.float32).mean()
        return dense_codes(self.cfg, f, z, inference_l0=inference_l0)
