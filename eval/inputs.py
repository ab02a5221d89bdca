"""What every measurement reads (`EvalInputs`: model, SAE, its held-out contexts and clean activations, from
sae_kit.heldout) and what it returns (`Section`: JSON metrics and plotly figures)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from sae_kit.activations import HarvestConfig
from sae_kit.heldout import (
    Encoded,
    HeldoutContexts,
    HeldoutError,
    activations,
    check_pair,
    encode,
    fold_input_scale,
    harvest_config_for,
    heldout_contexts,
)
from sae_kit.sae import SAE


class EvalError(HeldoutError):
    """Evaluation cannot run as asked (bad settings, too few tokens)."""


@dataclass
class EvalInputs:
    """The shared data of one SAE's evaluation."""

    model: Any
    """The TransformerBridge the SAE reads."""
    sae: SAE
    """The SAE, in eval mode (learned thresholds for MC/FC), taking raw activations (see `input_scale`)."""
    hook: str
    """The hook the SAE reads."""
    contexts: HeldoutContexts
    """Held-out contexts; `keep` marks the positions the SAE reads."""
    x: Tensor
    """[n_kept, d_in] clean activations at the kept positions, row-major over `contexts` (fp32, CPU)."""
    grad: Tensor | None
    """[n_kept, d_in] ∂CE/∂x at the same positions when the SAE reads gradients (g-SAE), else None."""
    data: HarvestConfig
    """The data settings and position rules the contexts were made with (the SAE's own, from its metadata)."""
    seed: int = 0
    """Seed of every random choice a measurement makes (splits, feature samples)."""
    input_scale: float | None = None
    """The scale s = sqrt(d_in)/E||x|| folded into an SAE that expected normalised inputs (None: it takes raw ones)."""
    memo: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)
    """Results that do not depend on the SAE (the zero- and mean-ablation CE/KL of each LM batch), shared by every
    SAE evaluated on these inputs (`with_sae` passes the same dict on), so each is computed once."""
    _encoded: Encoded | None = field(default=None, init=False, repr=False, compare=False)

    def batches(self) -> Iterator[tuple[HeldoutContexts, slice]]:
        """LM batches of contexts, each with the slice of `x`/`grad` rows at its kept positions."""
        start = 0
        for batch in self.contexts.batches(self.data.lm_batch_size):
            yield batch, slice(start, start + batch.n_kept)
            start += batch.n_kept

    def encoded(self) -> Encoded:
        """The SAE's encoding of every row of x (x̂, L0, latent counts and max |activation|), computed once."""
        if self._encoded is None:
            self._encoded = encode(self.sae, self.x, self.grad)
        return self._encoded


@dataclass
class Section:
    """One measurement's results."""

    metrics: dict[str, Any]
    """JSON-serialisable numbers, lists and strings."""
    figures: dict[str, Any] = field(default_factory=dict)
    """plotly Figures by name (written as HTML, and PNG where a renderer is available)."""
    lines: list[str] = field(default_factory=list)
    """A few plain-text lines for the stdout summary of `sae-kit eval`."""


def prepare(
    model,
    sae: SAE,
    n_tokens: int,
    *,
    hook: str | None = None,
    corpus: str | None = None,
    context_size: int | None = None,
    lm_batch_size: int = 16,
    seed: int = 0,
) -> EvalInputs:
    """Held-out contexts of the SAE's own data settings and the clean activations (and gradients, for g-SAE) at its hook."""
    cfg = harvest_config_for(sae, hook=hook, corpus=corpus, context_size=context_size, lm_batch_size=lm_batch_size)
    check_pair(model, sae, cfg.hook[0])
    ctxs = heldout_contexts(model, cfg, n_tokens)
    x, grad = activations(model, cfg, ctxs, grads=sae.sparsifier.uses_grad)
    return EvalInputs(model, sae.eval(), cfg.hook[0], ctxs, x, grad, cfg, seed, fold_input_scale(model, sae, cfg, x))


def with_sae(inputs: EvalInputs, sae: SAE) -> EvalInputs:
    """`inputs` for another SAE that reads the same held-out data (its input scale folded in, in place)."""
    check_pair(inputs.model, sae, inputs.hook)
    scale = fold_input_scale(inputs.model, sae, inputs.data, inputs.x)
    return dataclasses.replace(inputs, sae=sae.eval(), input_scale=scale)
