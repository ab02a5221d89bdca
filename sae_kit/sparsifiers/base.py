"""What every sparsity rule shares: the `Codes` it returns and the `Sparsifier` base class."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, ClassVar

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from sae_kit.sae import SAE, SAEConfig


@dataclass(eq=False)
class Codes:
    """The code of a batch of N tokens, as a rule produced it: sparse (values, indices) or dense.

    Fixed-k rules fill `values`/`indices` ([N, k]); MP-SAE fills them with one slot per pursuit step (an atom may
    repeat, and stopped tokens carry zeros); the other rules fill `dense` ([N, F]).
    """

    d_sae: int
    """Number of latents F."""
    values: Tensor | None = None
    """[N, k] code values at `indices` (differentiable)."""
    indices: Tensor | None = None
    """[N, k] int64 latent indices."""
    dense: Tensor | None = None
    """[N, F] dense code (differentiable)."""
    z: Tensor | None = None
    """[N, F] encoder pre-activations, detached (for aux-loss ranking); None for MP-SAE (no encoder)."""
    preact: Callable[[Tensor], Tensor] | None = None
    """preact(indices [N, j]) -> [N, j] pre-activations at those latents, differentiable into the encoder
    (sparse backward for the fixed-k rules). Aux losses use it for dead latents."""
    signed: bool = False
    """The rule keeps negative values (AbsTopK): aux losses rank candidates by |z| and keep the sign, else rank by z
    and apply ReLU."""
    unique_indices: bool = True
    """False when an index may repeat within a row (MP-SAE re-selects atoms); the values then add up."""
    inference_l0: Tensor | None = None
    """Batch-level rules in training mode only: mean per-token L0 that the learned thresholds (the eval-mode rule)
    give on this batch; report it next to the training L0."""

    def to_dense(self) -> Tensor:
        """The dense [N, F] code (differentiable)."""
        if self.dense is not None:
            return self.dense
        out = self.values.new_zeros(self.values.shape[0], self.d_sae)
        return out.scatter_add(1, self.indices, self.values)

    def nonzeros(self) -> tuple[Tensor, Tensor, Tensor]:
        """(token [n], latent [n], value [n]) of every nonzero code entry, sorted by token then latent, with repeated
        MP-SAE atoms summed (detached)."""
        if self.dense is None and self.unique_indices:
            values, indices = self.values.detach(), self.indices
            order = indices.argsort(-1)
            values, indices = values.gather(1, order), indices.gather(1, order)
            token = torch.arange(len(values), device=values.device).unsqueeze(1).expand_as(values)
            mask = values != 0
            return token[mask], indices[mask], values[mask]
        dense = self.to_dense().detach()
        token, latent = dense.nonzero(as_tuple=True)
        return token, latent, dense[token, latent]

    def l0(self) -> Tensor:
        """Number of nonzero latents per token [N] (int64)."""
        if self.dense is None and self.unique_indices:
            return (self.values != 0).sum(-1)
        return (self.to_dense() != 0).sum(-1)

    def feature_counts(self) -> Tensor:
        """How many tokens of the batch each latent fired on [F] (int64); the trainer's dead/density statistics."""
        if self.dense is None and self.unique_indices:
            return torch.bincount(self.indices[self.values != 0], minlength=self.d_sae)
        return (self.to_dense() != 0).sum(0)


class Sparsifier(nn.Module):
    """One rule that maps a centred input to a sparse code. Subclasses set the class attributes and `forward`.

    A rule may own state as buffers or parameters. A thresholded rule exposes its per-latent inference thresholds
    [d_sae] as a `threshold` attribute (buffer or property) and loads saved ones in `set_threshold`; the `SAE`
    saves them under the SAELens key `threshold`.
    """

    uses_encoder: ClassVar[bool] = True
    """Whether the SAE needs W_enc and b_enc (False only for MP-SAE)."""
    uses_grad: ClassVar[bool] = False
    """Whether the rule reads dLoss/dx (g-SAE): trainers and evaluators then harvest gradients."""
    config_fields: ClassVar[tuple[str, ...]] = ()
    """SAEConfig fields this rule reads; cfg.json records exactly these besides the common ones."""

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__()
        self.cfg = cfg

    def forward(self, sae: SAE, xc: Tensor, grad: Tensor | None = None) -> Codes:
        """Code `xc` ([N, d_in], b_dec already subtracted when cfg.apply_b_dec_to_input); `grad` is read only by g-SAE."""
        raise NotImplementedError

    def set_threshold(self, threshold: Tensor) -> None:
        """Load a saved `threshold` [d_sae]."""
        raise ValueError(f"architecture {self.cfg.architecture!r} has no threshold; the weights file should not carry one")

    def fold_scale(self, scale: float) -> None:
        """The SAE's inputs are divided by `scale` from now on: rescale any threshold (codes shrink by `scale`)."""


def dense_preacts(sae: SAE, xc: Tensor) -> Tensor:
    """Pre-activations z = xc·W_enc + b_enc [N, F] with an ordinary (dense) autograd graph."""
    return torch.addmm(sae.b_enc, xc, sae.W_enc)


def dense_codes(cfg: SAEConfig, f: Tensor, z: Tensor, **extra) -> Codes:
    """Codes for a dense rule: `f` the code, `z` the differentiable pre-activations."""
    return Codes(d_sae=cfg.d_sae, dense=f, z=z.detach(), preact=lambda idx: z.gather(1, idx), **extra)
