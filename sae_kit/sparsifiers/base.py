"""What every sparsity rule shares: the `Codes` it returns and the `Sparsifier` base class."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar, NoReturn

import torch
from torch import Tensor, nn

from sae_kit.errors import SaeKitError
from sae_kit.kernels import fixed_crow, rows_of

if TYPE_CHECKING:
    from sae_kit.sae import SAE, SAEConfig


@dataclass(eq=False)
class Codes:
    """The code of a batch of N tokens, as a rule produced it: sparse (values, indices), ragged pairs, or dense.

    Fixed-k rules fill `values`/`indices` ([N, k]); MP-SAE fills them with one slot per pursuit step (an atom may
    repeat, and stopped tokens carry zeros); batch-level rules that select a varying number of pairs per token
    (Mutual and Feature Choice) fill `values`/`indices` flat ([P]) with `crow`, the CSR row offsets [N + 1]; the
    other rules fill `dense` ([N, F]). Losses, eval and the browser use the methods below, never the fields' layout.
    """

    d_sae: int
    """Number of latents F."""
    values: Tensor | None = None
    """[N, k] code values at `indices` (differentiable); [P] with `crow`."""
    indices: Tensor | None = None
    """[N, k] int64 latent indices; [P] with `crow`."""
    crow: Tensor | None = None
    """[N + 1] int64 CSR row offsets of ragged pairs: token n owns values/indices[crow[n]:crow[n + 1]]; None for
    [N, k] or dense codes."""
    dense: Tensor | None = None
    """[N, F] dense code (differentiable)."""
    z: Tensor | None = None
    """[N, F] encoder pre-activations, detached (for aux-loss ranking); None for MP-SAE (no encoder)."""
    preact: Callable[[Tensor], Tensor] | None = None
    """preact(indices [N, j]) -> [N, j] pre-activations at those latents, differentiable into the encoder
    (sparse backward for the fixed-k rules). Aux losses use it for dead latents."""
    column_preacts: Callable[[Tensor], Tensor] | None = None
    """column_preacts(latents [j]) -> [N, j] every token's pre-activations at those latents, exact and
    differentiable (a dense product over those columns); aux losses use it when the candidates are few."""
    signed: bool = False
    """The rule keeps negative values (AbsTopK): aux losses rank candidates by |z| and keep the sign, else rank by z
    and apply ReLU."""
    unique_indices: bool = True
    """False when an index may repeat within a row (MP-SAE re-selects atoms); the values then add up."""
    inference_l0: Tensor | None = None
    """Batch-level rules in training mode only: mean per-token L0 that the learned thresholds (the eval-mode rule)
    give on this batch; report it next to the training L0."""

    def sparse(self) -> tuple[Tensor, Tensor]:
        """(values, indices) of a sparse code: [N, k], or [P] for ragged pairs (an error for a dense one)."""
        if self.values is None or self.indices is None:
            raise ValueError("this code is dense; use to_dense()")
        return self.values, self.indices

    @property
    def num_tokens(self) -> int:
        """N, the tokens coded."""
        if self.crow is not None:
            return len(self.crow) - 1
        return len(self.dense if self.dense is not None else self.sparse()[0])

    def pairs(self) -> tuple[Tensor, Tensor, Tensor]:
        """(crow [N + 1], latent [P], value [P]) of a sparse code as CSR pairs (differentiable values)."""
        values, indices = self.sparse()
        if self.crow is not None:
            return self.crow, indices, values
        n, k = indices.shape
        return fixed_crow(n, k, indices.device), indices.reshape(-1), values.reshape(-1)

    def to_dense(self) -> Tensor:
        """The dense [N, F] code (differentiable)."""
        if self.dense is not None:
            return self.dense
        values, indices = self.sparse()
        if self.crow is not None:
            out = values.new_zeros(self.num_tokens, self.d_sae)
            return out.index_put((rows_of(self.crow, len(indices)), indices), values, accumulate=True)
        return values.new_zeros(values.shape[0], self.d_sae).scatter_add(1, indices, values)

    def nonzeros(self) -> tuple[Tensor, Tensor, Tensor]:
        """(token [n], latent [n], value [n]) of every nonzero code entry, sorted by token then latent, with repeated
        MP-SAE atoms summed (detached)."""
        if self.dense is None and self.unique_indices:
            crow, latent, values = self.pairs()
            token = rows_of(crow, len(latent))
            values = values.detach()
            order = (token * self.d_sae + latent).argsort()
            token, latent, values = token[order], latent[order], values[order]
            mask = values != 0
            return token[mask], latent[mask], values[mask]
        dense = self.to_dense().detach()
        token, latent = dense.nonzero(as_tuple=True)
        return token, latent, dense[token, latent]

    def l0(self) -> Tensor:
        """Number of nonzero latents per token [N] (int64)."""
        if self.dense is None and self.unique_indices:
            if self.crow is not None:  # index_add_ rather than bincount(mask-indexed): no host sync on a GPU
                values, _ = self.sparse()
                counts = torch.zeros(self.num_tokens, dtype=torch.int64, device=self.crow.device)
                return counts.index_add_(0, rows_of(self.crow, len(values)), values.ne(0).long())
            return (self.sparse()[0] != 0).sum(-1)
        return (self.to_dense() != 0).sum(-1)

    def feature_counts(self) -> Tensor:
        """How many tokens of the batch each latent fired on [F] (int64); the trainer's dead/density statistics."""
        if self.dense is None and self.unique_indices:
            values, indices = self.sparse()
            counts = torch.zeros(self.d_sae, dtype=torch.int64, device=indices.device)
            return counts.index_add_(0, indices.flatten(), (values != 0).flatten().long())
        return (self.to_dense() != 0).sum(0)


@dataclass
class RuleConfig:
    """The settings of one rule (a subclass per rule, one docstring per field, validated in `check`).

    cfg.json stays flat and SAELens-style: field `f` is written as `flat_prefix + f` beside the common keys
    (`flat_names` overrides single names), so SAE directories written before rule configs existed still load.
    """

    flat_prefix: ClassVar[str] = ""
    """Prefix of this rule's keys in cfg.json (e.g. "mp_" for MP-SAE's `max_steps` -> `mp_max_steps`)."""
    flat_names: ClassVar[dict[str, str]] = {}
    """Field -> cfg.json key, where it is not `flat_prefix + field`."""

    def check(self) -> None:
        """Raise SaeKitError (one line naming the field and the fix) for settings that cannot work."""

    @classmethod
    def flat_key(cls, name: str) -> str:
        """The cfg.json key of field `name`."""
        return cls.flat_names.get(name, cls.flat_prefix + name)

    def to_flat(self) -> dict[str, Any]:
        """{cfg.json key: value} for every field."""
        return {self.flat_key(f.name): getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_flat(cls, data: dict[str, Any]) -> RuleConfig:
        """The config from flat cfg.json content (keys of other rules are ignored; missing ones keep defaults)."""
        return cls(**{f.name: data[cls.flat_key(f.name)] for f in fields(cls) if cls.flat_key(f.name) in data})

    def fail(self, name: str, value: Any, fix: str) -> NoReturn:
        """Raise the one-line error for field `name`."""
        raise RuleConfigError(f"{self.flat_key(name)}={value!r}; {fix}", name)


class RuleConfigError(SaeKitError):
    """A rule setting that cannot work; `field` names it (the CLI shows it as --<rule>.<field>)."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass
class StepContext:
    """What a rule's training hooks see of one optimiser step."""

    x: Tensor
    """[B, d_in] the (scaled) training batch."""
    out: Any
    """The SAE's `SAEOutput` on x (x_hat, codes)."""
    data_var: float
    """mean_t ||x_t − μ||² of the initialisation sample: the reconstruction losses' normaliser."""
    step: int
    """Optimiser steps taken before this one."""
    total_steps: int
    """Steps of the whole run."""

    @property
    def progress(self) -> float:
        """Fraction of the run done after this step, in (0, 1]."""
        return (self.step + 1) / max(1, self.total_steps)


class Sparsifier(nn.Module):
    """One architecture: the rule that maps a centred input to a sparse code, and everything else that is its own.

    Subclasses set the class attributes (capabilities), `Config` (their settings) and `forward`, and override the
    hooks they need. A rule may own tensors beyond W_enc/b_enc/W_dec/b_dec as parameters or buffers; those that
    `state_tensors` returns are saved in sae_weights.safetensors under their names and loaded back by
    `load_state_tensors`. The trainer, the SAE directory I/O, eval and the browser ask the rule; none of them
    compares architecture names.
    """

    Config: ClassVar[type[RuleConfig]] = RuleConfig
    """The rule's settings dataclass (SAEConfig.rule_config is an instance of it)."""
    uses_k: ClassVar[bool] = True
    """Whether SAEConfig.k means something to the rule (False: relu, jumprelu, gated); sweeps collapse the k axis."""
    uses_encoder: ClassVar[bool] = True
    """Whether the SAE needs W_enc and b_enc (False only for MP-SAE)."""
    uses_grad: ClassVar[bool] = False
    """Whether the rule reads dLoss/dx (g-SAE): trainers and evaluators then harvest gradients."""
    default_aux: ClassVar[str] = "auxk"
    """The aux loss `--aux auto` picks for the rule: "auxk", "zipf" or "none"."""
    saelens_name: str | None = None
    """The SAELens architecture a saved SAE of this rule loads as (None: exporting to SAELens is refused)."""

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__()
        self.cfg = cfg

    @property
    def config(self) -> Any:
        """This rule's settings (an instance of `Config`)."""
        return self.cfg.rule_config

    @property
    def signed(self) -> bool:
        """Whether codes keep their sign (AbsTopK; MP-SAE with signed pursuit): aux losses then rank by |z|."""
        return False

    def forward(self, sae: SAE, xc: Tensor, grad: Tensor | None = None) -> Codes:
        """Code `xc` ([N, d_in], b_dec already subtracted when cfg.apply_b_dec_to_input); `grad` is read only by g-SAE."""
        raise NotImplementedError

    # -------------------------------------------------------------------------------------------- state and I/O
    def state_tensors(self) -> dict[str, Tensor]:
        """The rule's own tensors saved in sae_weights.safetensors (SAELens names, e.g. `threshold`)."""
        return {}

    @torch.no_grad()
    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        """Load what `state_tensors` saved (same names and shapes, already checked by the SAE)."""
        own = dict(self.named_parameters()) | dict(self.named_buffers())
        for name, value in tensors.items():
            own[name].copy_(value)

    def fold_scale(self, scale: float) -> None:
        """The SAE's inputs are divided by `scale` from now on: rescale the rule's tensors in input units."""

    # ------------------------------------------------------------------------------------------ training hooks
    def init_from_sample(self, sae: SAE, x: Tensor) -> None:
        """Initialise the rule's state from a (scaled) data sample x [N, d_in], after b_dec is set."""

    def lr_scales(self) -> dict[str, float]:
        """LR multipliers for the rule's own parameters, by name (others train at the shared LR)."""
        return {}

    def reconstruction_loss(self, sae: SAE, ctx: StepContext) -> Tensor:
        """The reconstruction term: ||x − x̂||² over the data variance (Matryoshka sums it over nested prefixes)."""
        return (ctx.out.x_hat - ctx.x).square().sum(-1).mean() / ctx.data_var

    def penalties(self, sae: SAE, ctx: StepContext) -> dict[str, Tensor]:
        """Named extra loss terms of the rule (sparsity penalty with its warm-up, auxiliary losses); logged by name."""
        return {}

    def after_step(self, sae: SAE) -> None:
        """Called after every optimiser step (e.g. keep learned thresholds positive)."""

    def calibration_batches(self) -> int:
        """How many training batches `calibrate` wants at the end of training (0: none)."""
        return 0

    def calibrate(self, sae: SAE, batches: list[Tensor]) -> None:
        """End of training: fit inference-time state (thresholds) on (scaled) training batches of the run's size."""

    # ---------------------------------------------------------------------------------------------------- eval
    def eval_metrics(self, sae: SAE, x: Tensor, grad: Tensor | None = None, **settings: Any) -> dict[str, Any]:
        """Extra metrics of this architecture on held-out rows x (raw activations, eval mode); JSON-serialisable."""
        return {}


def dense_preacts(sae: SAE, xc: Tensor) -> Tensor:
    """Pre-activations z = xc·W_enc + b_enc [N, F] with an ordinary (dense) autograd graph."""
    return torch.addmm(sae.b_enc, xc, sae.W_enc)


def dense_codes(cfg: SAEConfig, f: Tensor, z: Tensor, **extra: Any) -> Codes:
    """Codes for a dense rule: `f` the code, `z` the differentiable pre-activations."""
    return Codes(
        d_sae=cfg.d_sae,
        dense=f,
        z=z.detach(),
        preact=lambda idx: z.gather(1, idx),
        column_preacts=lambda cols: z.index_select(1, cols),
        **extra,
    )
