"""The browser's pages. `main()` is the whole Streamlit script (dashboards/app.py calls it on every rerun).

Navigation state lives in st.session_state ("page", "fid": the open feature, "sae") and is mirrored into the URL
query string, so `?page=Feature&feature=123` opens a feature directly. Every page shows a one-line explanation
instead of a traceback when what it needs is missing or damaged.

Autointerp results (<index>/autointerp, see sae_kit.autointerp.store) show on the Overview (counts, score
distributions), the Feature list (explanation and score columns, search, score filter), the Feature page (explanation,
scores, the judge's answers) and Compare (two SAEs' score distributions), wherever they exist.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from sae_kit.autointerp.store import EXPLAIN_META, HEADLINE, SCORE_META, SCORERS, Results, distribution
from sae_kit.dashboards.render import STYLE, contexts_html, plain, tokens_html
from sae_kit.dashboards.store import FeatureIndex
from sae_kit.dashboards.workspace import AUTOINTERP_TABLES, ROOT_ENV, BrowseError, Entry, Evaluated, Workspace
from sae_kit.errors import SaeKitError

PAGES = ("Overview", "Features", "Feature", "Prompt", "Steering", "Compare")
PAGE_SIZE = 50
EXAMPLE_PROMPT = "The meeting is on Thursday at noon.\nBring the report, and don't forget the coffee!"


# ------------------------------------------------------------------------------------------------ cached resources
@st.cache_resource(show_spinner=False, max_entries=8)
def _index(path: str, stamp: float) -> FeatureIndex:
    """The opened index (`stamp`, index.json's mtime, is only part of the cache key)."""
    return FeatureIndex(path)


@st.cache_resource(show_spinner="Loading the SAE...", max_entries=4)
def _sae(path: str):
    from sae_kit.sae_io import load_sae

    return load_sae(path)


@st.cache_resource(show_spinner="Loading the language model...", max_entries=1)
def _model(name: str | None):
    from sae_kit.models import load_model

    return load_model(name)


def _stamp(path: Path) -> float:
    """Modification time of a file (0 when missing): part of cache keys, so a rebuilt index or SAE is picked up."""
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def open_index(ws: Workspace, entry: Entry) -> FeatureIndex:
    folder = ws.file(entry.index_dir)
    return _index(str(folder), _stamp(folder / "index.json"))


@st.cache_resource(show_spinner=False, max_entries=8)
def _autointerp(index_dir: str, stamps: tuple[float, ...]) -> Results:
    """The opened autointerp results of an index (`stamps`, the mtimes of its files, are only part of the cache key;
    the object caches the tables it has read)."""
    return Results(index_dir)


def open_autointerp(ws: Workspace, entry: Entry) -> Results | None:
    """The SAE's autointerp results with their tables read, or None when it has neither explanations nor scores. A
    damaged or unreadable file raises a one-line SaeKitError."""
    checked = ws.autointerp(entry)  # every file it may read lies inside the root
    if not (checked.has_explanations or checked.has_scores):
        return None
    stamps = tuple(_stamp(checked.path / name) for name in (EXPLAIN_META, SCORE_META, *AUTOINTERP_TABLES))
    results = _autointerp(str(checked.path.parent), stamps)
    _readable(ws, results, lambda: (results.wide, results.scorers(), results.summary(), results.explain_meta))
    return results


def _readable(ws: Workspace, results: Results, read):
    """read() with anything but a SaeKitError (a table or JSON file of another shape) turned into a one-line one."""
    try:
        return read()
    except SaeKitError:
        raise
    except (KeyError, ValueError, TypeError, AttributeError, IndexError) as err:
        where = results.path.relative_to(ws.root) if results.path.is_relative_to(ws.root) else results.path
        raise BrowseError(
            f"{where} holds autointerp results the browser cannot read ({type(err).__name__}: {str(err)[:80]}); "
            "rerun `sae-kit explain` and `sae-kit score`"
        ) from None


def one_line(err: Exception) -> str:
    return str(err).splitlines()[0] if str(err) else type(err).__name__


# ------------------------------------------------------------------------------------------------ navigation
def go_to(page: str, feature: int | None = None) -> None:
    """A callback: open `page` (and `feature`)."""
    st.session_state["page"] = page
    if feature is not None:
        st.session_state["fid"] = int(feature)


def feature_button(feature: int, label: str, key: str) -> None:
    st.button(label, key=key, on_click=go_to, args=("Feature", feature), help=f"open feature {feature}")


def feature_input(d_sae: int, key: str) -> int:
    """A feature-id input bound to the shared open feature."""
    st.session_state["fid"] = min(max(int(st.session_state.get("fid", 0)), 0), d_sae - 1)
    st.session_state[key] = st.session_state["fid"]
    st.number_input(
        f"Feature id (0–{d_sae - 1})",
        min_value=0,
        max_value=d_sae - 1,
        step=1,
        key=key,
        on_change=lambda: st.session_state.update(fid=int(st.session_state[key])),
    )
    return int(st.session_state["fid"])


def _restore_from_url() -> None:
    """On a session's first run, take page / feature / sae from the query string."""
    if st.session_state.get("_restored"):
        return
    st.session_state["_restored"] = True
    q = st.query_params
    page = q.get("page", "")
    match = [p for p in PAGES if p.lower() == page.lower()]
    st.session_state["page"] = match[0] if match else "Overview"
    if q.get("feature", "").isdigit():
        st.session_state["fid"] = int(q["feature"])
    if q.get("sae"):
        st.session_state["sae_name"] = q["sae"]


# ------------------------------------------------------------------------------------------------ the script
def main() -> None:
    st.set_page_config(page_title="sae-kit feature browser", page_icon="🔎", layout="wide")
    _restore_from_url()
    root = os.environ.get(ROOT_ENV, "")
    try:
        ws = Workspace(root)  # cheap (a few stats), and re-read on every run so new evals and indexes show up
    except SaeKitError as err:
        st.title("sae-kit feature browser")
        st.error(str(err))
        return
    names = [e.name for e in ws.entries]
    if st.session_state.get("sae_name") not in names:
        st.session_state["sae_name"] = names[0]
    with st.sidebar:
        st.markdown(f"**sae-kit** · `{ws.root.name}`")
        if len(names) > 1:
            st.selectbox("SAE", names, key="sae_name")
        st.radio("Page", PAGES, key="page")
    entry = ws.entries[names.index(st.session_state["sae_name"])]
    page = st.session_state["page"]
    st.query_params.update(
        {
            "page": page,
            "sae": entry.name,
            **({"feature": str(st.session_state["fid"])} if "fid" in st.session_state else {}),
        }
    )
    try:
        {
            "Overview": overview,
            "Features": feature_list,
            "Feature": feature_page,
            "Prompt": prompt_explorer,
            "Steering": steering_playground,
            "Compare": compare,
        }[page](ws, entry)
    except (SaeKitError, FileNotFoundError) as err:  # a missing or damaged file of the run: one line, no traceback
        st.error(one_line(err))


# ------------------------------------------------------------------------------------------------ Overview
def overview(ws: Workspace, entry: Entry) -> None:
    cfg = ws.config(entry)
    sae = _sae(str(ws.file(entry.sae_dir))).cfg  # normalised: SAELens and sparsify folders name things differently
    meta = sae.metadata
    heldout = meta.get("heldout") if isinstance(meta.get("heldout"), dict) else {}
    st.title(f"{entry.name}")
    st.caption(
        f"{sae.architecture} SAE · d_sae {sae.d_sae:,} · d_in {sae.d_in} · {meta.get('model_name', '?')} at {meta.get('hook_name', '?')}"
    )
    cols = st.columns(4)
    cols[0].metric("Features", f"{sae.d_sae:,}")
    cols[1].metric("k" if sae.rule.uses_k else "Architecture", sae.k if sae.rule.uses_k else sae.architecture)
    cols[2].metric(
        "Held-out FVU (training run)", f"{heldout['fvu']:.4f}" if isinstance(heldout.get("fvu"), float) else "—"
    )
    cols[3].metric(
        "Trained tokens", f"{meta['training_tokens']:,}" if isinstance(meta.get("training_tokens"), int) else "—"
    )
    with st.expander("Configuration (cfg.json and the run's config.json)"):
        st.json(cfg, expanded=1)

    st.subheader("Training curve")
    rows = [r for r in ws.metrics(entry) if "tokens" in r]
    if rows:
        df = pd.DataFrame(rows)
        choices = [c for c in ("fvu", "loss", "l0", "dead_frac", "aux", "lr") if c in df]
        shown = st.multiselect(
            "Metrics", choices, default=[c for c in ("fvu", "l0") if c in choices], key="curve_metrics"
        )
        for name in shown:
            st.plotly_chart(
                go.Figure(go.Scatter(x=df["tokens"], y=df[name], mode="lines", name=name)).update_layout(
                    height=240, margin=dict(t=30, b=30), title=name, xaxis_title="tokens"
                ),
                key=f"curve-{name}",
            )
    else:
        st.info("No training log (metrics.jsonl) in this run.")

    st.subheader("Evaluation")
    ev = ws.evaluation_of(entry)
    if ev is None:
        st.info(f"No eval report for this SAE yet. Run: `sae-kit eval {entry.run_dir}`")
    else:
        _eval_summary(ws, ev)

    _index_summary(ws, entry)
    _autointerp_summary(ws, entry, sae.d_sae)


def _index_summary(ws: Workspace, entry: Entry) -> None:
    st.subheader("Feature index")
    try:
        index = open_index(ws, entry)
    except SaeKitError as err:
        st.info(str(err))
        return
    m = index.meta
    s = index.summary
    dead = int((s["count"] == 0).sum())
    cols = st.columns(4)
    cols[0].metric("Indexed tokens", f"{m['tokens']:,}")
    cols[1].metric("Never fired", f"{dead:,} ({100 * dead / index.d_sae:.1f}%)")
    cols[2].metric("Median density", f"{float(np.median(s['density'])):.2e}")
    cols[3].metric("Index throughput", f"{m['throughput']['tokens_per_s']:,} tok/s")
    if m.get("sae", {}).get("sha256") and _changed(ws, entry, m["sae"]["sha256"]):
        st.warning(f"The SAE changed since it was indexed; rebuild: `sae-kit index {entry.run_dir} --force`")
    alive = s["density"][s["count"] > 0]
    st.plotly_chart(
        go.Figure(go.Histogram(x=np.log10(alive), nbinsx=60)).update_layout(
            height=260,
            margin=dict(t=30, b=30),
            title="Feature density on the indexed tokens",
            xaxis_title="log10 density",
        ),
        key="density-hist",
    )


def _autointerp_summary(ws: Workspace, entry: Entry, d_sae: int) -> None:
    st.subheader("Interpretability (autointerp)")
    try:
        results = open_autointerp(ws, entry)
        if results is None:
            st.info(
                f"No autointerp results for this SAE yet. Run: `sae-kit explain {entry.run_dir}`, "
                f"then `sae-kit score {entry.run_dir}`"
            )
        else:
            index_sha = _index_sha(ws, entry)
            _readable(ws, results, lambda: _results_summary(entry, results, d_sae, index_sha))
    except SaeKitError as err:
        st.error(one_line(err))


def _results_summary(entry: Entry, results: Results, d_sae: int, index_sha: str | None) -> None:
    explained_with = _identity(results.explain_meta).get("sae_sha256")
    if index_sha and explained_with and explained_with != index_sha:
        st.warning(
            f"The SAE was reindexed or changed since it was explained; redo: `sae-kit explain {entry.run_dir} --force`"
        )
    explained = results.explanations
    n_ok = int(explained["ok"].sum())
    dists = _distributions(results)
    cols = st.columns(4)
    cols[0].metric(
        "Explained features",
        f"{n_ok:,}",
        help=f"{len(explained):,} of the SAE's {d_sae:,} features were sent to the explainer",
    )
    cols[1].metric(
        "Parse failures", f"{len(explained) - n_ok:,}", help="explainer answers no explanation could be read from"
    )
    if dists:  # a row of their own: "0.812 ± 0.104" is too wide for a quarter of the page
        for col, (scorer, d) in zip(st.columns(max(3, len(dists))), dists.items()):
            col.metric(f"{scorer} score", _mean_std(d), help=_dist_help(scorer, d, results))
    caption = _meta_caption(results)
    if caption:
        st.caption(caption)
    if not dists:
        st.info(f"The explanations are not scored yet. Run: `sae-kit score {entry.run_dir}`")
        return
    st.plotly_chart(_score_histogram(dists, "Per-feature scores (balanced accuracy; 0.5 is chance)"), key="ai-hist")


def _index_sha(ws: Workspace, entry: Entry) -> str | None:
    """The SAE digest the feature index records (None without a readable index)."""
    try:
        sha = open_index(ws, entry).meta.get("sae", {}).get("sha256")
    except SaeKitError:
        return None
    return sha if isinstance(sha, str) else None


SCORER_COLOURS = {"detection": "#2f6fff", "fuzz": "#ff8000", "intervention": "#2ca02c"}


def _valid_distribution(d: Any) -> bool:
    if not isinstance(d, dict):
        return False
    edges, counts = d.get("hist_edges"), d.get("hist_counts")
    numbers = all(isinstance(d.get(k), (int, float)) for k in ("n", "mean", "median", "std"))
    return numbers and isinstance(edges, list) and isinstance(counts, list) and len(edges) == len(counts) + 1 > 1


def _distributions(results: Results) -> dict[str, dict[str, Any]]:
    """Each scored scorer's distribution of per-feature balanced accuracy (SCORERS order): score.json's summary, else
    (missing or malformed) computed from the scores table."""
    summary = results.summary()
    scores = results.scores
    out: dict[str, dict[str, Any]] = {}
    for scorer in results.scorers():
        part = summary.get(scorer) if isinstance(summary, dict) else None
        d: Any = part.get(HEADLINE) if isinstance(part, dict) else None
        out[scorer] = d if _valid_distribution(d) else distribution(scores.loc[scores["scorer"] == scorer, HEADLINE])
    return out


def _auroc_mean(results: Results, scorer: str) -> float:
    part = results.summary().get(scorer)
    d = part.get("auroc") if isinstance(part, dict) else None
    if isinstance(d, dict) and isinstance(d.get("mean"), (int, float)):
        return float(d["mean"])
    values = results.scores.loc[results.scores["scorer"] == scorer, "auroc"].to_numpy(dtype=float)
    return float(np.nanmean(values)) if np.isfinite(values).any() else math.nan


def _fmt(value: Any, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) and math.isfinite(value) else "—"


def _mean_std(d: dict[str, Any]) -> str:
    return f"{_fmt(d['mean'])} ± {_fmt(d['std'])}" if d.get("n") else "—"


def _dist_help(scorer: str, d: dict[str, Any], results: Results) -> str:
    auroc = _auroc_mean(results, scorer)
    return (
        f"mean ± std of the {scorer} judge's balanced accuracy over {d['n']:,} features"
        + (f" ({d['missing']:,} without a score)" if d.get("missing") else "")
        + f"; median {_fmt(d['median'])}"
        + (f", p10–p90 {_fmt(d['p10'])}–{_fmt(d['p90'])}" if "p10" in d and "p90" in d else "")
        + (f"; mean AUROC {_fmt(auroc)}" if math.isfinite(auroc) else "")
    )


def _identity(meta: Any) -> dict[str, Any]:
    """What explain.json / score.json say the results were made from ({} when they say nothing readable)."""
    identity = meta.get("identity") if isinstance(meta, dict) else None
    return identity if isinstance(identity, dict) else {}


def _meta_caption(results: Results) -> str:
    """Who explained and who judged, as explain.json / score.json name them (identity.client.model)."""
    parts = []
    for label, meta in (("explainer", results.explain_meta), ("judge", results.score_meta)):
        client = _identity(meta).get("client")
        model = client.get("model") if isinstance(client, dict) else None
        if isinstance(model, str) and model:
            parts.append(f"{label}: {model}")
    return " · ".join(parts)


def _score_histogram(dists: dict[str, dict[str, Any]], title: str) -> go.Figure:
    """Per-feature score histograms of several scorers, overlaid on [0, 1]."""
    fig = go.Figure()
    for scorer, d in dists.items():
        edges, counts = d["hist_edges"], d["hist_counts"]
        fig.add_trace(
            go.Bar(
                x=[(a + b) / 2 for a, b in zip(edges[:-1], edges[1:])],
                y=counts,
                width=[b - a for a, b in zip(edges[:-1], edges[1:])],
                name=scorer,
                opacity=0.55,
                marker_color=SCORER_COLOURS.get(scorer),
            )
        )
    fig.add_vline(x=0.5, line_dash="dot", line_color="grey")
    return fig.update_layout(
        barmode="overlay",
        height=280,
        margin=dict(t=40, b=30),
        title=title,
        xaxis=dict(title="balanced accuracy per feature", range=[0, 1]),
        yaxis_title="features",
    )


def _changed(ws: Workspace, entry: Entry, digest: str) -> bool:
    sae_dir = ws.file(entry.sae_dir)
    return _digest(str(sae_dir), max(_stamp(f) for f in sae_dir.iterdir())) != digest


@st.cache_resource(show_spinner=False, max_entries=16)
def _digest(sae_dir: str, stamp: float) -> str:
    """SHA-256 of the SAE's files (`stamp`, their newest mtime, is only part of the cache key)."""
    from sae_kit.dashboards.indexer import sae_digest

    return sae_digest(Path(sae_dir))


KEY_METRICS = (
    ("core", "fvu", "FVU"),
    ("core", "l0_mean", "L0"),
    ("core", "ce_loss_recovered", "CE recovered"),
    ("core", "kl_spliced", "KL (spliced)"),
    ("core", "explained_variance", "Explained variance"),
    ("dead", "dead_frac", "Dead fraction"),
    ("dark_matter", "norm_r2", "Dark matter ‖e‖ R²"),
    ("dark_matter", "vector_r2", "Dark matter e R²"),
    ("steering", "score", "Steering score (Δmass at KL ≤ budget)"),
)
FIGURES = (
    ("dead-log10_density", "Feature density"),
    ("core-l0_hist", "L0 per token"),
    ("dark_matter-norm_scatter", "Dark matter: predicted vs actual ‖e‖"),
    ("dark_matter-r2_per_dim", "Dark matter R² per dimension"),
    ("steering-steering_delta_mass", "Steering: Δ target mass"),
    ("steering-steering_kl", "Steering: KL"),
)


def _metrics_of(ev: Evaluated) -> dict[str, float]:
    out = {}
    for section, key, label in KEY_METRICS:
        value = ev.sae.get("sections", {}).get(section, {}).get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[label] = value
    return out


def _eval_summary(ws: Workspace, ev: Evaluated) -> None:
    st.caption(
        f"Report {ev.report_dir.relative_to(ws.root)}/report.json · {ev.report['settings'].get('tokens', '?'):,} held-out tokens · "
        f"created {ev.report.get('created', '?')}"
    )
    metrics = _metrics_of(ev)
    cols = st.columns(min(5, max(1, len(metrics))))
    for i, (label, value) in enumerate(metrics.items()):
        cols[i % len(cols)].metric(label, f"{value:.4g}")
    shown = [(name, title) for name, title in FIGURES if name in ev.sae.get("figures", {})]
    for (name, title), col in zip(shown, st.columns(2) * len(shown)):
        fig = ws.figure(ev, name)
        if fig is not None:
            col.plotly_chart(
                fig.update_layout(height=300, title=title, margin=dict(t=40, b=30)), key=f"eval-{ev.label}-{name}"
            )


# ------------------------------------------------------------------------------------------------ Feature list
SORTS = {
    "density": "density",
    "max activation": "max_act",
    "mean activation": "mean_act",
    "count": "count",
    "feature id": "feature",
}


UNPARSED = "(the explainer's answer could not be parsed)"


def feature_list(ws: Workspace, entry: Entry) -> None:
    index = open_index(ws, entry)
    st.title("Features")
    s = index.summary
    text: pd.Series | None = None  # the explanations the search reads, when there are any
    n_explained, scorers = 0, []
    try:
        results = open_autointerp(ws, entry)
        if results is not None and len(results.wide):
            found = results
            s, text = _readable(ws, found, lambda: _with_autointerp(index.summary, found, found.scorers()))
            n_explained, scorers = int(found.wide["ok"].sum()), found.scorers()
    except SaeKitError as err:  # the list still works without the autointerp columns
        st.error(one_line(err))
    sorts = {**SORTS, **{f"{scorer} score": scorer for scorer in scorers}}
    c1, c2, c3, c4 = st.columns([2, 1, 2, 1])
    sort = c1.selectbox("Sort by", list(sorts), key="list_sort") or "density"
    descending = c2.toggle("Descending", value=True, key="list_desc")
    token = c3.text_input("Token in top contexts or logits", key="list_token", placeholder="e.g. Thursday")
    with c4:
        jump = st.number_input("Jump to id", min_value=0, max_value=index.d_sae - 1, step=1, key="list_jump")
        st.button("Open", key="list_open", on_click=go_to, args=("Feature", int(jump)))
    c1, c2 = st.columns(2)
    lo, hi = c1.slider("log10 density", -7.0, 0.0, (-7.0, 0.0), 0.1, key="list_density")
    min_max = c2.number_input("Min max-activation", value=0.0, key="list_minmax")
    with np.errstate(divide="ignore"):
        log_density = np.log10(s["density"].to_numpy())
    mask = ((log_density >= lo) | (lo <= -7.0)) & (log_density <= hi) & (s["max_act"].to_numpy() >= min_max)
    if text is not None:
        c1, c2, c3 = st.columns([1, 1, 2])
        scorer = c1.selectbox("Scorer", scorers, key="list_scorer", disabled=not scorers) if scorers else None
        min_score = c2.slider("Min score", 0.0, 1.0, 0.0, 0.01, key="list_min_score", disabled=not scorers)
        search = c3.text_input("Search explanations", key="list_search", placeholder="e.g. dates")
        if scorer is not None and min_score > 0:  # features without a score (or explanation) drop out
            mask &= s[scorer].to_numpy(dtype=float) >= min_score
        if search.strip():
            mask &= text.str.contains(search.strip(), case=False, regex=False, na=False).to_numpy()
    if token.strip():
        ids = {i for i, t in enumerate(index.vocab) if t.strip().lower() == token.strip().lower()}
        if not ids:
            st.warning(f"No token of the vocabulary reads {token.strip()!r}")
        mask &= index.with_tokens(ids)
    table = s[mask].sort_values(sorts.get(sort, "density"), ascending=not descending, kind="stable")
    st.caption(
        f"{len(table):,} of {index.d_sae:,} features" + (f" · {n_explained:,} explained" if text is not None else "")
    )
    pages = max(1, -(-len(table) // PAGE_SIZE))
    page = (
        st.number_input(f"Page (of {pages})", min_value=1, max_value=pages, step=1, key="list_page") if pages > 1 else 1
    )
    shown = table.iloc[(page - 1) * PAGE_SIZE : page * PAGE_SIZE].copy()
    top_tokens = index.table["top_token_ids"]
    logit_ids = index.table["logit_pos_ids"]
    shown["top tokens"] = [
        index.token_strings(list(dict.fromkeys(top_tokens[int(i)].as_py()))[:6]) for i in shown["feature"]
    ]
    shown["promoted"] = [index.token_strings(logit_ids[int(i)].as_py()[:6]) for i in shown["feature"]]
    ai_columns = ["explanation", *scorers] if text is not None else []
    event = st.dataframe(
        shown[["feature", *ai_columns, "density", "count", "max_act", "mean_act", "top tokens", "promoted"]],
        column_config={
            "explanation": st.column_config.TextColumn(width="large"),
            **{
                scorer: st.column_config.NumberColumn(
                    f"{scorer} score", help=f"balanced accuracy of the {scorer} judge (0.5 is chance)", format="%.3f"
                )
                for scorer in scorers
            },
        }
        if ai_columns
        else None,
        hide_index=True,
        on_select="rerun",
        selection_mode="single-row",
        key="list_table",
        width="stretch",
    )
    rows = getattr(getattr(event, "selection", None), "rows", [])
    if rows:
        chosen = int(shown.iloc[rows[0]]["feature"])
        st.button(
            f"Open feature {chosen}", key="list_open_selected", on_click=go_to, args=("Feature", chosen), type="primary"
        )


def _with_autointerp(s: pd.DataFrame, results: Results, scorers: list[str]) -> tuple[pd.DataFrame, pd.Series]:
    """The summary table with an `explanation` column and one score column per scorer (a copy), and the explanation
    texts the search reads (null where a feature has none or its answer could not be parsed)."""
    wide = results.wide.drop_duplicates("feature", keep="last").set_index("feature")
    s = s.copy()
    features = s["feature"]
    text = features.map(wide["explanation"].where(wide["ok"].astype(bool)))
    s["explanation"] = text.where(text.notna() | ~features.isin(wide.index), UNPARSED)
    for scorer in scorers:
        s[scorer] = features.map(wide[scorer]).astype(float)
    return s, text


# ------------------------------------------------------------------------------------------------ Feature page
def feature_page(ws: Workspace, entry: Entry) -> None:
    index = open_index(ws, entry)
    c1, c2, c3 = st.columns([3, 1, 1])
    with c1:
        fid = feature_input(index.d_sae, "feature_page_id")
    c2.button("◀ Previous", key="prev", on_click=go_to, args=("Feature", max(fid - 1, 0)), disabled=fid == 0)
    c3.button(
        "Next ▶",
        key="next",
        on_click=go_to,
        args=("Feature", min(fid + 1, index.d_sae - 1)),
        disabled=fid == index.d_sae - 1,
    )
    row = index.feature(fid)
    s = index.summary.iloc[fid]
    st.title(f"Feature {fid}")
    _feature_autointerp(ws, entry, fid)
    cols = st.columns(5 if index.signed else 4)
    cols[0].metric("Density", f"{s['density']:.3e}")
    cols[1].metric("Fires on", f"{int(s['count']):,} tokens")
    cols[2].metric("Max activation", f"{s['max_act']:.3f}")
    cols[3].metric("Mean |activation|", f"{s['mean_act']:.3f}")
    if index.signed:
        cols[4].metric("Min activation", f"{s['min_act']:.3f}")
    if s["count"] == 0:
        st.info(
            f"Feature {fid} never fired on the {index.meta['tokens']:,} indexed tokens; its logit effects and neighbours are below."
        )
    scale = max(abs(float(s["max_act"])), abs(float(s["min_act"])), 1e-6)
    left, right = st.columns([3, 2])
    with left:
        st.subheader("Top activations")
        if row["top"]:
            st.html(contexts_html(row["top"], index.vocab, scale))
        if index.signed:
            st.subheader("Top negative activations")
            st.html(contexts_html(row["top_negative"], index.vocab, scale) if row["top_negative"] else "<p>none</p>")
        if row["quantiles"]:
            st.subheader("Across the activation range")
            for band in sorted({c["band"] for c in row["quantiles"]}, reverse=True):
                st.caption(
                    f"quantile band {band + 1} of {len(row['band_lo'])}: |activation| {row['band_lo'][band]:.3g} – {row['band_hi'][band]:.3g} "
                    "(outlined: the sampled token)"
                )
                st.html(contexts_html([c for c in row["quantiles"] if c["band"] == band], index.vocab, scale))
    with right:
        if s["count"] > 0:
            st.plotly_chart(_histogram(row), key=f"hist-{fid}")
        st.subheader("Logit effects (d·W_U)")
        if index.signed:
            st.caption("For negative activations the roles swap: promoted tokens are suppressed and vice versa.")
        l1, l2 = st.columns(2)
        l1.dataframe(
            _tokens_table(index, row["logit_pos_ids"], row["logit_pos_vals"], "promoted"),
            hide_index=True,
            key="logits_pos",
        )
        l2.dataframe(
            _tokens_table(index, row["logit_neg_ids"], row["logit_neg_vals"], "suppressed"),
            hide_index=True,
            key="logits_neg",
        )
        st.subheader("Nearest decoder directions")
        _feature_links(row["neighbour_ids"], [f"cos {c:.2f}" for c in row["neighbour_cos"]], "nb")
        st.subheader("Co-firing features")
        if row["cofire_ids"]:
            st.caption(
                "Ranked by the Jaccard index of the positions they fire on; the share is P(it fires | this feature fires)."
            )
            _feature_links(
                row["cofire_ids"],
                [f"J {j:.2f} · {100 * f:.0f}%" for j, f in zip(row["cofire_jaccard"], row["cofire_frac"])],
                "co",
            )
        else:
            st.caption("none on the indexed tokens")


MARKDOWN_SPECIAL = set("\\`*_[]<>#|$~:")


def md_escape(text: str) -> str:
    """`text` as literal Markdown (Streamlit's emphasis, links, math, emoji and colour directives escaped), one line."""
    return "".join("\\" + ch if ch in MARKDOWN_SPECIAL else ch for ch in " ".join(text.split()))


def _feature_autointerp(ws: Workspace, entry: Entry, fid: int) -> None:
    """The feature's explanation, its scores, and the judge's answers (or what to run to get them); a damaged or
    unreadable result file is one error line, and the rest of the page still shows."""
    try:
        results = open_autointerp(ws, entry)
        if results is None:
            st.caption(f"no explanation yet: run `sae-kit explain {entry.run_dir}`")
        else:
            _readable(ws, results, lambda: _feature_results(entry, results, fid))
    except SaeKitError as err:
        st.error(one_line(err))


def _feature_results(entry: Entry, results: Results, fid: int) -> None:
    hint = f"no explanation yet: run `sae-kit explain {entry.run_dir}`"
    explained = results.explanations[results.explanations["feature"] == fid]
    if not len(explained):
        st.caption(hint)
        return
    row = explained.iloc[-1]
    if bool(row["ok"]) and isinstance(row["explanation"], str):
        st.markdown(f"**Explanation:** {md_escape(row['explanation'])}")
    else:  # nothing to score either
        st.warning("the explainer's answer could not be parsed")
        with st.expander("The explainer's answer"):
            st.code(row["raw"] if isinstance(row["raw"], str) else "(empty)", language=None, wrap_lines=True)
        return
    scores = results.scores[results.scores["feature"] == fid]
    if not len(scores):
        st.caption(
            f"written from {int(row['n_examples'])} activating contexts · not scored yet: "
            f"run `sae-kit score {entry.run_dir}`"
        )
        return
    cells = []
    for scorer in SCORERS:
        of_scorer = scores[scores["scorer"] == scorer]
        if not len(of_scorer):
            continue
        r = of_scorer.iloc[-1]
        cells.append(
            (
                f"{scorer} score",
                _fmt(r[HEADLINE]),
                f"balanced accuracy of the {scorer} judge (0.5 is chance) on {int(r['n'])} examples: "
                f"{int(r['n_pos'])} positive, {int(r['n_neg'])} negative, {int(r['failures'])} unparsed answers",
            )
        )
        if math.isfinite(float(r["auroc"])):
            cells.append((f"{scorer} AUROC", _fmt(r["auroc"]), f"AUROC of the {scorer} judge's answer probabilities"))
    for col, (label, value, tip) in zip(st.columns(max(4, len(cells))), cells):
        col.metric(label, value, help=tip)
    with st.expander("How the judge scored it"):
        judged = results.predictions(fid)
        if not len(judged):
            st.caption("no judged examples of this feature are stored")
            return
        st.caption(
            "Each example the judge saw: `label` is the truth (the feature fires / the steering is on), "
            "`prediction` the judge's answer (1 yes, 0 no, -1 unparsed), `prob` its probability of yes."
        )
        columns = ["scorer", "kind", "label", "prediction", "prob", "text"]
        st.dataframe(
            judged[[*columns, *(["answer"] if "answer" in judged.columns else [])]],
            hide_index=True,
            key="judge_table",
            width="stretch",
            column_config={"text": st.column_config.TextColumn(width="large")},
        )


def _histogram(row: dict) -> go.Figure:
    counts = row["hist_counts"]
    lo, hi = row["hist_lo"], row["hist_hi"]
    width = (hi - lo) / len(counts) if hi > lo else 1.0
    centres = [lo + (i + 0.5) * width for i in range(len(counts))]
    colours = ["#2f6fff" if c < 0 else "#ff8000" for c in centres]
    return go.Figure(go.Bar(x=centres, y=counts, width=width, marker_color=colours)).update_layout(
        height=260,
        margin=dict(t=40, b=30),
        title="Activation histogram (where it fires)",
        xaxis_title="activation",
        yaxis_title="tokens",
    )


def _tokens_table(index: FeatureIndex, ids: list[int], values: list[float], label: str) -> pd.DataFrame:
    return pd.DataFrame({label: [plain(index.vocab[i]) for i in ids], "logit": [round(v, 3) for v in values]})


def _feature_links(ids: list[int], labels: list[str], key: str) -> None:
    cols = st.columns(2)
    for i, (fid, label) in enumerate(zip(ids, labels)):
        with cols[i % 2]:
            feature_button(fid, f"#{fid} · {label}", key=f"{key}-{i}")


# ------------------------------------------------------------------------------------------------ Prompt explorer
def prompt_explorer(ws: Workspace, entry: Entry) -> None:
    from sae_kit.dashboards.live import encode_prompt

    st.title("Prompt explorer")
    text = st.text_area("Prompt", value=EXAMPLE_PROMPT, key="prompt_text", height=100)
    if not text.strip():
        st.info("Type a prompt to see which features fire on each token.")
        return
    sae = _sae(str(ws.file(entry.sae_dir)))
    model = _model(sae.cfg.metadata.get("model_name"))
    result = encode_prompt(model, sae, text)
    codes = result.codes
    l0 = [int((codes[i] != 0).sum()) for i, read in enumerate(result.read) if read]
    st.caption(
        f"{len(result.tokens)} tokens · mean L0 {sum(l0) / max(len(l0), 1):.1f} on the {len(l0)} positions the SAE reads "
        "(BOS and special tokens are not read)"
    )
    strongest = codes.abs().amax(0)
    top = strongest.topk(min(12, int((strongest > 0).sum()))).indices.tolist() if (strongest > 0).any() else []
    if not top:
        st.warning("No feature fires on this prompt.")
        return
    st.subheader("Strongest features on the prompt")
    st.caption("Pick one to see its activation on every token; the buttons open the feature pages.")
    choice = st.selectbox(
        "Feature", top, format_func=lambda f: f"#{f} (max {float(codes[:, f].abs().max()):.2f})", key="prompt_feature"
    )
    scale = float(codes[:, choice].abs().max())
    st.html(STYLE + tokens_html(result.tokens, codes[:, choice].tolist(), scale, label=f"#{choice}"))
    cols = st.columns(6)
    for i, f in enumerate(top):
        with cols[i % 6]:
            feature_button(f, f"#{f}", key=f"prompt-open-{f}")

    st.subheader("Token by token")
    readable = [i for i, r in enumerate(result.read) if r]
    position = st.select_slider(
        "Token",
        options=readable,
        value=readable[-1] if readable else None,
        format_func=lambda i: f"{i}: {result.tokens[i]!r}",
        key="prompt_position",
    )
    active = codes[position].nonzero().squeeze(1)
    order = active[codes[position, active].abs().argsort(descending=True)].tolist()
    density = _densities(ws, entry)
    table = pd.DataFrame(
        {
            "feature": order,
            "activation": [round(float(codes[position, f]), 3) for f in order],
            **({"density": [float(density[f]) for f in order]} if density is not None else {}),
        }
    )
    st.dataframe(table, hide_index=True, key="prompt_token_table")
    cols = st.columns(6)
    for i, f in enumerate(order[:12]):
        with cols[i % 6]:
            feature_button(f, f"#{f}", key=f"prompt-pos-{f}")


def _densities(ws: Workspace, entry: Entry) -> np.ndarray | None:
    try:
        return open_index(ws, entry).summary["density"].to_numpy()
    except SaeKitError:
        return None


# ------------------------------------------------------------------------------------------------ Steering playground
def steering_playground(ws: Workspace, entry: Entry) -> None:
    from sae_kit.dashboards.live import steered_generation

    st.title("Steering playground")
    sae = _sae(str(ws.file(entry.sae_dir)))
    fid = feature_input(sae.cfg.d_sae, "steer_feature")
    try:
        unit = float(open_index(ws, entry).summary["max_act"].iloc[fid]) or 1.0
        unit_text = f"the feature's max activation on the indexed tokens ({unit:.3g})"
    except SaeKitError:
        unit, unit_text = 1.0, "1 (no index: strengths are absolute)"
    st.caption(
        f"Adds strength × {unit_text} × its decoder direction at the SAE's hook, on every position the SAE reads."
    )
    c1, c2 = st.columns([3, 1])
    alpha = c1.slider("Strength (negative: subtract the direction)", -20.0, 20.0, 4.0, 0.5, key="steer_alpha")
    n_tokens = c2.number_input("Tokens to generate", 1, 128, 24, key="steer_tokens")
    prompt = st.text_input("Prompt", value="My favourite thing to do on the weekend is", key="steer_prompt")
    if st.button("Generate", key="steer_run", type="primary"):
        model = _model(sae.cfg.metadata.get("model_name"))
        plain, steered = steered_generation(model, sae, prompt, fid, alpha, unit, int(n_tokens))
        st.session_state["steer_result"] = (fid, alpha, prompt, plain, steered)
    result = st.session_state.get("steer_result")
    if result:
        f, a, p, plain, steered = result
        left, right = st.columns(2)
        left.markdown("**Without steering**")
        left.code(p + plain, language=None, wrap_lines=True)
        right.markdown(f"**Feature {f} at strength {a:+g}**")
        right.code(p + steered, language=None, wrap_lines=True)


# ------------------------------------------------------------------------------------------------ Compare
def compare(ws: Workspace, entry: Entry) -> None:
    st.title("Compare SAEs")
    st.subheader("Eval reports")
    evals = ws.evaluations()
    if len(evals) < 2:
        st.info(
            "Comparing eval reports needs two evaluated SAEs inside this directory. Run `sae-kit eval` on a sweep, "
            f"or on each run with --out inside {ws.root}."
        )
    else:
        _compare_reports(ws, evals)
    st.subheader("Interpretability (autointerp)")
    _compare_autointerp(ws)


def _compare_reports(ws: Workspace, evals: list[Evaluated]) -> None:
    labels = [e.label for e in evals]
    c1, c2 = st.columns(2)
    a = c1.selectbox("A", labels, index=0, key="cmp_a") or labels[0]
    b = c2.selectbox("B", labels, index=1, key="cmp_b") or labels[1]
    ea, eb = evals[labels.index(a)], evals[labels.index(b)]
    ma, mb = _metrics_of(ea), _metrics_of(eb)
    rows = [
        {"metric": k, "A": ma.get(k), "B": mb.get(k), "B − A": (mb[k] - ma[k]) if k in ma and k in mb else None}
        for k in dict.fromkeys([*ma, *mb])
    ]
    head = {
        "metric": "SAE",
        "A": f"{ea.sae.get('architecture')} d_sae {ea.sae.get('d_sae')} k {ea.sae.get('k')}",
        "B": f"{eb.sae.get('architecture')} d_sae {eb.sae.get('d_sae')} k {eb.sae.get('k')}",
        "B − A": None,
    }
    st.dataframe(pd.DataFrame([head, *rows]).astype(str), hide_index=True, key="cmp_table", width="stretch")
    for name, title in FIGURES:
        figs = [ws.figure(e, name) if name in e.sae.get("figures", {}) else None for e in (ea, eb)]
        if any(f is not None for f in figs):
            st.markdown(f"**{title}**")
            for col, fig, side in zip(st.columns(2), figs, "AB"):
                if fig is None:
                    col.caption(f"{side}: not in its report")
                else:
                    col.plotly_chart(fig.update_layout(height=280, margin=dict(t=30, b=30)), key=f"cmp-{side}-{name}")


def _compare_autointerp(ws: Workspace) -> None:
    scored = []
    for e in ws.entries:
        try:
            if ws.autointerp(e).has_scores:
                scored.append(e)
        except SaeKitError:
            continue  # a results folder outside the root: its own pages say so
    if len(scored) < 2:
        st.info(
            f"Comparing interpretability needs two SAEs with autointerp scores inside this directory ({len(scored)} so far). "
            f"Run `sae-kit explain` and then `sae-kit score` on {ws.root} or on each run inside it."
        )
        return
    names = [e.name for e in scored]
    c1, c2 = st.columns(2)
    a = c1.selectbox("A", names, index=0, key="cmp_ai_a") or names[0]
    b = c2.selectbox("B", names, index=1, key="cmp_ai_b") or names[1]
    try:
        picked = [open_autointerp(ws, scored[names.index(n)]) for n in (a, b)]
        da, db = (_readable(ws, r, lambda r=r: _distributions(r)) if r is not None else {} for r in picked)
        explained = [int(r.explanations["ok"].sum()) if r is not None else 0 for r in picked]
    except SaeKitError as err:
        st.error(one_line(err))
        return
    rows = [
        {
            "scorer": "explanations",
            "statistic": "features explained",
            "A": f"{explained[0]:,}",
            "B": f"{explained[1]:,}",
            "B − A": f"{explained[1] - explained[0]:+,}",
        }
    ]
    for scorer in SCORERS:
        if scorer not in da and scorer not in db:
            continue
        for stat in ("mean", "median", "n"):
            va, vb = (d.get(scorer, {}).get(stat) for d in (da, db))
            digits = 0 if stat == "n" else 4
            both = isinstance(va, (int, float)) and isinstance(vb, (int, float))
            rows.append(
                {
                    "scorer": scorer,
                    "statistic": stat if stat == "n" else f"{stat} balanced accuracy",
                    "A": _fmt(va, digits),
                    "B": _fmt(vb, digits),
                    "B − A": f"{vb - va:+.{digits}f}" if both and math.isfinite(vb - va) else "—",
                }
            )
    st.dataframe(pd.DataFrame(rows), hide_index=True, key="cmp_ai_table", width="stretch")
    for col, side, name, d in zip(st.columns(2), "AB", (a, b), (da, db)):
        col.plotly_chart(_score_histogram(d, f"{side}: {name}"), key=f"cmp-ai-hist-{side}")
