"""The Streamlit browser driven by streamlit.testing's AppTest on a small real index (the `browse_run` sweep):
every page, feature selection and click-through, a typed prompt checked against a direct encoding, a steering
run checked against a direct generation, and one-line explanations for bad directories.

Autointerp results are checked on a copy of the sweep holding a synthetic result set (`write_autointerp`,
`sweep_with_autointerp`); the `shows_*` helpers check a page against any result set, synthetic or real.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

import sae_kit.dashboards
from sae_kit.atomic import write_json
from sae_kit.autointerp import store
from sae_kit.autointerp.store import EXPLANATIONS, PREDICTIONS, SCORES, Results, distribution, write_table
from sae_kit.dashboards.pages import md_escape
from sae_kit.dashboards.render import plain, visible
from sae_kit.dashboards.store import FeatureIndex
from sae_kit.dashboards.workspace import ROOT_ENV
from sae_kit.heldout import generate, harvest_config_for
from sae_kit.rundir import load_report
from sae_kit.sae_io import load_sae

pytestmark = pytest.mark.slow

APP = str(Path(sae_kit.dashboards.__file__).with_name("app.py"))
TOPK, ABSTOPK = "topk-k16-1152-s0", "abstopk-k16-1152-s0"


def app(root: Path, monkeypatch, **query: str) -> AppTest:
    monkeypatch.setenv(ROOT_ENV, str(root))
    at = AppTest.from_file(APP, default_timeout=300)
    for key, value in query.items():
        at.query_params[key] = value
    return at.run()


def clean(at: AppTest) -> AppTest:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    return at


def html(at: AppTest) -> str:
    return "".join(h.proto.body for h in at.get("html"))


def titles(at: AppTest) -> list[str]:
    return [t.value for t in at.title]


@pytest.fixture(scope="module")
def topk(browse_run) -> FeatureIndex:
    return FeatureIndex(browse_run / TOPK / "index")


def test_overview_shows_config_training_eval_and_index(browse_run, monkeypatch, topk):
    at = clean(app(browse_run, monkeypatch))
    assert titles(at) == [ABSTOPK]  # members sorted; the first is open
    at.sidebar.selectbox(key="sae_name").set_value(TOPK).run()
    clean(at)
    assert titles(at) == [TOPK]
    metrics = {m.label: m.value for m in at.metric}
    report = load_report(browse_run / "eval" / "report.json")
    fvu = next(s for s in report["saes"] if s["name"] == f"sweep/{TOPK}")["sections"]["core"]["fvu"]
    assert metrics["FVU"] == f"{fvu:.4g}"
    assert metrics["Indexed tokens"] == f"{topk.meta['tokens']:,}"
    assert metrics["Features"] == "1,152"
    assert len(at.get("plotly_chart")) >= 6  # training curves, eval figures, density histogram
    assert [i.value for i in at.info] == [  # nothing else is missing
        f"No autointerp results for this SAE yet. Run: `sae-kit explain {browse_run / TOPK}`, "
        f"then `sae-kit score {browse_run / TOPK}`"
    ]
    assert at.query_params["sae"] == [TOPK] or at.query_params["sae"] == TOPK


def test_overview_says_how_to_make_what_is_missing(browse_run, monkeypatch, tmp_path):
    run = tmp_path / "bare-run"
    shutil.copytree(browse_run / TOPK / "sae", run / "sae")
    at = clean(app(run, monkeypatch))
    infos = " ".join(i.value for i in at.info)
    assert f"sae-kit eval {run}" in infos and f"sae-kit index {run}" in infos
    assert "No training log" in infos


def peak_word(ix: FeatureIndex, f: int) -> str | None:
    """The peak token of feature f's strongest context, when it is a word (not whitespace or punctuation)."""
    top = ix.feature(f)["top"]
    word = ix.vocab[top[0]["tokens"][top[0]["peak"]]].strip() if top else ""
    return word if word.isalpha() else None


def test_feature_list_sorts_filters_and_jumps(browse_run, monkeypatch, topk):
    at = clean(app(browse_run, monkeypatch, page="Features", sae=TOPK))
    at.selectbox(key="list_sort").set_value("max activation").run()
    table = at.dataframe(key="list_table").value
    s = topk.summary
    assert int(table["feature"].iloc[0]) == int(s["max_act"].idxmax())
    assert table["max_act"].is_monotonic_decreasing
    f, token = next(
        (g, word)
        for g in s["max_act"].sort_values(ascending=False).index
        if (word := peak_word(topk, int(g))) is not None
    )
    at.text_input(key="list_token").input(token).run()
    listed = at.dataframe(key="list_table").value["feature"].astype(int).tolist()
    ids = {i for i, t in enumerate(topk.vocab) if t.strip().lower() == token.lower()}
    assert f in listed and all(topk.with_tokens(ids)[g] for g in listed)
    assert at.caption[0].value.startswith(f"{int(topk.with_tokens(ids).sum()):,} of 1,152 features")
    at.number_input(key="list_jump").set_value(5).run()
    at.button(key="list_open").click().run()
    assert at.sidebar.radio(key="page").value == "Feature" and titles(clean(at)) == ["Feature 5"]


def test_feature_page_shows_contexts_and_navigates(browse_run, monkeypatch, topk):
    f = int(topk.summary["max_act"].idxmax())
    row = topk.feature(f)
    at = clean(app(browse_run, monkeypatch, page="Feature", feature=str(f), sae=TOPK))
    assert titles(at) == [f"Feature {f}"]
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Max activation"] == f"{topk.summary['max_act'][f]:.3f}"
    assert metrics["Fires on"] == f"{int(topk.summary['count'][f]):,} tokens"
    body = html(at)
    top = row["top"][0]
    assert f"{top['act']:+.2f}" in body and visible(topk.vocab[top["tokens"][top["peak"]]]) in body
    assert "sk-peak" in body
    subheaders = [h.value for h in at.subheader]
    assert "Top activations" in subheaders and "Top negative activations" not in subheaders
    logits = at.dataframe[0].value
    assert logits["promoted"].tolist() == [plain(topk.vocab[i]) for i in row["logit_pos_ids"]]
    assert len(at.get("plotly_chart")) == 1  # the histogram
    at.button(key="next").click().run()
    assert titles(clean(at)) == [f"Feature {f + 1}"]
    at.button(key="nb-0").click().run()
    assert titles(clean(at)) == [f"Feature {topk.feature(f + 1)['neighbour_ids'][0]}"]
    at.number_input(key="feature_page_id").set_value(7).run()
    assert titles(clean(at)) == ["Feature 7"]
    assert at.query_params["feature"] in (["7"], "7")


def test_abstopk_feature_page_shows_the_negative_side(browse_run, monkeypatch):
    ix = FeatureIndex(browse_run / ABSTOPK / "index")
    f = int(ix.summary["min_act"].idxmin())
    at = clean(app(browse_run, monkeypatch, page="Feature", feature=str(f), sae=ABSTOPK))
    assert "Top negative activations" in [h.value for h in at.subheader]
    assert "Min activation" in [m.label for m in at.metric]
    assert f"{ix.feature(f)['top_negative'][0]['act']:+.2f}" in html(at)


def test_prompt_explorer_matches_a_direct_encoding_and_opens_features(browse_run, monkeypatch, model):
    text = "The meeting moved to Thursday afternoon, so I will bring the coffee."
    at = clean(app(browse_run, monkeypatch, page="Prompt", sae=TOPK))
    at.text_area(key="prompt_text").input(text).run()
    clean(at)
    sae = load_sae(browse_run / TOPK / "sae")
    hook = sae.cfg.metadata["hook_name"]
    _, cache = model.run_with_cache(model.to_tokens(text), names_filter=[hook])
    code = sae.encode(cache[hook][0, -1:].float())[0].detach()
    want = code.nonzero().squeeze(1)
    want = want[code[want].abs().argsort(descending=True)]
    table = at.dataframe[0].value
    assert table["feature"].tolist() == want.tolist()
    assert table["activation"].to_numpy() == pytest.approx(code[want].numpy(), abs=2e-3)
    assert "sk-tok" in html(at)
    first = int(want[0])
    at.button(key=f"prompt-pos-{first}").click().run()
    assert at.sidebar.radio(key="page").value == "Feature" and titles(clean(at)) == [f"Feature {first}"]


def test_steering_playground_generates_side_by_side(browse_run, monkeypatch, model, topk):
    f = int(topk.summary["max_act"].idxmax())
    at = clean(app(browse_run, monkeypatch, page="Steering", feature=str(f), sae=TOPK))
    prompt = at.text_input(key="steer_prompt").value
    at.slider(key="steer_alpha").set_value(20.0)
    at.number_input(key="steer_tokens").set_value(8)
    at.button(key="steer_run").click().run()
    clean(at)
    plain, steered = (c.value for c in at.code)
    assert plain == prompt + generate(model, harvest_config_for(load_sae(browse_run / TOPK / "sae")), prompt, 8)
    assert steered != plain
    assert f"Feature {f} at strength +20" in " ".join(m.value for m in at.markdown)


def test_compare_shows_two_reports_side_by_side(browse_run, monkeypatch):
    at = clean(app(browse_run, monkeypatch, page="Compare"))
    table = at.dataframe[0].value.set_index("metric")
    report = load_report(browse_run / "eval" / "report.json")
    a, b = (s["sections"]["core"]["fvu"] for s in report["saes"])
    assert float(table.loc["FVU", "A"]) == pytest.approx(a) and float(table.loc["FVU", "B"]) == pytest.approx(b)
    assert float(table.loc["FVU", "B − A"]) == pytest.approx(b - a)
    assert len(at.get("plotly_chart")) >= 4


def one_line_error(at: AppTest, *needles: str) -> str:
    assert not at.exception, [e.value for e in at.exception]
    assert len(at.error) == 1
    text = at.error[0].value
    assert "\n" not in text and all(n in text for n in needles), text
    return text


def test_a_directory_that_is_not_a_run_is_explained(monkeypatch, tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    one_line_error(app(tmp_path, monkeypatch), "is not a run", "sae-kit train")
    one_line_error(app(tmp_path / "missing", monkeypatch), "is not a directory")


def test_a_run_without_index_is_explained_on_index_pages(browse_run, monkeypatch, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(browse_run / TOPK / "sae", run / "sae")
    for page in ("Features", "Feature"):
        one_line_error(app(run, monkeypatch, page=page), "no feature index", f"sae-kit index {run}")


def test_a_corrupt_shard_is_explained(browse_run, monkeypatch, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(browse_run / TOPK, run)
    shard = run / "index" / "shards" / "00256-00511.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 3 : len(data) // 3 + 256] = bytes(256)
    shard.write_bytes(bytes(data))
    clean(app(run, monkeypatch, page="Feature", feature="3"))  # other shards still open
    found = [
        one_line_error(app(run, monkeypatch, page="Feature", feature=str(f)), "is damaged", "--force")
        for f in range(256, 512, 8)
        if app(run, monkeypatch, page="Feature", feature=str(f)).error
    ]
    assert found, "no feature of the damaged shard reported the damage"


def test_the_app_reads_only_inside_its_directory(browse_run, monkeypatch, tmp_path):
    outside = tmp_path / "outside"
    shutil.copytree(browse_run / TOPK, outside)
    root = tmp_path / "root"
    root.mkdir()
    (root / "sae").symlink_to(outside / "sae")
    one_line_error(app(root, monkeypatch), "outside", "reads only inside")
    run = tmp_path / "run"
    shutil.copytree(browse_run / TOPK / "sae", run / "sae")
    (run / "index").symlink_to(outside / "index")
    one_line_error(app(run, monkeypatch, page="Feature", feature="1"), "outside", "reads only inside")
    (run / "index").unlink()
    shutil.copytree(outside / "index", run / "index")
    shard = run / "index" / "shards" / "00000-00255.parquet"
    shard.unlink()
    shard.symlink_to(outside / "index" / "shards" / "00000-00255.parquet")
    clean(app(run, monkeypatch, page="Feature", feature="300"))
    one_line_error(app(run, monkeypatch, page="Feature", feature="1"), "outside the index", "reads only inside")


def test_browse_refuses_a_missing_directory_in_one_line(tmp_path):
    import subprocess
    import sys

    res = subprocess.run(
        [sys.executable, "-m", "sae_kit.cli", "browse", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (
        res.returncode == 2
        and res.stderr.strip()
        == f"sae-kit browse: error: {tmp_path / 'nope'} does not exist; pass a run directory written by sae-kit train"
    )


# ------------------------------------------------------------------------------------------------ autointerp
EXPLAINED = {
    3: "dates and days of the week",
    5: "Numbers and DATES in lists",
    8: "closing brackets after a list",
    13: "the word *coffee* and other [drinks]",
    21: "software updates",  # "dates" is a substring of "updates"
    40: None,  # the explainer's answer could not be parsed
}
"""The synthetic explanations (feature -> text; None: unparsed), written for both sweep members."""
RAW_UNPARSED = "I am not sure what this feature does. Maybe punctuation?"


def synthetic_scores(explained: dict[int, str | None], shift: float = 0.0) -> dict[str, dict[int, float]]:
    """scorer -> feature -> balanced accuracy for the parsed explanations: distinct values, intervention on some only."""
    ok = sorted(f for f, text in explained.items() if text is not None)
    return {
        "detection": {f: round(0.95 - 0.1 * i + shift, 4) for i, f in enumerate(ok)},
        "fuzz": {f: round(0.55 + 0.07 * i + shift, 4) for i, f in enumerate(ok)},
        "intervention": {f: round(0.8 - 0.2 * i + shift, 4) for i, f in enumerate(ok[:3])},
    }


def write_autointerp(
    index_dir: Path,
    explanations: dict[int, str | None],
    scores: dict[str, dict[int, float]] | None = None,
    model: str = "synthetic-llm",
) -> Results:
    """Write a synthetic autointerp result set into `index_dir`/autointerp (the schema of sae_kit.autointerp.store):
    `explanations` feature -> text (None: the answer could not be parsed), `scores` scorer -> feature -> balanced
    accuracy (default `synthetic_scores`; {} writes explanations only). AUROC is balanced accuracy + 0.02, NaN for
    the intervention scorer; four judged examples per (feature, scorer). Returns the written results, reopened."""
    folder = store.folder(index_dir)
    folder.mkdir(parents=True, exist_ok=True)
    write_table(
        folder / "explanations.parquet",
        [
            {
                "feature": f,
                "explanation": text,
                "ok": text is not None,
                "raw": f"Explanation: {text}" if text is not None else RAW_UNPARSED,
                "n_examples": 12,
                "rows": [f, f + 1],
                "prompt_tokens": 900,
                "completion_tokens": 12,
            }
            for f, text in sorted(explanations.items())
        ],
        EXPLANATIONS,
    )
    ok = sum(text is not None for text in explanations.values())
    sae = json.loads((index_dir / "index.json").read_text())["sae"].get("sha256")
    identity = {"client": {"backend": "synthetic", "model": model}, "sae_sha256": sae}
    write_json(
        folder / store.EXPLAIN_META,
        {
            "schema": store.SCHEMA,
            "version": store.VERSION,
            "complete": True,
            "identity": {"stage": "explain", "features": sorted(explanations), **identity},
            "ok": ok,
        },
    )
    scores = synthetic_scores(explanations) if scores is None else scores
    if not scores:
        return Results(index_dir)
    rows, judged, summary = [], [], {}
    for scorer, by_feature in scores.items():
        aurocs = {f: math.nan if scorer == "intervention" else min(ba + 0.02, 1.0) for f, ba in by_feature.items()}
        for f, ba in sorted(by_feature.items()):
            rows.append(
                {
                    "feature": f,
                    "scorer": scorer,
                    "n": 4,
                    "n_pos": 2,
                    "n_neg": 2,
                    "failures": 0,
                    "balanced_accuracy": ba,
                    "accuracy": ba,
                    "precision": ba,
                    "recall": ba,
                    "f1": ba,
                    "auroc": aurocs[f],
                    "prompt_tokens": 400,
                    "completion_tokens": 4,
                }
            )
            for i in range(4):
                kind = ("steered", "clean") if scorer == "intervention" else ("activating", "random")
                judged.append(
                    {
                        "feature": f,
                        "scorer": scorer,
                        "example": i,
                        "row": -1 if scorer == "intervention" else 100 * f + i,
                        "kind": kind[i % 2],
                        "band": i // 2 if i % 2 == 0 and scorer != "intervention" else -1,
                        "label": i % 2 == 0,
                        "prediction": int(i != 3),
                        "prob": 0.9 if i != 3 else 0.2,
                        "text": f"{scorer} example {i} of feature {f}",
                        "answer": "Yes" if i != 3 else "No",  # ignored by a PREDICTIONS without the column
                    }
                )
        summary[scorer] = {
            "balanced_accuracy": distribution(list(by_feature.values())),
            "auroc": distribution(list(aurocs.values())),
        }
    write_table(folder / "scores.parquet", rows, SCORES)
    write_table(folder / "predictions.parquet", judged, PREDICTIONS)
    write_json(
        folder / store.SCORE_META,
        {
            "schema": store.SCHEMA,
            "version": store.VERSION,
            "complete": True,
            "identity": {"stage": "score", "scorers": list(scores), **identity},
            "summary": summary,
        },
    )
    return Results(index_dir)


def sweep_with_autointerp(browse_run: Path, tmp_path: Path) -> Path:
    """A copy of the browse sweep with synthetic results for both members (AbsTopK's scores 0.05 lower)."""
    run = tmp_path / "sweep"
    shutil.copytree(browse_run, run)
    write_autointerp(run / TOPK / "index", EXPLAINED)
    write_autointerp(run / ABSTOPK / "index", EXPLAINED, synthetic_scores(EXPLAINED, shift=-0.05))
    return run


def judged_table(at: AppTest):
    """The feature page's table of judged examples (a plain dataframe has no key in AppTest: found by its expander)."""
    (expander,) = [e for e in at.expander if e.label == "How the judge scored it"]
    return expander.dataframe[0].value


def markdown(at: AppTest) -> str:
    return "\n".join(m.value for m in at.markdown)


def shows_feature_autointerp(at: AppTest, results: Results, feature: int) -> None:
    """The open feature page shows the feature's explanation (or the parse failure), each scorer's balanced accuracy
    and finite AUROC as metrics, and the judge's answers."""
    row = results.explanations.set_index("feature").loc[feature]
    if row["ok"]:
        assert f"**Explanation:** {md_escape(row['explanation'])}" in markdown(at)
    else:
        assert "the explainer's answer could not be parsed" in [w.value for w in at.warning]
        assert row["raw"] in [c.value for c in at.code]
    metrics = {m.label: m.value for m in at.metric}
    scores = results.scores[results.scores["feature"] == feature]
    for r in scores.itertuples():
        assert metrics[f"{r.scorer} score"] == (
            f"{r.balanced_accuracy:.3f}" if math.isfinite(r.balanced_accuracy) else "—"
        )
        assert metrics.get(f"{r.scorer} AUROC") == (f"{r.auroc:.3f}" if math.isfinite(r.auroc) else None)
    if len(scores):
        judged = judged_table(at)
        want = results.predictions(feature)
        assert judged["text"].tolist() == want["text"].tolist()
        assert judged["prediction"].tolist() == want["prediction"].tolist()


def shows_autointerp_summary(at: AppTest, results: Results) -> None:
    """The open Overview shows the explained and unparsed counts, each scorer's mean ± std, and the histogram."""
    metrics = {m.label: m.value for m in at.metric}
    ok = int(results.explanations["ok"].sum())
    assert metrics["Explained features"] == f"{ok:,}"
    assert metrics["Parse failures"] == f"{len(results.explanations) - ok:,}"
    summary = results.summary()
    for scorer in results.scorers():
        d = summary[scorer][store.HEADLINE]
        assert metrics[f"{scorer} score"] == (
            f"{d['mean']:.3f} ± {d['std']:.3f}" if d["n"] else "—"
        )  # n 0: none parsed
    charts = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    hist = [c for c in charts if {t.get("name") for t in c["data"]} == set(results.scorers())]
    assert len(hist) == 1 and hist[0]["layout"]["xaxis"]["range"] == [0, 1]


def test_feature_page_shows_explanation_scores_and_judged_examples(browse_run, monkeypatch, tmp_path):
    run = sweep_with_autointerp(browse_run, tmp_path)
    results = Results(run / TOPK / "index")
    at = clean(app(run, monkeypatch, page="Feature", feature="3", sae=TOPK))
    assert titles(at) == ["Feature 3"] and "Top activations" in [h.value for h in at.subheader]
    shows_feature_autointerp(at, results, 3)
    metrics = {m.label: m.value for m in at.metric}
    assert "dates and days of the week" in markdown(at)
    assert metrics["detection score"] == "0.950" and metrics["detection AUROC"] == "0.970"
    assert metrics["intervention score"] == "0.800" and "intervention AUROC" not in metrics  # NaN: not shown
    assert len(judged_table(at)) == 12  # 3 scorers x 4 examples
    at.number_input(key="feature_page_id").set_value(13).run()  # markdown in an explanation is shown literally
    shows_feature_autointerp(clean(at), results, 13)
    assert r"the word \*coffee\* and other \[drinks\]" in markdown(at)
    at.number_input(key="feature_page_id").set_value(40).run()  # unparsed: the raw answer, no scores
    shows_feature_autointerp(clean(at), results, 40)
    assert "detection score" not in {m.label for m in at.metric}
    assert [e.label for e in at.expander] == ["The explainer's answer"]  # no judged examples
    at.number_input(key="feature_page_id").set_value(0).run()
    assert f"no explanation yet: run `sae-kit explain {run / TOPK}`" in [c.value for c in clean(at).caption]


def test_feature_list_searches_filters_and_sorts_by_score(browse_run, monkeypatch, tmp_path):
    run = sweep_with_autointerp(browse_run, tmp_path)
    detection = synthetic_scores(EXPLAINED)["detection"]
    at = clean(app(run, monkeypatch, page="Features", sae=TOPK))
    options = at.selectbox(key="list_sort").options
    assert {"detection score", "fuzz score", "intervention score"} <= set(options)
    table = at.dataframe(key="list_table").value
    assert {"explanation", "detection", "fuzz", "intervention"} <= set(table.columns)
    assert at.caption[0].value == f"1,152 of 1,152 features · {len(detection)} explained"  # nothing dropped yet
    at.text_input(key="list_search").input("dates").run()
    matching = {f for f, text in EXPLAINED.items() if text and "dates" in text.lower()}
    assert matching == {3, 5, 21}
    table = clean(at).dataframe(key="list_table").value
    assert set(table["feature"].astype(int)) == matching
    assert table.set_index("feature").loc[3, "explanation"] == "dates and days of the week"
    at.selectbox(key="list_sort").set_value("detection score").run()
    table = clean(at).dataframe(key="list_table").value
    assert table["feature"].astype(int).tolist() == sorted(matching, key=lambda f: -detection[f])
    assert table["detection"].tolist() == sorted((detection[f] for f in matching), reverse=True)
    at.toggle(key="list_desc").set_value(False).run()
    assert clean(at).dataframe(key="list_table").value["feature"].astype(int).tolist() == sorted(
        matching, key=lambda f: detection[f]
    )
    at.text_input(key="list_search").input("").run()
    at.slider(key="list_min_score").set_value(0.8).run()  # a score filter alone: unexplained features drop out
    table = clean(at).dataframe(key="list_table").value
    assert set(table["feature"].astype(int)) == {f for f, ba in detection.items() if ba >= 0.8}
    at.selectbox(key="list_scorer").set_value("fuzz").run()
    fuzz = synthetic_scores(EXPLAINED)["fuzz"]
    assert set(clean(at).dataframe(key="list_table").value["feature"].astype(int)) == {
        f for f, ba in fuzz.items() if ba >= 0.8
    }


def test_overview_shows_interpretability(browse_run, monkeypatch, tmp_path):
    run = sweep_with_autointerp(browse_run, tmp_path)
    at = clean(app(run, monkeypatch, sae=TOPK))
    assert titles(at) == [TOPK] and "Interpretability (autointerp)" in [h.value for h in at.subheader]
    shows_autointerp_summary(at, Results(run / TOPK / "index"))
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Explained features"] == "5" and metrics["Parse failures"] == "1"
    d = distribution(list(synthetic_scores(EXPLAINED)["detection"].values()))
    assert metrics["detection score"] == f"{d['mean']:.3f} ± {d['std']:.3f}"
    assert "explainer: synthetic-llm · judge: synthetic-llm" in [c.value for c in at.caption]
    assert not at.info and not at.warning  # nothing is missing, nothing is stale
    meta = json.loads((store.folder(run / TOPK / "index") / store.EXPLAIN_META).read_text())
    meta["identity"]["sae_sha256"] = "0" * 64  # explained with another SAE than the index describes
    write_json(store.folder(run / TOPK / "index") / store.EXPLAIN_META, meta)
    at = clean(app(run, monkeypatch, sae=TOPK))
    assert [w.value for w in at.warning] == [
        f"The SAE was reindexed or changed since it was explained; redo: `sae-kit explain {run / TOPK} --force`"
    ]
    # explained, not scored: the counts and what to run next
    shutil.rmtree(store.folder(run / ABSTOPK / "index"))
    write_autointerp(run / ABSTOPK / "index", EXPLAINED, scores={})
    at = clean(app(run, monkeypatch, sae=ABSTOPK))
    assert {m.label: m.value for m in at.metric}["Explained features"] == "5"
    assert f"not scored yet. Run: `sae-kit score {run / ABSTOPK}`" in " ".join(i.value for i in at.info)
    at = clean(app(run, monkeypatch, page="Feature", feature="3", sae=ABSTOPK))
    assert "dates and days of the week" in markdown(at)
    assert f"not scored yet: run `sae-kit score {run / ABSTOPK}`" in " ".join(c.value for c in at.caption)


def test_compare_shows_both_members_interpretability(browse_run, monkeypatch, tmp_path):
    run = sweep_with_autointerp(browse_run, tmp_path)
    at = clean(app(run, monkeypatch, page="Compare"))
    a, b = at.selectbox(key="cmp_ai_a").value, at.selectbox(key="cmp_ai_b").value
    assert (a, b) == (ABSTOPK, TOPK)
    table = at.dataframe[-1].value.set_index(["scorer", "statistic"])
    ra, rb = (Results(run / name / "index") for name in (a, b))
    for scorer in ("detection", "fuzz", "intervention"):
        ma, mb = (r.summary()[scorer]["balanced_accuracy"]["mean"] for r in (ra, rb))
        row = table.loc[(scorer, "mean balanced accuracy")]
        assert (row["A"], row["B"]) == (f"{ma:.4f}", f"{mb:.4f}")
        assert float(row["B − A"]) == pytest.approx(0.05, abs=1e-4)
        assert table.loc[(scorer, "n"), "A"] == str(len(synthetic_scores(EXPLAINED)[scorer]))
    assert len(at.get("plotly_chart")) >= 6  # the reports' figures and the two score histograms
    assert len(at.dataframe) == 2  # the eval report comparison is still there
    shutil.rmtree(run / "eval")  # fewer than two eval reports: the interpretability comparison still shows
    at = clean(app(run, monkeypatch, page="Compare"))
    assert "Comparing eval reports needs two evaluated SAEs" in at.info[0].value
    assert len(at.get("plotly_chart")) == 2 and len(at.dataframe[-1].value) == 10


def test_pages_without_autointerp_say_what_to_run(browse_run, monkeypatch):
    member = browse_run / TOPK
    at = clean(app(browse_run, monkeypatch, page="Feature", feature="3", sae=TOPK))
    assert f"no explanation yet: run `sae-kit explain {member}`" in [c.value for c in at.caption]
    assert not [m for m in at.metric if m.label.endswith(" score")]
    at = clean(app(browse_run, monkeypatch, sae=TOPK))
    assert f"Run: `sae-kit explain {member}`, then `sae-kit score {member}`" in " ".join(i.value for i in at.info)
    at = clean(app(browse_run, monkeypatch, page="Features", sae=TOPK))
    assert "explanation" not in at.dataframe(key="list_table").value.columns
    assert "detection score" not in at.selectbox(key="list_sort").options
    at = clean(app(browse_run, monkeypatch, page="Compare"))
    assert "needs two SAEs with autointerp scores" in at.info[-1].value


def test_damaged_autointerp_results_are_one_line(browse_run, monkeypatch, tmp_path):
    run = sweep_with_autointerp(browse_run, tmp_path)
    folder = store.folder(run / TOPK / "index")
    (folder / "scores.parquet").write_bytes(b"PAR1 this is not a parquet file" * 8)
    for page in ("Overview", "Features", "Feature", "Compare"):
        at = app(run, monkeypatch, page=page, feature="3", sae=TOPK)
        one_line_error(at, "scores.parquet is damaged", "rerun")
    at = app(run, monkeypatch, page="Feature", feature="3", sae=TOPK)
    assert "Top activations" in [h.value for h in at.subheader]  # the rest of the page still shows
    at = app(run, monkeypatch, page="Features", sae=TOPK)
    listed = at.dataframe(key="list_table").value  # the list still shows, without the autointerp columns
    assert len(listed) == 50 and "explanation" not in listed.columns
    shutil.copy(run / ABSTOPK / "index" / store.DIR / "scores.parquet", folder / "scores.parquet")
    (folder / "predictions.parquet").write_bytes(bytes(300))
    at = app(run, monkeypatch, page="Feature", feature="3", sae=TOPK)  # only the judge's table is missing
    one_line_error(at, "predictions.parquet is damaged")
    assert {m.label for m in at.metric} >= {"detection score", "fuzz score"}
    (folder / store.SCORE_META).write_text("{not json")
    one_line_error(app(run, monkeypatch, sae=TOPK), "score.json is damaged")


def test_autointerp_files_outside_the_directory_are_refused(browse_run, monkeypatch, tmp_path):
    run = sweep_with_autointerp(browse_run, tmp_path)
    outside = tmp_path / "outside"
    shutil.move(store.folder(run / TOPK / "index") / "explanations.parquet", outside)
    (store.folder(run / TOPK / "index") / "explanations.parquet").symlink_to(outside)
    one_line_error(app(run, monkeypatch, page="Feature", feature="3", sae=TOPK), "outside", "reads only inside")
