"""AuxK's two exact paths (dense over few candidate columns, sparse kernels over the kept pairs) agree: the same loss
and the same gradients for every weight, signed or not, weighted or not, for fixed-k, batch and dense rules."""

from __future__ import annotations

import pytest
import torch

from sae_kit.sae import SAE, SAEConfig
from sae_kit.training.losses import auxk_loss


@pytest.mark.parametrize("architecture", ["topk", "abstopk", "mutual_choice", "relu"])
@pytest.mark.parametrize("n_dead,k_aux", [(5, 3), (5, 8), (40, 6)])
@pytest.mark.parametrize("weighted", [False, True])
def test_dense_and_sparse_aux_paths_agree(architecture, n_dead, k_aux, weighted):
    torch.manual_seed(n_dead + k_aux)
    sae = SAE(SAEConfig(architecture=architecture, d_in=12, d_sae=64, k=4, dtype="float64"))
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(20, 12, dtype=torch.float64)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[torch.randperm(64)[:n_dead]] = True
    weights = torch.rand(64, dtype=torch.float64) if weighted else None
    params = [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec]

    def run(dense: bool):
        out = sae(x)
        loss = auxk_loss(out.codes, x - out.x_hat, sae.W_dec, dead, k_aux, weights=weights, dense=dense)
        return loss, torch.autograd.grad(loss, params, allow_unused=True)

    (a, ga), (b, gb) = run(True), run(False)
    assert a > 0
    torch.testing.assert_close(a, b)
    for name, u, v in zip(["W_enc", "b_enc", "W_dec", "b_dec"], ga, gb):
        if u is None or v is None:  # b_dec reaches the aux loss only through the encoder input
            assert u is None and v is None or torch.count_nonzero(u if v is None else v) == 0, name
            continue
        torch.testing.assert_close(u, v, msg=lambda m, name=name: f"{name}: {m}")


def test_auto_rule_picks_dense_for_few_candidates(monkeypatch):
    """With a handful of dead latents the dense path runs (no sparse kernel call), with many the sparse one."""
    import sae_kit.training.losses as losses

    sae = SAE(SAEConfig(architecture="topk", d_in=12, d_sae=256, k=4))
    x = torch.randn(16, 12)
    out = sae(x)
    calls = []
    original = losses.sparse_decode
    monkeypatch.setattr(losses, "sparse_decode", lambda *a: calls.append(1) or original(*a))
    few = torch.zeros(256, dtype=torch.bool)
    few[:10] = True
    losses.auxk_loss(out.codes, x - out.x_hat, sae.W_dec, few, k_aux=6)
    assert not calls
    losses.auxk_loss(out.codes, x - out.x_hat, sae.W_dec, torch.ones(256, dtype=torch.bool), k_aux=6)
    assert calls
