"""Attention-SAE attribution and splicing through hook_z, the report files, SAE resolution and the comparison table."""

from __future__ import annotations

import json

import plotly.graph_objects as go
import pytest
import torch

from sae_kit import HarvestConfig
from sae_kit.eval.attention import head_attribution
from sae_kit.eval.compare import compare
from sae_kit.eval.inputs import EvalError
from sae_kit.eval.report import build_report, load_report, save_report, write_figures, write_plotly_js
from sae_kit.heldout import heldout_contexts, next_token_ce, run_lm, splice
from sae_kit.sae import SAE, SAEConfig

Z_HOOK = "blocks.6.attn.hook_z"


def test_head_attribution_finds_the_head_a_feature_writes_from():
    W = torch.zeros(3, 4 * 5)
    W[0, 5:10] = 1.0  # head 1 only
    W[1, :] = 1.0  # spread evenly
    W[2, 15:20] = 2.0
    W[2, 0:5] = 2.0  # heads 0 and 3 equally
    a = head_attribution(W, n_heads=4)
    assert torch.allclose(a[0], torch.tensor([0.0, 1, 0, 0]))
    assert torch.allclose(a[1], torch.full((4,), 0.25))
    assert torch.allclose(a[2], torch.tensor([0.5, 0, 0, 0.5]))
    with pytest.raises(EvalError, match="multiple of n_heads"):
        head_attribution(torch.zeros(2, 10), n_heads=4)


def test_hook_z_splices_back_through_the_head_reshape(model):
    ctx = next(heldout_contexts(model, HarvestConfig(hook=(Z_HOOK,), context_size=24), 60).batches(3))
    clean, z = run_lm(model, ctx.tokens, Z_HOOK, capture=True)
    assert z.shape[-1] == model.cfg.n_heads * model.cfg.d_head  # [R, T, heads, d_head] seen flattened
    same, _ = run_lm(model, ctx.tokens, Z_HOOK, edit=splice(z[ctx.keep]), keep=ctx.keep)
    assert torch.equal(clean, same)
    # Zeroing one head's slice changes the output: the reshape puts the values back on the right head.
    one_head = z[ctx.keep].clone()
    one_head[:, : model.cfg.d_head] = 0
    changed, _ = run_lm(model, ctx.tokens, Z_HOOK, edit=splice(one_head), keep=ctx.keep)
    ce_clean, mask = next_token_ce(clean, ctx.tokens, ctx.pad)
    ce_changed, _ = next_token_ce(changed, ctx.tokens, ctx.pad)
    assert not torch.equal(ce_clean, ce_changed)


def test_figures_and_report_files(tmp_path):
    write_plotly_js(tmp_path)
    fig = go.Figure(go.Scatter(x=[1, 2], y=[3, 4]))
    paths, png = write_figures(tmp_path, "my-sae", {"core-l0": fig}, png=False)
    assert paths == {"core-l0": "figures/my-sae/core-l0.html"} and png is False
    html = (tmp_path / paths["core-l0"]).read_text()
    assert "../plotly.min.js" in html and (tmp_path / "figures" / "plotly.min.js").stat().st_size > 1e6  # opens offline
    assert json.loads((tmp_path / "figures" / "my-sae" / "core-l0.json").read_text())["data"][0]["y"] == [3, 4]
    report = build_report({"tokens": 10}, [{"name": "a", "sections": {"core": {"fvu": float("nan")}}}], None)
    path = save_report(tmp_path, report)
    loaded = load_report(path)
    assert loaded["schema_version"] == 1 and loaded["saes"][0]["sections"]["core"]["fvu"] is None  # NaN is not JSON
    path.write_text(json.dumps({**loaded, "schema_version": 99}))
    with pytest.raises(ValueError, match="upgrade sae-kit"):
        load_report(path)


def test_resolve_finds_sae_run_and_sweep_dirs(tmp_path):
    from sae_kit.rundir import RunDirError, resolve

    sae = SAE(SAEConfig(d_in=4, d_sae=8, k=2))
    sae.save(tmp_path / "run" / "sae")
    sae.save(tmp_path / "sweep" / "topk-k2-8-s0" / "sae")
    sae.save(tmp_path / "sweep" / "topk-k2-8-s1" / "sae")
    found = resolve((tmp_path / "run", tmp_path / "run" / "sae", tmp_path / "sweep"))
    assert [f.name for f in found] == ["run#0", "run#1", "sweep/topk-k2-8-s0", "sweep/topk-k2-8-s1"]
    assert [f.run_dir for f in found] == [
        tmp_path / "run",
        tmp_path / "run",
        tmp_path / "sweep" / "topk-k2-8-s0",
        tmp_path / "sweep" / "topk-k2-8-s1",
    ]
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunDirError, match="holds no SAE"):
        resolve((tmp_path / "empty",))


def test_comparison_table_and_pareto_figures():
    saes = [
        {
            "name": f"s{i}",
            "architecture": arch,
            "d_sae": 64,
            "k": 8,
            "sections": {
                "core": {"l0_mean": 8.0 + i, "fvu": 0.3 - 0.1 * i, "ce_loss_recovered": 0.8},
                "dead": {"dead_frac": 0.1 * i},
            },
        }
        for i, arch in enumerate(["topk", "abstopk"])
    ]
    section = compare(saes)
    rows = section.metrics["table"]
    assert rows[1]["fvu"] == pytest.approx(0.2) and rows[0]["steering_score"] is None
    assert set(section.figures) == {"pareto_l0_fvu", "pareto_l0_ce_recovered", "dead_per_sae"}
    text = section.lines[0].splitlines()
    assert text[0].startswith("SAE") and text[2].startswith("s1") and "0.2" in text[2]
