"""Bidirectional features (AbsTopK, Zhu et al. 2025): how many features of a signed SAE use both signs of their code.

An AbsTopK latent keeps the sign of its pre-activation, so one atom d_i can stand for two opposite poles: +|f|·d_i and
−|f|·d_i. On the eval tokens, per live feature i, n⁺_i and n⁻_i count its positive and negative firings and m⁺_i, m⁻_i
are its largest activation of each sign (in absolute value). A feature is **bidirectional** when both signs are
substantial (our choice of "substantial", since the paper does not define it by a rule we can apply to any SAE):

    min(n⁺_i, n⁻_i) ≥ `min_share` · (n⁺_i + n⁻_i)   and   min(m⁺_i, m⁻_i) ≥ `min_share` · max(m⁺_i, m⁻_i)

i.e. each sign takes at least 10% of its firings and reaches at least 10% of the other sign's peak. An unsigned rule
(TopK, ReLU, JumpReLU, the batch rules) has no negative codes, so its share is 0 by construction; the section runs for
the rules that say they are signed (`Sparsifier.signed`).
"""

from __future__ import annotations

from typing import Any

import plotly.graph_objects as go
import torch

from sae_kit.eval.inputs import EvalInputs, Section
from sae_kit.heldout import encode_chunks

MIN_SHARE = 0.1
"""Each sign's least share of a bidirectional feature's firings and of its peak |activation|."""


def applies(inputs: EvalInputs) -> bool:
    """Whether the SAE's codes can be negative (ask the rule)."""
    return bool(inputs.sae.sparsifier.signed)


def sign_stats(inputs: EvalInputs) -> dict[str, torch.Tensor]:
    """Per latent: positive and negative firing counts and peaks [d_sae] over every row of inputs.x (eval mode)."""
    d_sae = inputs.sae.cfg.d_sae
    out = {name: torch.zeros(d_sae, dtype=torch.float64) for name in ("n_pos", "n_neg", "max_pos", "max_neg")}
    with torch.no_grad():
        for _, codes in encode_chunks(inputs.sae, inputs.x, inputs.grad):
            _, lat, val = codes.nonzeros()
            lat, val = lat.cpu(), val.double().cpu()
            pos = val > 0
            out["n_pos"].index_add_(0, lat[pos], torch.ones_like(val[pos]))
            out["n_neg"].index_add_(0, lat[~pos], torch.ones_like(val[~pos]))
            out["max_pos"].scatter_reduce_(0, lat[pos], val[pos], "amax")
            out["max_neg"].scatter_reduce_(0, lat[~pos], -val[~pos], "amax")
    return out


def measure(inputs: EvalInputs, min_share: float = MIN_SHARE) -> Section:
    """The share of live features that are bidirectional, each sign's share of the firings, and a histogram."""
    s = sign_stats(inputs)
    n = s["n_pos"] + s["n_neg"]
    live = n > 0
    neg_share = torch.where(live, s["n_neg"] / n.clamp_min(1), torch.zeros_like(n))
    peak_ratio = torch.minimum(s["max_pos"], s["max_neg"]) / torch.maximum(s["max_pos"], s["max_neg"]).clamp_min(1e-30)
    both = live & (torch.minimum(s["n_pos"], s["n_neg"]) >= min_share * n) & (peak_ratio >= min_share)
    n_live = int(live.sum())
    metrics: dict[str, Any] = {
        "min_share": min_share,
        "live_features": n_live,
        "bidirectional_count": int(both.sum()),
        "bidirectional_frac": float(both.sum()) / max(n_live, 1),
        "negative_firing_frac": float(s["n_neg"].sum() / n.sum().clamp_min(1)),
        "any_negative_frac": float(((s["n_neg"] > 0) & live).sum()) / max(n_live, 1),
        "bidirectional_features": both.nonzero().squeeze(1)[:64].tolist(),
    }
    fig = go.Figure(go.Histogram(x=neg_share[live].tolist(), nbinsx=50))
    fig.update_layout(
        title="share of each live feature's firings that are negative",
        xaxis_title="negative share of firings",
        yaxis_title="features",
    )
    line = (
        f"signs: {100 * metrics['bidirectional_frac']:.1f}% of {n_live:,} live features are bidirectional (each sign "
        f"≥ {100 * min_share:.0f}% of firings and of the peak); {100 * metrics['negative_firing_frac']:.1f}% of firings are negative"
    )
    return Section(metrics, {"negative_share": fig}, [line])
