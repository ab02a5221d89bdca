"""Data parallelism under torchrun, on CPU with gloo: 2 ranks train the same SAEs as 1 process (float64; TopK,
Mutual Choice, Feature Choice), only rank 0 writes, a killed rank ends the job in bounded time with one line, a NaN on
one rank stops every rank naming it, and a 2-rank run SIGKILLed at several points and resumed is bit-identical (also
when resumed by one process, to float64 rounding). Members mode (--distribute members): each rank trains its own
members bit-identically to one process, writes only their sae/, and its checkpoints resume in one process. Ranks are real processes launched by torchrun or by hand with
torchrun's environment; tests/_ddp_site/sitecustomize.py instruments them (write audit, float64 SAEs, kills)."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sae_kit.cache import ActivationCache, CacheWriter
from sae_kit.rows import ActivationRows

HOOK = "blocks.0.hook_resid_post"
SITE = Path(__file__).parent / "_ddp_site"
MEMBERS = ("topk-k4-64-s0", "mutual_choice-k4-64-s0", "feature_choice-k4-64-s0")
STEPS = 12
SETTINGS = {
    "architecture": ["topk", "mutual_choice", "feature_choice"],
    "k": "4",
    "d-sae": "64",
    "batch-size": "128",
    "tokens": str(128 * STEPS),
    "checkpoint-every": "256",
    "log-every": "1",
    "eval-tokens": "256",
    "lr": "3e-3",
    "warmup-steps": "2",
    "dead-tokens": "256",
    "mutual-choice.calibration-batches": "2",
    "feature-choice.calibration-batches": "2",
    "device": "cpu",
}


def train_args(cache: Path, out: Path, **changes) -> list[str]:
    """The flags of SETTINGS (with `changes`, underscores for dashes) for a run from `cache` into `out`."""
    settings = SETTINGS | {k.replace("_", "-"): v for k, v in changes.items()}
    flags = ["--cache", str(cache), "--out", str(out), "--no-progress"]
    for name, value in settings.items():
        flags += [f"--{name}", *([value] if isinstance(value, str) else value)]
    return flags


def make_cache(path: Path, n: int = 2048, nan_row: int | None = None) -> Path:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n + 256, 16, generator=g) @ torch.randn(16, 16, generator=g) + torch.randn(16, generator=g)
    if nan_row is not None:
        x[nan_row] = math.nan
    order = torch.arange(len(x))
    writer = CacheWriter(path, settings={"model_name": "synthetic"}, hooks=[HOOK], d_in=16, shard_rows=500)
    meta = {k: order for k in ("token", "doc", "row", "pos")}
    writer.add("train", ActivationRows(acts={HOOK: x[:n]}, **{k: v[:n] for k, v in meta.items()}), position=1)
    writer.add("heldout", ActivationRows(acts={HOOK: x[n:]}, **{k: v[n:] for k, v in meta.items()}), position=1)
    writer.close()
    return path


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return make_cache(tmp_path_factory.mktemp("ddp") / "cache")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra: str) -> dict[str, str]:
    out = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(SITE), os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1"
    )
    return out | extra


def torchrun(nproc: int, args: list[str], timeout: float = 240, **extra: str) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node N -m sae_kit train ...` (N = 1: plain `python -m sae_kit`), with a hard timeout."""
    launcher = (
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            str(nproc),
            "--master-port",
            str(free_port()),
        ]
        if nproc > 1
        else [sys.executable]
    )
    cmd = [*launcher, "-m", "sae_kit", "train", *args]
    alone = {"RANK": "0", "WORLD_SIZE": "1"} if nproc == 1 else {}  # instrumented as a rank (sitecustomize)
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env=env(**alone, **extra), cwd=SITE.parent
    )


def ranks(nproc: int, args: list[str], **extra: str) -> list[subprocess.Popen]:
    """The ranks of a job started by hand with torchrun's environment (no agent: nothing kills the survivors)."""
    port = str(free_port())
    return [
        subprocess.Popen(
            [sys.executable, "-m", "sae_kit", "train", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=SITE.parent,
            env=env(
                RANK=str(r),
                LOCAL_RANK=str(r),
                WORLD_SIZE=str(nproc),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port,
                **extra,
            ),
        )
        for r in range(nproc)
    ]


def saes(run: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {m: load_file(str(run / m / "sae" / "sae_weights.safetensors")) for m in MEMBERS}


def metrics(member_dir: Path) -> list[dict]:
    lines = [json.loads(line) for line in (member_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in m.items() if k != "tok_per_s"} for m in lines]


def files(run: Path) -> list[str]:
    return sorted(str(p.relative_to(run)) for p in run.rglob("*"))


def assert_bit_identical(run: Path, ref: Path) -> None:
    """Every member's SAE tensors equal bit for bit, and the same logged metrics (each step once, despite any kills)
    but for the timing."""
    got, want = saes(run), saes(ref)
    for member in MEMBERS:
        for name, value in want[member].items():
            assert torch.equal(got[member][name], value), f"{member} {name}"
        assert metrics(run / member) == metrics(ref / member), member


@pytest.fixture(scope="module")
def reference(cache, tmp_path_factory) -> dict[str, Path]:
    """One process and two ranks (torchrun -m sae_kit), float64 SAEs, the same global batches; rank writes audited."""
    root = tmp_path_factory.mktemp("ref")
    runs = {"one": root / "one", "two": root / "two"}
    res = torchrun(1, train_args(cache, runs["one"]), SAE_KIT_TEST_SAE_DTYPE="float64")
    assert res.returncode == 0, res.stderr[-3000:]
    audit = f"{runs['two']}:{root / 'audit'}"
    res = torchrun(
        2,
        train_args(cache, runs["two"]),
        SAE_KIT_TEST_SAE_DTYPE="float64",
        SAE_KIT_TEST_AUDIT=audit,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    runs["audit"] = root / "audit"
    return runs


def test_two_ranks_train_the_same_saes_as_one_process_in_float64(reference):
    one, two = saes(reference["one"]), saes(reference["two"])
    for member in MEMBERS:
        assert one[member]["W_dec"].dtype == torch.float64
        for name, value in one[member].items():
            torch.testing.assert_close(two[member][name], value, rtol=1e-9, atol=1e-11, msg=f"{member} {name}")
    # the runs learned something (the comparison is not between two untouched initialisations)
    summary = json.loads((reference["two"] / "summary.json").read_text())
    assert all(m["heldout"]["fvu"] < 0.9 for m in summary["members"])
    one_sum = json.loads((reference["one"] / "summary.json").read_text())
    for a, b in zip(one_sum["members"], summary["members"]):
        assert a["heldout"]["l0"] == pytest.approx(b["heldout"]["l0"], rel=1e-9)


def test_only_rank_0_writes(reference):
    assert files(reference["two"]) == files(reference["one"])
    written = Path(f"{reference['audit']}.0").read_text()
    assert "summary.json" in written and "sae_weights.safetensors" in written  # the audit sees rank 0's writes
    assert Path(f"{reference['audit']}.1").read_text() == ""  # and none of rank 1's


def test_a_killed_rank_ends_the_job_in_bounded_time_with_one_line(cache, tmp_path):
    run = tmp_path / "run"
    procs = ranks(2, train_args(cache, run, tokens=str(128 * 100_000)), SAE_KIT_TEST_KILL="1:3")
    try:
        procs[1].wait(timeout=120)
        killed = time.monotonic()
        _, err = procs[0].communicate(timeout=60)
        took = time.monotonic() - killed
    finally:
        for p in procs:
            p.kill()
    assert procs[1].returncode == -signal.SIGKILL
    assert procs[0].returncode != 0
    assert took < 30, took
    lines = [line for line in err.splitlines() if "error" in line]
    assert lines == [f"sae-kit train: error: rank 1 stopped responding (killed?); resume with --resume {run}"], err


def test_a_nan_on_one_rank_stops_every_rank_and_names_it(tmp_path):
    nan_row = 700
    cache = make_cache(tmp_path / "cache", nan_row=nan_row)
    reader = ActivationCache(cache)
    # which rank reads the NaN row, and in which of its batches (the cache's rank reader, batch 64 per rank)
    where = [
        (r, b)
        for r in range(2)
        for b, rows in enumerate(reader.batches(64, seed=0, drop_last=True, rank=r, world_size=2, hooks=[HOOK]))
        if bool(rows.acts[HOOK].isnan().any())
    ]
    assert len(where) == 1
    rank, batch = where[0]
    run = tmp_path / "run"
    res = torchrun(2, train_args(cache, run, architecture=["topk"], tokens=str(128 * 16)))
    assert res.returncode != 0
    errors = [line for line in res.stderr.splitlines() if line.startswith("sae-kit train: error:")]
    assert len(errors) == 1, res.stderr[-3000:]
    assert f"rank {rank}: the loss became NaN/inf at step {batch}" in errors[0]
    assert not (run / "summary.json").exists()


def test_a_two_rank_run_killed_at_several_points_and_resumed_is_bit_identical(cache, reference, tmp_path):
    run = tmp_path / "run"
    args = train_args(cache, run)
    for kill in ("1:3", "0:7"):  # mid-interval on rank 1, then on rank 0 after a resume
        res = torchrun(
            2,
            args if kill == "1:3" else ["--resume", str(run), "--no-progress"],
            SAE_KIT_TEST_SAE_DTYPE="float64",
            SAE_KIT_TEST_KILL=kill,
        )
        assert res.returncode != 0
        assert not (run / "summary.json").exists()
        assert any((run / "checkpoints").glob("step-*"))
    res = torchrun(2, ["--resume", str(run), "--no-progress"], SAE_KIT_TEST_SAE_DTYPE="float64")
    assert res.returncode == 0, res.stderr[-3000:]
    assert_bit_identical(run, reference["two"])


def test_a_cache_run_resumes_at_another_world_size(cache, reference, tmp_path):
    """Killed with 2 ranks, finished by 1 process: the same global batches, so the same SAEs up to the float64
    rounding of the gradient all-reduce's summation order."""
    run = tmp_path / "run"
    res = torchrun(2, train_args(cache, run), SAE_KIT_TEST_SAE_DTYPE="float64", SAE_KIT_TEST_KILL="0:5")
    assert res.returncode != 0
    res = torchrun(1, ["--resume", str(run), "--no-progress"], SAE_KIT_TEST_SAE_DTYPE="float64")
    assert res.returncode == 0, res.stderr[-3000:]
    got, want = saes(run), saes(reference["two"])
    for member in MEMBERS:
        for name, value in want[member].items():
            torch.testing.assert_close(got[member][name], value, rtol=1e-9, atol=1e-11, msg=f"{member} {name}")


MODEL_ARGS = [
    *("--k", "8", "--expansion-factor", "1", "--context-size", "32", "--lm-batch-size", "4"),
    *("--batch-size", "256", "--tokens", "2048", "--buffer-tokens", "512", "--checkpoint-every", "512"),
    *("--log-every", "1", "--eval-tokens", "256", "--lr", "2e-3", "--device", "cpu", "--no-progress"),
]


def test_a_model_run_harvests_per_rank_and_resumes_exactly_at_its_world_size(tmp_path):
    """From the real model: each rank harvests its own LM batches into its own buffer; killed and resumed with 2
    ranks, bit-identical (the checkpoint holds both ranks' buffer positions)."""
    ref, run = tmp_path / "ref", tmp_path / "run"
    res = torchrun(2, ["--out", str(ref), *MODEL_ARGS])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "SAE saved to" in res.stdout and res.stdout.count("held-out") == 1  # rank 0 alone reports
    res = torchrun(2, ["--out", str(run), *MODEL_ARGS], SAE_KIT_TEST_KILL="1:5")
    assert res.returncode != 0 and "rank 1 stopped responding (killed?)" in res.stderr
    res = torchrun(2, ["--resume", str(run), "--no-progress"])
    assert res.returncode == 0, res.stderr[-3000:]
    want = load_file(str(ref / "sae" / "sae_weights.safetensors"))
    got = load_file(str(run / "sae" / "sae_weights.safetensors"))
    assert want.keys() == got.keys() and all(torch.equal(got[k], v) for k, v in want.items())


def test_a_model_run_refuses_to_resume_at_another_world_size():
    """The checkpoint of a 2-rank model run holds 2 buffer positions (each rank's own shard): 1 process cannot use them."""
    from sae_kit.distributed import World
    from sae_kit.errors import SaeKitError
    from sae_kit.training.sources import ModelSource

    source = ModelSource.__new__(ModelSource)
    source.world = World()
    saved = ({"world_size": 2, "ranks": [{"source": None, "chunk": 0, "batch": 1}] * 2}, {})
    with pytest.raises(SaeKitError, match=r"resume it with 2 \(torchrun --nproc-per-node 2\)"):
        source.resume_position(saved)
    alone = ({"source": None, "chunk": 0, "batch": 1}, {})
    assert source.resume_position(alone) == alone  # a 1-process run's position, for 1 process
    source.world = World(rank=1, world_size=2)
    with pytest.raises(SaeKitError, match="with 1 process"):
        source.resume_position(alone)


# ------------------------------------------------------------------------------------- members mode (--distribute members)
def test_members_are_assigned_whole_and_balanced_by_width():
    from sae_kit.errors import SaeKitError
    from sae_kit.training.run import assign
    from sae_kit.training.sweep import expand

    team = expand(("topk", "mutual_choice"), (8,), (1024, 256), (0, 1))  # 8 members, widths 1024 ×4 and 256 ×4
    owner = assign(team, 3)
    load = [sum(m.d_sae for m in team if owner[m.name] == r) for r in range(3)]
    assert sorted(load) == [1536, 1536, 2048]  # widest first, each to the least loaded rank (within 4/3 of the best)
    assert assign(team, 3) == owner and set(owner) == {m.name for m in team}  # every member once, deterministic
    with pytest.raises(SaeKitError, match=r"this sweep has 8 for 9 ranks; launch at most 8 ranks"):
        assign(team, 9)


@pytest.fixture(scope="module")
def members_run(cache, tmp_path_factory) -> dict[str, Path]:
    """Two ranks in members mode, float64 SAEs, rank writes audited."""
    root = tmp_path_factory.mktemp("members")
    run = root / "run"
    res = torchrun(
        2,
        train_args(cache, run, distribute="members"),
        SAE_KIT_TEST_SAE_DTYPE="float64",
        SAE_KIT_TEST_AUDIT=f"{run}:{root / 'audit'}",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return {"run": run, "audit": root / "audit"}


def test_members_mode_trains_each_member_exactly_as_one_process(reference, members_run):
    """No gradient traffic, the whole batch on every rank: bit-identical to one process (not only to rounding), and
    the same metrics, summary and files."""
    run = members_run["run"]
    assert_bit_identical(run, reference["one"])
    summary = json.loads((run / "summary.json").read_text())
    one = json.loads((reference["one"] / "summary.json").read_text())
    assert [m["name"] for m in summary["members"]] == list(MEMBERS)
    assert [m["heldout"] for m in summary["members"]] == [m["heldout"] for m in one["members"]]
    assert files(run) == files(reference["one"])


def test_members_mode_each_rank_writes_only_its_own_members(members_run):
    """Rank 1 (the mutual-choice member's owner: widths tie, so the grid order deals topk, MC, FC to 0, 1, 0) writes
    that member's sae/ and nothing else; rank 0 writes the rest."""
    mine = [line.split(" ", 1)[1] for line in Path(f"{members_run['audit']}.1").read_text().splitlines()]
    assert any("sae_weights.safetensors" in p for p in mine), mine  # (atomic writes: a temp name, then a rename)
    member = (members_run["run"] / "mutual_choice-k4-64-s0").resolve()
    assert all(Path(p).resolve().is_relative_to(member) and "metrics" not in p for p in mine), mine
    theirs = [line.split(" ", 1)[1] for line in Path(f"{members_run['audit']}.0").read_text().splitlines()]
    assert any("summary.json" in p for p in theirs) and any("topk-k4-64-s0/.sae" in p for p in theirs)
    in_member = {Path(p).resolve().relative_to(member) for p in theirs if Path(p).resolve().is_relative_to(member)}
    assert in_member <= {Path("."), Path("metrics.jsonl")}, in_member  # rank 0 writes that member's metrics only


def test_a_members_run_killed_and_resumed_by_one_process_is_bit_identical(cache, reference, tmp_path):
    """A members-mode checkpoint is one process's (rank 0 gathers the states): killed on rank 1 and resumed by one
    process, the run ends bit-identical to the uninterrupted one."""
    run = tmp_path / "run"
    res = torchrun(
        2, train_args(cache, run, distribute="members"), SAE_KIT_TEST_SAE_DTYPE="float64", SAE_KIT_TEST_KILL="1:7"
    )
    assert res.returncode != 0 and "rank 1 stopped responding (killed?)" in res.stderr, res.stderr[-3000:]
    assert not (run / "summary.json").exists() and any((run / "checkpoints").glob("step-*"))
    res = torchrun(1, ["--resume", str(run), "--no-progress"], SAE_KIT_TEST_SAE_DTYPE="float64")
    assert res.returncode == 0, res.stderr[-3000:]
    assert_bit_identical(run, reference["one"])
