"""The Streamlit browser driven by streamlit.testing's AppTest on a small real index (the `browse_run` sweep):
every page, feature selection and click-through, a typed prompt checked against a direct encoding, a steering
run checked against a direct generation, and one-line explanations for bad directories."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

import sae_kit.dashboards
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
    assert not at.info  # nothing is missing
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
