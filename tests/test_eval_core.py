"""eval.core and eval.dead on the real SmolLM2 with SAEs whose answers are known: an exact identity, an all-zero
reconstruction, random TopK/MP-SAE/g-SAE/Mutual Choice SAEs, and a ReLU SAE whose latents' firing is set by hand."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from sae_kit.eval import core, dead
from sae_kit.eval.core import CoreConfig
from sae_kit.eval.inputs import EvalError, prepare
from sae_kit.heldout import next_token_ce, run_lm
from sae_kit.sae import SAE, SAEConfig

HOOK = "blocks.6.hook_resid_post"
D = 576


def make_sae(architecture: str = "topk", d_sae: int = 256, k: int = 8, **metadata) -> SAE:
    torch.manual_seed(0)
    return SAE(
        SAEConfig(architecture=architecture, d_in=D, d_sae=d_sae, k=k, metadata={"hook_name": HOOK, **metadata})
    ).eval()


def identity_sae() -> SAE:
    """ReLU SAE with W_enc = [I, −I], W_dec = [I; −I], zero biases: x̂ = ReLU(x) − ReLU(−x) = x exactly."""
    sae = make_sae("relu", d_sae=2 * D)
    eye = torch.eye(D)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


@pytest.fixture(scope="module")
def base(model):
    """About 250 held-out tokens at context 32 (x does not depend on the SAE, so tests swap SAEs on these inputs)."""
    return prepare(model, identity_sae(), 200, context_size=32, lm_batch_size=8)


def with_sae(inputs, sae: SAE):
    return dataclasses.replace(inputs, sae=sae)


def test_identity_sae_recovers_everything(model, base):
    x = base.x
    assert torch.equal(base.sae(x).x_hat, x)  # the construction really is an identity
    m = core.measure(base, CoreConfig(ce_tokens=64)).metrics
    assert m["tokens"] == len(x) >= 200
    assert m["fvu"] < 1e-12 and m["mse"] < 1e-12 and m["explained_variance"] == pytest.approx(1)
    assert (
        m["cossim"] == pytest.approx(1)
        and m["l2_ratio"] == pytest.approx(1)
        and m["relative_reconstruction_bias"] == pytest.approx(1)
    )
    used = int((base.contexts.keep.sum(1).cumsum(0) < 64).sum()) + 1  # whole contexts holding 64 kept positions
    tokens, pad = base.contexts.tokens[:used], base.contexts.pad[:used]
    ce, mask = next_token_ce(run_lm(model, tokens, HOOK)[0], tokens, pad)
    assert m["ce_tokens"] == int(base.contexts.keep[:used].sum()) >= 64 and m["ce_positions"] == int(mask.sum())
    assert m["ce_clean"] == pytest.approx(float(ce[mask].mean()), rel=1e-5)
    assert m["ce_zero_ablation"] > m["ce_mean_ablation"] > m["ce_clean"] + 0.1  # the ablations really hurt
    assert m["ce_loss_recovered"] == pytest.approx(1, abs=1e-6) and m["ce_loss_recovered_mean"] == pytest.approx(
        1, abs=1e-6
    )
    assert abs(m["delta_ce"]) < 1e-6 and abs(m["kl_spliced"]) < 1e-6 and m["kl_zero"] > 1
    assert m["kl_score"] == pytest.approx(1, abs=1e-6)
    nonzero = (x != 0).sum(-1)  # ReLU(x) and ReLU(−x) together fire once per nonzero coordinate
    assert m["l0_mean"] == pytest.approx(float(nonzero.double().mean()))
    assert m["ablation_positions"] == "kept"
    json.dumps(m)


def test_ablating_every_position_is_an_option_and_is_reported(base):
    """SAELens and SAEBench zero/mean-ablate every position; the default ablates only the positions x̂ is spliced into."""
    kept = core.measure(base, CoreConfig(ce_tokens=64)).metrics
    section = core.measure(base, CoreConfig(ce_tokens=64, ablation_positions="all"))
    every = section.metrics
    assert every["ablation_positions"] == "all" and "ablating every position" in section.lines[0]
    assert (
        every["ce_spliced"] == kept["ce_spliced"] and every["ce_clean"] == kept["ce_clean"]
    )  # x̂ still goes to the kept positions
    assert (
        abs(every["ce_zero_ablation"] - kept["ce_zero_ablation"]) > 0.1 and every["kl_zero"] != kept["kl_zero"]
    )  # BOS edited too
    assert abs(every["ce_mean_ablation"] - kept["ce_mean_ablation"]) > 0.1
    with pytest.raises(EvalError, match="ablation_positions"):
        CoreConfig(ablation_positions="some")


def test_zero_sae_recovers_nothing(base):
    sae = make_sae("topk")
    with torch.no_grad():
        sae.W_dec.zero_()
        sae.b_dec.zero_()
    section = core.measure(with_sae(base, sae), CoreConfig(ce_tokens=32))
    m = section.metrics
    x = base.x.double()
    assert (
        m["fvu"] == pytest.approx(float(x.square().sum() / (x - x.mean(0)).square().sum()), rel=1e-9) and m["fvu"] > 1
    )
    assert m["normalized_mse"] == pytest.approx(1) and m["cossim"] == 0 and m["l2_ratio"] == 0
    assert m["relative_reconstruction_bias"] is None  # 0/0
    assert m["ce_spliced"] == m["ce_zero_ablation"] and m["ce_loss_recovered"] == 0
    assert m["ce_loss_recovered_mean"] < 0  # worse than splicing in the mean
    assert m["kl_spliced"] == m["kl_zero"] and m["kl_score"] == 0
    assert m["l0_mean"] == 8 and m["l0_hist_counts"][8] == m["tokens"] and sum(m["l0_hist_counts"]) == m["tokens"]
    assert set(section.figures) == {"l0_hist"} and section.lines[0].startswith("core: FVU")


def test_random_topk_sits_between(base):
    sae = make_sae("topk", d_sae=512, k=16)
    sae.init_b_dec(base.x, "mean")
    section = core.measure(with_sae(base, sae), CoreConfig(ce_tokens=64))
    m = section.metrics
    x_hat = sae(base.x).x_hat.detach().double()
    x = base.x.double()
    assert m["fvu"] == pytest.approx(float((x - x_hat).square().sum() / (x - x.mean(0)).square().sum()), rel=1e-6)
    assert m["explained_variance"] == pytest.approx(1 - m["fvu"])
    assert m["mse"] == pytest.approx(float((x - x_hat).square().sum(-1).mean()), rel=1e-6)
    assert m["l0_mean"] == 16 and m["l0_p1"] == m["l0_p99"] == 16
    assert m["ce_clean"] < m["ce_spliced"] < m["ce_zero_ablation"] and 0 < m["ce_loss_recovered"] < 1
    assert m["ce_loss_recovered"] == pytest.approx(
        (m["ce_zero_ablation"] - m["ce_spliced"]) / (m["ce_zero_ablation"] - m["ce_clean"])
    )
    assert 0 < m["kl_spliced"] < m["kl_zero"] and 0 < m["kl_score"] < 1
    assert m["delta_ce"] == pytest.approx(m["ce_spliced"] - m["ce_clean"])
    assert 0 < m["cossim"] < 1 and f"recovered {m['ce_loss_recovered']:.3f}" in section.lines[0]


def test_mpsae_curve_is_monotone_and_chunking_is_exact(base):
    sae = make_sae("mpsae", d_sae=256, k=8)
    sae.init_b_dec(base.x, "mean")
    section = core.measure(with_sae(base, sae), CoreConfig(ce_tokens=0, mp_curve_tokens=200))
    m = section.metrics
    l0, fvu = m["mp_curve_l0"], m["mp_curve_fvu"]
    assert len(l0) == len(fvu) == 16 and m["mp_curve_tokens"] == 200  # default 2k steps
    assert all(b <= a + 1e-9 for a, b in zip(fvu, fvu[1:])) and fvu[-1] < fvu[0]
    assert all(b >= a for a, b in zip(l0, l0[1:])) and 0 < l0[0] <= 1 and l0[-1] > l0[0]
    assert m["mp_fvu_at_k"] == fvu[7] and m["l0_mean"] <= 8
    assert set(section.figures) == {"l0_hist", "mp_curve"} and m["ce_clean"] is None and m["ce_loss_recovered"] is None
    whole = sae.sparsifier.eval_metrics(
        sae, base.x, curve_steps=5, curve_tokens=len(base.x)
    )  # chunked (tiny chunks) == one pass
    chunked = sae.sparsifier.eval_metrics(sae, base.x, curve_steps=5, curve_tokens=len(base.x), max_cells=256 * 37)
    assert torch.allclose(torch.tensor(chunked["mp_curve_l0"]), torch.tensor(whole["mp_curve_l0"]), rtol=1e-5)
    assert torch.allclose(torch.tensor(chunked["mp_curve_fvu"]), torch.tensor(whole["mp_curve_fvu"]), rtol=1e-4)


def test_gsae_uses_real_gradients(model):
    sae = make_sae("gsae", d_sae=256, k=8)
    inputs = prepare(model, sae, 60, context_size=32, lm_batch_size=2)
    assert inputs.grad is not None
    m = core.measure(inputs, CoreConfig(ce_tokens=30, mean_ablation=False)).metrics
    x = inputs.x.double()
    total = (x - x.mean(0)).square().sum()
    with_grad = float((x - sae(inputs.x, grad=inputs.grad).x_hat.detach()).square().sum() / total)
    with pytest.warns(UserWarning, match="no grad"):
        plain = float((x - sae(inputs.x).x_hat.detach()).square().sum() / total)
    assert m["fvu"] == pytest.approx(with_grad, rel=1e-6) and abs(with_grad - plain) > 1e-4
    assert m["ce_spliced"] > m["ce_clean"] and m["ce_mean_ablation"] is None and m["ce_loss_recovered_mean"] is None
    with pytest.raises(EvalError, match="gradients"):
        core.measure(dataclasses.replace(inputs, grad=None))
    with pytest.raises(EvalError, match="gradients"):
        dead.measure(dataclasses.replace(inputs, grad=None))


def test_mutual_choice_uses_its_inference_threshold(base):
    sae = make_sae("mutual_choice", d_sae=256, k=8, training_l0=8.0)
    sae.init_b_dec(base.x, "mean")
    r = ((base.x - sae.b_dec) @ sae.W_enc + sae.b_enc).relu().detach()
    low = core.measure(with_sae(base, sae), CoreConfig(ce_tokens=0)).metrics
    assert low["l0_mean"] == pytest.approx(float((r > 0).sum(-1).double().mean()))
    theta = float(r[r > 0].quantile(0.9))
    sae.sparsifier.threshold.fill_(theta)
    section = core.measure(with_sae(base, sae), CoreConfig(ce_tokens=0))
    high = section.metrics
    assert (
        high["l0_mean"] == pytest.approx(float((r > theta).sum(-1).double().mean()))
        and high["l0_mean"] < low["l0_mean"] / 5
    )
    assert high["l0_training_target"] == 8 and high["l0_training"] == 8.0 and "learned thresholds" in section.lines[1]


def test_dead_and_dense_latents_are_counted(base):
    """64 ReLU latents: 32 never fire, 8 always fire, 8 fire on ~5% of tokens, 16 fire on exactly one token."""
    x = base.x
    sae = make_sae("relu", d_sae=64, training_dead_latents=5, training_tokens=1000)
    W = torch.zeros(D, 64)
    b = torch.zeros(64)
    b[:32], b[32:40] = -1.0, 1.0
    for i, j in enumerate(range(40, 64)):
        col = x[:, i]
        W[i, j] = 1.0
        b[j] = -float(col.quantile(0.95)) if j < 48 else -float(col.topk(2).values[1])  # fire above the cut
    with torch.no_grad():
        sae.W_enc.copy_(W)
        sae.b_enc.copy_(b)
        sae.b_dec.zero_()
    sae.sparsity = torch.tensor([-10.0] * 3 + [-2.0] * 61)
    inputs = with_sae(base, sae)
    section = dead.measure(inputs)
    m = section.metrics
    expected = (sae.encode(x) > 0).double().mean(0)
    assert m["latent_density"] == pytest.approx(expected.tolist())
    assert m["dead_count"] == 32 and m["dead_frac"] == 0.5 and m["alive_frac"] == 0.5
    assert m["dead_detection_floor"] == 1 / len(x) and "detection floor" in section.lines[0]
    assert m["dense_frac_10pct"] == 8 / 64 and m["dense_frac_1pct"] == 16 / 64
    assert all(d == 1 / len(x) for d in m["latent_density"][48:])
    assert m["density_mean"] == pytest.approx(float(expected.mean())) and m["density_median"] == 0
    assert sum(m["log10_density_counts"]) + m["dead_count"] == 64 and m["log10_density_edges"][-1] == 0.25
    assert m["training_dead_latents"] == 5 and m["training_dead_frac"] == 5 / 64 and m["training_tokens"] == 1000
    assert m["training_never_fired"] == 3 and sum(m["training_log10_density_counts"]) == 61
    assert "32 of 64 dead" in section.figures["log10_density"].layout.title.text
    json.dumps(m)
    bare = dead.measure(with_sae(base, make_sae("topk"))).metrics
    assert bare["training_dead_latents"] is None and bare["training_log10_density_counts"] is None


def test_ablation_passes_run_once_for_every_sae_sharing_the_inputs(base, monkeypatch):
    """Zero and mean ablation do not depend on the SAE: a second SAE on the same inputs reuses them (half the LM
    passes) and gets exactly the numbers a fresh evaluation computes."""
    calls = []
    real = core.run_lm
    monkeypatch.setattr(core, "run_lm", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    cfg = CoreConfig(ce_tokens=96)
    shared = dataclasses.replace(base, memo={})
    core.measure(with_sae(shared, make_sae("topk")), cfg)
    first = len(calls)
    second = core.measure(with_sae(shared, make_sae("topk", d_sae=128, k=4)), cfg).metrics
    assert len(calls) - first == first // 2  # clean + spliced, not clean + spliced + zero + mean
    fresh = core.measure(dataclasses.replace(base, sae=make_sae("topk", d_sae=128, k=4).eval(), memo={}), cfg).metrics
    for key in ("ce_clean", "ce_spliced", "ce_zero_ablation", "ce_mean_ablation", "kl_zero", "kl_mean", "kl_spliced"):
        assert second[key] == fresh[key], key
