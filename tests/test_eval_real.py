"""`sae-kit eval` / `sae_kit.evaluate` end to end on real SmolLM2 SAEs trained by the trainer: every section filled,
the report and figures written, the comparison across widths, and one-line errors for bad input."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

import sae_kit
from sae_kit import HarvestConfig
from sae_kit.build_cache import CacheConfig, build_cache
from sae_kit.eval.evaluate import EvalConfig, evaluate
from sae_kit.eval.report import load_report
from sae_kit.sae import SAE, SAEConfig
from sae_kit.training import TrainConfig
from sae_kit.training.run import TrainRunConfig, train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sweep(model, tmp_path_factory):
    """TopK SAEs of two widths (1152 and 2304 latents), trained briefly on the same real layer-6 batches."""
    root = tmp_path_factory.mktemp("eval")
    cache = build_cache(
        CacheConfig(
            out=root / "cache", harvest=HarvestConfig(context_size=64), tokens=12288, heldout_tokens=512, progress=False
        ),
        model=model,
    )
    train(
        TrainRunConfig(
            out=root / "sweep",
            cache=cache,
            k=16,
            expansion_factor=(2, 4),
            eval_tokens=512,
            progress=False,
            train=TrainConfig(batch_size=512, tokens=512 * 24, lr=2e-3, warmup_steps=4),
        )
    )
    return root / "sweep"


def small(**kw) -> dict:
    from sae_kit.eval.core import CoreConfig
    from sae_kit.eval.dark_matter import DarkMatterConfig
    from sae_kit.eval.steering import SteeringConfig

    return (
        dict(
            tokens=10000,
            context_size=64,
            core=CoreConfig(ce_tokens=600),
            dark_matter=DarkMatterConfig(ce_tokens=600),
            steering=SteeringConfig(n_features=3, alphas=(1.0, 4.0), contexts=2, generate_tokens=8),
        )
        | kw
    )


def finite(obj) -> bool:
    if isinstance(obj, float):
        return math.isfinite(obj)
    if isinstance(obj, dict):
        return all(finite(v) for v in obj.values())
    if isinstance(obj, list):
        return all(finite(v) for v in obj)
    return True


def test_every_section_is_filled_for_a_sweep(tmp_path, model, sweep):
    report = evaluate(EvalConfig(saes=(sweep,), out=tmp_path / "ev", **small()), model=model)
    assert load_report(tmp_path / "ev" / "report.json")["schema_version"] == 1
    assert [s["name"] for s in report["saes"]] == ["sweep/topk-k16-1152-s0", "sweep/topk-k16-2304-s0"]
    for sae in report["saes"]:
        assert set(sae["sections"]) == {"core", "dead", "dark_matter", "steering"}
        core, dm = sae["sections"]["core"], sae["sections"]["dark_matter"]
        assert (
            0 < core["fvu"] < 0.6
            and 0.3 < core["ce_loss_recovered"] <= 1.05
            and core["l0_mean"] == pytest.approx(16, abs=0.01)
        )
        assert 0 < dm["norm_r2"] <= 1 and -0.1 < dm["vector_r2"] < 1
        for path in sae["figures"].values():
            assert (tmp_path / "ev" / path).is_file()
        assert any("paper" in line for line in sae["summary"])  # dark matter printed next to the paper's headline
    assert report["settings"]["tokens"] >= 10000 and report["settings"]["split"] == "heldout"
    cmp = report["comparison"]
    assert [r["name"] for r in cmp["table"]] == [s["name"] for s in report["saes"]] and "cross_width" in cmp
    cross = cmp["cross_width"]["blocks.6.hook_resid_post"]
    assert finite(cross)
    wide, narrow = (s["sections"]["core"]["fvu"] for s in report["saes"][::-1])
    assert wide < narrow  # the wider SAE reconstructs better on the same tokens


def test_cli_prints_a_summary_and_rejects_bad_input(tmp_path, sweep):
    member = sweep / "topk-k16-1152-s0"
    cli = [sys.executable, "-m", "sae_kit.cli", "eval"]
    res = subprocess.run(
        [
            *cli,
            str(member),
            "--out",
            str(tmp_path / "ev"),
            "--tokens",
            "2500",
            "--context-size",
            "64",
            "--core.ce-tokens",
            "400",
            "--sections",
            "core",
            "dead",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr
    assert "FVU" in res.stdout and "report: " in res.stdout and (tmp_path / "ev" / "report.json").is_file()
    res = subprocess.run(
        [*cli, str(member), "--hook", "blocks.6.hook_resid_pots"], capture_output=True, text=True, timeout=600
    )
    assert (
        res.returncode == 2 and "blocks.6.hook_resid_post" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    )
    narrow = SAE(
        SAEConfig(
            d_in=512,
            d_sae=64,
            k=4,
            metadata={"hook_name": "blocks.6.hook_resid_post", "model_name": "SmolLM2-135M-Instruct"},
        )
    )
    narrow.save(tmp_path / "narrow")
    res = subprocess.run([*cli, str(tmp_path / "narrow")], capture_output=True, text=True, timeout=600)
    assert res.returncode == 2 and "d_in=512" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    res = subprocess.run(
        [*cli, str(member), "--tokens", "50", "--sections", "dark_matter"], capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 2 and "--tokens" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not (member / "eval").exists()  # a failed evaluation leaves no half-written report behind


def test_evaluate_takes_sae_objects_in_a_notebook(tmp_path, model, sweep):
    sae = sae_kit.load_sae(sweep / "topk-k16-1152-s0" / "sae")
    report = sae_kit.evaluate(
        sae,
        model=model,
        out=tmp_path / "nb",
        sections=("core",),
        **{k: v for k, v in small().items() if k != "steering"},
    )
    assert (
        report["saes"][0]["name"] == "sae0"
        and json.loads((tmp_path / "nb" / "report.json").read_text())["saes"][0]["sections"]["core"]["fvu"] > 0
    )


def test_an_attention_sae_is_spliced_through_the_heads_and_attributed(tmp_path, model):
    torch.manual_seed(0)
    sae = SAE(
        SAEConfig(
            d_in=576,
            d_sae=1152,
            k=16,
            metadata={"hook_name": "blocks.6.attn.hook_z", "model_name": "SmolLM2-135M-Instruct"},
        )
    )
    report = sae_kit.evaluate(
        sae,
        model=model,
        out=tmp_path / "z",
        sections=("core", "attention"),
        tokens=1500,
        context_size=64,
        **{k: v for k, v in small().items() if k == "core"},
    )
    sections = report["saes"][0]["sections"]
    assert report["saes"][0]["hook"] == "blocks.6.attn.hook_z" and set(sections) == {"core", "attention"}
    assert sections["attention"]["n_heads"] == 9 and sum(sections["attention"]["features_per_head"]) == 1152
    core = sections["core"]
    assert (
        core["kl_spliced"] > 1e-3 and core["kl_zero"] > 1e-3 and core["fvu"] > 0.5
    )  # the spliced z changes the output
