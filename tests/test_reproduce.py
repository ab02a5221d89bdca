"""`sae-kit reproduce` end to end at its --quick size on the real SmolLM2 and corpus (one harvest, every comparison
trained, evaluated and reported), and the report's pieces on known inputs.

The quick run (1,152 latents, 32k tokens, one seed) is a smoke test of the whole product path, so these tests check
what the report promises (every paper's section and verdicts, every number traceable to a file the command wrote,
the batch rules' inference L0 at their training budget, resume and refusal), not the papers' findings; those are
the full run's, recorded in docs/reproduce.md. The realistic-size check of the calibrated thresholds is
tests/test_train_scale.py (2,304 latents, 262k tokens).
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from sae_kit.autointerp.run import ClientConfig
from sae_kit.errors import SaeKitError
from sae_kit.eval import claims, signs
from sae_kit.eval.claims import Number, Stat, better, resolve
from sae_kit.eval.reproduce import QUICK, ReproduceConfig, check_scale, reproduce
from sae_kit.sae import SAE, SAEConfig

PAPERS = {"mutual_feature_choice", "abstopk", "mpsae", "gsae", "dark_matter", "attention", "autointerp"}
VERDICTS = {claims.HOLDS, claims.FAILS, claims.NOT_COMPARABLE, claims.NOT_RUN}


@pytest.fixture(scope="module")
def quick(reproduce_quick):
    return reproduce_quick


def numbers(report):
    """Every Number of the report as (paper, claim, label, number dict)."""
    for key, paper in report["papers"].items():
        for c in paper["claims"]:
            for label, v in c["ours"].items():
                if isinstance(v, dict):
                    for n in v["from"] if "from" in v else [v]:
                        yield key, c["claim"], label, n


@pytest.mark.slow
def test_every_paper_gets_a_section_with_honest_verdicts(quick):
    cfg, report = quick
    assert set(report["papers"]) == PAPERS
    md = (cfg.out / "report.md").read_text()
    for paper in report["papers"].values():
        assert paper["claims"] and f"## {paper['title']}" in md
        for c in paper["claims"]:
            assert c["verdict"] in VERDICTS and c["claim"] and c["paper"], c
            assert c["verdict"] == claims.NOT_COMPARABLE or c["rule"], c  # a verdict says how it was decided
            assert f"**Verdict: {c['verdict']}**" in md
    # the auto-interp issue has landed: the section ran (with the local judge it cannot be compared)
    ai = report["papers"]["autointerp"]["claims"][0]
    assert ai["verdict"] == claims.NOT_COMPARABLE and len(ai["ours"]) == 8, ai
    assert all(v["value"] is not None for v in ai["ours"].values())
    # figures the report links exist, its own and each section's
    linked = list(report["figures"].values()) + [
        p for paper in report["papers"].values() for p in paper["figures"].values()
    ]
    assert len(linked) >= 6 and all((cfg.out / p).is_file() for p in linked), linked
    # the overview table holds every SAE of the architectures comparison
    names = {r["name"] for r in report["table"]}
    assert {"mpsae", "relu", "fc_uniform", "mc_zipf", "jumprelu_l0_32"} <= names and len(names) == 11, names


@pytest.mark.slow
def test_every_number_traces_to_a_file_the_command_wrote(quick):
    cfg, report = quick
    files = {}
    seen = 0
    for paper, claim, label, n in numbers(report):
        path = cfg.out / n["source"]
        assert path.is_file() and path.resolve().is_relative_to(cfg.out.resolve()), (paper, label, n)
        data = files.setdefault(n["source"], json.loads(path.read_text()))
        value = resolve(data, n["key"])  # the key exists
        if not n.get("derived"):
            assert value == n["value"], (paper, claim, label, n, value)
        seen += 1
    assert seen >= 70, seen


@pytest.mark.slow
def test_batch_rules_infer_within_five_percent_of_their_training_l0(quick):
    """The calibrated thresholds on real held-out documents (eval mode, single tokens), read from the files."""
    cfg, report = quick
    check = report["papers"]["mutual_feature_choice"]["claims"][0]
    assert check["verdict"] == claims.HOLDS, check
    evals = json.loads((cfg.out / "eval/architectures/report.json").read_text())
    summary = json.loads((cfg.out / "runs/main/summary.json").read_text())
    for arch in ("mutual_choice", "feature_choice"):
        trained = next(m for m in summary["members"] if m["architecture"] == arch)["training"]["l0"]
        inferred = next(s for s in evals["saes"] if s["architecture"] == arch and s["name"].startswith(arch))
        assert trained == pytest.approx(32, rel=0.01)
        assert inferred["sections"]["core"]["l0_mean"] == pytest.approx(trained, rel=0.05), (arch, inferred["name"])


@pytest.mark.slow
def test_a_rerun_resumes_and_other_settings_are_refused(quick, model):
    cfg, report = quick
    stages = json.loads((cfg.out / "stages.json").read_text())
    # a stage lost (its output and its record): only it runs again, and the report is the same
    shutil.rmtree(cfg.out / "eval" / "attention")
    del stages["eval/attention"]
    (cfg.out / "stages.json").write_text(json.dumps(stages))
    mtime = (cfg.out / "eval/architectures/report.json").stat().st_mtime_ns
    again = reproduce(cfg, model=model)
    assert (cfg.out / "eval/architectures/report.json").stat().st_mtime_ns == mtime  # not redone
    assert "eval/attention" in json.loads((cfg.out / "stages.json").read_text())
    strip = lambda r: {k: v for k, v in r.items() if k not in ("created", "stages", "out")}  # noqa: E731
    assert strip(again) == strip(report)
    with pytest.raises(SaeKitError, match=r"other settings \(seeds\).*same flags to resume it, or pass a new --out"):
        reproduce(dataclasses.replace(cfg, seeds=2), model=model)
    other = cfg.out.parent / "not-a-run"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(SaeKitError, match="not empty and holds no reproduce run"):
        reproduce(dataclasses.replace(cfg, out=other), model=model)
    assert (other / "notes.txt").read_text() == "mine"


@pytest.mark.slow
def test_another_judge_reruns_only_auto_interp(quick, model, chat_server, tmp_path):
    """On a copy of the finished run (moved: the report reads it by its own paths), an OpenAI-compatible judge redoes
    the auto-interp stages only, and the report names that judge."""
    cfg, _ = quick
    copy = tmp_path / "copy"
    shutil.copytree(cfg.out, copy, ignore=shutil.ignore_patterns("cache", "cache-grads"))  # the caches are done with
    base_url, log = chat_server
    judge = ClientConfig(backend="openai", base_url=base_url, model="judge-x", api_key_env="")
    before = json.loads((copy / "stages.json").read_text())
    report = reproduce(dataclasses.replace(cfg, out=copy, client=judge), model=model)
    after = json.loads((copy / "stages.json").read_text())
    redone = {k for k in after if after[k] != before[k]}
    assert redone == {k for k in before if k.startswith("autointerp/")} and len(redone) == 4, redone
    assert all(after[k]["result"]["client"]["model"] == "judge-x" for k in redone)
    assert "judge-x" in report["papers"]["autointerp"]["claims"][0]["note"]
    assert log.read_text().count("judge-x") >= 4  # every rule's features went to the server
    assert report["table"] == json.loads((cfg.out / "report.json").read_text())["table"]  # the rest is the same


# ------------------------------------------------------------------------------------------- the pieces, no model
def test_the_committed_full_report_traces_every_number_to_its_committed_file():
    """docs/reproduce/ holds the full run's report and the files its numbers name: each one reads back."""
    docs = Path(__file__).resolve().parent.parent / "docs" / "reproduce"
    report = json.loads((docs / "report.json").read_text())
    assert set(report["papers"]) == PAPERS and report["scale"]["d_sae"] == 4608 and report["scale"]["seeds"] == 2
    checked = 0
    for paper, claim, label, n in numbers(report):
        value = resolve(json.loads((docs / n["source"]).read_text()), n["key"])
        if not n.get("derived"):
            assert value == n["value"], (paper, claim, label, n, value)
        checked += 1
    assert checked >= 100, checked
    md = (docs / "report.md").read_text()
    for png in re.findall(r"\]\(([^)]+\.png)\)", md):
        assert (docs / png).is_file(), png


def test_a_difference_counts_only_beyond_the_seed_spread_and_the_margin():
    def stat(*values):
        return Stat([Number(v, "f.json", "k") for v in values])

    assert better(stat(0.20), stat(0.25)) == "better"
    assert better(stat(0.25), stat(0.20)) == "worse"
    assert better(stat(0.200), stat(0.201)) == "same"  # within 1% of the reference
    assert better(stat(0.20, 0.30), stat(0.26, 0.27)) == "same"  # a 0.1 seed spread hides a 0.015 gap
    assert better(stat(0.9), stat(0.5), lower_is_better=False) == "better"
    assert better(stat(0.2), stat(None)) is None and better(stat(0.2), "text") is None
    # thresholds: a shortfall within 1% of the threshold is not a miss, a larger one is
    assert claims.at_least(0.896, 0.9) and not claims.at_least(0.89, 0.9) and claims.at_least(0.95, 0.9)


def test_number_keys_resolve_names_indices_and_dotted_dict_keys():
    data = {
        "saes": [
            {"name": "a", "sections": {"core": {"fvu": 0.1}}},
            {"name": "b/c", "sections": {"core": {"fvu": 0.2}}},
        ],
        "comparison": {"cross_width": {"blocks.6.hook_resid_post": {"pairs": [{"r2_norm": 0.7}]}}},
    }
    assert resolve(data, "saes[name=b/c].sections.core.fvu") == 0.2
    assert resolve(data, "comparison.cross_width[blocks.6.hook_resid_post].pairs[0].r2_norm") == 0.7
    with pytest.raises(KeyError):
        resolve(data, "saes[name=zzz].sections.core.fvu")


def test_bidirectional_features_need_both_signs_in_firings_and_peak():
    """An AbsTopK SAE with W_enc = I (k 1): latent 0 fires +2 and −1 equally often (bidirectional), latent 1 fires
    +3 nine times and −0.1 once (10% of firings, but 3% of the peak: not), latent 2 only positive, latent 3 never."""
    sae = SAE(SAEConfig(architecture="abstopk", d_in=4, d_sae=4, k=1, apply_b_dec_to_input=False)).eval()
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(4))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    rows = [[2, 0, 0, 0]] * 5 + [[-1, 0, 0, 0]] * 5 + [[0, 3, 0, 0]] * 9 + [[0, -0.1, 0, 0]] + [[0, 0, 1, 0]] * 3
    m = signs.measure(SimpleNamespace(sae=sae, x=torch.tensor(rows, dtype=torch.float32), grad=None)).metrics
    assert m["live_features"] == 3 and m["bidirectional_count"] == 1 and m["bidirectional_features"] == [0]
    assert m["bidirectional_frac"] == pytest.approx(1 / 3)
    assert m["negative_firing_frac"] == pytest.approx(6 / 23)
    assert signs.applies(SimpleNamespace(sae=sae)) and not signs.applies(
        SimpleNamespace(sae=SAE(SAEConfig(architecture="topk", d_in=4, d_sae=4, k=1)))
    )


def test_sizes_the_plan_cannot_use_are_one_line_errors():
    with pytest.raises(SaeKitError, match=r"--d-sae 64 is too narrow .* use --d-sae 128 or more"):
        check_scale(dataclasses.replace(QUICK, d_sae=64, topk_ks=(16, 64)))
    with pytest.raises(SaeKitError, match="--seeds must be positive"):
        ReproduceConfig(quick=True, seeds=0).scale()
    assert ReproduceConfig(quick=True, d_sae=2048).scale().d_sae == 2048
