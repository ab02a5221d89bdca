"""MP-SAE (Costa et al. 2025): no encoder matrix; greedy matching pursuit over the tied, unit-norm dictionary W_dec."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from sae_kit.sparsifiers.base import Codes, RuleConfig, Sparsifier

if TYPE_CHECKING:
    from sae_kit.sae import SAE


@dataclass
class MPConfig(RuleConfig):
    """MP-SAE settings (cfg.json keys mp_<field>). By default inference runs exactly the training rule (k steps)."""

    flat_prefix = "mp_"

    max_steps: int | None = None
    """Pursuit steps at inference (None = k); training always runs k steps."""
    stop_residual: float = 0.0
    """Inference: stop a token once ||r||/||x − b_dec|| falls below this (0 = off: adaptive stopping is opt-in)."""
    stop_on_same_support: bool = False
    """Inference: stop a token when a step adds no new atom (adaptive L0; off by default, so inference = training)."""
    signed: bool = False
    """Select by |r·W_decᵀ| with signed coefficients instead of the authors' ReLU rule."""

    def check(self) -> None:
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or self.max_steps < 1):
            self.fail("max_steps", self.max_steps, "use None (= k) or an integer >= 1")
        if not 0 <= self.stop_residual < 1:
            self.fail("stop_residual", self.stop_residual, "use a relative residual norm in [0, 1)")


class MatchingPursuit(Sparsifier):
    """r⁰ = x − b_dec; each step picks j = argmax ReLU(r·W_decᵀ) (argmax |·| with cfg.mp_signed), adds
    a = ReLU(d_j·r) (signed: d_j·r) to f_j and sets r ← r − a·d_j. The index is chosen without gradient; the
    coefficient and the residual chain are differentiable into W_dec and b_dec.

    Training mode runs exactly k steps. Eval mode runs `max_steps` (default k) and, only when asked, stops a token
    early once ||r||/||x − b_dec|| < `stop_residual` or (`stop_on_same_support`) a step adds no new atom; the
    keyword arguments of `forward` override these per call. With the defaults, inference is the training rule. Codes are one (value, index) slot per step: an atom
    can repeat and stopped tokens carry zeros. With unit-norm atoms ||r|| never increases and each new residual
    is orthogonal to the atom just used (the trainer re-normalises atoms after every optimiser step).
    """

    Config = MPConfig
    uses_encoder = False
    default_aux = "none"
    saelens_name = "matching_pursuit"

    @property
    def signed(self) -> bool:
        return bool(self.config.signed)

    def pursue(
        self, W_dec: Tensor, xc: Tensor, steps: int, stop_residual: float = 0.0, stop_on_same_support: bool = False
    ) -> Iterator[tuple[Tensor, Tensor, Tensor, Tensor]]:
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
                j = (corr.abs_() if self.signed else corr).argmax(-1)
            atom = W_dec[j]
            a = torch.linalg.vecdot(r, atom)
            if not self.signed:
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

    def forward(
        self,
        sae: SAE,
        xc: Tensor,
        grad: Tensor | None = None,
        *,
        max_steps: int | None = None,
        stop_residual: float | None = None,
        stop_on_same_support: bool | None = None,
    ) -> Codes:
        cfg, rule = self.cfg, self.config
        if self.training:
            defaults = (cfg.k, 0.0, False)
        else:
            defaults = (rule.max_steps or cfg.k, rule.stop_residual, rule.stop_on_same_support)
        steps = max_steps if max_steps is not None else defaults[0]
        stop_residual = stop_residual if stop_residual is not None else defaults[1]
        stop_on_same_support = stop_on_same_support if stop_on_same_support is not None else defaults[2]
        if steps < 1:
            raise ValueError(f"mpsae: max_steps={steps}; use max_steps >= 1")
        values, indices = [], []
        for a, j, _, _ in self.pursue(sae.W_dec, xc, steps, stop_residual, stop_on_same_support):
            values.append(a)
            indices.append(j)
        return Codes(
            d_sae=cfg.d_sae,
            values=torch.stack(values, 1),
            indices=torch.stack(indices, 1),
            unique_indices=False,
            signed=self.signed,
        )

    @torch.no_grad()
    def eval_metrics(
        self,
        sae: SAE,
        x: Tensor,
        grad: Tensor | None = None,
        *,
        curve_steps: int | None = None,
        curve_tokens: int = 4096,
        seed: int = 0,
        max_cells: int = 1 << 25,
        **settings: Any,
    ) -> dict[str, Any]:
        """The adaptive-inference curve: mean L0 and FVU after each of `curve_steps` (default 2k) pursuit steps, without
        early stopping, on a seeded sample of `curve_tokens` rows (in chunks of at most `max_cells` correlations):
        mp_curve_l0 / mp_curve_fvu, and mp_fvu_at_k, the curve at the trained k."""
        steps = curve_steps or 2 * self.cfg.k  # None from eval's settings: twice the trained k
        generator = torch.Generator().manual_seed(seed)
        sample = x[torch.randperm(len(x), generator=generator)[:curve_tokens]].to(sae.W_dec.device, sae.W_dec.dtype)
        xc = sample - sae.b_dec
        total = (xc - xc.mean(0)).double().square().sum()
        chunk = max(1, max_cells // self.cfg.d_sae)
        l0 = torch.zeros(steps, dtype=torch.float64)
        err = torch.zeros(steps, dtype=torch.float64)
        for i in range(0, len(xc), chunk):  # no stopping rule: every chunk runs all `steps`
            for step, (_, _, r, support) in enumerate(self.pursue(sae.W_dec, xc[i : i + chunk], steps)):
                l0[step] += support.sum(dtype=torch.float64).cpu()
                err[step] += r.double().square().sum().cpu()
        fvu = (err / total.cpu()).tolist()
        l0_mean = (l0 / len(xc)).tolist()
        k = self.cfg.k
        return {
            "mp_curve_tokens": len(xc),
            "mp_curve_l0": l0_mean,
            "mp_curve_fvu": fvu,
            "mp_fvu_at_k": fvu[k - 1] if len(fvu) >= k else None,
        }
