"""Per-architecture behaviour of the SAE module, the sparsifier registry and the training losses (tiny shapes)."""

from __future__ import annotations

import warnings

import pytest
import torch

from sae_kit.sae import SAE, SAEConfig
from sae_kit.sparsifiers import ARCHITECTURES, REGISTRY, StepContext, get_sparsifier
from sae_kit.training import losses

D_IN, D_SAE, K = 16, 64, 4


def make(architecture: str, seed: int = 0, **kw) -> SAE:
    """An SAE from cfg.json-style flat settings (rule settings under their cfg.json keys, e.g. gsae_beta)."""
    torch.manual_seed(seed)
    return SAE(SAEConfig.from_dict({"architecture": architecture, "d_in": D_IN, "d_sae": D_SAE, "k": K, **kw}))


def rule_loss(sae: SAE, x: torch.Tensor, out, step: int = 0, total: int = 10) -> torch.Tensor:
    """The rule's training loss on a batch (reconstruction + its own penalties), as the trainer adds it up."""
    ctx = StepContext(x=x, out=out, data_var=1.0, step=step, total_steps=total)
    return sae.sparsifier.reconstruction_loss(sae, ctx) + sum(sae.sparsifier.penalties(sae, ctx).values())


def batch(n: int, seed: int = 1, d: int = D_IN) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def test_registry_and_aliases():
    assert get_sparsifier("batchtopk") is REGISTRY["mutual_choice"]
    assert {
        "topk",
        "abstopk",
        "gsae",
        "mpsae",
        "mutual_choice",
        "batchtopk",
        "feature_choice",
        "relu",
        "jumprelu",
    } <= set(ARCHITECTURES)
    with pytest.raises(ValueError, match="use one of: .*topk"):
        get_sparsifier("no_such_rule")


@pytest.mark.filterwarnings("ignore:gsae")
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_shapes_parameters_and_leading_dims(architecture):
    sae = make(architecture)
    names = dict(sae.named_parameters())
    assert names["W_dec"].shape == (D_SAE, D_IN) and names["b_dec"].shape == (D_IN,)
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(D_SAE))
    if architecture == "mpsae":
        assert not hasattr(sae, "W_enc") and not hasattr(sae, "b_enc")
    else:
        assert sae.W_enc.shape == (D_IN, D_SAE) and sae.b_enc.shape == (D_SAE,)
        torch.testing.assert_close(sae.W_enc, sae.W_dec.t())  # tied init
    own = sae.sparsifier.state_tensors()
    assert (sae.threshold is not None) == ("threshold" in own)
    assert set(sae.weights()) == {"W_dec", "b_dec", *own, *(("W_enc", "b_enc") if sae.cfg.rule.uses_encoder else ())}
    for t in own.values():
        assert t.shape == (D_SAE,)
    x = batch(24).reshape(2, 3, 4, D_IN)
    for mode in (sae.train, sae.eval):
        mode()
        f = sae.encode(x)
        assert f.shape == (2, 3, 4, D_SAE)
        assert sae.decode(f).shape == x.shape
        out = sae(x)
        assert out.x_hat.shape == x.shape
        torch.testing.assert_close(out.x_hat.reshape(-1, D_IN), sae.decode(out.codes.to_dense()))


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_backward_reaches_every_parameter(architecture):
    sae = make(architecture)
    x = batch(64)
    sae.sparsifier.init_from_sample(sae, x)
    out = sae(x, grad=batch(64, seed=5))
    rule_loss(sae, x, out, step=9).backward()  # the rule's own loss terms (JumpReLU's L0 reaches θ)
    for name, p in sae.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_topk_keeps_relu_of_the_k_largest():
    sae = make("topk")
    x = batch(32)
    codes = sae.forward_codes(x)
    z = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    assert codes.values.shape == codes.indices.shape == (32, K)
    top = z.topk(K, dim=-1)
    torch.testing.assert_close(codes.to_dense(), torch.zeros_like(z).scatter(1, top.indices, top.values.relu()))


def test_abstopk_keeps_negative_values():
    sae = make("abstopk")
    x = batch(64)
    codes = sae.forward_codes(x)
    z = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    want = torch.zeros_like(z).scatter(1, z.abs().topk(K, -1).indices, z.gather(1, z.abs().topk(K, -1).indices))
    torch.testing.assert_close(codes.to_dense(), want)
    assert (codes.values < 0).any() and (codes.l0() == K).all()
    assert codes.signed


def test_gsae_beta0_equals_topk_and_gradient_changes_support():
    topk = make("topk", seed=3)
    x, g = batch(48), batch(48, seed=7) * 100
    for beta in (0.0, 1.0):
        gsae = make("gsae", seed=3, gsae_beta=beta)
        gsae.load_state_dict(topk.state_dict())
        f_gsae = gsae.encode(x, grad=g)
        if beta == 0:
            torch.testing.assert_close(f_gsae, topk.encode(x))
        else:
            support_changed = (f_gsae != 0) != (topk.encode(x) != 0)
            assert support_changed.any()
            # kept values are ReLU(z), only the support moves
            z = (x - gsae.b_dec) @ gsae.W_enc + gsae.b_enc
            torch.testing.assert_close(f_gsae, (f_gsae != 0) * z.relu())
    # the per-token RMS normalisation makes the selection independent of the gradient's scale
    gsae = make("gsae", seed=3)
    torch.testing.assert_close(gsae.encode(x, grad=g), gsae.encode(x, grad=g * 1e-3))


def test_gsae_without_grad_warns_once_and_falls_back_to_topk():
    topk, gsae = make("topk", seed=3), make("gsae", seed=3)
    x = batch(8)
    with pytest.warns(UserWarning, match="no grad"):
        f = gsae.encode(x)
    torch.testing.assert_close(f, topk.encode(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gsae.encode(x)


def test_mutual_choice_activates_exactly_k_times_batch():
    sae = make("mutual_choice").train()
    x = batch(50)
    codes = sae.forward_codes(x)
    assert int((codes.to_dense() != 0).sum()) == K * 50
    assert not (codes.l0() == K).all()  # the allocation is batch-level, not per token
    z = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    kth = z.relu().flatten().topk(K * 50).values[-1]
    torch.testing.assert_close(codes.to_dense(), z.relu() * (z >= kth))


@pytest.mark.parametrize("budget", [1, 3000, 150_000, 299_999])
def test_flat_topk_indices_is_exact(budget):
    from sae_kit.sparsifiers.mutual_choice import flat_topk_indices

    flat = torch.randn(300_000, generator=torch.Generator().manual_seed(budget)).relu().mul(50).round()  # many ties
    got = flat_topk_indices(flat, budget)
    assert got.unique().numel() == budget
    assert torch.equal(flat[got].sort().values, flat.topk(budget).values.sort().values)


@pytest.mark.parametrize("B", [64, 80])
def test_feature_choice_gives_every_feature_exactly_m_tokens(B):
    sae = make("feature_choice", fc_zipf_exponent=0.0).train()  # uniform capacities
    codes = sae.forward_codes(batch(B))
    m = round(K * B / D_SAE)
    assert (codes.feature_counts() == m).all()  # so no dead latent
    assert codes.feature_counts().sum() == m * D_SAE


def test_feature_choice_zipf_capacities():
    sae = make("feature_choice", fc_zipf_exponent=1.0).train()
    x = batch(128)
    codes = sae.forward_codes(x)
    r = ((x - sae.b_dec) @ sae.W_enc + sae.b_enc).relu()
    caps = sae.sparsifier.capacities(r)
    assert torch.equal(codes.feature_counts(), torch.minimum(caps, (r > 0).sum(0)))  # a kept zero is not a firing
    assert caps.min() >= 1 and caps.max() > caps.min() and caps.max() <= 128
    assert int(caps.sum()) == K * 128  # the budget exactly, with the capped top ranks' excess water-filled down
    assert torch.equal(caps[r.sum(0).argsort(descending=True)], caps.sort(descending=True).values)  # by affinity rank


def test_zipf_capacities_water_fill_the_budget():
    from sae_kit.sparsifiers.feature_choice import zipf_capacities

    for s in (0.0, 0.5, 1.0, 2.0):
        caps = zipf_capacities(2304, 4096, 32 * 4096, s)
        assert int(caps.sum()) == 32 * 4096 and int(caps.max()) <= 4096 and int(caps.min()) >= 1
        assert bool((caps.diff() <= 0).all())  # non-increasing with rank
    assert zipf_capacities(64, 80, 4 * 80, 0.0).unique().tolist() == [5]
    assert int(zipf_capacities(512, 128, 128, 0.0).sum()) == 512  # k·B < F: each latent still keeps one


@pytest.mark.parametrize("architecture", ["mutual_choice", "batchtopk", "feature_choice"])
def test_learned_thresholds_give_inference_l0_close_to_training_l0(architecture):
    sae = make(architecture, d_sae=128, k=8, threshold_ema=0.05).train()
    train_l0 = []
    for step in range(40):
        codes = sae.forward_codes(batch(256, seed=100 + step))
        train_l0.append(codes.l0().float().mean())
    assert codes.inference_l0 is not None
    assert sae.sparsifier.threshold_updates == 40
    sae.eval()
    x = batch(1024, seed=999)
    f = sae.encode(x)
    for i in range(3):  # single tokens encode exactly as they do inside a batch
        torch.testing.assert_close(sae.encode(x[i : i + 1]), f[i : i + 1])
    inference_l0 = (f != 0).sum(-1).float().mean()
    training_l0 = torch.stack(train_l0).mean()
    assert abs(inference_l0 / training_l0 - 1) < 0.10, (float(inference_l0), float(training_l0))
    z = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    torch.testing.assert_close(f, z.relu() * (z > sae.threshold))  # a JumpReLU at inference
    if architecture != "feature_choice":
        assert (sae.threshold == sae.threshold[0]).all()  # one global threshold


def test_thresholds_update_only_in_training_mode():
    sae = make("mutual_choice").eval()
    sae.encode(batch(32))
    assert (sae.threshold == 0).all() and int(sae.sparsifier.threshold_updates) == 0
    sae.train()
    sae.encode(batch(32))
    assert (sae.threshold > 0).all() and not sae.threshold.requires_grad


def _mp_trace(sae, x, steps, **kw):
    xc = x - sae.b_dec
    return [(a.detach(), j, r.detach()) for a, j, r, _ in sae.sparsifier.pursue(sae.W_dec, xc, steps, **kw)], xc


@pytest.mark.parametrize("signed", [False, True])
def test_mp_residual_never_increases_and_is_orthogonal_to_last_atom(signed):
    sae = make("mpsae", mp_signed=signed)
    with torch.no_grad():
        sae.b_dec.normal_()
    x = batch(32)
    trace, xc = _mp_trace(sae, x, 12)
    prev = xc.norm(dim=-1)
    for a, j, r in trace:
        norm = r.norm(dim=-1)
        assert (norm <= prev + 1e-5).all()
        dot = (r * sae.W_dec[j]).sum(-1)
        used = a != 0
        assert used.any()
        torch.testing.assert_close(dot[used], torch.zeros_like(dot[used]), atol=1e-5, rtol=0)
        torch.testing.assert_close(norm.square(), prev.square() - a.square(), atol=1e-4, rtol=1e-4)
        prev = norm
        if not signed:
            assert (a >= 0).all()


def test_mp_training_runs_k_steps_and_inference_stops_adaptively():
    sae = make("mpsae", k=8).train()
    x = batch(64)
    codes = sae.forward_codes(x)
    assert codes.values.shape == (64, 8) and not codes.unique_indices
    out = sae(x)
    torch.testing.assert_close(out.x_hat, x - list(sae.sparsifier.pursue(sae.W_dec, x - sae.b_dec, 8))[-1][2])
    sae.eval()
    full = sae.forward_codes(x, stop_on_same_support=False).l0().float().mean()
    loose = sae.forward_codes(x, stop_residual=0.9).l0().float().mean()
    assert loose < full
    fewer = sae.forward_codes(x, max_steps=3)
    assert fewer.values.shape[1] <= 3
    # stopping on an unchanged support: no token ever repeats an atom
    codes = sae.forward_codes(x, max_steps=40, stop_on_same_support=True)
    counts = torch.zeros(64, D_SAE).scatter_add(1, codes.indices, (codes.values != 0).float())
    assert counts.max() <= 1 + 1  # at most the one re-selection that ends the pursuit
    with pytest.raises(ValueError, match="max_steps >= 1"):
        sae.forward_codes(x, max_steps=0)


def test_mp_curve_from_one_pass_in_chunks():
    sae = make("mpsae", k=6).eval()
    x = batch(64)
    m = sae.sparsifier.eval_metrics(sae, x, curve_steps=10, curve_tokens=64, max_cells=D_SAE * 10)  # 7 chunks
    l0, fvu = torch.tensor(m["mp_curve_l0"]), torch.tensor(m["mp_curve_fvu"], dtype=torch.float64)
    assert l0.shape == fvu.shape == (10,) and m["mp_curve_tokens"] == 64
    assert (l0.diff() >= 0).all() and (fvu.diff() <= 1e-6).all() and l0[0] == 1
    x_hat = sae(x, max_steps=10).x_hat
    torch.testing.assert_close(
        fvu[-1], ((x - x_hat).double().square().sum() / (x - x.mean(0)).double().square().sum()), rtol=1e-5, atol=1e-7
    )
    assert m["mp_fvu_at_k"] == m["mp_curve_fvu"][5]
    assert make("topk").sparsifier.eval_metrics(make("topk"), x) == {}


def test_mp_inference_equals_training_by_default():
    """MP-SAE used to stop on a repeated atom at inference only, so eval scored another rule than training."""
    sae = make("mpsae", k=8)
    x = batch(64)
    trained = sae.train()(x).x_hat
    inferred = sae.eval()(x).x_hat
    torch.testing.assert_close(inferred, trained)
    assert sae.forward_codes(x).values.shape[1] == 8
    legacy = make("mpsae", k=8, mp_stop_on_same_support=True).eval()  # the old default, still a choice
    legacy.load_state_dict(sae.state_dict())
    assert legacy.forward_codes(x, max_steps=40).values.shape[1] < 40


def test_relu_and_jumprelu_codes():
    x = batch(32)
    relu = make("relu")
    z = (x - relu.b_dec) @ relu.W_enc + relu.b_enc
    torch.testing.assert_close(relu.encode(x), z.relu())
    jr = make("jumprelu", jumprelu_init_threshold=0.1, jumprelu_bandwidth=0.05)
    jr.load_state_dict(relu.state_dict(), strict=False)
    torch.testing.assert_close(jr.threshold, torch.full((D_SAE,), 0.1))
    torch.testing.assert_close(jr.encode(x), z * (z > 0.1))


def test_jumprelu_straight_through_gradients():
    from sae_kit.sparsifiers.jumprelu import l0_penalty

    sae = make("jumprelu", jumprelu_init_threshold=0.2, jumprelu_bandwidth=0.1)
    x = batch(16)
    out = sae(x)
    out.codes.dense.sum().backward()
    z, theta, eps = out.z, sae.threshold.detach(), 0.1
    window = ((z - theta).abs() < eps / 2).float()
    want = (-(theta / eps) * window).sum(0)  # θ is the parameter itself (not log θ)
    torch.testing.assert_close(sae.threshold.grad, want)

    theta = torch.full((D_SAE,), 0.2, requires_grad=True)
    l0 = l0_penalty(z, theta, eps)
    torch.testing.assert_close(l0, (z > 0.2).sum(-1).float().mean())
    l0.backward()
    torch.testing.assert_close(theta.grad, -(window.sum(0) / eps) / 16)
    target = l0_penalty(z, theta.detach(), eps, coefficient=2.0, target_l0=10.0)
    torch.testing.assert_close(target, 2.0 * ((z > 0.2).sum(-1).float().mean() / 10 - 1) ** 2)


def test_jumprelu_bandwidth_scales_with_the_input_norm_and_threshold_starts_at_the_target():
    """Gemma Scope's ε = 0.001 assumed E||x||² = 1; our inputs have E||x|| = sqrt(d), so ε must grow with ||x||."""
    sae = make("jumprelu", d_sae=256, jumprelu_target_l0=8.0)
    x = batch(2048) * 5
    sae.sparsifier.init_from_sample(sae, x)
    norm = float(x.norm(dim=-1).mean())
    assert sae.sparsifier.bandwidth == pytest.approx(0.001 * norm, rel=1e-5)
    l0 = float((sae.encode(x) != 0).sum(-1).float().mean())
    assert l0 == pytest.approx(8.0, rel=0.2)
    sae.fold_activation_scale(5.0)  # ε and θ follow the input units
    assert sae.sparsifier.bandwidth == pytest.approx(0.001 * norm / 5, rel=1e-5)
    sae.sparsifier.threshold.data.fill_(-1.0)
    sae.sparsifier.after_step(sae)
    assert (sae.threshold > 0).all()


# ------------------------------------------------------------------------------------------------------- losses
def test_reconstruction_losses():
    x, x_hat = batch(20), batch(20, seed=2)
    torch.testing.assert_close(losses.mse(x_hat, x), (x - x_hat).square().sum(-1).mean())
    fvu = (x - x_hat).square().sum() / (x - x.mean(0)).square().sum()
    torch.testing.assert_close(losses.normalized_mse(x_hat, x), fvu)
    torch.testing.assert_close(losses.normalized_mse(x_hat, x, baseline=2.0), losses.mse(x_hat, x) / 2)


def test_relu_l1_penalty_warms_up():
    sae = make("relu", relu_l1_coef=0.5, relu_l1_warmup_fraction=0.5)
    x = batch(20)
    out = sae(x)
    l1 = out.codes.to_dense().abs().sum(-1).mean()
    for step, warm in ((0, 0.2), (2, 0.6), (4, 1.0), (9, 1.0)):  # 10 steps, warm-up over 5
        ctx = StepContext(x=x, out=out, data_var=1.0, step=step, total_steps=10)
        torch.testing.assert_close(sae.sparsifier.penalties(sae, ctx)["l1"], 0.5 * warm * l1)


def _aux_reference(sae, x, dead, k_aux, signed):
    z = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    score = (z.abs() if signed else z).masked_fill(~dead, float("-inf"))
    idx = score.topk(k_aux, -1).indices
    vals = z.gather(1, idx)
    fa = torch.zeros_like(z).scatter(1, idx, vals if signed else vals.relu())
    return fa


@pytest.mark.parametrize("architecture", ["topk", "abstopk", "gsae", "mutual_choice", "feature_choice", "relu"])
def test_auxk_matches_dense_reference(architecture):
    sae = make(architecture).train()
    x = batch(32)
    out = sae(x, grad=batch(32, seed=3))
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[::5] = True
    residual = x - out.x_hat
    aux = losses.auxk_loss(out.codes, residual, sae.W_dec, dead, k_aux=6)
    fa = _aux_reference(sae, x, dead, 6, out.codes.signed)
    e = residual.detach()
    want = ((fa @ sae.W_dec - e).square().sum(-1).mean() / (e - e.mean(0)).square().sum(-1).mean()) / 32
    torch.testing.assert_close(aux, want)
    g_got = torch.autograd.grad(aux, [sae.W_enc, sae.W_dec], retain_graph=True)
    g_want = torch.autograd.grad(want, [sae.W_enc, sae.W_dec])
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b)
    assert (g_got[0][:, ~dead] == 0).all() and g_got[0][:, dead].abs().sum() > 0  # only dead latents learn from it
    if architecture == "abstopk":
        assert (out.codes.preact(fa.abs().topk(6, -1).indices) < 0).any()  # ranked by |z|, sign kept


def test_auxk_edge_cases():
    sae = make("topk")
    x = batch(8)
    out = sae(x)
    none = losses.auxk_loss(out.codes, x - out.x_hat, sae.W_dec, torch.zeros(D_SAE, dtype=torch.bool))
    assert none.item() == 0
    few = torch.zeros(D_SAE, dtype=torch.bool)
    few[:2] = True  # fewer dead latents than k_aux: all of them are used
    assert losses.auxk_loss(out.codes, x - out.x_hat, sae.W_dec, few, k_aux=100) > 0
    mp = make("mpsae")
    with pytest.raises(ValueError, match="MP-SAE"):
        losses.auxk_loss(mp.forward_codes(x), x, mp.W_dec, few)


def test_zipf_underuse_weights():
    ranks = torch.arange(1, 41, dtype=torch.float64)
    density = 0.1 / ranks  # exactly on a Zipf line
    density[30:] = 0  # dead
    density[20] = density[20] / 4  # dying: a quarter of its expected density
    w = losses.zipf_underuse_weights(density.float())
    assert (w[30:] == 1).all()
    assert 0.6 < w[20] < 0.85
    assert (w[:20] < 0.2).all() and (w >= 0).all() and (w <= 1).all()


def test_aux_zipf_reduces_to_auxk_when_underused_latents_are_dead():
    sae = make("feature_choice").train()
    x = batch(64)
    out = sae(x)
    density = torch.zeros(D_SAE)
    density[3] = 0.5  # one live latent: no Zipf line, every dead latent has weight 1
    residual = x - out.x_hat
    torch.testing.assert_close(
        losses.aux_zipf_loss(out.codes, residual, sae.W_dec, density, k_aux=8),
        losses.auxk_loss(out.codes, residual, sae.W_dec, density == 0, k_aux=8),
    )
    density = torch.rand(D_SAE, generator=torch.Generator().manual_seed(0))
    assert losses.aux_zipf_loss(out.codes, residual, sae.W_dec, density, k_aux=8) > 0


# ------------------------------------------------------------------------------------------------ SAE helpers
def test_codes_counts_and_l0():
    sae = make("topk")
    codes = sae.forward_codes(batch(32))
    dense = codes.to_dense()
    assert torch.equal(codes.feature_counts(), (dense != 0).sum(0))
    assert torch.equal(codes.l0(), (dense != 0).sum(-1))
    mp = make("mpsae").eval().forward_codes(batch(32))
    assert torch.equal(mp.feature_counts(), (mp.to_dense() != 0).sum(0))


def test_decoder_norm_and_gradient_projection():
    sae = make("topk")
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(D_SAE, 1) + 0.5)
    x = batch(16)
    losses.mse(sae(x).x_hat, x).backward()
    sae.remove_gradient_parallel_to_decoder_directions()
    torch.testing.assert_close((sae.W_dec.grad * sae.W_dec).sum(-1), torch.zeros(D_SAE), atol=1e-6, rtol=0)
    sae.set_decoder_norm_to_unit_norm()
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(D_SAE))


def test_init_b_dec():
    sae = make("topk")
    x = batch(200) + 3
    sae.init_b_dec(x, method="mean")
    torch.testing.assert_close(sae.b_dec, x.mean(0))
    x[:5] += 1000  # outliers move the mean, hardly the median
    sae.init_b_dec(x, method="geometric_median")
    m = sae.b_dec.double()
    unit = (m - x.double()) / (m - x.double()).norm(dim=-1, keepdim=True)
    assert unit.sum(0).norm() < 1e-2 * len(x)  # first-order optimality of Σ||x − m||
    assert (sae.b_dec - 3).abs().max() < 1
    with pytest.raises(ValueError, match="'mean' or 'geometric_median'"):
        sae.init_b_dec(x, method="median")


@pytest.mark.filterwarnings("ignore:gsae")
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_fold_activation_scale(architecture):
    sae = make(architecture, jumprelu_init_threshold=0.05).train()
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.05 * torch.randn_like(p))
    sae.set_decoder_norm_to_unit_norm()
    x, scale = batch(128), 3.0
    sae(batch(128, seed=9) * scale)  # learn thresholds (on other tokens, so none sits exactly on a threshold)
    sae.eval()
    want_f, want_x = sae.encode(x * scale) / scale, sae(x * scale).x_hat / scale
    sae.fold_activation_scale(scale)
    torch.testing.assert_close(sae.encode(x), want_f, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(sae(x).x_hat, want_x, atol=1e-5, rtol=1e-4)
    assert sae.cfg.normalize_activations == "none" and sae.cfg.metadata["activation_scale_folded"] == scale


@pytest.mark.filterwarnings("ignore:gsae")
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_nonzeros_list_exactly_the_dense_code(architecture):
    """The indexer reads codes as (token, latent, value) entries: they must rebuild the dense code, MP-SAE's
    repeated atoms summed, sorted by token then latent."""
    sae = make(architecture).eval()
    x = batch(12)
    grad = batch(12, seed=2) if sae.sparsifier.uses_grad else None
    codes = sae.forward_codes(x, grad)
    token, latent, value = codes.nonzeros()
    rebuilt = torch.zeros(12, D_SAE)
    rebuilt[token, latent] = value.float()
    torch.testing.assert_close(rebuilt, codes.to_dense().detach().float())
    assert bool((value != 0).all())
    keys = token * D_SAE + latent
    assert bool((keys[1:] > keys[:-1]).all())


@pytest.mark.parametrize("architecture", ["mutual_choice", "feature_choice"])
@pytest.mark.parametrize("zipf", [0.0, 1.0])
def test_calibrated_thresholds_give_the_training_budget_exactly(architecture, zipf):
    """An EMA of per-batch minima lags and is biased (inference L0 24/32 on real data); the end-of-training
    calibration makes the eval-mode L0 on the calibration batches equal the training budget k."""
    if architecture == "mutual_choice" and zipf:
        pytest.skip("capacities are Feature Choice's")
    sae = make(architecture, d_sae=128, k=8, fc_zipf_exponent=zipf).train()
    batches = [batch(256, seed=200 + i) for i in range(4)]
    for x in batches:
        sae.forward_codes(x)  # the EMA alone is off the budget
    sae.eval()
    sae.sparsifier.calibrate(sae, batches)
    x = torch.cat(batches)
    f = sae.encode(x)
    counts = (f != 0).sum(0)
    if architecture == "feature_choice":
        r = ((x - sae.b_dec) @ sae.W_enc + sae.b_enc).relu()
        caps = sae.sparsifier.capacities(r.reshape(4, 256, -1).sum(0))  # capacities from the summed affinities
        # every latent fires its capacity share of the 1024 tokens (or on all its positive entries, if fewer)
        assert torch.equal(counts, torch.minimum(caps * 4, (r > 0).sum(0)))
        assert zipf or float(counts.sum()) / 1024 == pytest.approx(8.0, abs=1e-9)
    else:
        assert float(counts.sum()) / 1024 == pytest.approx(8.0, abs=1e-9)
        assert (sae.threshold == sae.threshold[0]).all()


def test_feature_choice_warns_when_capacities_round_up():
    """k·B/F < 0.5 used to round every capacity up to 1 silently (asked for L0 1, got 4)."""
    sae = make("feature_choice", d_sae=512, k=1).train()
    with pytest.warns(UserWarning, match=r"effective L0 is 4\.0, not k=1"):
        sae.sparsifier.init_from_sample(sae, batch(128))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sae.sparsifier.init_from_sample(sae, batch(1024))
