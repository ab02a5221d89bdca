"""The held-out LM layer and the run-directory layout that eval, the index and the browser share (sae_kit.heldout,
sae_kit.rundir): one chunked encode, one held-out FVU, the SAE's own position rules and data settings, the input
scale of normalising SAEs, and the fixes that came with them (exact L0 percentiles, NaN R² of constant dimensions)."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from sae_kit import rundir
from sae_kit.eval import core
from sae_kit.eval.dark_matter import DarkMatterConfig, predictability, split_tokens
from sae_kit.heldout import (
    SCALE_TOKENS,
    activations,
    encode,
    fvu,
    generate,
    harvest_config_for,
    heldout_contexts,
    mean_activation,
    prompt_tokens,
    run_lm,
)
from sae_kit.sae import SAE, SAEConfig
from sae_kit.training.run import heldout_metrics

HOOK = "blocks.6.hook_resid_post"


def small_sae(architecture: str = "topk", d_in: int = 576, d_sae: int = 256, k: int = 8, **metadata) -> SAE:
    torch.manual_seed(0)
    return SAE(
        SAEConfig(
            architecture=architecture,
            d_in=d_in,
            d_sae=d_sae,
            k=k,
            metadata={"hook_name": HOOK, "context_size": 32, **metadata},
        )
    ).eval()


# ------------------------------------------------------------------------------------------------ without the LM
@pytest.mark.parametrize("architecture", ["topk", "abstopk", "relu", "gsae"])
def test_training_summary_and_eval_report_share_one_heldout_fvu(architecture):
    """The run's summary.json (training.run.heldout_metrics) and eval's core section give the same FVU on the same rows."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6000, 64, generator=g) * 0.5 + 10  # a large mean: float32 centring would lose digits
    grad = torch.randn(6000, 64, generator=g) if architecture == "gsae" else None
    sae = small_sae(architecture, d_in=64)
    sae.init_b_dec(x, "mean")
    summary = heldout_metrics(sae, x, grad)
    report = core.reconstruction(x, encode(sae, x, grad).x_hat)
    x_hat = sae(x, grad=grad).x_hat.detach().double()
    reference = float((x.double() - x_hat).square().sum() / (x.double() - x.double().mean(0)).square().sum())
    assert summary["fvu"] == report["fvu"] == fvu(x, x_hat.float())
    assert summary["fvu"] == pytest.approx(reference, rel=1e-6) and summary["mse"] == pytest.approx(
        report["mse"], rel=1e-12
    )


@pytest.mark.parametrize("architecture", ["topk", "abstopk", "relu", "mutual_choice"])
def test_encode_is_the_same_in_any_chunking(architecture):
    torch.manual_seed(1)
    x = torch.randn(500, 32)
    sae = small_sae(architecture, d_in=32, d_sae=96, k=4)
    whole, chunked = encode(sae, x), encode(sae, x, max_cells=96 * 7)
    assert torch.equal(whole.l0, chunked.l0) and torch.equal(
        whole.counts, chunked.counts
    )  # (BLAS sums differ by chunk size)
    assert torch.allclose(whole.x_hat, chunked.x_hat, atol=1e-6) and torch.allclose(
        whole.max_abs, chunked.max_abs, atol=1e-6
    )
    assert whole.signed == chunked.signed == (architecture == "abstopk")
    dense = sae.encode(x).detach()
    assert torch.equal(whole.counts, (dense != 0).sum(0)) and torch.allclose(whole.max_abs, dense.abs().amax(0))


def test_l0_percentiles_are_exact_beyond_torch_quantile_limit():
    """torch.quantile refuses more than 2^24 elements; the L0 statistics come from counts and match numpy exactly."""
    l0 = torch.randint(0, 70, (17_000_000,), generator=torch.Generator().manual_seed(0))
    stats = core.l0_stats(l0)
    values = l0.numpy()
    for p in core.PERCENTILES:
        assert stats[f"l0_p{p}"] == pytest.approx(float(np.percentile(values, p)), abs=1e-9)
    assert stats["l0_mean"] == pytest.approx(float(values.mean(dtype=np.float64)), rel=1e-12)
    assert stats["l0_std"] == pytest.approx(float(values.std(ddof=1, dtype=np.float64)), rel=1e-9)
    assert sum(stats["l0_hist_counts"]) == len(l0) and stats["l0_hist_edges"][1] == 2  # 70 values in bins of width 2
    small = core.l0_stats(torch.tensor([3, 1, 4, 1, 5, 9, 2, 6]))
    expected = torch.quantile(
        torch.tensor([3, 1, 4, 1, 5, 9, 2, 6], dtype=torch.float64),
        torch.tensor(core.PERCENTILES, dtype=torch.float64) / 100,
    )
    assert [small[f"l0_p{p}"] for p in core.PERCENTILES] == pytest.approx(expected.tolist())


def test_a_constant_error_dimension_has_nan_r2_and_is_skipped():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(4000, 8, generator=g, dtype=torch.float64) * 3 + 10
    E = X @ torch.randn(8, 4, generator=g, dtype=torch.float64) + torch.randn(4000, 4, generator=g, dtype=torch.float64)
    E[:, 2] = 0.1  # constant: nothing to explain (the plain formula reads R² −3 here from rounding, or −inf, or NaN)
    fit, held = split_tokens(4000, 8, DarkMatterConfig(), seed=0)
    got = predictability(X, E, fit, held)
    assert math.isnan(float(got.r2_per_dim[2])) and got.skipped_dims == 1
    live = got.r2_per_dim[[0, 1, 3]]
    assert math.isfinite(got.vector_r2) and got.vector_r2 == pytest.approx(float(live.mean()))


# ------------------------------------------------------------------------------------------------ run directories
def test_training_layout_is_what_eval_index_and_browse_find(tmp_path):
    from sae_kit.dashboards.workspace import Workspace

    sae = small_sae(d_in=4, d_sae=8, k=2)
    for run, names in ((tmp_path / "solo", ["topk-k2-8-s0"]), (tmp_path / "sweep", ["topk-k2-8-s0", "topk-k2-8-s1"])):
        for d in rundir.member_dirs(run, names).values():
            sae.save(rundir.sae_dir(d))
        found = rundir.find(run)
        ws = Workspace(run)
        assert [e.sae_dir for e in ws.entries] == [f.sae_dir.resolve() for f in found]
        assert [e.run_dir for e in ws.entries] == [f.run_dir.resolve() for f in found]
        assert [e.name for e in ws.entries] == [f.name.split("/")[-1] for f in found]
    assert [f.name for f in rundir.find(tmp_path / "solo")] == ["solo"] and rundir.find(tmp_path / "solo")[
        0
    ].index_dir == tmp_path / "solo" / "index"
    assert [f.name for f in rundir.find(tmp_path / "sweep")] == ["sweep/topk-k2-8-s0", "sweep/topk-k2-8-s1"]
    given_sae_dir = Workspace(tmp_path / "solo" / "sae").entries[
        0
    ]  # the browser confined to a run's sae/: its run is outside
    assert given_sae_dir.name == "solo" and given_sae_dir.run_dir == (tmp_path / "solo" / "sae").resolve()
    assert rundir.holds_run(tmp_path / "solo") and not rundir.holds_run(tmp_path / "new")


def test_the_dashboards_import_no_eval_module():
    from pathlib import Path

    import sae_kit.dashboards

    for file in Path(sae_kit.dashboards.__file__).parent.glob("*.py"):
        assert "sae_kit.eval" not in file.read_text(), file
    code = (
        "import sys, sae_kit.dashboards.indexer, sae_kit.dashboards.live, sae_kit.dashboards.workspace, sae_kit.dashboards.pages; "
        "print(sorted(m for m in sys.modules if m.startswith('sae_kit.eval')))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1] == "[]"


# ------------------------------------------------------------------------------------------------ on the real SmolLM2
def test_generation_and_dim_use_the_sae_s_own_position_rule(model):
    """An SAE trained with --no-exclude-first-position (and special tokens kept) is steered at position 0 (BOS) too."""
    keeps_all = small_sae(exclude_first_position=False, exclude_special_tokens=False)
    default = small_sae()
    seen: dict[str, list[torch.Tensor]] = {"all": [], "default": []}

    def spy(name):
        def edit(acts, keep):
            seen[name].append(keep.cpu().clone())
            return acts

        return edit

    text = generate(model, harvest_config_for(keeps_all), "The cat sat on the", 2, edit=spy("all"))
    assert text == generate(
        model, harvest_config_for(default), "The cat sat on the", 2, edit=spy("default")
    )  # the spy edits nothing
    assert all(k.all() for k in seen["all"]) and all(not k[0, 0] for k in seen["default"])
    assert seen["all"][1].shape[1] == seen["all"][0].shape[1] + 1  # the generated token is edited as well
    prompts = ("I love this movie.", "What a happy day!")
    for sae in (keeps_all, default):
        data = harvest_config_for(sae)
        acts = []
        for p in prompts:
            tokens, keep = prompt_tokens(model, data, p)
            assert bool(keep[0, 0]) == (sae is keeps_all)
            acts.append(run_lm(model, tokens, HOOK, capture=True)[1][keep])
        assert torch.allclose(mean_activation(model, data, prompts), torch.cat(acts).mean(0), atol=1e-4)


def test_eval_inputs_follow_each_sae_s_data_settings(model):
    """SAEs on one hook with other holdout fractions or position rules get their own held-out inputs."""
    from sae_kit.eval.evaluate import EvalConfig, _inputs

    first = small_sae()
    twin = small_sae(architecture="abstopk")
    other_split = small_sae(holdout_fraction=0.2)
    keeps_first = small_sae(exclude_first_position=False, exclude_special_tokens=False)
    shared: dict = {}
    cfg = EvalConfig(tokens=100)
    a, b, c, d = (_inputs(shared, cfg, model, s) for s in (first, twin, other_split, keeps_first))
    assert b.x is a.x and b.sae is twin and len(shared) == 3  # same settings: shared tokens; others: their own
    assert c.data.holdout_fraction == 0.2
    assert not (
        c.contexts.tokens.shape == a.contexts.tokens.shape and torch.equal(c.contexts.tokens, a.contexts.tokens)
    )
    assert d.contexts.keep[:, 0].all() and not a.contexts.keep[:, 0].any() and d.data.exclude_first_position is False


def test_an_sae_expecting_normalised_inputs_is_scaled_everywhere(model):
    """An SAE saved with normalize_activations="expected_average_only_in" (weights for inputs scaled to E||x|| = sqrt(d))
    gives the same codes in eval and the browser as the raw SAE it was made from; the scale is in the report."""
    import copy

    from sae_kit.dashboards.live import encode_prompt
    from sae_kit.eval.inputs import prepare, with_sae

    raw = small_sae("topk", d_sae=512, k=16)
    base = prepare(model, raw, 300, lm_batch_size=8)
    raw.init_b_dec(base.x, "mean")
    data = harvest_config_for(raw, lm_batch_size=8)
    x, _ = activations(model, data, heldout_contexts(model, data, SCALE_TOKENS))
    s = math.sqrt(576) / float(x[:SCALE_TOKENS].double().norm(dim=1).mean())
    normalised = copy.deepcopy(raw)
    with torch.no_grad():  # the unfolded form: the same SAE for inputs x·s
        normalised.b_dec.mul_(s)
        normalised.b_enc.mul_(s)
    normalised.cfg.normalize_activations = "expected_average_only_in"
    unfolded = copy.deepcopy(normalised)
    m_raw = core.measure(with_sae(base, raw), core.CoreConfig(ce_tokens=0)).metrics
    inputs = with_sae(base, normalised)
    m_norm = core.measure(inputs, core.CoreConfig(ce_tokens=0)).metrics
    assert (
        inputs.input_scale == pytest.approx(s, rel=1e-12)
        and m_norm["input_scale"] == inputs.input_scale
        and m_raw["input_scale"] is None
    )
    assert m_norm["fvu"] == pytest.approx(m_raw["fvu"], rel=1e-5) and m_norm["l0_mean"] == m_raw["l0_mean"]
    text = "The meeting moved to Thursday."
    assert torch.allclose(
        encode_prompt(model, unfolded, text).codes, encode_prompt(model, raw, text).codes, rtol=1e-4, atol=1e-4
    )
    assert unfolded.cfg.normalize_activations == "none"


def test_logit_lens_applies_the_final_norm_s_own_scale_gemma_s_one_plus_w():
    """A Gemma-style final RMSNorm multiplies by (1 + w): the lens must weight d by (1 + w), not by the raw w
    (which would flip the sign of every dimension with w < -1/2 relative to the real model, and zero w = 0 ones)."""
    from types import SimpleNamespace

    from sae_kit.heldout import logit_lens

    class GemmaRMSNorm(torch.nn.Module):
        def __init__(self, d: int) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(d, generator=torch.Generator().manual_seed(0)))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-6) * (1 + self.weight)

    d, vocab = 8, 11
    g = torch.Generator().manual_seed(1)
    model = SimpleNamespace(
        W_U=torch.randn(d, vocab, generator=g),
        ln_final=GemmaRMSNorm(d),
        cfg=SimpleNamespace(d_model=d, eps=1e-6, normalization_type="RMSPre"),
    )
    directions = torch.randn(3, d, generator=g)
    want = (directions * (1 + model.ln_final.weight.detach())) @ model.W_U
    assert torch.allclose(logit_lens(model, directions), want, atol=1e-4)
    assert not torch.allclose(logit_lens(model, directions), (directions * model.ln_final.weight.detach()) @ model.W_U)


def test_another_corpus_drops_the_training_corpus_subset_and_split():
    """An SAE trained on a hub subset (fineweb sample-10BT, train) evaluated on a local corpus: the subset and split
    belong to the training corpus, so they must not follow the override (they would be refused for a local file)."""
    sae = SAE(SAEConfig(architecture="topk", d_in=8, d_sae=16, k=2))
    sae.cfg.metadata |= {
        "hook_name": "blocks.0.hook_resid_post",
        "dataset_path": "HuggingFaceFW/fineweb",
        "corpus_config": "sample-10BT",
        "corpus_split": "train",
    }
    same = harvest_config_for(sae)
    assert (same.corpus, same.corpus_config, same.corpus_split) == ("HuggingFaceFW/fineweb", "sample-10BT", "train")
    other = harvest_config_for(sae, corpus="pydoc")
    assert other.corpus == "pydoc" and other.corpus_config is None and other.corpus_split == "train"
    chosen = harvest_config_for(sae, corpus="HuggingFaceFW/fineweb-edu", corpus_config="sample-10BT")
    assert chosen.corpus_config == "sample-10BT"
