"""AbsTopK (Zhu et al. 2025): the k largest |z| per token, keeping their sign (no ReLU)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from sae_kit.sparsifiers.topk import TopK

if TYPE_CHECKING:
    from sae_kit.sae import SAE


class AbsTopK(TopK):
    """Hard thresholding H_k: one atom can encode both poles of an axis through the sign of its code."""

    saelens_name = "abstopk"

    @property
    def signed(self) -> bool:
        return True

    def selection_score(self, sae: SAE, z: Tensor, grad: Tensor | None) -> Tensor:
        return z.abs()

    def activate(self, preacts: Tensor) -> Tensor:
        return preacts
