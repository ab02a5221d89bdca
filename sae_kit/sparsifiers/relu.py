"""ReLU SAE (the L1 baseline): f = ReLU(z); the sparsity pressure is the L1 loss in sae_kit.training.losses."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from sae_kit.sparsifiers.base import Codes, Sparsifier, dense_codes, dense_preacts

if TYPE_CHECKING:
    from sae_kit.sae import SAE


class ReLU(Sparsifier):
    """Dense code ReLU(z)."""

    def forward(self, sae: SAE, xc: Tensor, grad: Tensor | None = None) -> Codes:
        z = dense_preacts(sae, xc)
        return dense_codes(self.cfg, z.relu(), z)
