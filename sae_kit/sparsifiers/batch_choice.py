"""What Mutual Choice and Feature Choice share: a batch-level allocation in training, learned thresholds at inference.

In training mode the rule picks (token, latent) matches over the whole batch of ReLU(z) and keeps an EMA of the
smallest kept activation (one global value for MC, one per latent for FC) in the `threshold` buffer [d_sae]; it is
logged as the inference L0 during training. In eval mode the code is the JumpReLU r·1[r > θ], r = ReLU(z), so single
tokens encode without a batch.

An EMA of per-batch minima lags the training and is biased low in count (the mean of minima is not the pooled
quantile), which gave inference L0s 25–33% below the training budget. So at the end of training `calibrate` sets
θ from `calibration_batches` training batches: the value that the budget's worth of entries exceed over all of them
(MC: k·N entries in all; FC: each latent's capacity share of the N tokens), which makes the inference L0 on
training data equal the training budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from sae_kit.sparsifiers.base import Codes, RuleConfig, Sparsifier, dense_codes, dense_preacts

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


class BatchChoice(Sparsifier):
    """Base for batch-allocating rules; subclasses implement `allocate` and `calibrated_threshold`."""

    Config = BatchChoiceConfig
    saelens_name: str | None = "jumprelu"
    threshold: Tensor
    threshold_updates: Tensor  # the inference rule r·1[r > θ] is SAELens's jumprelu (as SAELens saves batchtopk)

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        self.register_buffer("threshold", torch.zeros(cfg.d_sae, dtype=cfg.torch_dtype, device=cfg.device))
        self.register_buffer("threshold_updates", torch.zeros((), dtype=torch.int64, device=cfg.device))

    def allocate(self, r: Tensor) -> tuple[Tensor, Tensor]:
        """From ReLU(z) [B, F] (differentiable), return the code [B, F] and the smallest kept value (scalar or [F])."""
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
        rate = max(self.config.threshold_ema, 1.0 / (int(self.threshold_updates) + 1))
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
            rs.append(dense_preacts(sae, x - sae.b_dec if self.cfg.apply_b_dec_to_input else x).relu_())
        self.threshold.copy_(self.calibrated_threshold(rs))

    def eval_metrics(self, sae: SAE, x: Tensor, grad: Tensor | None = None, **settings: Any) -> dict[str, Any]:
        """The training budget k, reported next to the inference L0 that core eval measures on the same rows."""
        return {"l0_training_target": self.cfg.k}
