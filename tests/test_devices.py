"""A GPU-trained SAE on a laptop, and where training runs and checkpoints by default.

An SAE saved on a GPU node may say `cuda:0` (an old sae-kit, SAELens) or `cuda` in cfg.json. On a machine without
that GPU it must still load, evaluate, index and open in the browser, on the CPU.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from sae_kit.sae_io import available_device, load_sae
from sae_kit.training.run import TrainRunConfig, checkpoint_cadence

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the test is for one without")


def _as_if_trained_on(sae_dir, device: str) -> None:
    cfg_file = sae_dir / "cfg.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["device"] = device
    cfg_file.write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def gpu_sae(browse_run, tmp_path_factory):
    """The browser fixture's TopK member, copied as a one-SAE run whose cfg.json says cuda:0."""
    run = tmp_path_factory.mktemp("gpu") / "run"
    member = next(
        p for p in sorted(browse_run.iterdir()) if (p / "sae" / "cfg.json").is_file() and "abstopk" not in p.name
    )
    shutil.copytree(member / "sae", run / "sae")
    _as_if_trained_on(run / "sae", "cuda:0")
    return run


@pytest.mark.parametrize("device", ["cuda:0", "cuda", "cuda:3", "mps"])
def test_an_sae_saved_on_an_accelerator_loads_on_the_cpu(gpu_sae, tmp_path, device):
    sae_dir = tmp_path / "sae"
    shutil.copytree(gpu_sae / "sae", sae_dir)
    _as_if_trained_on(sae_dir, device)
    sae = load_sae(sae_dir)
    assert sae.W_dec.device.type == "cpu" and sae.cfg.device == "cpu"
    reference = load_sae(gpu_sae / "sae", device="cpu")
    assert torch.equal(sae.W_enc, reference.W_enc)


def test_a_gpu_index_missing_here_maps_to_a_gpu_that_exists(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert available_device("cuda:1") == "cuda:1"
    assert available_device("cuda:3") == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert available_device("cuda:1") == "cpu"


def test_eval_and_index_of_a_gpu_trained_sae_run_on_a_laptop(gpu_sae, model):
    from sae_kit.dashboards.indexer import IndexConfig, build_index
    from sae_kit.dashboards.store import FeatureIndex
    from sae_kit.eval.core import CoreConfig
    from sae_kit.eval.evaluate import EvalConfig, evaluate

    report = evaluate(
        EvalConfig(
            saes=(gpu_sae,),
            out=gpu_sae / "eval",
            tokens=2048,
            context_size=64,
            sections=("core", "dead"),
            core=CoreConfig(ce_tokens=256),
            png=False,
        ),
        model=model,
    )
    (entry,) = report["saes"] if "saes" in report else [report]
    assert json.dumps(entry).count("fvu") and (gpu_sae / "eval" / "report.json").is_file()
    rows = build_index(
        IndexConfig(sae=gpu_sae, tokens=1024, context_size=64, shard_size=256, row_group=8, progress=False), model=model
    )
    assert rows and FeatureIndex(gpu_sae / "index").summary["count"].sum() > 0


def test_the_browser_opens_a_gpu_trained_sae(gpu_sae, monkeypatch):
    from streamlit.testing.v1 import AppTest

    import sae_kit.dashboards
    from sae_kit.dashboards.workspace import ROOT_ENV

    monkeypatch.setenv(ROOT_ENV, str(gpu_sae))
    at = AppTest.from_file(str(sae_kit.dashboards.__path__[0] + "/app.py"), default_timeout=120)
    at.query_params["page"] = "Feature"
    at.query_params["feature"] = "0"
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert any("Feature 0" in t.value for t in at.title)


def test_checkpoints_are_paced_by_tokens_on_the_cpu_and_by_time_on_an_accelerator():
    cfg = TrainRunConfig()
    assert checkpoint_cadence(cfg, "cpu") == (100_000, 0.0)
    assert checkpoint_cadence(cfg, "cuda") == (0, 15 * 60.0)  # a 131k x 2304 checkpoint is ~7 GB
    both = TrainRunConfig(checkpoint_every=50_000, checkpoint_minutes=2.0)
    assert checkpoint_cadence(both, "cuda:1") == checkpoint_cadence(both, "cpu") == (50_000, 120.0)


def _tiny_cache(path):
    from sae_kit.cache import CacheWriter
    from sae_kit.rows import ActivationRows

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 16, generator=g) @ torch.randn(16, 16, generator=g)
    order = torch.arange(len(x))
    writer = CacheWriter(path, settings={"model_name": "synthetic"}, hooks=["h"], d_in=16, shard_rows=1024)
    meta = {k: order for k in ("token", "doc", "row", "pos")}
    writer.add("train", ActivationRows(acts={"h": x}, **meta), position=1)
    writer.add("heldout", ActivationRows(acts={"h": x[:512]}, **{k: v[:512] for k, v in meta.items()}), position=1)
    writer.close()
    return path


@pytest.mark.parametrize(
    "every, minutes, expected", [(0, 1e-9, list(range(1, 16))), (0, 0.0, []), (1024, 0.0, [4, 8, 12])]
)
def test_checkpoints_by_time_by_tokens_or_neither(tmp_path, monkeypatch, every, minutes, expected):
    import sae_kit.training.run as run
    from sae_kit.training import TrainConfig

    written = []
    real = run.save_checkpoint
    monkeypatch.setattr(run, "save_checkpoint", lambda d, step, *a, **k: (written.append(step), real(d, step, *a, **k)))
    cfg = TrainRunConfig(
        out=tmp_path / "run",
        cache=_tiny_cache(tmp_path / "c"),
        k=(4,),
        expansion_factor=(2,),
        checkpoint_every=every,
        checkpoint_minutes=minutes,
        eval_tokens=256,
        progress=False,
        train=TrainConfig(batch_size=256, tokens=4096, lr=1e-3),
    )
    run.train(cfg)
    assert written == expected
