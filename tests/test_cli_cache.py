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

from sae_kit.cache import ActivationCache, CacheError

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
    from sae_kit import HarvestConfig, contexts, harvester_for, load_model
    from sae_kit.models import resolve_dtype

    cache = ActivationCache(reference)
    assert cache.complete and cache.n_rows("train") == 12000 and cache.n_rows("heldout") == 2048
    assert cache.settings["model_name"] == "SmolLM2-135M-Instruct" and cache.settings["context_size"] == 64
    # the cache's LM ran in the dtype --model-dtype auto picks here (bf16 on a CPU with AVX-512 BF16): compare with a
    # direct harvest by a model of that dtype
    dtype = cache.settings["model_dtype"]
    assert dtype == str(resolve_dtype("auto", "cpu")).removeprefix("torch.")
    lm = model if dtype == "float32" else load_model(dtype=dtype)
    cfg = HarvestConfig(context_size=64)
    direct = harvester_for(lm, cfg).rows(next(contexts(lm, cfg)))
    stored = cache.read("train", 0, len(direct))
    assert torch.equal(stored.token, direct.token) and torch.equal(stored.pos, direct.pos)
    torch.testing.assert_close(stored.acts[cfg.hook[0]], direct.acts[cfg.hook[0]], rtol=1e-4, atol=1e-3)


def test_killed_cache_resumes_to_identical_contents(reference, tmp_path):
    out = tmp_path / "cache"
    proc = subprocess.Popen(
        [*SAE_KIT, "cache", "--out", str(out), *ARGS], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    while time.time() < deadline and len(list(out.glob("train-*.meta.bin"))) < 2:  # two training shards landed
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    try:
        complete = ActivationCache(out).complete
    except CacheError:  # killed before its first manifest or mid-shard: not complete either
        complete = False
    assert not complete
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
    assert (
        res.returncode == 2 and "blocks.6.hook_resid_post" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    )
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


def _refused(capsys, argv: list[str], out: Path, *needles: str) -> str:
    """main(argv) exits 2 with one `sae-kit <command>: error:` line holding every needle, and leaves no `out` behind."""
    from sae_kit.cli import main

    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith(f"sae-kit {argv[0]}: error: "), err
    for needle in needles:
        assert needle in err, err
    assert not out.exists(), f"{argv} left {out} behind"
    return err


BAD_CACHE_INPUTS = {
    "context-1": (["--context-size", "1"], ["--context-size must be at least 2", "got 1"]),
    "context-0": (["--context-size", "0"], ["--context-size must be at least 2"]),
    "context-above-n_ctx": (
        ["--context-size", "9000"],
        ["--context-size 9000", "maximum context of 8192", "[2, 8192]"],
    ),
    "tokens-0": (["--tokens", "0"], ["--tokens must be positive"]),
    "tokens-negative": (["--tokens", "-5"], ["--tokens must be positive"]),
    "heldout-negative": (["--heldout-tokens", "-1"], ["--heldout-tokens must be 0 or more"]),
    "shard-rows-0": (["--shard-rows", "0"], ["--shard-rows must be positive"]),
    "lm-batch-0": (["--lm-batch-size", "0"], ["--lm-batch-size must be at least 1"]),
    "lm-batch-negative": (["--lm-batch-size", "-3"], ["--lm-batch-size must be at least 1"]),
    "holdout-1": (["--holdout-fraction", "1"], ["--holdout-fraction must be in [0, 1)"]),
    "holdout-negative": (["--holdout-fraction", "-0.5"], ["--holdout-fraction must be in [0, 1)"]),
    "holdout-0-with-heldout-tokens": (["--holdout-fraction", "0"], ["--holdout-fraction is 0", "--heldout-tokens 0"]),
    "hook-twice": (["--hook", "blocks.6.hook_resid_post", "blocks.6.hook_resid_post"], ["names a hook twice"]),
    "device-unknown": (["--device", "gpu"], ["unknown --device 'gpu'"]),
    "device-missing": (["--device", "cuda:7"], ["--device cuda:7"]),
}


@pytest.mark.parametrize("case", list(BAD_CACHE_INPUTS))
def test_cache_settings_that_cannot_work_are_refused_before_any_directory(case, tmp_path, capsys):
    extra, needles = BAD_CACHE_INPUTS[case]
    if case == "device-missing" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    out = tmp_path / "c"
    _refused(capsys, ["cache", "--out", str(out), "--tokens", "100", "--no-progress", *extra], out, *needles)


def test_corpora_that_give_no_data_are_refused_before_any_directory(tmp_path, capsys):
    out = tmp_path / "c"
    (tmp_path / "blank.txt").write_text("  \n\n\t\n")
    _refused(capsys, ["cache", "--out", str(out), "--corpus", str(tmp_path / "blank.txt")], out, "is empty", "blank")
    (tmp_path / "empty_dir").mkdir()
    _refused(
        capsys,
        ["cache", "--out", str(out), "--corpus", str(tmp_path / "empty_dir")],
        out,
        "holds no .txt/.jsonl/.parquet",
    )
    (tmp_path / "tiny.txt").write_text("Too short for one context.\n\nSo is this.\n")
    # The corpus is smaller than one 128-token context: it used to end with exit 0 and an empty cache.
    _refused(
        capsys,
        ["cache", "--out", str(out), "--corpus", str(tmp_path / "tiny.txt"), "--heldout-tokens", "0", "--no-progress"],
        out,
        "train split",
        "gives no context of 128 tokens",
        "lower --context-size",
    )
    (tmp_path / "file").write_text("not a directory")
    _refused(
        capsys, ["cache", "--out", str(tmp_path / "file" / "c")], tmp_path / "file" / "c", "is a file, not a directory"
    )


def test_train_gets_the_same_checks_before_any_run_directory(tmp_path, capsys):
    out = tmp_path / "run"
    common = ["train", "--out", str(out), "--tokens", "8192", "--no-progress"]
    _refused(capsys, [*common, "--context-size", "1"], out, "--context-size must be at least 2")
    _refused(capsys, [*common, "--context-size", "100000"], out, "maximum context of 8192", "[2, 8192]")
    _refused(capsys, [*common, "--holdout-fraction", "1.5"], out, "--holdout-fraction must be in [0, 1)")
    _refused(capsys, [*common, "--lm-batch-size", "0"], out, "--lm-batch-size must be at least 1")
    _refused(capsys, [*common, "--device", "nonsense"], out, "unknown --device")
    _refused(capsys, [*common, "--batch-size", "-4"], out, "--batch-size")
    _refused(capsys, [*common, "--cache", str(tmp_path / "missing")], out, "no activation cache")
    _refused(capsys, [*common, "--corpus", str(tmp_path / "missing.txt")], out, "does not exist")


def test_hooks_filter_that_matches_nothing_is_an_error(capsys):
    from sae_kit.cli import main

    assert main(["hooks", "--filter", "resid_post"]) == 0
    names = capsys.readouterr().out.split()
    assert "blocks.6.hook_resid_post" in names and all("resid_post" in n for n in names)
    assert main(["hooks", "--filter", "no_such_hook"]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith("sae-kit hooks: error: no hook name of SmolLM2-135M-Instruct contains 'no_such_hook'")
        and "\n" not in err
    )


def test_context_size_one_via_the_real_command(tmp_path):
    out = tmp_path / "c"
    res = run("cache", "--out", str(out), "--context-size", "1", "--tokens", "100")
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [res.stderr.strip()], res.stderr
    assert "--context-size must be at least 2" in res.stderr and not out.exists()
