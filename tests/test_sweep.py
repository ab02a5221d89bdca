"""Sweeps on real SmolLM2 activations: a sweep equals its members run alone; prefetching changes nothing; config
files; the optional wandb mirror."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from sae_kit import HarvestConfig
from sae_kit.build_cache import CacheConfig, build_cache
from sae_kit.errors import SaeKitError
from sae_kit.training import TrainConfig
from sae_kit.training.run import TrainRunConfig, train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cache(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "cache"
    return build_cache(
        CacheConfig(out=out, harvest=HarvestConfig(context_size=64), tokens=6144, heldout_tokens=1024, progress=False),
        model=model,
    )


def base(tmp_path, cache, **kw) -> TrainRunConfig:
    return TrainRunConfig(
        out=tmp_path,
        cache=cache,
        expansion_factor=2,
        eval_tokens=1024,
        progress=False,
        log_every=1,
        train=TrainConfig(batch_size=512, tokens=512 * 10, lr=2e-3, warmup_steps=2),
        **kw,
    )


def saved(sae_dir) -> dict[str, torch.Tensor]:
    return load_file(sae_dir / "sae_weights.safetensors") | load_file(sae_dir / "sparsity.safetensors")


def test_a_sweep_trains_the_same_saes_as_separate_runs(tmp_path, cache):
    s = train(base(tmp_path / "sweep", cache, architecture=("topk", "relu"), k=(8, 16), seed=(3,), data_seed=1))
    names = [m["name"] for m in s["members"]]
    assert names == ["topk-k8-1152-s3", "topk-k16-1152-s3", "relu-1152-s3"]  # relu has no k: one member
    for line, m in zip(s["table"].splitlines()[2:], s["members"]):
        assert line.startswith(m["name"]) and f"{m['heldout']['fvu']:.4f}" in line
    for m in s["members"]:
        alone = train(base(tmp_path / m["name"], cache, architecture=m["architecture"], k=m["k"], seed=3, data_seed=1))
        assert alone["members"][0]["heldout"] == m["heldout"]
        want, got = saved(tmp_path / m["name"] / "sae"), saved(tmp_path / "sweep" / m["name"] / "sae")
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), m["name"]
    a, b = saved(tmp_path / "sweep" / names[0] / "sae"), saved(tmp_path / "sweep" / names[1] / "sae")
    assert not torch.equal(a["W_dec"], b["W_dec"])  # the members really differ


def test_seeds_change_the_init_but_not_the_batches(tmp_path, cache):
    s = train(base(tmp_path, cache, seed=(0, 1)))
    w0, w1 = (saved(tmp_path / m["name"] / "sae")["W_dec"] for m in s["members"])
    assert not torch.equal(w0, w1)
    other_data = train(base(tmp_path / "d", cache, seed=0, data_seed=5))["members"][0]
    assert other_data["heldout"] != s["members"][0]["heldout"]


def test_prefetch_from_the_model_gives_the_same_sae(tmp_path, model):
    def run(prefetch: str) -> dict[str, torch.Tensor]:
        cfg = TrainRunConfig(
            out=tmp_path / str(prefetch),
            harvest=HarvestConfig(context_size=64),
            k=16,
            expansion_factor=2,
            eval_tokens=512,
            buffer_tokens=1536,
            prefetch=prefetch,
            progress=False,
            train=TrainConfig(batch_size=512, tokens=512 * 8, lr=2e-3, warmup_steps=2),
        )
        train(cfg, model=model)
        return saved(tmp_path / str(prefetch) / "sae")

    on, off = run("on"), run("off")
    assert all(torch.equal(on[k], off[k]) for k in on)


def cli(*args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sae_kit.cli", "train", *args], capture_output=True, text=True, timeout=600, env=env
    )


def test_config_file_describes_a_sweep_and_flags_override_it(tmp_path, cache):
    spec = tmp_path / "sweep.yaml"
    spec.write_text(
        f"cache: {cache}\narchitecture: [topk, abstopk]\nk: 8\nexpansion_factor: 2\neval_tokens: 512\n"
        "train:\n  batch_size: 512\n  tokens: 2048\n  lr: 0.002\n"
    )
    res = cli("--config", str(spec), "--out", str(tmp_path / "run"), "--seed", "0", "1", "--no-progress")
    assert res.returncode == 0, res.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert [m["name"] for m in summary["members"]] == [
        "topk-k8-1152-s0",
        "topk-k8-1152-s1",
        "abstopk-k8-1152-s0",
        "abstopk-k8-1152-s1",
    ]
    assert "topk-k8-1152-s1" in res.stdout and "FVU" in res.stdout
    saved_cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved_cfg["train"]["tokens"] == 2048 and saved_cfg["seed"] == [0, 1]

    spec.write_text("architecture: topk\ntrain:\n  lrr: 0.1\n")
    res = cli("--config", str(spec))
    assert (
        res.returncode == 2
        and "unknown key 'train.lrr'; did you mean 'train.lr'?" in res.stderr
        and len(res.stderr.splitlines()) == 1
    )
    spec.write_text("train:\n  decay: sqrt\n")
    res = cli("--config", str(spec))
    assert res.returncode == 2 and "train.decay must be one of 'linear', 'cosine', 'none'" in res.stderr


def test_sweep_errors(tmp_path, cache):
    with pytest.raises(SaeKitError, match="--k 2000 must be between 1 and d_sae"):
        train(base(tmp_path / "a", cache, k=(8, 2000)))
    with pytest.raises(SaeKitError, match="lists a value twice"):
        train(base(tmp_path / "b", cache, seed=(1, 1)))
    with pytest.raises(SaeKitError, match="unknown architecture 'topq'"):
        train(base(tmp_path / "c", cache, architecture=("topk", "topq")))
    with pytest.raises(SaeKitError, match="--aux auxk ranks latents by encoder pre-activations, and mpsae has none"):
        train(
            dataclasses.replace(
                base(tmp_path / "g", cache, architecture=("topk", "mpsae")), train=TrainConfig(aux="auxk")
            )
        )
    assert not (tmp_path / "g").exists()  # refused before the run directory is made
    with pytest.raises(SaeKitError, match="--d-sae/--expansion-factor must be positive"):
        train(dataclasses.replace(base(tmp_path / "d", cache), expansion_factor=(0,)))
    # harvest flags given with a cache must agree with it (they were silently ignored); the same value is fine
    with pytest.raises(SaeKitError, match="has context_size=64, expected 32"):
        train(base(tmp_path / "e", cache, harvest=HarvestConfig(context_size=32)))
    assert not (tmp_path / "e").exists()
    same = base(tmp_path / "f", cache, harvest=HarvestConfig(context_size=64))
    assert train(dataclasses.replace(same, train=TrainConfig(batch_size=512, tokens=1024)))["steps"] == 2


def test_wandb_mirror_is_optional(tmp_path, cache, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if wandb were not installed
    with pytest.raises(SaeKitError, match="pip install"):
        train(dataclasses.replace(base(tmp_path / "none", cache), wandb=True))
    monkeypatch.delitem(sys.modules, "wandb")
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    res = cli(
        "--cache",
        str(cache),
        "--out",
        str(tmp_path / "wb"),
        "--expansion-factor",
        "2",
        "--batch-size",
        "512",
        "--tokens",
        "2048",
        "--eval-tokens",
        "512",
        "--log-every",
        "1",
        "--wandb",
        "--no-progress",
        env=env,
    )
    assert res.returncode == 0, res.stderr
    records = list((tmp_path / "wb" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(records) == 1 and b"topk-k32-1152-s0/fvu" in records[0].read_bytes()
    assert len((tmp_path / "wb" / "metrics.jsonl").read_text().splitlines()) == 4  # the JSONL record is unchanged
