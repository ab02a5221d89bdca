"""MP-SAE (Costa et al. 2025): no encoder matrix; greedy matching pursuit over the tied, unit-norm dictionary W_dec."""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

import torch
from torch import Tensor

from sae_kit.sparsifiers.base import Codes, Sparsifier

if TYPE_CHECKING:
    from sae_kit.sae import SAE


class MatchingPursuit(Sparsifier):
    """r⁰ = x − b_dec; each step picks j = argmax ReLU(r·W_decᵀ) (argmax |·| with cfg.mp_signed), adds
    a = ReLU(d_j·r) (signed: d_j·r) to f_j and sets r ← r − a·d_j. The index is chosen without gradient; the
    coefficient and the residual chain are differentiable into W_dec and b_dec.

    Training mode runs exactly k steps. Eval mode runs cfg.mp_max_steps (default k) and stops a token early once
    ||r||/||x − b_dec|| < cfg.mp_stop_residual or (cfg.mp_stop_on_same_support) a step adds no new atom; the
    keyword arguments of `forward` override these per call. Codes are one (value, index) slot per step: an atom
    can repeat and stopped tokens carry zeros. With unit-norm atoms ||r|| never increases and each new residual
    is orthogonal to the atom just used (the trainer re-normalises atoms after every optimiser step).
    """

    uses_encoder = False
    config_fields = ("k", "mp_max_steps", "mp_stop_residual", "mp_stop_on_same_support", "mp_signed")

    def pursue(self, W_dec: Tensor, xc: Tensor, steps: int, stop_residual: float = 0.0,
               stop_on_same_support: bool = False) -> Iterator[tuple[Tensor, Tensor, Tensor, Tensor]]:
        """Yield (coefficient [N], atom index [N], residual [N, d], support mask [N, F]) after each step."""
        r = xc
        with torch.no_grad():
            start_norm = xc.norm(dim=-1)
            running = torch.ones(xc.shape[0], dtype=torch.bool, device=xc.device)
            support = torch.zeros(xc.shape[0], W_dec.shape[0], dtype=torch.bool, device=xc.device)
        for _ in range(steps):
            with torch.no_grad():
                corr = r.detach() @ W_dec.detach().t()
                # argmax of the raw correlations: it differs from argmax ReLU(·) only when every correlation is
                # <= 0, and then the ReLU'd coefficient below is 0 either way.
                j = (corr.abs_() if self.cfg.mp_signed else corr).argmax(-1)
            atom = W_dec[j]
            a = torch.linalg.vecdot(r, atom)
            if not self.cfg.mp_signed:
                a = a.relu()
            a = a * running
            r = r - a[:, None] * atom
            with torch.no_grad():
                picked = a != 0
                new = picked & ~support.gather(1, j[:, None]).squeeze(1)
                support[picked, j[picked]] = True
                if stop_on_same_support:
                    running &= new
                if stop_residual > 0:
                    running &= r.norm(dim=-1) >= stop_residual * start_norm
            yield a, j, r, support
            if not running.any():
                return

    def forward(self, sae: SAE, xc: Tensor, grad: Tensor | None = None, *, max_steps: int | None = None,
                stop_residual: float | None = None, stop_on_same_support: bool | None = None) -> Codes:
        cfg = self.cfg
        if self.training:
            defaults = (cfg.k, 0.0, False)
        else:
            defaults = (cfg.mp_max_steps or cfg.k, cfg.mp_stop_residual, cfg.mp_stop_on_same_support)
        steps = max_steps if max_steps is not None else defaults[0]
        stop_residual = stop_residual if stop_residual is not None else defaults[1]
        stop_on_same_support = stop_on_same_support if stop_on_same_support is not None else defaults[2]
        if steps < 1:
            raise ValueError(f"mpsae: max_steps={steps}; use max_steps >= 1")
        values, indices = [], []
        for a, j, _, _ in self.pursue(sae.W_dec, xc, steps, stop_residual, stop_on_same_support):
            values.append(a)
            indices.append(j)
        return Codes(d_sae=cfg.d_sae, values=torch.stack(values, 1), indices=torch.stack(indices, 1),
                     unique_indices=False)

    @torch.no_grad()
    def curve(self, sae: SAE, xc: Tensor, max_steps: int) -> tuple[Tensor, Tensor]:
        """Mean L0 and FVU after each of `max_steps` pursuit steps (no early stopping), from one pass."""
        total = (xc - xc.mean(0)).square().sum()
        l0, fvu = [], []
        for _, _, r, support in self.pursue(sae.W_dec, xc, max_steps):
            l0.append(support.sum(-1, dtype=torch.float32).mean())
            fvu.append(r.square().sum() / total)
        return torch.stack(l0), torch.stack(fvu)

