"""What Mutual Choice and Feature Choice share: a batch-level allocation in training, learned thresholds at inference.

With z = xc·W_enc + b_enc [B, F] and r = ReLU(z), a rule chooses a set S of (token, latent) matches over the whole
batch (Mutual Choice: the k·B largest entries of r; Feature Choice: each latent i its m_i largest tokens) and the
code is f[n, i] = r[n, i]·1[(n, i) ∈ S], so x̂ = f·W_dec + b_dec and ∂L/∂z[n, i] = ∂L/∂f[n, i]·1[z[n, i] > 0] on S and
0 elsewhere. Only the |S| = k·B pairs are ever decoded or differentiated (sae_kit.kernels):
- selection, without autograd: z = `encode_preacts` (one dense GEMM, the only O(B·F·d) product of the step; bf16
  under bf16 autocast), r = ReLU(z), S from r by the rule's `select`;
- S as a CSR pattern sorted by token, then latent (crow [B + 1], latents [P]): the ragged `Codes` form;
- values = ReLU(`pair_preacts`(S)): gathered from z when z is in the weights' dtype, recomputed exactly in that
  dtype (fp32) by an SDDMM at the pairs when z is bf16, so the code is exact given its support; their backward
  and the decode's (`pair_decode`, in W_dec's dtype outside autocast) are sparse products over the P pairs.
Under bf16 autocast only the selection sees bf16 scores (the training support, the eval-mode support z > θ and
the logged inference L0), so a pair whose fp32 value ties with the budget's edge (or with θ) to within the bf16
error of z may be swapped for its neighbour; every value, gradient and threshold is fp32. `Codes.z` is the
selection score z (bf16 under autocast) for the aux losses' ranking, and `Codes.preact` the exact, differentiable
`gather_preacts`. No [B, F] tensor other than z and the rule's own selection scratch is built.

The rule keeps an EMA of the smallest kept value (one global value for MC, one per latent for FC; from the exact
pair values) in the `threshold` buffer [d_sae]; the L0 it gives on the batch (the count of z > max(θ, 0)) is logged
as the inference L0 during training. In eval mode the code is the JumpReLU f = r·1[r > θ], so single tokens encode
without a batch; it is returned as pairs too (the support z > max(θ, 0), values recomputed exactly and masked by
the exact r > θ), which keeps no [N, F] code or graph on wide SAEs.

An EMA of per-batch minima lags the training and is biased low in count (the mean of minima is not the pooled
quantile), which gave inference L0s 25–33% below the training budget. So at the end of training `calibrate` sets
θ from `calibration_batches` training batches: the value that the budget's worth of entries exceed over all of them
(MC: k·N entries in all; FC: each latent's capacity share of the N tokens), which makes the inference L0 on
training data equal the training budget. Calibration runs in the weights' dtype (fp32), outside autocast.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from sae_kit.kernels import column_preacts, encode_preacts, gather_preacts, pair_preacts
from sae_kit.sparsifiers.base import Codes, RuleConfig, Sparsifier

if TYPE_CHECKING:
    from sae_kit.sae import SAE, SAEConfig


@dataclass
class BatchChoiceConfig(RuleConfig):
    """Settings shared by Mutual Choice and Feature Choice (cfg.json keys as the field names)."""

    threshold_ema: float = 0.01
    """EMA rate of the running inference threshold logged during training (a running mean for the first
    1/threshold_ema batches); the saved threshold is calibrated at the end of training."""
    calibration_batches: int = 8
    """Training batches (of the run's batch size) that the end-of-training threshold calibration reads (0: keep the EMA)."""

    def check(self) -> None:
        if not 0 < self.threshold_ema <= 1:
            self.fail("threshold_ema", self.threshold_ema, "use a rate in (0, 1]")
        if not (isinstance(self.calibration_batches, int) and self.calibration_batches >= 0):
            self.fail("calibration_batches", self.calibration_batches, "use a number of batches >= 0")


def midpoint_of_ranks(values: Tensor, n: Tensor | int, dim: int = 0) -> Tensor:
    """Per slice along `dim` of descending-sorted non-negative `values`: the midpoint of the n-th and (n+1)-th
    largest, so exactly n entries exceed it (n may differ per slice; n = 0 gives a value above the largest, n at
    or past the slice's length gives 0: every positive entry)."""
    size = values.shape[dim]
    n = torch.as_tensor(n, device=values.device).expand(values.shape[1 - dim] if values.dim() == 2 else ())
    upper = values.gather(dim, (n - 1).clamp(0, size - 1).unsqueeze(dim)).squeeze(dim)
    lower = values.gather(dim, n.clamp_max(size - 1).unsqueeze(dim)).squeeze(dim)
    upper = torch.where(n > 0, upper, lower + 1)
    return torch.where(n < size, (upper + lower) / 2, torch.zeros_like(upper))


def sorted_pairs(keys: Tensor, n_tokens: int, d_sae: int) -> tuple[Tensor, Tensor]:
    """(crow [N + 1], latents [P]) of the pairs with flat keys n·F + i [P] (any order, no repeats): CSR sorted by
    token, then latent."""
    keys = keys.sort().values
    tokens, latents = keys.div(d_sae, rounding_mode="floor"), keys.remainder(d_sae)
    crow = torch.zeros(n_tokens + 1, dtype=torch.int64, device=keys.device)
    ones = torch.ones_like(tokens)  # index_add_ rather than bincount, whose output size is a host read on a GPU
    crow[1:] = torch.zeros(n_tokens, dtype=torch.int64, device=keys.device).index_add_(0, tokens, ones).cumsum(0)
    return crow, latents


class BatchChoice(Sparsifier):
    """Base for batch-allocating rules; subclasses implement `select`, `smallest_kept` and `calibrated_threshold`."""

    Config = BatchChoiceConfig
    saelens_name: str | None = "jumprelu"
    threshold: Tensor
    threshold_updates: Tensor  # the inference rule r·1[r > θ] is SAELens's jumprelu (as SAELens saves batchtopk)

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        self.register_buffer("threshold", torch.zeros(cfg.d_sae, dtype=cfg.torch_dtype, device=cfg.device))
        self.register_buffer("threshold_updates", torch.zeros((), dtype=torch.int64, device=cfg.device))

    def select(self, z: Tensor) -> Tensor:
        """The kept pairs S of a batch, chosen on r = ReLU(z) from z [B, F] (no autograd; bf16 under autocast), as
        flat keys n·F + i [P], in any order, each pair once."""
        raise NotImplementedError

    def smallest_kept(self, values: Tensor, latents: Tensor) -> Tensor:
        """The threshold EMA's target from the kept pairs' exact values [P] and latents [P]: a scalar or [F]."""
        raise NotImplementedError

    def calibrated_threshold(self, rs: list[Tensor]) -> Tensor:
        """θ [d_sae] from ReLU(z) of the calibration batches (each [B, F], detached)."""
        raise NotImplementedError

    def state_tensors(self) -> dict[str, Tensor]:
        return {"threshold": self.threshold}

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        super().load_state_tensors(tensors)
        # A saved threshold is a trained one: further training continues at the EMA rate.
        self.threshold_updates.fill_(math.ceil(1 / self.config.threshold_ema))

    def fold_scale(self, scale: float) -> None:
        self.threshold.div_(scale)

    @torch.no_grad()
    def update_threshold(self, smallest_kept: Tensor) -> None:
        """θ ← θ + rate·(smallest_kept − θ), rate = max(threshold_ema, 1/(updates + 1)): a plain running mean over
        the first 1/threshold_ema batches, then an EMA."""
        # the rate stays on the device: reading the update count on the host would stall a GPU every step
        rate = (1.0 / (self.threshold_updates + 1).double()).clamp_min(self.config.threshold_ema)
        target = smallest_kept.detach().to(self.threshold.dtype).expand_as(self.threshold)
        self.threshold.lerp_(target, rate.to(self.threshold.dtype))
        self.threshold_updates += 1

    def score_threshold(self, dtype: torch.dtype) -> Tensor:
        """θ⁺ = max(θ, 0) [d_sae] as the largest value of `dtype` at or below it, so that for z of that dtype
        z > θ⁺ ⇔ ReLU(z)·1[ReLU(z) > θ] ≠ 0 (the nonzeros of the JumpReLU), and the comparison runs in z's own
        dtype (a bf16 z against an fp32 θ costs 2.5x as much)."""
        theta = self.threshold.clamp_min(0)
        if dtype == theta.dtype:
            return theta
        low = theta.to(dtype)
        return torch.where(low.to(theta.dtype) > theta, torch.nextafter(low, low.new_tensor(-math.inf)), low)

    def forward(self, sae: SAE, xc: Tensor, grad: Tensor | None = None) -> Codes:
        z = encode_preacts(xc, sae.W_enc, sae.b_enc)
        n, d_sae = z.shape
        with torch.no_grad():
            if self.training:
                crow, latents = sorted_pairs(self.select(z), n, d_sae)
            else:  # nonzero() lists row-major: sorted by token, then latent
                tokens, latents = (z > self.score_threshold(z.dtype)).nonzero(as_tuple=True)
                crow = torch.zeros(n + 1, dtype=torch.int64, device=z.device)
                crow[1:] = torch.bincount(tokens, minlength=n).cumsum(0)
        values = pair_preacts(xc, sae.W_enc, sae.b_enc, z, crow, latents).relu()
        codes = Codes(
            d_sae=d_sae,
            values=values,
            indices=latents,
            crow=crow,
            z=z,
            preact=partial(gather_preacts, xc, sae.W_enc, sae.b_enc, z),
            column_preacts=partial(column_preacts, xc, sae.W_enc, sae.b_enc),
        )
        if not self.training:  # the exact JumpReLU on the support (a no-op unless z is bf16)
            codes.values = values * (values > self.threshold[latents])
            return codes
        self.update_threshold(self.smallest_kept(values.detach(), latents))
        with torch.no_grad():
            codes.inference_l0 = torch.count_nonzero(z > self.score_threshold(z.dtype)).to(torch.float32) / n
        return codes

    def calibration_batches(self) -> int:
        """How many training batches `calibrate` wants at the end of training."""
        return int(self.config.calibration_batches)

    @torch.no_grad()
    def calibrate(self, sae: SAE, batches: list[Tensor]) -> None:
        if not batches:
            return
        rs = []
        for x in batches:
            x = x.to(sae.W_dec.device, sae.W_dec.dtype)
            xc = x - sae.b_dec if self.cfg.apply_b_dec_to_input else x
            with torch.autocast(x.device.type, enabled=False):
                rs.append(encode_preacts(xc, sae.W_enc, sae.b_enc).relu_())
        self.threshold.copy_(self.calibrated_threshold(rs))

    def eval_metrics(self, sae: SAE, x: Tensor, grad: Tensor | None = None, **settings: Any) -> dict[str, Any]:
        """The training budget k, reported next to the inference L0 that core eval measures on the same rows."""
        return {"l0_training_target": self.cfg.k}
