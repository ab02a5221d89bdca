"""`sae-kit cache` end to end on the real model: contents, bad input, and a real SIGKILL followed by a resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sae_kit.cache import ActivationCache

pytestmark = pytest.mark.slow
SAE_KIT = [sys.executable, "-m", "sae_kit.cli"]
ARGS = ["--tokens", "12000", "--heldout-tokens", "2048", "--shard-rows", "2048", "--context-size", "64"]


def run(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*SAE_KIT, *args], capture_output=True, text=True, timeout=600, **kw)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "cache"
    res = run("cache", "--out", str(out), *ARGS)
    assert res.returncode == 0, res.stderr
    assert "cache ready" in res.stdout
    return out


def test_cache_contents_match_a_direct_harvest(reference, model):
    from sae_kit import HarvestConfig, contexts, harvester_for

    cache = ActivationCache(reference)
    assert cache.complete and cache.n_rows("train") == 12000 and cache.n_rows("heldout") == 2048
    assert cache.settings["model_name"] == "SmolLM2-135M-Instruct" and cache.settings["context_size"] == 64
    cfg = HarvestConfig(context_size=64)
    direct = harvester_for(model, cfg).rows(next(contexts(model, cfg)))
    stored = cache.read("train", 0, len(direct))
    assert torch.equal(stored.token, direct.token) and torch.equal(stored.pos, direct.pos)
    torch.testing.assert_close(stored.acts[cfg.hook[0]], direct.acts[cfg.hook[0]], rtol=1e-4, atol=1e-3)


def test_killed_cache_resumes_to_identical_contents(reference, tmp_path):
    out = tmp_path / "cache"
    proc = subprocess.Popen([*SAE_KIT, "cache", "--out", str(out), *ARGS], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and len(list(out.glob("train-*.meta.bin"))) < 2:  # two training shards landed
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with pytest.raises(Exception):
        assert ActivationCache(out).complete
    res = run("cache", "--out", str(out), *ARGS)
    assert res.returncode == 0, res.stderr
    a, b = ActivationCache(out), ActivationCache(reference)
    for split in ("train", "heldout"):
        ra, rb = a.read(split), b.read(split)
        assert torch.equal(ra.row, rb.row) and torch.equal(ra.token, rb.token)
        assert torch.equal(ra.acts[a.hooks[0]], rb.acts[b.hooks[0]])


def test_bad_inputs_leave_nothing_behind(tmp_path):
    out = tmp_path / "c"
    res = run("cache", "--out", str(out), "--hook", "blocks.6.hook_resid_pots", "--tokens", "100")
    assert res.returncode == 2 and "blocks.6.hook_resid_post" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    res = run("cache", "--out", str(out), "--corpus", str(tmp_path / "missing.txt"), "--tokens", "100")
    assert res.returncode == 2 and "does not exist" in res.stderr
    (tmp_path / "empty.txt").write_text("")
    res = run("cache", "--out", str(out), "--corpus", str(tmp_path / "empty.txt"), "--tokens", "100")
    assert res.returncode == 2 and "empty" in res.stderr
    assert not out.exists()


def test_cache_of_another_model_or_hook_is_refused(reference):
    res = run("cache", "--out", str(reference), *ARGS[:-2], "--context-size", "32")
    assert res.returncode == 2 and "context_size" in res.stderr
    cache = ActivationCache(reference)
    with pytest.raises(ValueError, match="hook"):
        cache.check_compatible(hooks=["blocks.7.hook_resid_post"])
    with pytest.raises(ValueError, match="model_name"):
        cache.check_compatible(model_name="gpt2")
