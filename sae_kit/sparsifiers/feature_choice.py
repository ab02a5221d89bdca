"""Feature Choice (Ayonrinde 2024): each latent keeps its top-m tokens of the batch, m = k·B/F (so none is dead)."""

from __future__ import annotations

import torch
from torch import Tensor

from sae_kit.sparsifiers.batch_choice import BatchChoice


class FeatureChoice(BatchChoice):
    """Per-latent capacities over the batch; per-latent inference thresholds.

    Capacity m_i: uniform m = round(k·B/F), at least 1 and at most B (so the batch L0 is m·F/B, which equals k when
    F divides k·B). With cfg.fc_zipf_exponent = s > 0 (a design choice; the paper leaves it open), latents are
    ranked by their summed affinity ΣReLU(z) in the batch and latent of rank ρ gets m ∝ ρ^(−s), scaled so the
    capacities add up to about k·B.
    """

    config_fields = BatchChoice.config_fields + ("fc_zipf_exponent",)

    def capacities(self, r: Tensor) -> Tensor:
        """Tokens each latent keeps in this batch [F] (int64)."""
        B, F = r.shape
        s = self.cfg.fc_zipf_exponent
        by_rank = torch.arange(1, F + 1, device=r.device, dtype=torch.float64).pow(-s)
        by_rank = (by_rank / by_rank.sum() * (self.cfg.k * B)).round().clamp(1, B).long()
        if s == 0:
            return by_rank
        caps = torch.empty_like(by_rank)
        caps[r.sum(0).argsort(descending=True)] = by_rank
        return caps

    def allocate(self, r: Tensor) -> tuple[Tensor, Tensor]:
        caps = self.capacities(r.detach())
        top, rows = r.detach().topk(int(caps.max()), dim=0)
        keep = torch.arange(top.shape[0], device=r.device)[:, None] < caps
        f = r.new_zeros(r.shape).scatter(0, rows, r.gather(0, rows) * keep)
        return f, top.gather(0, (caps - 1)[None]).squeeze(0)
