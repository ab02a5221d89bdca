"""Dead and dense latents: how often each latent fires on the held-out tokens, next to what training recorded.

Metrics (density = fraction of the eval tokens, the rows of `inputs.x`, on which a latent's code is nonzero, in eval
mode; g-SAE with its real gradients):
- `tokens`, `d_sae`; `dead_count`, `dead_frac` (density 0 on the eval tokens), `dead_detection_floor` (= 1/tokens, the
  lowest nonzero density these tokens can show: "dead" means rarer than about that), `alive_frac` (= 1 − dead_frac,
  SAEBench `frac_alive`); `dense_frac_1pct`, `dense_frac_10pct` (density > 1%, > 10%: SAEBench
  `freq_over_1_percent`, `freq_over_10_percent`); `density_mean`, `density_median` over latents.
- `log10_density_edges`/`log10_density_counts`: latents per quarter-decade bin [edge_i, edge_i+1) of log10 density;
  dead latents (log10 0 = −inf) are not in the bins but in `dead_count`.
- `latent_density`: the per-latent densities as a list (for the browser) when d_sae <= 65536, else None (the
  report stays small; recompute from the SAE when needed).
- Training (None when the SAE does not carry them): `training_dead_latents` and `training_dead_frac` (the trainer's
  "no firing in the dead window" count, metadata["training_dead_latents"]), `training_tokens`; from `sae.sparsity`
  (training log10 densities) `training_log10_density_edges`/`_counts` and `training_never_fired` (latents at the
  1e-10 floor that sae-kit's trainer and SAELens write for a latent that never fired).

The counts come from the evaluation's one encoding pass (EvalInputs.encoded, sae_kit.heldout.encode: bounded
chunks, only per-latent counts kept), so a 16k-latent SAE on 100k tokens never holds the dense [tokens, d_sae] code.
"""

from __future__ import annotations

import math
from typing import Any

import plotly.graph_objects as go
import torch
from torch import Tensor

from sae_kit.eval.core import check_grads
from sae_kit.eval.inputs import EvalInputs, Section

MAX_LISTED_LATENTS = 65536
BIN_WIDTH = 0.25
"""Histogram bin width in decades of density."""
TRAINING_FLOOR = -10 + 1e-3
"""log10 training densities at or below this are the 1e-10 floor of a latent that never fired."""


def measure(inputs: EvalInputs) -> Section:
    """Per-latent density on the eval tokens, dead and dense fractions, and the training-time dead count."""
    check_grads(inputs)
    n = len(inputs.x)
    density = inputs.encoded().counts.double() / max(n, 1)
    d_sae = len(density)
    dead = int((density == 0).sum())
    metrics: dict[str, Any] = {
        "tokens": n,
        "d_sae": d_sae,
        "dead_count": dead,
        "dead_frac": dead / d_sae,
        "dead_detection_floor": 1 / max(n, 1),
        "alive_frac": 1 - dead / d_sae,
        "dense_frac_1pct": float((density > 0.01).double().mean()),
        "dense_frac_10pct": float((density > 0.1).double().mean()),
        "density_mean": float(density.mean()),
        "density_median": float(density.median()),
    }
    metrics |= prefixed("log10_density", log10_histogram(density.log10(), -math.inf))
    metrics["latent_density"] = density.tolist() if d_sae <= MAX_LISTED_LATENTS else None
    metrics |= training_stats(inputs)
    return Section(metrics, {"log10_density": density_figure(metrics)}, summary_lines(metrics))


def log10_histogram(log_density: Tensor, floor: float) -> dict[str, Any]:
    """Latents per BIN_WIDTH-decade bin of the log10 densities above `floor`, and how many sit at or below it."""
    live = log_density[log_density > floor].double()
    out: dict[str, Any] = {"edges": [], "counts": [], "zero": len(log_density) - len(live)}
    if len(live):
        lo = math.floor(float(live.min()) / BIN_WIDTH)
        hi = max(math.floor(float(live.max()) / BIN_WIDTH) + 1, lo + 1)
        counts = torch.bincount((live / BIN_WIDTH).floor().long() - lo, minlength=hi - lo)
        out["edges"] = [round(i * BIN_WIDTH, 6) for i in range(lo, hi + 1)]
        out["counts"] = counts.tolist()
    return out


def prefixed(name: str, hist: dict[str, Any]) -> dict[str, Any]:
    """Histogram keys as flat metrics: NAME_edges, NAME_counts (the zero count is reported by the caller)."""
    return {f"{name}_edges": hist["edges"], f"{name}_counts": hist["counts"]}


def training_stats(inputs: EvalInputs) -> dict[str, Any]:
    """The training-time dead count (metadata) and densities (sae.sparsity), None where the SAE lacks them."""
    sae = inputs.sae
    meta = sae.cfg.metadata
    dead = meta.get("training_dead_latents")
    out: dict[str, Any] = {
        "training_dead_latents": dead,
        "training_dead_frac": None if dead is None else dead / sae.cfg.d_sae,
        "training_tokens": meta.get("training_tokens"),
        "training_log10_density_edges": None,
        "training_log10_density_counts": None,
        "training_never_fired": None,
    }
    if sae.sparsity is not None:
        hist = log10_histogram(sae.sparsity.float().cpu(), TRAINING_FLOOR)
        out |= prefixed("training_log10_density", hist) | {"training_never_fired": hist["zero"]}
    return out


def density_figure(m: dict[str, Any]) -> go.Figure:
    """Latents per log10-density bin on the eval tokens (and in training, when known); dead ones in the title."""
    fig = go.Figure()
    for prefix, label in (("", "eval"), ("training_", "training")):
        edges, counts = m[f"{prefix}log10_density_edges"], m[f"{prefix}log10_density_counts"]
        if counts:
            fig.add_trace(
                go.Bar(x=[e + BIN_WIDTH / 2 for e in edges[:-1]], y=counts, width=BIN_WIDTH, name=label, opacity=0.7)
            )
    title = f"Latent density: {m['dead_count']} of {m['d_sae']} dead on {m['tokens']} eval tokens"
    if m["training_dead_latents"] is not None:
        title += f", {m['training_dead_latents']} dead in training"
    fig.update_layout(
        title=title, xaxis_title="log10 density (fraction of tokens firing)", yaxis_title="latents", barmode="overlay"
    )
    return fig


def summary_lines(m: dict[str, Any]) -> list[str]:
    """Two short lines for stdout."""
    training = "" if m["training_dead_frac"] is None else f" (training {100 * m['training_dead_frac']:.1f}%)"
    return [
        f"dead: {100 * m['dead_frac']:.1f}% dead on {m['tokens']} eval tokens (density below the detection floor "
        f"{m['dead_detection_floor']:.1e}){training}; "
        f"dense {100 * m['dense_frac_1pct']:.1f}% >1%, {100 * m['dense_frac_10pct']:.1f}% >10%",
        f"dead: latent density mean {m['density_mean']:.2e}, median {m['density_median']:.2e}",
    ]
