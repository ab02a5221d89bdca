"""`sae-kit explain` and `sae-kit score` end to end on a real trained SAE (the `browse_run` TopK member, copied),
with the embedded SmolLM2 as explainer and judge: the files, the row split, negatives re-encoded on the real model,
resume after a kill ending with the same files, and one-line errors for bad input.

SmolLM2-135M is far too small to explain features well; these tests check the plumbing, not the quality (that is
`test_autointerp_scoring.py`'s planted feature).
"""

from __future__ import annotations

import json
import math
import shutil
import socket
from pathlib import Path

import pandas as pd
import pytest

from sae_kit.autointerp import store
from sae_kit.autointerp.clients import LocalClient, ResponseCache
from sae_kit.autointerp.run import ExplainConfig, ScoreConfig, explain, score
from sae_kit.cli import main
from sae_kit.dashboards.store import FeatureIndex

pytestmark = pytest.mark.slow
TOPK = "topk-k16-1152-s0"
FAST = [  # small test sets, two intervention prompts of 4 tokens: the plumbing at a CI price
    "--n-random",
    "4",
    "--test-per-band",
    "1",
    "--n-hard",
    "2",
    "--intervention-prompts",
    "The",
    "I think that",
    "--intervention-tokens",
    "4",
    "--no-progress",
]


def live_features(run: Path, n: int) -> list[int]:
    s = FeatureIndex(run / "index").summary
    return [int(f) for f in s.sort_values("count", ascending=False)["feature"].iloc[5 : 5 + n]]


@pytest.fixture(scope="module")
def scored(browse_run, tmp_path_factory, model):
    """A copy of the TopK member, explained (3 features) and scored with all three scorers through the CLI."""
    run = tmp_path_factory.mktemp("autointerp") / TOPK
    shutil.copytree(browse_run / TOPK, run)
    features = [str(f) for f in live_features(run, 3)]
    assert main(["explain", str(run), "--features", *features, "--no-progress"]) == 0
    assert main(["score", str(run), *FAST]) == 0
    return run


def test_explain_and_score_write_their_tables(scored):
    out = scored / "index" / store.DIR
    res = store.Results(scored / "index")
    ex, sc = res.explanations, res.scores
    assert len(ex) == 3 and ex["ok"].all() and ex["explanation"].str.len().gt(0).all()
    meta = json.loads((out / store.EXPLAIN_META).read_text())
    assert meta["complete"] and meta["identity"]["client"]["model"] == "SmolLM2-135M-Instruct"
    assert meta["identity"]["sae_sha256"] == FeatureIndex(scored / "index").meta["sae"]["sha256"]
    assert meta["identity"]["prompt_version"].startswith("sae-kit-autointerp-")
    assert sorted(sc["scorer"].unique()) == ["detection", "fuzz", "intervention"] and len(sc) == 9
    det = sc[sc["scorer"] == "detection"]
    assert (det["n_pos"] + det["n_neg"] + det["failures"] == det["n"]).all()
    assert (det["n"] >= 7).all() and (det["prompt_tokens"] > 0).all()
    iv = sc[sc["scorer"] == "intervention"]
    assert (iv["kl"] > 0.25).all() and (iv["strength"] > 0).all()  # the search reached (about) the 0.5 target
    summary = json.loads((out / store.SCORE_META).read_text())["summary"]
    for name in ("detection", "fuzz", "intervention"):
        assert summary[name]["features"] == 3
        assert sum(summary[name]["balanced_accuracy"]["hist_counts"]) == summary[name]["balanced_accuracy"]["n"]
    preds = pd.read_parquet(out / "predictions.parquet")
    assert set(preds["kind"]) >= {"activating", "random", "hard", "misplaced", "steered"}
    assert (preds["answer"].str.len() > 0).all()
    assert not (out / ".work").exists()


def test_explain_and_test_sets_never_share_a_row(scored):
    res = store.Results(scored / "index")
    preds = pd.read_parquet(res.path / "predictions.parquet")
    for _, e in res.explanations.iterrows():
        mine = preds[(preds["feature"] == e["feature"]) & (preds["row"] >= 0)]
        assert len(mine) and not set(e["rows"]) & set(mine["row"])


def test_negatives_reencode_to_zero(scored, model):
    from sae_kit.heldout import encode_positions, fold_input_scale, harvest_config_for, heldout_contexts
    from sae_kit.sae_io import load_sae

    index = FeatureIndex(scored / "index")
    preds = pd.read_parquet(store.folder(scored / "index") / "predictions.parquet")
    negs = preds[preds["kind"].isin(["random", "hard"]) & (preds["scorer"] == "detection")]
    assert (negs["kind"] == "random").sum() == 3 * 4 and (negs["kind"] == "hard").sum() >= 1
    sae = load_sae(scored / "sae").eval()
    s = index.meta["settings"]
    hcfg = harvest_config_for(sae, corpus=s["corpus"], context_size=s["context_size"])
    fold_input_scale(model, sae, hcfg)
    ctxs = heldout_contexts(model, hcfg, s["tokens"])
    width = s["before"] + s["after"] + 1
    for row in sorted(set(negs["row"])):
        codes = encode_positions(sae, model, hcfg, ctxs.rows(row, row + 1))
        for _, n in negs[negs["row"] == row].iterrows():
            fired = codes["position"][codes["feature"] == n["feature"]]
            inside = (fired >= n["start"]) & (fired < n["start"] + width)
            assert not inside.any(), f"feature {n['feature']} fires in its negative window (row {row})"


class Killed(Exception):
    pass


class DiesAfter:
    """A client that answers `calls` batches, then dies like a killed process."""

    def __init__(self, inner, calls: int) -> None:
        self.inner, self.calls, self.model_name = inner, calls, inner.model_name

    def complete(self, requests):
        if self.calls == 0:
            raise Killed
        self.calls -= 1
        return self.inner.complete(requests)


def test_a_killed_run_resumes_to_the_same_files(scored, tmp_path, model):
    """Explain and score killed mid-way, then resumed, end with the files of an uninterrupted run (same client)."""
    from sae_kit.autointerp.examples import ExampleConfig

    features = tuple(int(f) for f in store.Results(scored / "index").explanations["feature"])[:2]
    outs, asked = [], []
    for name, kill in (("clean", False), ("killed", True)):
        run = tmp_path / name / TOPK
        shutil.copytree(scored, run, ignore=shutil.ignore_patterns(store.DIR))
        out = store.folder(run / "index")
        client = LocalClient(batch_size=1, cache=ResponseCache(out / "responses"))  # nothing from the fixture's cache
        ecfg = ExplainConfig(run=run, features=features, progress=False)
        scfg = ScoreConfig(
            run=run, scorers=("detection",), examples=ExampleConfig(n_random=4, test_per_band=1), progress=False
        )
        if kill:
            with pytest.raises(Killed):
                explain(ecfg, client=DiesAfter(client, 1))  # one feature per call: dies before the second
            assert len(list((out / ".work" / "explain").glob("[0-9]*.json"))) == 1
        explain(ecfg, client=client)
        if kill:
            with pytest.raises(Killed):
                score(scfg, model=model, client=DiesAfter(client, 1))  # one call a feature: dies in the second
            assert len(list((out / ".work" / "score").glob("[0-9]*.json"))) == 1
        score(scfg, model=model, client=client)
        outs.append(out)
        asked.append(client.usage["requests"])
    assert asked[0] == asked[1]  # killed + resumed asked the LLM exactly what one clean run asks: never twice
    for name in ("explanations.parquet", "scores.parquet", "predictions.parquet"):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name
    for name in (store.EXPLAIN_META, store.SCORE_META):
        a, b = (json.loads((d / name).read_text()) for d in outs)
        assert {k: v for k, v in a.items() if k != "timing"} == {k: v for k, v in b.items() if k != "timing"}


def test_the_http_backend_end_to_end(scored, tmp_path, chat_server, monkeypatch):
    """explain and score through the OpenAI-compatible client against a local server: the key from the named
    variable, answers and log-probabilities parsed into the tables, tokens counted, and a forced rerun answered
    from the response cache without one request."""
    base_url, log = chat_server
    run = tmp_path / TOPK
    shutil.copytree(scored, run, ignore=shutil.ignore_patterns(store.DIR))
    monkeypatch.setenv("SAE_KIT_TEST_KEY", "sekret")
    http = ["--backend", "openai", "--base-url", base_url, "--model", "served", "--api-key-env", "SAE_KIT_TEST_KEY"]
    features = [str(f) for f in live_features(run, 2)]
    assert main(["explain", str(run), "--features", *features, *http, "--no-progress"]) == 0
    res = store.Results(run / "index")
    assert res.explanations["explanation"].tolist() == ["words from a server"] * 2
    assert res.explain_meta["identity"]["client"] == {"backend": "openai", "model": "served", "base_url": base_url}
    fast = ["--scorers", "detection", "--n-random", "4", "--test-per-band", "1", "--no-progress"]
    assert main(["score", str(run), *http, *fast]) == 0
    sc = store.Results(run / "index").scores
    assert (sc["balanced_accuracy"] == 0.5).all() and (sc["auroc"] == 0.5).all()  # always "Yes", P(yes) 0.8 ties
    assert (sc["prompt_tokens"] == 11 * sc["n"]).all() and (sc["failures"] == 0).all()
    sent = [json.loads(line) for line in log.read_text().splitlines()]
    mine = [r for r in sent if any("words from a server" in m["content"] for m in r["body"]["messages"])]
    assert len(mine) == int(sc["n"].sum()) and {r["auth"] for r in mine} == {"Bearer sekret"}
    assert all(r["body"]["logprobs"] and r["body"]["model"] == "served" for r in mine)
    assert main(["score", str(run), *http, *fast, "--force"]) == 0
    assert len(log.read_text().splitlines()) == len(sent)  # every answer came from index/autointerp/responses


# ------------------------------------------------------------------------------------------------ the browser
def test_the_app_shows_the_real_results(scored, monkeypatch):
    from test_browse_app import app, clean, shows_autointerp_summary, shows_feature_autointerp

    results = store.Results(scored / "index")
    for f in results.explanations["feature"]:
        shows_feature_autointerp(clean(app(scored, monkeypatch, page="Feature", feature=str(f))), results, int(f))
    shows_autointerp_summary(clean(app(scored, monkeypatch, page="Overview")), results)
    at = clean(app(scored, monkeypatch, page="Features"))
    assert set(results.explanations["explanation"]) <= set(at.dataframe[0].value["explanation"])


def test_chromium_shows_the_real_results(chromium, scored, tmp_path):
    from playwright.sync_api import expect, sync_playwright
    from test_browser import CHROMIUM_ARGS, WAIT_MS, free_port, server

    results = store.Results(scored / "index")
    f = int(results.explanations["feature"].iloc[0])
    scores = results.scores[results.scores["feature"] == f].set_index("scorer")["balanced_accuracy"]
    port = free_port()
    expect.set_options(timeout=WAIT_MS)
    with server(scored, port, tmp_path / "server.log"), sync_playwright() as pw:
        page = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS).new_page()
        page.set_default_timeout(WAIT_MS)
        page.goto(f"http://127.0.0.1:{port}/?page=Feature&feature={f}")
        expect(page.get_by_text("Co-firing features")).to_be_visible()
        expect(page.get_by_test_id("stStatusWidget")).to_have_count(0)
        expect(page.get_by_test_id("stMarkdown").filter(has_text="Explanation:")).to_contain_text(
            str(results.explanations["explanation"].iloc[0])
        )
        for scorer in ("detection", "fuzz"):
            metric = page.get_by_test_id("stMetric").filter(has_text=f"{scorer} score")
            value = scores[scorer]
            expect(metric.get_by_test_id("stMetricValue")).to_have_text(f"{value:.3f}" if math.isfinite(value) else "—")


# ------------------------------------------------------------------------------------------------ bad input
def one_line(capsys, argv: list[str], *expect: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for e in expect:
        assert e in err, err
    return err


def test_bad_input_gets_one_line(scored, tmp_path, capsys, monkeypatch):
    bare = tmp_path / "bare"
    shutil.copytree(scored, bare, ignore=shutil.ignore_patterns("index"))
    one_line(capsys, ["explain", str(bare)], "no feature index", "sae-kit index")
    one_line(capsys, ["explain", str(scored), "--features", "99999"], "out of range", "0..1151")
    one_line(capsys, ["score", str(bare)], "no feature index")
    one_line(capsys, ["explain", str(tmp_path / "nowhere")], "holds no SAE")
    monkeypatch.delenv("SAE_KIT_TEST_KEY", raising=False)
    one_line(
        capsys,
        ["explain", str(scored), "--backend", "openai", "--base-url", "http://127.0.0.1:9/v1", "--model", "m"]
        + ["--api-key-env", "SAE_KIT_TEST_KEY", "--force"],
        "SAE_KIT_TEST_KEY is not set",
    )
    with socket.socket() as s:  # a port where nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = f"http://127.0.0.1:{port}/v1"
    kept = lambda: {f.name: f.read_bytes() for f in store.folder(scored / "index").glob("*.*") if f.is_file()}  # noqa: E731
    before = kept()
    one_line(
        capsys,
        ["explain", str(scored), "--backend", "openai", "--base-url", base, "--model", "m", "--api-key-env", ""]
        + ["--max-retries", "1", "--force", "--no-progress"],
        "cannot reach",
        base,
    )
    assert kept() == before  # a failed --force run loses nothing
    one_line(capsys, ["score", str(scored), "--scorers", "detection", "--n-random", "-1"], "--n-random must be >= 0")
    one_line(capsys, ["score", str(scored), "--intervention-tokens", "0"], "--intervention-tokens >= 1")
