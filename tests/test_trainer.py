"""The Trainer on tiny synthetic data: schedule, decoder constraint, dead latents and AuxK, normalisation folding, NaN."""

from __future__ import annotations

import math

import pytest
import torch

from sae_kit.errors import SaeKitError
from sae_kit.sae import SAE, SAEConfig
from sae_kit.training import NonFiniteError, TrainConfig, Trainer

D = 16


def data(n: int = 4096, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=g) @ torch.randn(D, D, generator=g) * 3 + 7


def make(arch: str = "topk", **train) -> Trainer:
    torch.manual_seed(0)
    sae = SAE(SAEConfig(architecture=arch, d_in=D, d_sae=64, k=4))
    return Trainer(sae, TrainConfig(**{"batch_size": 256, "tokens": 256 * 40, "lr": 3e-3, "warmup_steps": 5, **train}))


def test_schedule_warms_up_and_decays_to_zero():
    t = make(decay="linear", decay_fraction=0.25)
    f = [t.lr_factor(s) for s in range(t.total_steps)]
    assert f[0] == pytest.approx(1 / 5) and f[4] == 1.0 and f[20] == 1.0
    assert f[-1] == pytest.approx(0.1) and all(a > b for a, b in zip(f[30:], f[31:]))  # reaches 0 after the last step
    cos = make(decay="cosine", decay_fraction=0.5)
    assert cos.lr_factor(cos.total_steps - 1) < 0.01 and cos.lr_factor(25) < 1


def test_training_reduces_fvu_and_keeps_unit_norm_atoms():
    t, x = make(), data()
    first = t.step(x[:256])["fvu"]
    for i in range(39):
        last = t.step(x[(i % 16) * 256 : (i % 16 + 1) * 256])
    assert last["fvu"] < 0.5 * first
    torch.testing.assert_close(t.sae.W_dec.norm(dim=-1), torch.ones(64))
    assert t.step_count == 40 and t.tokens_seen == 40 * 256


def test_dead_latents_are_counted():
    t = make(dead_tokens=512)
    with torch.no_grad():
        t.sae.b_enc[:8] = -1e4  # latents 0..7 can never win the top-k
    x = data()
    t.step(x[:256])
    m = t.step(x[256:512])
    assert m["dead_frac"] >= 8 / 64 and t.dead_mask[:8].all()


def test_auxk_trains_dead_latents_only_when_there_are_some():
    x = data()
    moved = {}
    for aux in ("auxk", "none"):
        t = make(aux=aux, dead_tokens=10**9)
        t.step(x[:256])
        assert t.step(x[256:512])["aux"] == 0  # nothing is dead yet
        t.tokens_since_fired[:32] = 10**9  # declare half the latents dead
        assert t.aux_candidates.numel() == 0  # the aux loss reads the dead set as of the last sync ...
        t.sync()  # ... which runs every sync_every steps (and here by hand)
        assert t.aux_candidates.tolist() == (list(range(32)) if aux == "auxk" else [])
        before = t.sae.W_dec.clone()
        m = t.step(x[512:768])
        moved[aux] = (t.sae.W_dec - before)[:32].norm(dim=-1)
        assert (m["aux"] > 0) == (aux == "auxk")
    assert not torch.allclose(moved["auxk"], moved["none"])


def test_input_normalisation_is_folded_into_the_export():
    t, x = make(), data()
    for i in range(5):
        t.step(x[i * 256 : (i + 1) * 256])
    assert t.scale != 1.0
    exported = t.export()
    t.sae.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            exported(x[:64]).x_hat, t.sae(x[:64] * t.scale).x_hat / t.scale, rtol=1e-4, atol=1e-4
        )
    assert exported.cfg.normalize_activations == "none"
    assert exported.cfg.metadata["activation_scale_folded"] == pytest.approx(t.scale)
    assert exported.sparsity.shape == (64,)


def test_mutual_choice_reports_inference_l0_next_to_training_l0():
    t, x = make("mutual_choice"), data()
    for i in range(30):
        m = t.step(x[(i % 16) * 256 : (i % 16 + 1) * 256])
    assert m["l0"] == pytest.approx(4, rel=1e-6) and "inference_l0" in m and m["inference_l0"] > 0


def test_nan_batch_stops_at_the_next_sync_with_the_weights_finite():
    """A NaN batch is not checked on the host when it arrives (that would stall a GPU every step): its gradients
    and those of the steps after it are zeroed, and the next sync (every sync_every steps) raises naming its step."""
    t, x = make(sync_every=4), data()
    t.step(x[:256])
    bad = x[256:512].clone()
    bad[3, 2] = math.nan
    t.step(bad)  # step index 1: queued, no host read
    t.step(x[512:768])
    with pytest.raises(NonFiniteError, match="NaN/inf at step 1"):
        t.step(x[768:1024])  # the 4th step syncs
    assert t.step_count == 4 and all(bool(torch.isfinite(p).all()) for p in t.sae.parameters())
    with pytest.raises(NonFiniteError, match="at step 1"):
        t.state()  # no checkpoint of a failed state


def test_a_bad_step_leaves_the_weights_as_adam_momentum_alone_moves_them():
    """The bad step's update is exactly one with zero gradients (what a skipped batch costs: Adam's momentum)."""
    x = data()
    runs = {}
    for name in ("nan", "zero"):
        t = make(sync_every=100, grad_clip=0.0)
        t.step(x[:256])
        if name == "nan":
            bad = x[256:512].clone()
            bad[0, 0] = math.nan
            t.step(bad)
        else:  # the same step with its gradients zeroed by hand
            orig = t.opt.step

            def zeroed(*a, orig=orig, t=t, **k):
                for p in t.sae.parameters():
                    if p.grad is not None:
                        p.grad.zero_()
                return orig(*a, **k)

            t.opt.step = zeroed  # type: ignore[method-assign]
            t.step(x[256:512])
        runs[name] = t.sae.W_dec.clone()
    torch.testing.assert_close(runs["nan"], runs["zero"], rtol=0, atol=0)


@pytest.mark.parametrize("kw, match", [({"lr": 0.0}, "--lr"), ({"lr": -1.0}, "--lr"), ({"tokens": 10}, "--tokens")])
def test_bad_train_config(kw, match):
    with pytest.raises(SaeKitError, match=match):
        make(**kw)


def test_aux_zipf_waits_one_window_and_reads_a_windowed_density():
    """aux_zipf's density used to be cumulative from step 0, so at the start every latent looked dead (and a latent
    that stopped firing stayed 'alive' for ever). It now reads an EMA over the dead window, after a grace period."""
    x = data()
    t = make("topk", aux="zipf", dead_tokens=256 * 4, sync_every=1)
    for i in range(4):
        assert t.step(x[i * 256 : (i + 1) * 256])["aux"] == 0  # the first window: no aux yet
    assert t.step(x[1024:1280])["aux"] > 0
    # the windowed density forgets: a latent that fired only long ago reads as (nearly) unused
    t.density_ema.zero_()
    t.density_ema[7] = 1.0
    for _ in range(20):
        t.step_count += 1
        t.density_ema.mul_(1 - 256 / 1024)
    assert float(t.recent_density()[7]) < 0.01
    assert float(t.density()[7]) > 0  # the cumulative density (for sparsity.safetensors) keeps the history
    with pytest.raises(SaeKitError, match="has no encoder"):
        make("mpsae", aux="zipf")


def test_rule_penalties_are_logged_by_name():
    t, x = make("relu"), data()
    m = t.step(x[:256])
    assert m["l1"] > 0 and m["loss"] == pytest.approx(m["mse_norm"] + m["l1"], rel=1e-5)
