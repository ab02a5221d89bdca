"""Feature Choice (Ayonrinde 2024, arXiv 2411.02124): each latent keeps its top-m_i tokens of the batch (so none is dead).

The paper frames sparsity as allocating a budget of k·B (token, latent) matches; Feature Choice caps the matches of
each latent at a capacity m_i, and sets the capacities from a Zipf distribution (feature densities are roughly Zipf,
its Fig. 2). Where we differ, since the paper's text and code do not pin these down (only the Zipf shape is stated):
- m_ρ ∝ ρ^(−s) over the latents ranked by their summed affinity ΣReLU(z) in the batch, with s = 0.5 by default,
  water-filled so that every m_i <= B and Σ m_i = k·B exactly (the batch L0 is k). Measured on SmolLM2 layer 6
  (2,304 latents, k 32, 300k tokens): held-out FVU 0.260 at s = 0.5 against 0.300 with uniform capacities (s = 0)
  and 0.287 for TopK at the same L0 (BENCHMARKS.md);
- training keeps S = {(n, i): n among the m_i largest r[:, i]} (r = ReLU(z), the selection score: bf16 under bf16
  autocast), decoded and differentiated at its k·B pairs only (sae_kit.sparsifiers.batch_choice); a kept zero is a
  pair with value 0, not a firing;
- inference is the JumpReLU r·1[r > θ_i] with per-latent θ_i calibrated at the end of training so that latent i
  fires on its capacity share m_i·N/B of N training tokens (sae_kit.sparsifiers.batch_choice).

Under data parallelism (sae_kit.distributed) z holds this rank's b = B/W rows of the global batch B, and the choice
is the global one: the affinities are summed over every rank (so the ranks and capacities are the global batch's),
each rank offers each latent its min(m_i, b) largest tokens, and every rank merges the W offers per latent with the
same top-m_i and keeps the winners that are its own: exactly each latent's m_i largest tokens of the global batch.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from sae_kit import distributed
from sae_kit.sparsifiers.batch_choice import BatchChoice, BatchChoiceConfig, midpoint_of_ranks

if TYPE_CHECKING:
    from sae_kit.sae import SAE


def zipf_capacities(n: int, cap: int, total: int, exponent: float, device: torch.device | str = "cpu") -> Tensor:
    """Integer capacities m_ρ for ranks ρ = 1..n, each in [1, cap], adding up to `total` (clamped to [n, n·cap]):
    one each, and the rest ∝ ρ^(−exponent), water-filled (what the cap cuts off the top ranks goes to the others;
    rounding keeps the largest remainders, ties to the top ranks)."""
    total = min(max(total, n), n * cap)
    room, spare = cap - 1, total - n
    w = torch.arange(1, n + 1, device=device, dtype=torch.float64).pow(-exponent)
    # the fewest top ranks j pinned at `room` such that the rest, scaled to fill spare − j·room, stay within room
    rest = w.flip(0).cumsum(0).flip(0)  # rest[j] = Σ_{i >= j} w_i
    scale = (spare - torch.arange(n, device=device, dtype=torch.float64) * room) / rest
    fits = scale * w <= room
    j = int(torch.nonzero(fits)[0]) if bool(fits.any()) else n
    ideal = torch.where(
        torch.arange(n, device=device) < j, torch.full_like(w, room), (scale[min(j, n - 1)] * w).clamp(0, room)
    )
    extra = ideal.floor()
    short = int(spare - extra.sum())
    if short > 0:
        frac = (ideal - extra) - torch.arange(n, device=device, dtype=torch.float64) * 1e-12
        extra[frac.topk(short).indices] += 1
    return (1 + extra).long()


@dataclass
class FeatureChoiceConfig(BatchChoiceConfig):
    """Feature Choice settings (cfg.json keys threshold_ema, calibration_batches, fc_zipf_exponent)."""

    flat_names = {"zipf_exponent": "fc_zipf_exponent"}

    zipf_exponent: float = 0.5
    """Capacities m ∝ ρ^(−s) by affinity rank ρ (adding up to k·B, each at most B); 0 gives every latent k·B/F."""

    def check(self) -> None:
        super().check()
        if not self.zipf_exponent >= 0:
            self.fail("zipf_exponent", self.zipf_exponent, "use 0 (uniform capacities) or a positive exponent")


class FeatureChoice(BatchChoice):
    """Per-latent capacities over the batch; per-latent inference thresholds.

    Every latent keeps at least one token per batch, so when k·B < F the batch L0 is F/B, above k, and the rule warns.
    """

    Config = FeatureChoiceConfig

    def capacities(self, r: Tensor) -> Tensor:
        """Tokens each latent keeps in a batch r [B, F] (int64): at most B each, adding up to k·B when F·B allows."""
        B, F = r.shape
        s = self.config.zipf_exponent
        by_rank = zipf_capacities(F, B, self.cfg.k * B, s, r.device)
        caps = torch.empty_like(by_rank)  # by affinity rank (with s = 0 only the rounding's +1s depend on it)
        caps[r.sum(0, dtype=torch.promote_types(r.dtype, torch.float32)).argsort(descending=True)] = by_rank
        return caps

    def budget_l0(self, batch_size: int) -> float:
        """Mean L0 per token the allocation gives on batches of `batch_size` (k, unless k·B < F lifts it to F/B)."""
        total = zipf_capacities(self.cfg.d_sae, batch_size, self.cfg.k * batch_size, self.config.zipf_exponent).sum()
        return float(total) / batch_size

    def init_from_sample(self, sae: SAE, x: Tensor) -> None:
        effective = self.budget_l0(len(x))
        if effective > 1.1 * self.cfg.k:
            warnings.warn(
                f"feature_choice: k·B/F = {self.cfg.k * len(x) / self.cfg.d_sae:.2f} tokens per latent rounds up to "
                f"at least 1, so the effective L0 is {effective:.1f}, not k={self.cfg.k}; raise --batch-size to "
                f"{-(-self.cfg.d_sae // self.cfg.k)} or more, or lower d_sae",
                stacklevel=2,
            )

    def select(self, z: Tensor) -> Tensor:
        """The flat indices n·F + i of each latent i's m_i largest tokens of r = ReLU(z) (m = `capacities`).

        One topk per run of affinity ranks with the same ⌈log2 m⌉ (capacities fall with rank, so runs are
        contiguous), each over the rows of rᵀ gathered in rank order and as deep as the run's largest m: the Zipf
        capacities are a few large ones and thousands of small ones, and one topk as deep as the largest over the
        strided token axis of all F latents cost 4x more. Under data parallelism z is this rank's rows of the
        global batch, and the result this rank's part of the global choice (one gather of every run's offers).
        """
        world = distributed.world()
        b, F = z.shape
        B = b * world.world_size  # the global batch
        rt = z.t().contiguous().relu_()  # rᵀ [F, b], contiguous over tokens
        # latents by affinity rank, summed in fp32 at least: bf16 sums of 4,096 tokens took ~40 distinct values over
        # 9,216 latents (one rounding of the total), so the Zipf ranks were arbitrary among ties
        affinity = distributed.all_reduce_sum_(rt.sum(1, dtype=torch.promote_types(z.dtype, torch.float32)))
        order = affinity.argsort(descending=True)
        by_rank = zipf_capacities(F, B, self.cfg.k * B, self.config.zipf_exponent, z.device)  # non-increasing
        rt = rt.index_select(0, order)  # row ρ = the latent of rank ρ
        runs = torch.unique_consecutive(by_rank.double().log2().ceil(), return_counts=True)[1].tolist()
        spans, start = [], 0
        for count in runs:
            caps = by_rank[start : start + count]
            top = rt[start : start + count].topk(min(int(caps[0]), b), dim=1, sorted=True)  # by decreasing r
            spans.append((start, caps, top))
            start += count
        if world.distributed:
            offers = distributed.gather_candidates(torch.cat([top.values.flatten() for _, _, top in spans]))
        keys, at = [], 0
        for start, caps, top in spans:
            count, depth = top.indices.shape
            tokens, latents = top.indices, order[start : start + count, None]
            if world.distributed:  # merge the ranks' offers [W, count, depth] per latent: its top-m over all
                mine = offers[:, at : at + count * depth].reshape(-1, count, depth).permute(1, 0, 2).flatten(1)
                at += count * depth
                winners = mine.topk(int(caps[0]), dim=1, sorted=True).indices  # [count, m]: rank·depth + slot
                keep = (torch.arange(winners.shape[1], device=z.device) < caps[:, None]) & (
                    winners // depth == world.rank
                )
                tokens = tokens.gather(1, winners.remainder(depth))
            else:
                keep = torch.arange(depth, device=z.device) < caps[:, None]
            keys.append((tokens * F + latents)[keep])
        return torch.cat(keys)

    def smallest_kept(self, values: Tensor, latents: Tensor) -> Tensor:
        """Per latent, the smallest of its kept values [F] (its m_i-th largest; every latent keeps m_i >= 1), over
        every rank's pairs under data parallelism."""
        out = values.new_full((self.cfg.d_sae,), float("inf"))
        return distributed.all_reduce_min_(out.scatter_reduce(0, latents, values, "amin"))

    def calibrated_threshold(self, rs: list[Tensor]) -> Tensor:
        """θ_i that exactly n_i of the N calibration tokens exceed, n_i = latent i's capacity share m_i·N/B (capacities
        from the affinities summed over all calibration batches), from a running per-latent top-(max n + 1)."""
        n_tokens = sum(len(r) for r in rs)
        caps = self.capacities(torch.stack([r.sum(0) for r in rs]).sum(0, keepdim=True).expand(len(rs[0]), -1))
        counts = (caps.double() * n_tokens / len(rs[0])).round().long().clamp(0, n_tokens)
        depth = int(counts.max()) + 1
        top = rs[0].topk(min(depth, len(rs[0])), dim=0).values
        for r in rs[1:]:
            block = torch.cat([top, r])
            top = block.topk(min(depth, len(block)), dim=0).values
        return midpoint_of_ranks(top, counts)
