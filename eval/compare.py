"""Side-by-side comparison of SAEs evaluated on the same tokens: one table and the Pareto plots (L0 vs FVU, L0 vs CE
recovered, dead % per SAE)."""

from __future__ import annotations

from typing import Any

import plotly.graph_objects as go

from sae_kit.eval.inputs import Section

COLUMNS = (  # (column, section, metric)
    ("l0", "core", "l0_mean"),
    ("fvu", "core", "fvu"),
    ("ce_loss_recovered", "core", "ce_loss_recovered"),
    ("delta_ce", "core", "delta_ce"),
    ("kl", "core", "kl_spliced"),
    ("dead_frac", "dead", "dead_frac"),
    ("dense_frac_1pct", "dead", "dense_frac_1pct"),
    ("dark_matter_norm_r2", "dark_matter", "norm_r2"),
    ("dark_matter_vector_r2", "dark_matter", "vector_r2"),
    ("steering_score", "steering", "score"),
    ("bidirectional_frac", "signs", "bidirectional_frac"),
)


def row(sae: dict[str, Any]) -> dict[str, Any]:
    """One SAE's table row from its report entry (None where a section was not run)."""
    out = {key: sae[key] for key in ("name", "architecture", "d_sae", "k")}
    for column, section, metric in COLUMNS:
        out[column] = sae["sections"].get(section, {}).get(metric)
    return out


def _fmt(value: Any, width: int) -> str:
    if value is None:
        return f"{'-':>{width}}"
    return f"{value:>{width}.4g}" if isinstance(value, float) else f"{value!s:>{width}}"


def table_text(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of the rows (the stdout comparison)."""
    columns = (
        "d_sae",
        "k",
        "l0",
        "fvu",
        "ce_loss_recovered",
        "delta_ce",
        "kl",
        "dead_frac",
        "dark_matter_norm_r2",
        "steering_score",
    )
    names = ("d_sae", "k", "L0", "FVU", "CE rec.", "ΔCE", "KL", "dead", "DM norm R²", "steer")
    width = max(12, *(len(r["name"]) for r in rows))
    lines = [f"{'SAE':<{width}}" + "".join(f"{n:>11}" for n in names)]
    for r in rows:
        lines.append(f"{r['name']:<{width}}" + "".join(_fmt(r[c], 11) for c in columns))
    return "\n".join(lines)


def _scatter(rows: list[dict[str, Any]], y: str, title: str, y_title: str) -> go.Figure:
    points = [r for r in rows if r["l0"] is not None and r[y] is not None]
    fig = go.Figure()
    for arch in dict.fromkeys(r["architecture"] for r in points):
        mine = [r for r in points if r["architecture"] == arch]
        fig.add_trace(
            go.Scatter(
                x=[r["l0"] for r in mine],
                y=[r[y] for r in mine],
                mode="markers+text",
                name=arch,
                text=[r["name"] for r in mine],
                textposition="top center",
            )
        )
    fig.update_layout(title=title, xaxis_title="L0 (mean active latents per token)", yaxis_title=y_title)
    return fig


def compare(saes: list[dict[str, Any]]) -> Section:
    """The comparison section over report entries of SAEs evaluated on the same tokens."""
    rows = [row(s) for s in saes]
    dead = go.Figure(go.Bar(x=[r["name"] for r in rows], y=[100 * (r["dead_frac"] or 0) for r in rows]))
    dead.update_layout(title="dead latents on the eval tokens", yaxis_title="dead %")
    figures = {
        "pareto_l0_fvu": _scatter(rows, "fvu", "L0 vs FVU (lower-left is better)", "FVU"),
        "pareto_l0_ce_recovered": _scatter(
            rows, "ce_loss_recovered", "L0 vs CE loss recovered (upper-left is better)", "CE loss recovered"
        ),
        "dead_per_sae": dead,
    }
    return Section({"table": rows}, figures, [table_text(rows)])
