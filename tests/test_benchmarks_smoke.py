"""Every benchmark script runs end to end in its --smoke mode (tiny sizes, peers skipped), so none can rot silently.

Each script runs in a subprocess as a user would run it; the checks are on what it prints: every section it reports,
with finite, plausible numbers. The timings themselves are not checked (a shared CI machine makes them noise).
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
NUMBER = r"([0-9][0-9,]*\.?[0-9]*(?:e[-+]?[0-9]+)?)"


def smoke(script: str, tmp_path: Path, *args: str) -> str:
    """stdout of `python benchmarks/<script> --smoke`, after asserting it exits 0."""
    env = os.environ | {
        "TMPDIR": str(tmp_path),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }  # temp files land in tmp_path
    res = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--smoke", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, f"{script} --smoke exited {res.returncode}:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res.stdout


def numbers(pattern: str, text: str) -> list[float]:
    """The numbers that `pattern`'s NUMBER groups find in `text`; fails if absent or not finite."""
    match = re.search(pattern, text)
    assert match, f"no {pattern!r} in:\n{text}"
    values = [float(g.replace(",", "")) for g in match.groups()]
    assert all(math.isfinite(v) for v in values), (pattern, values)
    return values


def number(pattern: str, text: str) -> float:
    """The one number that `pattern` finds in `text`."""
    return numbers(pattern, text)[0]


def test_train_step(tmp_path):
    out = smoke("train_step.py", tmp_path)
    assert "d_sae 1024, k 32, batch 512" in out
    step_s, fvu = numbers(rf"\nsae-kit\s+\S+\s+{NUMBER}\s+1\.00x\s+{NUMBER}", out)
    assert step_s > 0 and 0 < fvu < 1, out  # three steps already explain part of the variance
    for floor in ("gemm", "topk"):
        assert number(rf"\(floor\)\s+{floor}\s+{NUMBER}", out) > 0
    assert "our step / bf16 encoder GEMM" in out and "our step with AuxK / without" in out
    assert 90 < number(rf"support agreement {NUMBER}%", out) <= 100  # bf16 picks the fp32 support but for near-ties
    diff = re.search(r"held-out FVU, bf16 - fp32 training\s+([-+][0-9.]+)", out)
    assert diff and abs(float(diff.group(1))) < 0.02, out  # the same SAE, trained in bf16 or fp32 compute
    assert "[setup]" not in out and "FAILED" not in out  # no peer venv built or timed
    assert not list(tmp_path.glob("sae-kit-train-step-smoke-*")), "the smoke data directory is left behind"


def test_harvest(tmp_path):
    out = smoke("harvest.py", tmp_path)
    for what in (
        r"harvest, early stop \(stop_at_layer\):",
        "full forward to logits:",
        r"harvest with CE gradients \(g-SAE\):",
        "cache write:",
        r"cache shuffled read \(batch 4096, global shuffle\):",
    ):
        assert number(rf"{what}\s+{NUMBER}", out) > 0
    assert number(rf"early-stop speed-up: {NUMBER}x", out) > 0


def test_pipeline(tmp_path):
    out = smoke("pipeline.py", tmp_path)
    assert "1024 training tokens per run" in out and "batch 256" in out
    for what in ("harvest alone", "train, no prefetch", "train, prefetch", "sweep of 2", "2 separate runs"):
        assert number(rf"{what}\s+{NUMBER} s", out) > 0
    assert number(rf"sweep costs {NUMBER}x of them", out) > 0
    assert not list(tmp_path.glob("sae-kit-bench-*")), "the runs are left behind"


def test_eval(tmp_path):
    out = smoke("eval.py", tmp_path)
    for section in ("prepare", "core", "dead", "dark_matter", "steering", "total"):
        assert number(rf"\n  {section}\s+{NUMBER} s", out) >= 0
    assert 0 < number(rf"core: FVU {NUMBER}", out) < 1.5
    assert "dark matter: norm R²" in out and "steering: score" in out
    assert not list(tmp_path.glob("sae-kit-eval-bench-*")), "the SAE and its report are left behind"


def test_browse(tmp_path):
    out = smoke("browse.py", tmp_path)
    assert "index: 1,024 features on" in out
    assert number(rf"pass\s+{NUMBER} s", out) > 0 and number(rf"features\s+{NUMBER} s", out) > 0
    assert number(rf"index read \(FeatureIndex.feature\):\s+median\s+{NUMBER} ms", out) > 0
    assert number(rf"app rerun \(AppTest, no browser\):\s+median\s+{NUMBER} ms", out) > 0
    assert "switch, real browser" in out  # measured, or skipped where Chromium or playwright is missing
    assert number(rf"open a 2,048-feature index: meta \+ vocab \+ summary {NUMBER} ms", out) >= 0
    assert not list(tmp_path.glob("sae-kit-browse-bench-*")), "the SAE and its index are left behind"


def test_autointerp(tmp_path):
    out = smoke("autointerp.py", tmp_path)
    assert "judge and explainer SmolLM2-135M-Instruct" in out and "no response cache" in out
    row = r"\s+".join([NUMBER] * 7)
    for stage in ("explain", "detection", "fuzz", "intervention"):
        n, seconds, per_min, requests, prompt, completion, price = numbers(rf"\n{stage}\s+{row}", out)
        assert n == 2 and seconds > 0 and per_min > 0, (stage, out)
        assert requests >= 1 and prompt > 0 and completion > 0 and price > 0, (stage, out)
    assert number(rf"\nall four\s+{NUMBER}", out) > 0
    assert "intervention  judge" in out and "strength search" in out
    assert not list(tmp_path.glob("sae-kit-autointerp-bench-*")), "the run and its results are left behind"


def test_rules(tmp_path):
    out = smoke("rules.py", tmp_path)
    assert "d_sae 1024, k 32, batch 512" in out
    for rule in ("topk", "mutual_choice", "feature_choice", "mpsae", "relu"):
        bf16, ratio_bf16, fp32, ratio_fp32 = numbers(rf"\n{rule}\s+{NUMBER}\s+{NUMBER}x\s+{NUMBER}\s+{NUMBER}x", out)
        assert bf16 > 0 and fp32 > 0 and ratio_bf16 > 0, out
    assert number(rf"\ntopk\s+{NUMBER}\s+1\.00x", out) > 0
    for rule in ("mutual_choice", "feature_choice", "mpsae"):
        assert re.search(rf"{rule} step / topk step \(bfloat16\)\s+{NUMBER}x", out), out
    assert not list(tmp_path.glob("sae-kit-rules-smoke-*")), "the smoke data directory is left behind"


def test_scaling(tmp_path):
    out = smoke("scaling.py", tmp_path)
    assert "cost against d_sae (d_in 32)" in out and "cost against d_in (d_sae 512)" in out
    row = rf"\s+{NUMBER}\s+{NUMBER}x\s+{NUMBER}\s+{NUMBER}"
    for axis, first, second in (("d_sae", 256, 512), ("d_in", 32, 64)):
        table = out.split(f"cost against {axis}")[1]
        step, ratio, *_ = numbers(rf"\n\s+{first}{row}", table)
        assert step > 0 and ratio == 1.0, out
        cells = numbers(rf"\n\s+{second}{row} \|{row} \|{row}", table)  # step, eval, index: s, ratio, µs/lat, µs/tok
        assert cells[0] > 0 and cells[4] > 0 and cells[8] > 0, out
    assert not list(tmp_path.glob("sae-kit-scaling-*")), "the index directories are left behind"


def test_cache_read(tmp_path):
    out = smoke("cache_read.py", tmp_path)
    assert "64 shards x 32 rows" in out and "rows identical to the old reader's: yes" in out
    row = rf"\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}x\s+{NUMBER}\n"
    peaks = {}
    for reader in ("old per-shard loop", "reader, float32 out", "read-ahead one batch", "map cap 2", "bfloat16 out"):
        rows_s, gb_s, ratio, peaks[reader] = numbers(rf"\n *{re.escape(reader)}{row}", out)
        assert rows_s > 0 and gb_s > 0 and ratio > 0, (reader, out)
    assert peaks["old per-shard loop"] == 128 and peaks["map cap 2"] == 2, out  # every file, or the cap
    assert peaks["reader, float32 out"] == 16, out  # the smoke run's cap
    assert number(rf"one-shard copy \(floor\){row}", out) > 0
    assert not list(tmp_path.glob("sae-kit-cache-read-*")), "the cache is left behind"


def test_gpu_check(tmp_path):
    """The prepared GPU script (benchmarks/gpu_check.py) on the CPU: every rule steps, the step, two gloo ranks and
    the wide eval run, and the two-rank SAE equals the one-process SAE to float rounding."""
    out = smoke("gpu_check.py", tmp_path, "--out", str(tmp_path / "gpu.json"))
    report = __import__("json").loads((tmp_path / "gpu.json").read_text())
    assert set(report["sync"].values()) == {"ok"} and len(report["sync"]) >= 10
    assert report["step"]["ours:512"]["tok_per_s"] > 0
    assert report["ddp"]["max_weight_diff"] < 1e-5, report["ddp"]
    assert 0 < report["eval"]["fvu"] and "eval  seconds" in out


def test_reproduce_smoke(tmp_path, reproduce_quick):
    """The benchmark resumes the quick run tests/test_reproduce.py made (every stage recorded, none redone)."""
    cfg, _ = reproduce_quick
    before = (cfg.out / "stages.json").read_text()
    out = smoke("reproduce.py", tmp_path, "--out", str(cfg.out))
    total = numbers(r"\ntotal\s+" + NUMBER, out)[0]
    assert total == pytest.approx(sum(v["seconds"] for v in json.loads(before).values()), abs=0.2), out
    assert "eval/architectures" in out and "7 papers" in out, out
    assert (cfg.out / "stages.json").read_text() == before  # nothing ran again
