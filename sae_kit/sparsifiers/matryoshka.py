"""Matryoshka BatchTopK (Bussmann et al. 2025, "Learning Multi-Level Features with Matryoshka SAEs"; SAELens's
`matryoshka_batchtopk`): BatchTopK whose nested dictionary prefixes must each reconstruct the input on their own.

The code is exactly Mutual Choice / BatchTopK's (the top k·B entries of ReLU(z) over the batch in training, one
calibrated global threshold at inference), so a trained SAE is a BatchTopK SAE and exports like one (SAELens
jumprelu). Only the loss differs: with prefix widths w_1 < ... < w_m = d_sae it is
    Σ_j ||x − (f[:, :w_j]·W_dec[:w_j] + b_dec)||² / data_var,
every prefix with b_dec, summed over the levels, not averaged (as SAELens). The latents in front are then pushed to
carry the coarse, frequent features and later ones to refine them, which counters feature absorption.

The prefix reconstructions are built cumulatively, one block W_dec[w_{j−1}:w_j] at a time, and the outermost level
is the SAE's own x̂: a step costs one decode plus w_{m−1}/d_sae of another, not m full decodes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import Tensor

from sae_kit.errors import SaeKitError
from sae_kit.sparsifiers.base import StepContext
from sae_kit.sparsifiers.batch_choice import BatchChoiceConfig
from sae_kit.sparsifiers.mutual_choice import MutualChoice

if TYPE_CHECKING:
    from sae_kit.sae import SAE, SAEConfig


@dataclass
class MatryoshkaConfig(BatchChoiceConfig):
    """Matryoshka BatchTopK settings (cfg.json keys threshold_ema, calibration_batches, matryoshka_prefix_fractions)."""

    flat_names = {"prefix_fractions": "matryoshka_prefix_fractions"}

    prefix_fractions: tuple[float, ...] = (0.0625, 0.25)
    """Widths of the inner nested prefixes as fractions of d_sae, strictly increasing in (0, 1); the whole
    dictionary is always the last level (so () is plain BatchTopK). Width w_j = round(fraction_j·d_sae)."""

    def __post_init__(self) -> None:
        if isinstance(self.prefix_fractions, list):  # from cfg.json / JSON
            self.prefix_fractions = tuple(self.prefix_fractions)

    def check(self) -> None:
        super().check()
        fractions = self.prefix_fractions
        if not isinstance(fractions, tuple) or not all(
            isinstance(f, (int, float)) and not isinstance(f, bool) for f in fractions
        ):
            self.fail("prefix_fractions", fractions, "use a list of fractions of d_sae, e.g. (0.0625, 0.25)")
        if not all(0 < f < 1 for f in fractions) or any(a >= b for a, b in zip(fractions, fractions[1:])):
            self.fail(
                "prefix_fractions",
                fractions,
                "use strictly increasing fractions in (0, 1); d_sae itself is always the last level",
            )


class MatryoshkaBatchTopK(MutualChoice):
    """Mutual Choice / BatchTopK selection with the nested-prefix reconstruction loss."""

    Config = MatryoshkaConfig

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        widths = [round(f * cfg.d_sae) for f in self.config.prefix_fractions]
        if any(w < 1 for w in widths) or any(a >= b for a, b in zip(widths, [*widths[1:], cfg.d_sae])):
            raise SaeKitError(
                f"matryoshka_prefix_fractions={self.config.prefix_fractions} give prefix widths {widths} of "
                f"d_sae={cfg.d_sae}; they must be strictly increasing between 1 and d_sae − 1 (use fewer levels or a wider SAE)"
            )
        self.widths: tuple[int, ...] = (*widths, cfg.d_sae)
        """Nested prefix widths w_1 < ... < w_m = d_sae."""

    def reconstruction_loss(self, sae: SAE, ctx: StepContext) -> Tensor:
        x = ctx.x.reshape(-1, self.cfg.d_in)
        loss = (ctx.out.x_hat.reshape(x.shape) - x).square().sum(-1).mean()  # the whole dictionary: the SAE's own x̂
        sizes = [b - a for a, b in zip((0, *self.widths[:-1]), self.widths)]
        blocks = zip(ctx.out.codes.to_dense().split(sizes, dim=1)[:-1], sae.W_dec.split(sizes)[:-1])
        residual = x - sae.b_dec
        for f_block, atoms in blocks:  # x − x̂_j = (x − b_dec) − Σ_{i <= j} f_i·W_i, one block at a time
            residual = residual - f_block @ atoms
            loss = loss + residual.square().sum(-1).mean()
        return loss / ctx.data_var
