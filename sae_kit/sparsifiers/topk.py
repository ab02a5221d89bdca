"""TopK (Gao et al. 2024): ReLU of the k largest pre-activations per token; the base of every fixed-k rule."""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from sae_kit.kernels import column_preacts, encode_preacts, gather_preacts
from sae_kit.sparsifiers.base import Codes, Sparsifier

if TYPE_CHECKING:
    from sae_kit.sae import SAE


class TopK(Sparsifier):
    """Keep the k latents with the largest selection score (here z), with values ReLU(z).

    Returns (values, indices) [N, k]: the SAE decodes them with a sparse gather, and the encoder backward touches
    only the k active latents per token (sae_kit.kernels). Subclasses change `selection_score` / `activate`.
    """

    saelens_name: str | None = "topk"

    def selection_score(self, sae: SAE, z: Tensor, grad: Tensor | None) -> Tensor:
        """[N, F] score whose per-row top-k is the support (no autograd)."""
        return z

    def activate(self, preacts: Tensor) -> Tensor:
        """Code values from the selected pre-activations [N, k]."""
        return preacts.relu()

    def forward(self, sae: SAE, xc: Tensor, grad: Tensor | None = None) -> Codes:
        z = encode_preacts(xc, sae.W_enc, sae.b_enc)
        with torch.no_grad():
            indices = self.selection_score(sae, z, grad).topk(self.cfg.k, dim=-1, sorted=False).indices
        preact = partial(gather_preacts, xc, sae.W_enc, sae.b_enc, z)
        return Codes(
            d_sae=self.cfg.d_sae,
            values=self.activate(preact(indices)),
            indices=indices,
            z=z,
            preact=preact,
            column_preacts=partial(column_preacts, xc, sae.W_enc, sae.b_enc),
            signed=self.signed,
        )
