"""Harvesting against the HF model, exclusion rules, provenance, early stop and the gradient."""

from __future__ import annotations

import pytest
import torch

from sae_kit.activations import HarvestConfig, Harvester, contexts, harvester_for, stream
from sae_kit.data import Contexts

pytestmark = pytest.mark.slow
HOOK = "blocks.6.hook_resid_post"


@pytest.fixture(scope="module")
def ctx(model):
    return next(contexts(model, HarvestConfig(context_size=64, lm_batch_size=4)))


def test_activations_equal_hf_hidden_states(model, ctx):
    from transformers import AutoModelForCausalLM

    from sae_kit.models import default_model_dir

    hf = AutoModelForCausalLM.from_pretrained(default_model_dir(), dtype=torch.float32).eval()
    with torch.no_grad():
        hidden = hf(ctx.tokens, output_hidden_states=True).hidden_states
    acts, _ = Harvester(model, [HOOK, "blocks.2.hook_resid_post"], False, False).run(ctx.tokens)
    torch.testing.assert_close(acts[HOOK], hidden[7], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(acts["blocks.2.hook_resid_post"], hidden[3], rtol=1e-4, atol=1e-4)


def test_exclusions_and_provenance(model, ctx):
    rows = Harvester(model, [HOOK]).rows(ctx)
    special = set(model.tokenizer.all_special_ids)
    assert not set(rows.token.tolist()) & special
    assert (rows.pos > 0).all()
    assert torch.equal(ctx.tokens[rows.row - ctx.row[0], rows.pos], rows.token)
    assert (rows.doc >= 0).all()
    everything = Harvester(model, [HOOK], exclude_special_tokens=False, exclude_first_position=False).rows(ctx)
    assert len(everything) == ctx.tokens.numel()
    bos = everything.token == model.tokenizer.bos_token_id
    # SmolLM2's position-0 residual is ~7x an ordinary token's: that is what the default exclusion keeps out of SAEs
    first = everything.pos == 0
    assert everything.acts[HOOK][first].norm(dim=-1).min() > 5 * rows.acts[HOOK].norm(dim=-1).median()
    assert len(rows) == (~bos & (everything.pos > 0)).sum()


def test_early_stop_skips_later_blocks(model, ctx):
    ran = []
    model.blocks[20].register_forward_hook(lambda *a: ran.append(1))
    try:
        Harvester(model, [HOOK]).run(ctx.tokens)
        assert not ran
        model(ctx.tokens[:1, :4])
        assert ran
    finally:
        model.blocks[20]._forward_hooks.clear()


def test_stream_positions_and_heldout(model):
    cfg = HarvestConfig(context_size=32, lm_batch_size=8)
    (rows, consumed), *_ = [x for _, x in zip(range(1), stream(model, cfg))]
    assert consumed == 8 and rows.row.max() == 7
    train_docs = set(rows.doc.tolist())
    held, _ = next(stream(model, cfg, split="heldout"))
    assert not train_docs & set(held.doc.tolist())


def test_gradient_matches_finite_differences(tiny_model):
    torch.manual_seed(0)
    tokens = torch.randint(3, 2000, (2, 10))
    tokens[:, 0] = tiny_model.tokenizer.bos_token_id
    hook = "blocks.0.hook_resid_post"
    harv = Harvester(tiny_model, [hook, "blocks.1.hook_resid_post"], with_grads=True)
    assert harv._chunked  # the chunked-CE path is the one checked against finite differences
    acts, grads = harv.run(tokens)
    g = grads[hook]
    assert g.shape == acts[hook].shape and g.abs().sum() > 0

    def loss_with(delta: torch.Tensor) -> float:
        def add(act, hook):
            return act + delta

        with torch.no_grad(), tiny_model.hooks(fwd_hooks=[(hook, add)]):
            logits = tiny_model(tokens)
        return torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(), reduction="sum"
        ).item()

    # HF's RMSNorm computes in fp32 even in an fp64 model, so the step is 1e-3 and the tolerance 3e-4 (relative)
    eps = 1e-3
    for b, t, d in [(0, 3, 5), (1, 7, 0), (0, 8, 31), (1, 1, 17)]:
        delta = torch.zeros_like(acts[hook])
        delta[b, t, d] = eps
        fd = (loss_with(delta) - loss_with(-delta)) / (2 * eps)
        assert abs(fd - g[b, t, d].item()) < 3e-4 * max(1.0, abs(fd)), (b, t, d, fd, g[b, t, d].item())
    assert g[:, -1].abs().max() == 0  # the last position predicts nothing and, causally, feeds nothing else
    # the gradient rows come back aligned with the activation rows
    ctx = Contexts(tokens=tokens, doc=torch.zeros_like(tokens), row=torch.arange(2))
    rows = harv.rows(ctx)
    torch.testing.assert_close(rows.grads[hook], g[rows.row, rows.pos])


def test_gradients_on_real_model_are_row_aligned(model):
    cfg = HarvestConfig(context_size=16, lm_batch_size=2)
    ctx = next(contexts(model, cfg))
    rows = harvester_for(model, cfg, with_grads=True).rows(ctx)
    plain = harvester_for(model, cfg).rows(ctx)
    torch.testing.assert_close(rows.acts[HOOK], plain.acts[HOOK], rtol=1e-5, atol=1e-4)
    assert rows.grads[HOOK].shape == rows.acts[HOOK].shape and torch.isfinite(rows.grads[HOOK]).all()


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"context_size": 1}, r"--context-size must be at least 2 .*got 1"),
        ({"context_size": -4}, r"--context-size must be at least 2"),
        ({"holdout_fraction": 1.0}, r"--holdout-fraction must be in \[0, 1\), got 1.0"),
        ({"holdout_fraction": -0.1}, r"--holdout-fraction must be in \[0, 1\)"),
        ({"holdout_fraction": float("nan")}, r"--holdout-fraction must be in \[0, 1\)"),
        ({"lm_batch_size": 0}, r"--lm-batch-size must be at least 1"),
        ({"hook": (HOOK, HOOK)}, r"--hook names a hook twice"),
        ({"device": "foo"}, r"unknown --device 'foo'"),
    ],
)
def test_settings_that_cannot_work_are_one_line_errors(settings, message):
    from sae_kit.errors import SaeKitError

    with pytest.raises(SaeKitError, match=message) as err:
        HarvestConfig(**settings).check()
    assert "\n" not in str(err.value)


def test_settings_the_model_cannot_serve(model, tmp_path):
    from sae_kit.activations import check_splits
    from sae_kit.data import HarvestError
    from sae_kit.models import HookError

    assert model.cfg.n_ctx == 8192
    with pytest.raises(
        HarvestError,
        match=r"--context-size 8193 is longer than SmolLM2-135M-Instruct's maximum context of 8192 tokens; "
        r"use a value in \[2, 8192\]",
    ):
        harvester_for(model, HarvestConfig(context_size=8193))  # before any LM pass (that one would need ~40 GB)
    HarvestConfig(context_size=8192).check(model)
    with pytest.raises(HookError, match="unknown hook"):
        HarvestConfig(hook=("blocks.99.hook_resid_post",)).check(model)
    (tmp_path / "tiny.txt").write_text("A short document.\n\nAnother one.\n")
    tiny = HarvestConfig(corpus=str(tmp_path / "tiny.txt"), context_size=64)
    with pytest.raises(HarvestError, match="the train split of corpus .* gives no context of 64 tokens.*--packing doc"):
        check_splits(model, tiny, ("train",))
    check_splits(
        model,
        HarvestConfig(corpus=str(tmp_path / "tiny.txt"), context_size=64, packing="doc", holdout_fraction=0.0),
        ("train",),
    )
    with pytest.raises(
        HarvestError, match="held-out split .* is empty because --holdout-fraction is 0; raise it.*--heldout-tokens 0"
    ):
        check_splits(model, HarvestConfig(holdout_fraction=0.0), hint=", or pass --heldout-tokens 0")
    check_splits(model, HarvestConfig(context_size=32))
