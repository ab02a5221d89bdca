"""Mutual Choice (Ayonrinde 2024) = BatchTopK (Bussmann et al. 2024): the top k·B entries of ReLU(z) over the batch.

S = the k·B largest entries of r = ReLU(z) [B, F] flattened (`flat_topk_indices`, on the selection score: bf16
under bf16 autocast), so tokens keep varying numbers of latents (k on average); f = r on S, decoded and
differentiated at the k·B pairs only (sae_kit.sparsifiers.batch_choice). The inference threshold is global: the EMA
of min_{(n, i) ∈ S} r[n, i] (exact fp32 values), and at the end of training the value that exactly k·N calibration
entries exceed.

Under data parallelism (sae_kit.distributed) z holds this rank's b = B/W rows of the global batch B, and the
selection is the global one: every rank offers its own k·B largest entries (the most the global top k·B can take
from one rank), every rank merges the W·k·B offers with the same top-k·B, and keeps the winners that are its own.
The kept set is exactly the top k·B of the global [B, F] z (ties broken by the merge, identically on every rank).
"""

from __future__ import annotations

import torch
from torch import Tensor

from sae_kit import distributed
from sae_kit.sparsifiers.batch_choice import BatchChoice, midpoint_of_ranks

_SAMPLE = 1 << 16


def flat_topk_indices(flat: Tensor, budget: int) -> Tensor:
    """Indices of the `budget` largest entries of a 1-D tensor (as a set; the same set as `flat.topk(budget)`).

    A plain topk over B·F entries is slow (0.57 s for 4096 x 9216 on 2 CPU threads). A fixed-seed random sample
    gives a value that about 2·budget entries exceed; topk then runs on those alone (0.08 s). If fewer than
    `budget` entries pass (an unlucky sample), it falls back to the full topk, so the result is always exact.
    """
    n = flat.numel()
    if n <= 4 * _SAMPLE:
        return flat.topk(budget, sorted=False).indices
    generator = torch.Generator(device=flat.device).manual_seed(0)
    sample = flat[torch.randint(n, (_SAMPLE,), generator=generator, device=flat.device)]
    lower = sample.topk(min(_SAMPLE, 2 * budget * _SAMPLE // n + 1), sorted=False).values.min()
    candidates = (flat >= lower).nonzero().squeeze(1)
    if candidates.numel() < budget:
        return flat.topk(budget, sorted=False).indices
    return candidates[flat[candidates].topk(budget, sorted=False).indices]


class MutualChoice(BatchChoice):
    """Unrestricted allocation of k·B matches; one global inference threshold (stored in every `threshold` entry)."""

    def select(self, z: Tensor) -> Tensor:
        """The flat indices n·F + i of the k·B largest entries of z (or all B·F of them, if fewer): those of r =
        ReLU(z) too, as ReLU keeps the order (with fewer than k·B positive entries the rest are entries with r = 0,
        which carry no value and no gradient, as the zeros of r that a top-k·B of r would pick). No [B, F] ReLU.
        Under data parallelism: of the global batch's z (this rank's part of the global selection)."""
        world = distributed.world()
        flat = z.flatten()
        budget = self.cfg.k * z.shape[0] * world.world_size  # k·B over the global batch
        offer = flat_topk_indices(flat, min(flat.numel(), budget))
        if not world.distributed:
            return offer
        offers = distributed.gather_candidates(flat[offer])  # [W, n]: every rank's offer, the same on every rank
        n = offers.shape[1]
        winners = flat_topk_indices(offers.flatten(), min(offers.numel(), budget))
        return offer[winners[winners // n == world.rank] % n]

    def smallest_kept(self, values: Tensor, latents: Tensor) -> Tensor:
        """min over the kept pairs' values (scalar; the threshold is global: over every rank's pairs)."""
        smallest = torch.cat([values, values.new_full((1,), float("inf"))]).min()  # a rank may keep no pair
        return distributed.all_reduce_min_(smallest)

    def calibrated_threshold(self, rs: list[Tensor]) -> Tensor:
        """The global θ that exactly k·N of the N calibration tokens' entries exceed. Each batch contributes its
        top c·k·B entries; the pooled choice is exact when θ is at or above every batch's smallest contribution
        (else c doubles)."""
        budget = self.cfg.k * sum(len(r) for r in rs)
        c = 2
        while True:
            parts = [r.flatten()[flat_topk_indices(r.flatten(), min(r.numel(), c * self.cfg.k * len(r)))] for r in rs]
            pooled = torch.cat(parts).sort(descending=True).values
            theta = midpoint_of_ranks(pooled, min(budget, len(pooled) - 1))
            if all(p.numel() == r.numel() or theta >= p.min() for p, r in zip(parts, rs)):
                return theta.expand(self.cfg.d_sae).clone()
            c *= 2
