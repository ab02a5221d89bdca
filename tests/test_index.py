"""`sae-kit index` on real SmolLM2 SAEs: the index agrees with encoding the held-out tokens directly, the signed
side is kept for AbsTopK, a SIGKILLed run resumes to the same files, and bad states get one-line errors."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sae_kit.dashboards.indexer import IndexConfig, build_index, token_strings
from sae_kit.dashboards.store import FeatureIndex, FeatureIndexError
from sae_kit.eval.inputs import prepare
from sae_kit.sae_io import load_sae

pytestmark = pytest.mark.slow

SMALL = [
    "--tokens",
    "3000",
    "--context-size",
    "64",
    "--chunk-contexts",
    "8",
    "--shard-size",
    "128",
    "--row-group",
    "8",
    "--no-progress",
]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "sae_kit.cli", "index", *args]


def member(run: Path, arch: str) -> Path:
    return run / f"{arch}-k16-1152-s0"


def direct_codes(model, run: Path, arch: str) -> torch.Tensor:
    """Dense codes of the same held-out tokens, encoded without the indexer (through eval's inputs)."""
    sae = load_sae(member(run, arch) / "sae")
    inputs = prepare(model, sae, 3000, context_size=64)
    return sae.forward_codes(inputs.x).to_dense().detach()


def test_the_index_agrees_with_encoding_the_heldout_tokens_directly(model, browse_run):
    ix = FeatureIndex(member(browse_run, "topk") / "index")
    codes = direct_codes(model, browse_run, "topk")
    s = ix.summary
    assert ix.meta["tokens"] == len(codes) and ix.meta["complete"]
    assert s["count"].tolist() == (codes != 0).sum(0).tolist()
    assert s["max_act"].to_numpy() == pytest.approx(codes.clamp(min=0).amax(0).numpy(), rel=1e-5, abs=1e-6)
    assert s["density"].to_numpy() == pytest.approx(((codes != 0).sum(0) / len(codes)).numpy())
    f = int(s["max_act"].idxmax())
    row = ix.feature(f)
    assert row["feature"] == f
    top = row["top"]
    assert top[0]["act"] == pytest.approx(float(codes[:, f].max()), rel=1e-5)
    assert [c["act"] for c in top] == sorted((c["act"] for c in top), reverse=True)
    assert len({c["row"] for c in top}) == len(top)
    assert all(c["acts"][c["peak"]] == pytest.approx(c["act"]) for c in top + row["quantiles"])
    assert sum(row["hist_counts"]) == s.loc[f, "count"]
    assert ix.vocab == token_strings(model.tokenizer) and len(ix.vocab) == len(model.tokenizer)
    peak = top[0]["tokens"][top[0]["peak"]]
    assert model.tokenizer.decode([peak]) in (ix.vocab[peak], "\ufffd")
    assert len(row["logit_pos_ids"]) == 10 and row["logit_pos_vals"] == sorted(row["logit_pos_vals"], reverse=True)
    assert len(row["neighbour_ids"]) == 10 and f not in row["neighbour_ids"]
    assert f not in row["cofire_ids"] and all(0 < j <= 1 for j in row["cofire_jaccard"])
    assert ix.with_tokens({top[0]["tokens"][top[0]["peak"]]})[f]


def test_abstopk_keeps_the_negative_side(model, browse_run):
    ix = FeatureIndex(member(browse_run, "abstopk") / "index")
    codes = direct_codes(model, browse_run, "abstopk")
    assert ix.signed
    assert ix.summary["min_act"].to_numpy() == pytest.approx(codes.clamp(max=0).amin(0).numpy(), rel=1e-5, abs=1e-6)
    f = int(ix.summary["min_act"].idxmin())
    negative = ix.feature(f)["top_negative"]
    assert negative and negative[0]["act"] == pytest.approx(float(codes[:, f].min()), rel=1e-5)
    assert all(c["act"] < 0 for c in negative)


def wait_for(path_glob: tuple[Path, str], proc: subprocess.Popen, timeout: float = 300) -> None:
    folder, pattern = path_glob
    deadline = time.monotonic() + timeout
    while not (folder.is_dir() and list(folder.glob(pattern))):
        assert proc.poll() is None, f"the index run ended before {pattern} appeared"
        assert time.monotonic() < deadline
        time.sleep(0.01)


def files(folder: Path) -> dict[str, bytes]:
    return {
        str(f.relative_to(folder)): f.read_bytes()
        for f in sorted(folder.rglob("*"))
        if f.is_file() and f.name != "index.json"
    }


@pytest.mark.parametrize("stage", ["pass", "shards"])
def test_a_killed_index_resumes_to_the_same_files(browse_run, tmp_path, stage):
    sae = member(browse_run, "topk")
    clean = tmp_path / "clean"
    subprocess.run(cli(str(sae), "--out", str(clean), *SMALL), check=True, capture_output=True, timeout=600)
    out = tmp_path / "resumed"
    proc = subprocess.Popen(
        cli(str(sae), "--out", str(out), *SMALL), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_for(
            (out / ".work", "pass-00001.safetensors") if stage == "pass" else (out / "shards", "00128-*.parquet"), proc
        )
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not json.loads((out / "index.json").read_text())["complete"]
    with pytest.raises(FeatureIndexError, match="unfinished; resume it"):
        FeatureIndex(out)
    res = subprocess.run(cli(str(sae), "--out", str(out), *SMALL), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert not (out / ".work").exists()
    want, got = files(clean), files(out)
    assert list(got) == list(want) and len(want) == 2 + 9  # vocab, summary, 9 shards
    assert all(got[name] == want[name] for name in want), "the resumed index differs from the uninterrupted one"


def test_rerun_settings_and_damage(model, browse_run, tmp_path):
    sae = member(browse_run, "topk")
    out = tmp_path / "ix"
    cfg = IndexConfig(sae=sae, out=out, tokens=1500, context_size=64, shard_size=256, row_group=8, progress=False)
    build_index(cfg, model=model)
    stamp = (out / "features.parquet").stat().st_mtime_ns
    start = time.perf_counter()
    build_index(cfg, model=model)
    assert (out / "features.parquet").stat().st_mtime_ns == stamp, "an up-to-date index was rebuilt"
    assert time.perf_counter() - start < 30
    res = subprocess.run(
        cli(str(sae), "--out", str(out), "--tokens", "1500", "--context-size", "64", "--top", "5", "--no-progress"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 2 and res.stderr.strip().count("\n") == 0
    assert "other settings; rebuild it with --force" in res.stderr
    shard = out / "shards" / "00256-00511.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 3 : len(data) // 3 + 64] = bytes(64)
    shard.write_bytes(bytes(data))
    ix = FeatureIndex(out)
    ix.feature(3)  # other shards still read
    with pytest.raises(FeatureIndexError, match=r"shards/00256-00511.parquet is damaged .*--force"):
        for f in range(256, 512, 8):
            ix.feature(f)
    build_index(IndexConfig(**{**cfg.__dict__, "force": True}), model=model)
    assert FeatureIndex(out).feature(300)["feature"] == 300


def test_cli_reports_throughput_and_bad_input(browse_run, tmp_path):
    res = subprocess.run(
        cli(
            str(member(browse_run, "topk")),
            "--out",
            str(tmp_path / "ix"),
            "--tokens",
            "800",
            "--context-size",
            "64",
            "--no-progress",
        ),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "index of 1,152 features on" in res.stdout and "tok/s" in res.stdout and "features/s" in res.stdout
    res = subprocess.run(
        cli(str(browse_run), "--out", str(tmp_path / "x")), capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 2 and "holds 2 SAEs; drop --out" in res.stderr
    res = subprocess.run(cli(str(tmp_path)), capture_output=True, text=True, timeout=600)
    assert res.returncode == 2 and "holds no SAE" in res.stderr


def test_a_moved_run_keeps_its_index(model, browse_run, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(member(browse_run, "topk"), moved)
    stamp = (moved / "index" / "features.parquet").stat().st_mtime_ns
    meta = build_index(
        IndexConfig(sae=moved, tokens=3000, context_size=64, shard_size=256, row_group=8, progress=False), model=model
    )[0]
    assert meta["complete"] and (moved / "index" / "features.parquet").stat().st_mtime_ns == stamp


def test_an_sae_expecting_normalised_inputs_is_indexed_on_scaled_inputs(model, browse_run, tmp_path):
    """The same SAE saved unfolded (normalize_activations="expected_average_only_in") indexes to the same features: the
    held-out layer folds the scale sqrt(d_in)/E||x|| in, and index.json records it."""
    import math

    from sae_kit.heldout import SCALE_TOKENS, activations, harvest_config_for, heldout_contexts

    sae = load_sae(member(browse_run, "topk") / "sae")
    data = harvest_config_for(sae)
    x, _ = activations(model, data, heldout_contexts(model, data, SCALE_TOKENS))
    s = math.sqrt(sae.cfg.d_in) / float(x[:SCALE_TOKENS].double().norm(dim=1).mean())
    with torch.no_grad():
        sae.b_dec.mul_(s)
        sae.b_enc.mul_(s)
    sae.cfg.normalize_activations = "expected_average_only_in"
    sae.save(tmp_path / "normalised" / "sae")
    small = dict(tokens=800, context_size=64, shard_size=256, row_group=8, progress=False)
    meta = build_index(IndexConfig(sae=tmp_path / "normalised", **small), model=model)[0]
    ref = build_index(IndexConfig(sae=member(browse_run, "topk"), out=tmp_path / "ref", **small), model=model)[0]
    assert meta["sae"]["input_scale"] == pytest.approx(s, rel=1e-6) and ref["sae"]["input_scale"] is None
    got, want = FeatureIndex(tmp_path / "normalised" / "index").summary, FeatureIndex(tmp_path / "ref").summary
    assert got["count"].tolist() == want["count"].tolist()
    assert got["max_act"].to_numpy() == pytest.approx(want["max_act"].to_numpy(), rel=1e-4, abs=1e-5)


def test_force_never_deletes_a_folder_that_is_not_an_index(model, browse_run, tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(FeatureIndexError, match="exists and is not a feature index"):
        build_index(
            IndexConfig(sae=member(browse_run, "topk"), out=tmp_path, tokens=500, force=True, progress=False),
            model=model,
        )
    assert (tmp_path / "notes.txt").read_text() == "keep me"
