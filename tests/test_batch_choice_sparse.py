"""Mutual and Feature Choice decode and backpropagate only their selected pairs: the same code, x̂ and gradients as
the dense formula they replaced.

The reference below is that formula, written out here: z = xc·W_enc + b_enc, r = ReLU(z), the batch-level
selection S on r (MC: the k·B largest entries; FC: latent i's m_i largest tokens), f = r·1_S as a dense [B, F]
matrix with an ordinary autograd graph, x̂ = f·W_dec + b_dec.
"""

from __future__ import annotations

import pytest
import torch

from sae_kit.kernels import encode_preacts, rows_of
from sae_kit.sae import SAE, SAEConfig
from sae_kit.sparsifiers import batch_choice

RULES = [("mutual_choice", 0.0), ("feature_choice", 0.0), ("feature_choice", 0.5)]


def make(architecture: str, d_in: int, d_sae: int, k: int, zipf: float, dtype: str, seed: int = 0) -> SAE:
    """An SAE with every parameter off its initial value (biases nonzero, atoms unit-norm)."""
    torch.manual_seed(seed)
    settings = {"architecture": architecture, "d_in": d_in, "d_sae": d_sae, "k": k, "dtype": dtype}
    if architecture == "feature_choice":
        settings["fc_zipf_exponent"] = zipf
    sae = SAE(SAEConfig.from_dict(settings))
    with torch.no_grad():
        sae.W_enc.add_(0.1 * torch.randn_like(sae.W_enc))
        sae.b_enc.copy_(0.05 * torch.randn_like(sae.b_enc))
        sae.b_dec.copy_(0.3 * torch.randn_like(sae.b_dec))
        sae.W_dec.add_(0.1 * torch.randn_like(sae.W_dec))
        sae.set_decoder_norm_to_unit_norm()
    return sae


def data(n: int, d: int, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    return (torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) + 0.2).to(dtype)


def dense_reference(sae: SAE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(kept flat keys n·F + i sorted, dense code f, x̂, smallest kept value) by the dense formula, differentiable."""
    xc = x - sae.b_dec
    z = torch.addmm(sae.b_enc, xc, sae.W_enc)
    r = z.relu()
    B, F = r.shape
    if sae.cfg.architecture == "mutual_choice":
        flat = r.flatten()
        kept = flat.detach().topk(sae.cfg.k * B).indices
        f = flat.new_zeros(flat.shape).scatter(0, kept, flat[kept]).view_as(r)
        smallest = flat[kept].detach().min()
    else:
        caps = sae.sparsifier.capacities(r.detach())
        top, rows = r.detach().topk(int(caps.max()), dim=0)
        keep = torch.arange(top.shape[0])[:, None] < caps
        f = r.new_zeros(r.shape).scatter(0, rows, r.gather(0, rows) * keep)
        kept = (rows * F + torch.arange(F))[keep]
        smallest = top.gather(0, (caps - 1)[None]).squeeze(0)
    return kept.sort().values, f, f @ sae.W_dec + sae.b_dec, smallest


def keys_of(codes) -> torch.Tensor:
    """Flat keys n·F + i of a ragged code's pairs, in its own order (which must be sorted)."""
    crow, latents, _ = codes.pairs()
    return rows_of(crow) * codes.d_sae + latents


def check_against_reference(sae: SAE, x: torch.Tensor) -> None:
    """Pairs, values, x̂, gradients of the four weights and the threshold update against `dense_reference`."""
    params = [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec]
    weight = torch.randn(x.shape, generator=torch.Generator().manual_seed(7), dtype=x.dtype)

    assert int(sae.sparsifier.threshold_updates) == 0
    out = sae(x)
    codes = out.codes
    got_grads = torch.autograd.grad(((out.x_hat - x).square() * weight).sum(), params)
    want_keys, f, x_hat, smallest = dense_reference(sae, x)
    want_grads = torch.autograd.grad(((x_hat - x).square() * weight).sum(), params)

    assert codes.crow is not None and codes.dense is None  # ragged pairs, never a dense code
    assert codes.crow.shape == (len(x) + 1,) and int(codes.crow[-1]) == len(codes.indices)
    assert torch.equal(keys_of(codes), want_keys)  # the same pairs, sorted by token then latent
    torch.testing.assert_close(codes.values, f.flatten()[want_keys])
    torch.testing.assert_close(codes.to_dense(), f)
    torch.testing.assert_close(out.x_hat, x_hat)
    for name, a, b in zip(("W_enc", "b_enc", "W_dec", "b_dec"), got_grads, want_grads):
        torch.testing.assert_close(a, b, msg=lambda m, name=name: f"grad {name}: {m}")
    # the first update is the running mean of one batch: the batch's smallest kept value (per latent for FC)
    torch.testing.assert_close(sae.threshold, smallest.expand(sae.cfg.d_sae).to(sae.threshold.dtype))


@pytest.mark.parametrize(("architecture", "zipf"), RULES)
def test_training_code_and_gradients_match_the_dense_formula_in_float64(architecture, zipf):
    sae = make(architecture, d_in=16, d_sae=64, k=4, zipf=zipf, dtype="float64").train()
    x = data(48, 16, torch.float64)
    r = (torch.addmm(sae.b_enc, x - sae.b_dec, sae.W_enc)).relu()
    assert int((r > 0).sum()) > 2 * 4 * 48 and int((r > 0).sum(0).min()) >= 4 * 48 // 64  # no zero in the budget
    check_against_reference(sae, x)


@pytest.mark.parametrize(("zipf", "d_sae"), [(2.0, 64), (0.5, 512)])
def test_feature_choice_edge_capacities_match_the_dense_formula_in_float64(zipf, d_sae):
    """A steep Zipf whose top capacities reach the whole batch (B = 48), and k·B < F where every latent keeps one
    token."""
    sae = make("feature_choice", d_in=16, d_sae=d_sae, k=4, zipf=zipf, dtype="float64").train()
    x = data(48, 16, torch.float64)
    caps = sae.sparsifier.capacities(torch.addmm(sae.b_enc, x - sae.b_dec, sae.W_enc).relu())
    assert int(caps.max()) == 48 if zipf == 2.0 else bool((caps == 1).all())
    check_against_reference(sae, x)


@pytest.mark.parametrize("architecture", ["mutual_choice", "feature_choice"])
def test_the_comparison_catches_an_off_by_one_row_offset(architecture, monkeypatch):
    """The float64 check fails when crow gives one pair to the wrong token (so it tests what it claims)."""
    sae = make(architecture, d_in=16, d_sae=64, k=4, zipf=0.0, dtype="float64").train()
    x = data(48, 16, torch.float64)
    right = batch_choice.sorted_pairs

    def off_by_one(keys, n_tokens, d_sae):
        crow, latents = right(keys, n_tokens, d_sae)
        crow = crow.clone()
        crow[1:-1] += 1
        return crow, latents

    monkeypatch.setattr(batch_choice, "sorted_pairs", off_by_one)
    with pytest.raises(AssertionError):
        check_against_reference(sae, x)


@pytest.mark.parametrize(("architecture", "zipf"), RULES[:2])
def test_eval_mode_jumprelu_matches_the_dense_formula_in_float64(architecture, zipf):
    sae = make(architecture, d_in=16, d_sae=64, k=4, zipf=zipf, dtype="float64").eval()
    x = data(48, 16, torch.float64)
    with torch.no_grad():
        sae.sparsifier.threshold.copy_(0.2 + 0.3 * torch.rand(64, dtype=torch.float64))
    params = [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec]
    out = sae(x)
    z = torch.addmm(sae.b_enc, x - sae.b_dec, sae.W_enc)
    f = z.relu() * (z > sae.threshold)
    x_hat = f @ sae.W_dec + sae.b_dec
    codes = out.codes
    assert codes.crow is not None and bool((codes.values > 0).all())  # only the nonzeros are kept
    assert torch.equal(keys_of(codes), f.flatten().nonzero().squeeze(1))
    torch.testing.assert_close(codes.to_dense(), f)
    torch.testing.assert_close(out.x_hat, x_hat)
    for a, b in zip(torch.autograd.grad(out.x_hat.sin().sum(), params), torch.autograd.grad(x_hat.sin().sum(), params)):
        torch.testing.assert_close(a, b)
    assert int(sae.sparsifier.threshold_updates) == 0


@pytest.mark.parametrize(("architecture", "zipf"), [("mutual_choice", 0.0), ("feature_choice", 0.5)])
def test_preact_for_the_aux_losses_is_the_exact_differentiable_preactivation(architecture, zipf):
    sae = make(architecture, d_in=16, d_sae=64, k=4, zipf=zipf, dtype="float64").train()
    x = data(48, 16, torch.float64)
    codes = sae.forward_codes(x)
    z = torch.addmm(sae.b_enc, x - sae.b_dec, sae.W_enc)
    idx = torch.randint(64, (48, 5), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(codes.preact(idx), z.gather(1, idx))
    torch.testing.assert_close(codes.z, z.detach())
    assert not codes.z.requires_grad
    g = torch.autograd.grad(codes.preact(idx).sum(), sae.W_enc)[0]
    torch.testing.assert_close(g, torch.autograd.grad(z.gather(1, idx).sum(), sae.W_enc)[0])


@pytest.mark.parametrize(("architecture", "zipf"), RULES)
def test_realistic_size_pairs_and_reconstruction_match_in_float32(architecture, zipf):
    """4,096 latents, 2,048 tokens, k 16 (MC takes flat_topk_indices's sampled path over 8.4M entries)."""
    sae = make(architecture, d_in=96, d_sae=4096, k=16, zipf=zipf, dtype="float32").train()
    x = data(2048, 96, torch.float32)
    with torch.no_grad():
        out = sae(x)
        want_keys, f, x_hat, smallest = dense_reference(sae, x)
    codes = out.codes
    assert torch.equal(keys_of(codes), want_keys)
    assert len(want_keys) == 16 * 2048
    torch.testing.assert_close(codes.values, f.flatten()[want_keys])
    torch.testing.assert_close(out.x_hat, x_hat)
    torch.testing.assert_close(sae.threshold, smallest.expand(4096))
    assert codes.inference_l0 is not None
    r = torch.addmm(sae.b_enc, x - sae.b_dec, sae.W_enc).relu()
    torch.testing.assert_close(codes.inference_l0, (r > sae.threshold).sum(-1).float().mean())


@pytest.mark.parametrize(("architecture", "zipf"), [("mutual_choice", 0.0), ("feature_choice", 0.0)])
def test_bf16_autocast_values_are_exact_and_the_support_differs_only_at_near_ties(architecture, zipf):
    """Under bf16 autocast the selection score z is bf16; the values are the exact fp32 ReLU(z) at the chosen
    pairs, and a pair is in one support but not the other only when its fp32 value is within 2ε of the fp32 edge
    (ε = the largest |z_bf16 − z_fp32| of the batch): what bf16 selection can swap, and nothing else.
    (FC with uniform capacities that divide k·B evenly, so both precisions give every latent the same m.)"""
    d_sae, n, k = 4096, 2048, 16
    sae = make(architecture, d_in=96, d_sae=d_sae, k=k, zipf=zipf, dtype="float32").train()
    x = data(n, 96, torch.float32)
    with torch.no_grad():
        want_keys, f, _, _ = dense_reference(sae, x)
        xc = x - sae.b_dec
        z32 = torch.addmm(sae.b_enc, xc, sae.W_enc)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            z16 = encode_preacts(xc, sae.W_enc, sae.b_enc)
            out = sae(x)
    assert z16.dtype == torch.bfloat16 and out.codes.values.dtype == torch.float32
    eps = float((z16.float() - z32).abs().max())
    r32 = z32.relu().flatten()
    got_keys = keys_of(out.codes)
    torch.testing.assert_close(out.codes.values, r32[got_keys], rtol=1e-5, atol=1e-5)  # exact given the support
    assert len(got_keys) == len(want_keys) == k * n

    only_one = torch.cat([got_keys[~torch.isin(got_keys, want_keys)], want_keys[~torch.isin(want_keys, got_keys)]])
    agreement = 1 - len(only_one) / 2 / len(want_keys)
    if architecture == "mutual_choice":
        edge = r32[want_keys].min().expand(len(only_one))
    else:
        assert (k * n) % d_sae == 0
        edge = f.masked_fill(f == 0, float("inf")).min(0).values[only_one % d_sae]  # latent i's m-th largest
    assert bool(((r32[only_one] - edge).abs() <= 2 * eps).all()), "a pair far from the edge changed"
    assert agreement > 0.98, agreement  # measured: MC 0.9938, FC 0.9890 on this data
    print(f"{architecture}: bf16/fp32 support agreement {agreement:.5f}, eps {eps:.2e}")


@pytest.mark.parametrize("architecture", ["mutual_choice", "feature_choice"])
def test_the_bf16_support_threshold_is_theta_rounded_down(architecture):
    """For a bf16 score z, z > θ⁺ (θ⁺ = the largest bf16 at or below max(θ, 0)) is exactly fp32(z) > max(θ, 0)."""
    sae = make(architecture, d_in=16, d_sae=64, k=4, zipf=0.0, dtype="float32")
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        theta = torch.rand(64, generator=g) * 2 - 0.2  # some negative: the JumpReLU's nonzeros are then z > 0
        theta[:8] = theta[:8].bfloat16().float()  # some exactly representable
        sae.sparsifier.threshold.copy_(theta)
    z = (torch.randn(4096, 64, generator=g) * 1.5).bfloat16()
    z[:, :8] = theta[:8].bfloat16()  # z equal to θ: not above it
    low = sae.sparsifier.score_threshold(torch.bfloat16)
    assert low.dtype == torch.bfloat16
    assert torch.equal(z > low, z.float() > theta.clamp_min(0))
    assert torch.equal(z.float() > sae.sparsifier.score_threshold(torch.float32), z.float() > theta.clamp_min(0))


def test_eval_mode_under_bf16_autocast_is_the_exact_jumprelu_on_its_support():
    sae = make("mutual_choice", d_in=96, d_sae=4096, k=16, zipf=0.0, dtype="float32").eval()
    with torch.no_grad():
        sae.sparsifier.threshold.fill_(0.6)
    x = data(512, 96, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        codes = sae.forward_codes(x)
    z32 = torch.addmm(sae.b_enc, x - sae.b_dec, sae.W_enc).detach()
    f32 = z32.relu() * (z32 > 0.6)
    token, latent, value = codes.nonzeros()
    torch.testing.assert_close(value, f32[token, latent], rtol=1e-5, atol=1e-5)  # exact values, all above θ
    support = torch.zeros_like(f32, dtype=torch.bool)
    support[token, latent] = True
    differ = support ^ (f32 > 0)
    eps = float((encode_preacts_bf16(sae, x).float() - z32).abs().max())
    assert bool(((z32[differ] - 0.6).abs() <= eps).all())  # only near-ties with θ differ
    assert int(differ.sum()) < 0.01 * int((f32 > 0).sum())


def encode_preacts_bf16(sae: SAE, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        return encode_preacts(x - sae.b_dec, sae.W_enc, sae.b_enc)
