"""What every measurement reads (`EvalInputs`: model, SAE, hook, held-out contexts, clean activations) and what it
returns (`Section`: JSON metrics and plotly figures)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import Tensor

from sae_kit.activations import HarvestConfig, harvester_for
from sae_kit.eval.lm import EvalContexts, check_pair, harvest_config_for, heldout_contexts, run_lm
from sae_kit.models import stop_layer
from sae_kit.sae import SAE


@dataclass
class EvalInputs:
    """The shared data of one SAE's evaluation."""

    model: Any
    """The TransformerBridge the SAE reads."""
    sae: SAE
    """The SAE, in eval mode (learned thresholds for MC/FC, adaptive stopping for MP-SAE)."""
    hook: str
    """The hook the SAE reads."""
    contexts: EvalContexts
    """Held-out contexts; `keep` marks the positions the SAE reads."""
    x: Tensor
    """[n_kept, d_in] clean activations at the kept positions, row-major over `contexts` (fp32, CPU)."""
    grad: Tensor | None
    """[n_kept, d_in] ∂CE/∂x at the same positions when the SAE reads gradients (g-SAE), else None."""
    lm_batch_size: int = 16
    """Contexts per LM forward pass."""
    seed: int = 0
    """Seed of every random choice a measurement makes (splits, feature samples)."""

    def batches(self) -> Iterator[tuple[EvalContexts, slice]]:
        """LM batches of contexts, each with the slice of `x`/`grad` rows at its kept positions."""
        start = 0
        for batch in self.contexts.batches(self.lm_batch_size):
            yield batch, slice(start, start + batch.n_kept)
            start += batch.n_kept

    @torch.no_grad()
    def encode(self, x: Tensor | None = None, grad: Tensor | None = None, max_cells: int = 1 << 25) -> tuple[Tensor, Tensor]:
        """(x̂ [n, d_in], L0 per row [n]) of `x` (default: all of self.x, with self.grad), in chunks of at most
        `max_cells` code entries (dense rules materialise [chunk, d_sae]), on the SAE's device."""
        if x is None:
            x, grad = self.x, self.grad
        device = self.sae.W_dec.device
        chunk = max(1, max_cells // self.sae.cfg.d_sae)
        x_hat, l0 = [], []
        for i in range(0, len(x), chunk):
            g = None if grad is None else grad[i : i + chunk].to(device)
            out = self.sae(x[i : i + chunk].to(device), grad=g)
            x_hat.append(out.x_hat.float().cpu())
            l0.append(out.codes.l0().cpu())
        return torch.cat(x_hat), torch.cat(l0)


@dataclass
class Section:
    """One measurement's results."""

    metrics: dict[str, Any]
    """JSON-serialisable numbers, lists and strings."""
    figures: dict[str, Any] = field(default_factory=dict)
    """plotly Figures by name (written as HTML, and PNG where a renderer is available)."""
    lines: list[str] = field(default_factory=list)
    """A few plain-text lines for the stdout summary of `sae-kit eval`."""


def prepare(model, sae: SAE, n_tokens: int, *, hook: str | None = None, corpus: str | None = None, context_size: int | None = None,
            lm_batch_size: int = 16, seed: int = 0) -> EvalInputs:
    """Held-out contexts and the clean activations (and gradients, for g-SAE) at the SAE's hook."""
    cfg = harvest_config_for(sae, hook=hook, corpus=corpus, context_size=context_size, lm_batch_size=lm_batch_size)
    check_pair(model, sae, cfg.hook[0])
    ctxs = heldout_contexts(model, cfg, n_tokens)
    x, grad = activations(model, sae, cfg.hook[0], ctxs, lm_batch_size, cfg)
    return EvalInputs(model, sae.eval(), cfg.hook[0], ctxs, x, grad, lm_batch_size, seed)


def activations(model, sae: SAE, hook: str, ctxs: EvalContexts, lm_batch_size: int, cfg: HarvestConfig) -> tuple[Tensor, Tensor | None]:
    """The clean activations [n_kept, d_in] at `hook` on the kept positions of `ctxs` (row-major, fp32, CPU), and
    ∂CE/∂x at the same positions when the SAE reads gradients (g-SAE), else None."""
    stop = stop_layer(model, [hook])
    xs, gs = [], []
    grad_harvester = harvester_for(model, cfg, with_grads=True) if sae.sparsifier.uses_grad else None
    for batch in ctxs.batches(lm_batch_size):
        if grad_harvester is None:
            _, acts = run_lm(model, batch.tokens, hook, capture=True, stop_at_layer=stop)
        else:
            acts_by_hook, grads = grad_harvester.run(batch.tokens, batch.pad)
            acts = acts_by_hook[hook]
            gs.append(grads[hook][batch.keep.to(grads[hook].device)].float().cpu())
        xs.append(acts[batch.keep.to(acts.device)].float().cpu())
    return torch.cat(xs), torch.cat(gs) if gs else None
