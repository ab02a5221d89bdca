"""Training on real SmolLM2 activations: every architecture lowers the held-out FVU well below 1; the CLI; NaN stops."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import pytest
import torch

from sae_kit import HarvestConfig, load_sae
from sae_kit.build_cache import CacheConfig, build_cache
from sae_kit.cache import CacheWriter
from sae_kit.errors import SaeKitError
from sae_kit.rows import ActivationRows
from sae_kit.sparsifiers import REGISTRY
from sae_kit.training import NonFiniteError, TrainConfig
from sae_kit.training.run import RuleSettings, TrainRunConfig, train

pytestmark = pytest.mark.slow
HOOK = "blocks.6.hook_resid_post"


@pytest.fixture(scope="module")
def real_cache(model, tmp_path_factory):
    """8k training + 2k held-out tokens of layer-6 residuals."""
    out = tmp_path_factory.mktemp("real") / "cache"
    return build_cache(
        CacheConfig(
            out=out,
            harvest=HarvestConfig(context_size=64),
            tokens=8192,
            heldout_tokens=2048,
            shard_rows=4096,
            progress=False,
        ),
        model=model,
    )


@pytest.fixture(scope="module")
def grad_cache(model, tmp_path_factory):
    """A smaller cache with dCE/dx as well (the gradient harvest runs the whole model forward and backward)."""
    out = tmp_path_factory.mktemp("real") / "grads"
    return build_cache(
        CacheConfig(
            out=out,
            harvest=HarvestConfig(context_size=64),
            tokens=3072,
            heldout_tokens=1024,
            grads=True,
            progress=False,
        ),
        model=model,
    )


def run(tmp_path, cache, arch: str, **kw) -> dict:
    rules = RuleSettings()
    rules.jumprelu.target_l0 = 16.0
    cfg = TrainRunConfig(
        out=tmp_path / arch,
        cache=cache,
        architecture=arch,
        k=16,
        expansion_factor=2,
        eval_tokens=2048,
        progress=False,
        rules=rules,
        train=TrainConfig(batch_size=512, tokens=512 * 100, lr=2e-3, warmup_steps=10, **kw),
    )
    return train(cfg)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("arch", sorted(REGISTRY))
def test_every_architecture_learns_real_activations(tmp_path, request, arch):
    s = run(tmp_path, request.getfixturevalue("grad_cache" if arch == "gsae" else "real_cache"), arch)["members"][0]
    h = s["heldout"]
    assert h["fvu"] < 0.5, h
    assert 0 < h["l0"] < 1152 / 4, h
    sae = load_sae(s["sae_dir"])
    meta = sae.cfg.metadata
    assert meta["heldout"]["fvu"] == pytest.approx(h["fvu"])
    assert meta["model_name"] == "SmolLM2-135M-Instruct" and meta["hook_name"] == HOOK and meta["context_size"] == 64
    assert meta["exclude_special_tokens"] is True and sae.sparsity is not None
    if arch in ("topk", "abstopk", "gsae", "mpsae"):
        assert h["l0"] <= 16
    if arch in ("mutual_choice", "feature_choice"):  # inference thresholds give about the training L0
        assert abs(h["l0"] - 16) < 0.35 * 16, h
    lines = (tmp_path / arch / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 10


def test_gsae_uses_gradients_on_real_data(grad_cache):
    from sae_kit.cache import ActivationCache

    torch.manual_seed(0)
    from sae_kit.sae import SAE, SAEConfig

    rows = ActivationCache(grad_cache).read("train", 0, 512, with_grads=True)
    sae = SAE(SAEConfig.from_dict({"architecture": "gsae", "d_in": 576, "d_sae": 1152, "k": 16, "gsae_beta": 5.0}))
    with_g = sae.forward_codes(rows.acts[HOOK], grad=rows.grads[HOOK]).indices.sort(-1).values
    plain = SAE(SAEConfig(architecture="topk", d_in=576, d_sae=1152, k=16))
    plain.load_state_dict(sae.state_dict(), strict=False)
    without = plain.forward_codes(rows.acts[HOOK]).indices.sort(-1).values
    assert (with_g != without).any(-1).float().mean() > 0.5  # the real gradient changes most tokens' support


def test_train_from_the_model_stream(tmp_path, model, capsys):
    cfg = TrainRunConfig(
        out=tmp_path / "stream",
        harvest=HarvestConfig(context_size=64),
        k=16,
        expansion_factor=2,
        eval_tokens=1024,
        buffer_tokens=2048,
        log_every=4,
        train=TrainConfig(batch_size=512, tokens=512 * 12, lr=2e-3, warmup_steps=2),
    )
    s = train(cfg, model=model)
    h = s["members"][0]["heldout"]
    assert s["steps"] == 12 and h["tokens"] == 1024 and h["fvu"] < 1.0
    # the bar names its phase (the LM harvest filling the buffer, or SAE steps) and the share of time each takes
    bar = capsys.readouterr().err
    assert "[harvest]" in bar and "[SAE steps]" in bar, bar[-2000:]
    share = re.findall(r"harvest (\d+)% of the time", bar)
    assert share and 0 < int(share[-1]) <= 100, bar[-2000:]
    # the logged rate is the run's average (tokens so far / time so far), so it never swings to burst speeds
    rates = [json.loads(line)["tok_per_s"] for line in (tmp_path / "stream" / "metrics.jsonl").read_text().splitlines()]
    assert len(rates) == 3 and all(r > 0 for r in rates)
    assert max(rates) / min(rates) < 3, rates


def test_cli_train_prints_where_and_how_good(tmp_path, real_cache):
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "sae_kit.cli",
            "train",
            "--cache",
            str(real_cache),
            "--out",
            str(tmp_path / "cli"),
            "--tokens",
            "8192",
            "--batch-size",
            "512",
            "--expansion-factor",
            "2",
            "--eval-tokens",
            "1024",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr
    assert f"SAE saved to {tmp_path / 'cli' / 'sae'}" in res.stdout and "FVU" in res.stdout and "dead" in res.stdout
    res = subprocess.run(
        [sys.executable, "-m", "sae_kit.cli", "train", "--cache", str(real_cache), "--d-in", "768"],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 2 and "768" in res.stderr and "576" in res.stderr


def test_nan_in_data_stops_and_keeps_the_last_good_sae(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6144, 32, generator=g) @ torch.randn(32, 32, generator=g)
    x[5000] = math.nan
    order = torch.arange(len(x))
    writer = CacheWriter(tmp_path / "c", settings={"model_name": "synthetic"}, hooks=[HOOK], d_in=32, shard_rows=1024)
    meta = {k: order for k in ("token", "doc", "row", "pos")}
    writer.add("train", ActivationRows(acts={HOOK: x}, **meta), position=1)
    writer.add("heldout", ActivationRows(acts={HOOK: x[:512]}, **{k: v[:512] for k, v in meta.items()}), position=1)
    writer.close()
    cfg = TrainRunConfig(
        out=tmp_path / "run",
        cache=tmp_path / "c",
        k=4,
        expansion_factor=2,
        checkpoint_every=512,
        progress=False,
        train=TrainConfig(batch_size=256, tokens=6144, lr=1e-3),
    )
    with pytest.raises(NonFiniteError, match="last good SAE"):
        train(cfg)
    sae = load_sae(tmp_path / "run" / "sae")
    assert all(torch.isfinite(p).all() for p in sae.parameters())
    with pytest.raises(SaeKitError, match="already holds"):
        train(cfg)
