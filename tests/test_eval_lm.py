"""The held-out LM layer (sae_kit.heldout) on the real SmolLM2: held-out contexts, capture, splice, CE and KL."""

from __future__ import annotations

import pytest
import torch

from sae_kit import HarvestConfig
from sae_kit.heldout import (
    HeldoutError,
    check_pair,
    harvest_config_for,
    heldout_contexts,
    kl_from,
    next_token_ce,
    run_lm,
    splice,
)
from sae_kit.sae import SAE, SAEConfig

HOOK = "blocks.6.hook_resid_post"


@pytest.fixture(scope="module")
def ctxs(model):
    return heldout_contexts(model, HarvestConfig(context_size=32), n_tokens=200)


def test_heldout_contexts_keep_the_training_positions(model, ctxs):
    assert ctxs.n_kept >= 200 and ctxs.tokens.shape[1] == 32
    assert not ctxs.keep[:, 0].any()  # position 0 (BOS) is never read or edited
    bos = model.tokenizer.bos_token_id
    assert not ctxs.keep[ctxs.tokens == bos].any()


def test_identity_splice_changes_nothing_and_zeroing_hurts(model, ctxs):
    batch = next(ctxs.batches(4))
    clean, x = run_lm(model, batch.tokens, HOOK, capture=True)
    same, _ = run_lm(model, batch.tokens, HOOK, edit=splice(x[batch.keep]), keep=batch.keep)
    assert torch.equal(clean, same)
    zero, _ = run_lm(model, batch.tokens, HOOK, edit=splice(torch.zeros(batch.n_kept, x.shape[-1])), keep=batch.keep)
    ce_clean, mask = next_token_ce(clean, batch.tokens, batch.pad)
    ce_zero, _ = next_token_ce(zero, batch.tokens, batch.pad)
    assert ce_zero[mask].mean() > ce_clean[mask].mean() + 1
    kl = kl_from(clean, zero)
    assert kl[:, 0].abs().max() < 1e-4 and kl[:, 1:].mean() > 0.5  # position 0 was not edited
    assert kl_from(clean, clean).abs().max() < 1e-4


def test_bad_pairs_give_one_line_errors(model):
    with pytest.raises(HeldoutError, match="blocks.6.hook_resid_post"):
        check_pair(model, SAE(SAEConfig(d_in=576, d_sae=8, k=2)), "blocks.6.hook_resid_pots")
    with pytest.raises(HeldoutError, match="d_in=512.*width 576"):
        check_pair(model, SAE(SAEConfig(d_in=512, d_sae=8, k=2)), HOOK)


def test_harvest_config_comes_from_the_sae_metadata():
    sae = SAE(
        SAEConfig(
            d_in=4,
            d_sae=8,
            k=2,
            metadata={
                "hook_name": "blocks.3.hook_resid_post",
                "context_size": 64,
                "dataset_path": "fortunes",
                "holdout_fraction": 0.2,
                "packing": "doc",
            },
        )
    )
    cfg = harvest_config_for(sae, context_size=32)
    assert cfg.hook == ("blocks.3.hook_resid_post",) and cfg.corpus == "fortunes" and cfg.context_size == 32
    assert (
        cfg.holdout_fraction == 0.2 and cfg.packing == "doc"
    )  # the SAE's own held-out split, tokenised as in training


def test_prepare_captures_the_kept_activations_in_order(model):
    from sae_kit.eval.inputs import prepare

    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=576, d_sae=64, k=4, metadata={"hook_name": HOOK, "context_size": 32}))
    inputs = prepare(model, sae, 100, lm_batch_size=2)
    assert inputs.x.shape == (inputs.contexts.n_kept, 576) and inputs.grad is None
    first, rows = next(inputs.batches())
    _, acts = run_lm(model, first.tokens, HOOK, capture=True)
    assert torch.allclose(acts[first.keep], inputs.x[rows], atol=1e-4)
    encoded = inputs.encoded()
    assert (
        encoded.x_hat.shape == inputs.x.shape and (encoded.l0 == 4).all() and inputs.encoded() is encoded
    )  # encoded once
    gsae = SAE(
        SAEConfig(architecture="gsae", d_in=576, d_sae=64, k=4, metadata={"hook_name": HOOK, "context_size": 32})
    )
    with_grads = prepare(model, gsae, 50, lm_batch_size=2)
    assert (
        with_grads.grad is not None and with_grads.grad.shape == with_grads.x.shape and with_grads.grad.abs().sum() > 0
    )
