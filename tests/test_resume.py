"""Exact resume: `sae-kit train` killed with SIGKILL at several points and resumed ends with the same bits as an
uninterrupted run (real SmolLM2 harvest in the prefetch thread, a two-member sweep); damaged checkpoints fall back."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sae_kit.training.checkpoint import CheckpointError, load_checkpoint

pytestmark = pytest.mark.slow

MEMBERS = ("topk-k16-1152-s0", "mutual_choice-k16-1152-s0")
STEPS = 16
ARGS = [
    "--architecture",
    "topk",
    "mutual_choice",
    "--k",
    "16",
    "--expansion-factor",
    "2",
    "--context-size",
    "64",
    "--batch-size",
    "512",
    "--tokens",
    str(512 * STEPS),
    "--buffer-tokens",
    "1536",
    "--checkpoint-every",
    "1024",
    "--log-every",
    "1",
    "--eval-tokens",
    "512",
    "--lr",
    "2e-3",
    "--warmup-steps",
    "2",
    "--no-progress",
]


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "sae_kit.cli", "train", *args]


def run_to_end(*args: str) -> subprocess.CompletedProcess:
    res = subprocess.run(command(*args), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def logged_step(run_dir: Path) -> int:
    """The last step a member has logged (0 before the first)."""
    lines = (
        (run_dir / MEMBERS[0] / "metrics.jsonl").read_text().splitlines()
        if (run_dir / MEMBERS[0] / "metrics.jsonl").exists()
        else []
    )
    for line in reversed(lines):
        try:
            return json.loads(line)["step"]
        except json.JSONDecodeError:
            continue
    return 0


def kill_at(args: list[str], run_dir: Path, step: int) -> None:
    """Start the run and SIGKILL it as soon as it has logged `step` (wherever it then is: stepping, checkpointing, harvesting)."""
    proc = subprocess.Popen(command(*args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600
        while logged_step(run_dir) < step:
            assert proc.poll() is None, f"the run ended before step {step}"
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (run_dir / "summary.json").exists()


def weights(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {
        m: load_file(run_dir / m / "sae" / "sae_weights.safetensors")
        | load_file(run_dir / m / "sae" / "sparsity.safetensors")
        for m in MEMBERS
    }


def assert_identical(run_dir: Path, reference: Path) -> None:
    got, want = weights(run_dir), weights(reference)
    for member in MEMBERS:
        for name, tensor in want[member].items():
            assert torch.equal(got[member][name], tensor), f"{member}/{name} differs from the uninterrupted run"
        steps = [json.loads(line)["step"] for line in (run_dir / member / "metrics.jsonl").read_text().splitlines()]
        assert steps == list(range(1, STEPS + 1))  # every step logged once, none repeated after the resume
    s, r = json.loads((run_dir / "summary.json").read_text()), json.loads((reference / "summary.json").read_text())
    assert [m["heldout"] for m in s["members"]] == [m["heldout"] for m in r["members"]]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, model) -> Path:
    """The uninterrupted run (the `model` fixture has converted the default model already)."""
    out = tmp_path_factory.mktemp("resume") / "reference"
    run_to_end(*ARGS, "--out", str(out))
    assert not (out / "checkpoints").exists()  # deleted once the run completed
    return out


@pytest.mark.parametrize(
    "kills", [(1,), (3,), (9,), (4, 13)], ids=["before-first-checkpoint", "early", "mid-chunk", "twice"]
)
def test_sigkill_and_resume_is_bit_identical(tmp_path, reference, kills):
    out = tmp_path / "run"
    for step in kills:
        kill_at([*ARGS, "--out", str(out)] if step == kills[0] else ["--resume", str(out)], out, step)
    run_to_end("--resume", str(out))
    assert_identical(out, reference)


def test_damaged_newest_checkpoint_falls_back_to_the_previous(tmp_path, reference):
    out = tmp_path / "run"
    kill_at([*ARGS, "--out", str(out)], out, 11)
    checkpoints = sorted((out / "checkpoints").glob("step-*"))
    assert len(checkpoints) == 2
    newest = checkpoints[-1] / f"{MEMBERS[1]}.safetensors"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # truncated
    with pytest.raises(CheckpointError, match="damaged"):
        load_checkpoint(checkpoints[-1])
    res = run_to_end("--resume", str(out))
    assert "damaged" in res.stderr and checkpoints[0].name in res.stderr
    assert_identical(out, reference)


def test_resume_errors(tmp_path, reference):
    res = subprocess.run(command("--resume", str(reference)), capture_output=True, text=True)
    assert res.returncode == 2 and "complete" in res.stderr
    res = subprocess.run(command("--resume", str(tmp_path)), capture_output=True, text=True)
    assert res.returncode == 2 and "no config.json" in res.stderr
    res = subprocess.run(command("--resume", str(reference), "--k", "8"), capture_output=True, text=True)
    assert res.returncode == 2 and "drop --k" in res.stderr
    res = subprocess.run(command(*ARGS, "--out", str(reference)), capture_output=True, text=True)
    assert res.returncode == 2 and "--resume" in res.stderr


def test_sigkill_and_resume_from_a_cache(tmp_path, model):
    from sae_kit import HarvestConfig
    from sae_kit.build_cache import CacheConfig, build_cache

    cache = build_cache(
        CacheConfig(
            out=tmp_path / "cache",
            harvest=HarvestConfig(context_size=64),
            tokens=3072,
            heldout_tokens=512,
            progress=False,
        ),
        model=model,
    )
    args = [*ARGS, "--cache", str(cache), "--tokens", str(512 * STEPS)]  # 16 steps over 3k rows: several epochs
    reference = tmp_path / "reference"
    run_to_end(*args, "--out", str(reference))
    out = tmp_path / "run"
    kill_at([*args, "--out", str(out)], out, 7)
    run_to_end("--resume", str(out))
    assert_identical(out, reference)


def test_a_run_from_before_the_precision_settings_resumes_in_fp32(tmp_path):
    """config.json written before --compute-dtype / --model-dtype existed: that run was fp32 throughout, and its
    resumption must continue in fp32 (auto would switch it to bf16 mid-run on this CPU)."""
    from sae_kit.training.run import TrainRunConfig

    settings = TrainRunConfig(cache=tmp_path / "cache").settings()
    current = _resumed_with(tmp_path / "new", settings)
    assert (current.train.compute_dtype, current.harvest.model_dtype) == ("auto", "auto")
    del settings["train"]["compute_dtype"], settings["harvest"]["model_dtype"]
    old = _resumed_with(tmp_path / "old", settings)
    assert (old.train.compute_dtype, old.harvest.model_dtype) == ("float32", "float32")


def _resumed_with(run_dir, settings):
    from sae_kit.training.run import TrainRunConfig, _resumed

    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps(settings))
    return _resumed(TrainRunConfig(resume=run_dir))
