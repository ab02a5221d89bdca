"""Attention SAEs (Kissane et al. 2024): for an SAE on `blocks.L.attn.hook_z`, which heads each feature writes from.

hook_z holds the per-head mixed values [pos, n_heads, d_head] before W_O; the SAE reads them flattened (head-major) to
n_heads·d_head, and sae_kit.heldout.run_lm splices x̂ back through the same reshape, so the core metrics' CE passes work unchanged.
Head attribution (weight-based): w_{i,h} = ||W_dec[i, h, :]|| / Σ_h' ||W_dec[i, h', :]||, with W_dec's row i viewed as
[n_heads, d_head]. A feature "belongs" to a head when most of its decoder norm sits there.
"""

from __future__ import annotations

from typing import Any

import plotly.graph_objects as go
import torch
from torch import Tensor

from sae_kit.eval.inputs import EvalError, EvalInputs, Section


def is_attention_hook(hook: str) -> bool:
    """Whether `hook` is an attention hook_z (the per-head mixed values)."""
    return hook.endswith("attn.hook_z")


def head_attribution(W_dec: Tensor, n_heads: int) -> Tensor:
    """[d_sae, n_heads]: each feature's share of decoder norm per head (rows sum to 1)."""
    d_sae, d_in = W_dec.shape
    if d_in % n_heads:
        raise EvalError(f"the SAE's d_in {d_in} is not a multiple of n_heads {n_heads}; it does not read a hook_z")
    norms = W_dec.detach().float().reshape(d_sae, n_heads, d_in // n_heads).norm(dim=-1)
    return norms / norms.sum(-1, keepdim=True).clamp_min(1e-12)


def measure(inputs: EvalInputs, top: int = 10) -> Section:
    """Per-head attribution of every feature, per-head feature counts and each head's `top` features."""
    if not is_attention_hook(inputs.hook):
        raise EvalError(f"attention attribution needs an SAE on blocks.L.attn.hook_z, not {inputs.hook}")
    n_heads = int(inputs.model.cfg.n_heads)
    attribution = head_attribution(inputs.sae.W_dec, n_heads)
    main_head = attribution.argmax(-1)
    main_share = attribution.max(-1).values
    per_head = torch.bincount(main_head, minlength=n_heads)
    k = min(top, attribution.shape[0])
    top_features = attribution.topk(k, dim=0)
    metrics: dict[str, Any] = {
        "n_heads": n_heads,
        "d_head": inputs.sae.cfg.d_in // n_heads,
        "features_per_head": per_head.tolist(),
        "mean_attribution_per_head": attribution.mean(0).tolist(),
        "frac_single_head_features": float((main_share > 0.5).float().mean()),
        "mean_main_head_share": float(main_share.mean()),
        "top_features_per_head": [
            [
                {"feature": int(f), "share": float(s)}
                for f, s in zip(top_features.indices[:, h], top_features.values[:, h])
            ]
            for h in range(n_heads)
        ],
    }
    fig = go.Figure(go.Bar(x=[f"head {h}" for h in range(n_heads)], y=per_head.tolist()))
    fig.update_layout(title=f"{inputs.hook}: features by main head", yaxis_title="features", xaxis_title="head")
    share = go.Figure(go.Histogram(x=main_share.tolist(), nbinsx=40))
    share.update_layout(
        title="share of decoder norm on the feature's main head", xaxis_title="share", yaxis_title="features"
    )
    line = (
        f"attention: {100 * metrics['frac_single_head_features']:.0f}% of features put > 50% of their decoder norm on one head; "
        f"features per head {per_head.tolist()}"
    )
    return Section(metrics, {"features_per_head": fig, "main_head_share": share}, [line])
