"""The notebook splice API (sae_kit.splice) and the feature edit under it (sae_kit.heldout.feature_edit)."""

from __future__ import annotations

import pytest
import torch

from sae_kit.heldout import HeldoutError, feature_edit
from sae_kit.sae import SAE, SAEConfig


def small_sae(d_in: int = 8, d_sae: int = 16, k: int = 4, seed: int = 0) -> SAE:
    torch.manual_seed(seed)
    sae = SAE(SAEConfig(d_in=d_in, d_sae=d_sae, k=k, dtype="float64"))
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(0, 0.1)
    return sae.eval()


def test_feature_edit_changes_exactly_the_decoder_contribution():
    sae = small_sae()
    acts = torch.randn(2, 5, 8, dtype=torch.float64) * 3
    keep = torch.ones(2, 5, dtype=torch.bool)
    keep[:, 0] = False
    f = sae.encode(acts)  # [2, 5, 16]
    live = int((f[keep] != 0).sum(0).argmax())  # the feature active on most kept positions
    d = sae.W_dec[live].detach()

    out = feature_edit(sae, {live: 0.0})(acts, keep)
    expected = acts - keep[..., None] * f[..., live : live + 1] * d
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    assert torch.equal(out[:, 0], acts[:, 0])  # unkept positions untouched, bit for bit
    assert (out - acts)[keep].abs().sum() > 0  # the feature really fired somewhere

    # clamp / scale / add, restricted to the last position, error term kept
    for mode, v, new in (
        ("clamp", 2.5, lambda x: torch.full_like(x, 2.5)),
        ("scale", 3.0, lambda x: 3 * x),
        ("add", -1.0, lambda x: x - 1),
    ):
        out = feature_edit(sae, {live: v}, mode=mode, positions=[-1])(acts, keep)
        delta = (new(f[..., live]) - f[..., live])[..., None] * d
        torch.testing.assert_close(out[:, -1], acts[:, -1] + delta[:, -1], rtol=0, atol=1e-12)
        assert torch.equal(out[:, :-1], acts[:, :-1])  # other positions bit for bit

    # without the error term: every kept position is the reconstruction of the edited codes
    g = f.clone()
    g[..., live] = 0
    out = feature_edit(sae, {live: 0.0}, use_error_term=False)(acts, keep)
    torch.testing.assert_close(out[keep], sae.decode(g)[keep], rtol=0, atol=1e-12)
    assert torch.equal(out[~keep], acts[~keep])
    # an empty edit without the error term is the plain splice x̂
    torch.testing.assert_close(feature_edit(sae, {}, use_error_term=False)(acts, keep)[keep], sae.decode(f)[keep])


def test_feature_edit_refuses_bad_ids_and_modes():
    sae = small_sae()
    with pytest.raises(
        HeldoutError, match=r"^feature 16 is out of range: this SAE has d_sae=16 latents \(ids 0..15\)$"
    ):
        feature_edit(sae, {16: 0.0})
    with pytest.raises(HeldoutError, match="feature -1 is out of range"):
        feature_edit(sae, {-1: 0.0})
    with pytest.raises(HeldoutError, match=r"^mode='zero'; use one of: clamp, scale, add$"):
        feature_edit(sae, {1: 0.0}, mode="zero")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ the splice API
def identity_sae(d_in: int, hook: str, dtype: str) -> SAE:
    """An exact identity "SAE": ReLU codes of [x, −x] (W_enc = [I, −I]) decoded by W_dec = [I; −I], no biases, so
    x̂ = relu(x) − relu(−x) = x bit for bit (one of the two terms is exactly 0)."""
    sae = SAE(SAEConfig(architecture="relu", d_in=d_in, d_sae=2 * d_in, dtype=dtype, apply_b_dec_to_input=False))
    eye = torch.eye(d_in, dtype=sae.W_dec.dtype)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    sae.cfg.metadata |= {"hook_name": hook, "context_size": 32}  # (the tiny model's context is 64)
    return sae.eval()


@pytest.fixture(scope="module")
def sae6(analysis_sae):
    from sae_kit import load_sae

    return load_sae(analysis_sae / "sae").eval()


PROMPT = "The cat sat on the mat, and then it went to sleep in the warm sun."


def restored(model) -> bool:
    """No splice leftovers: no SAE hook names, the class forward, no hooks on the hook points."""
    return (
        not any(".sae." in name for name in model.hook_dict)
        and "forward" not in model.__dict__
        and not model.embed._forward_pre_hooks
        and not any(point.fwd_hooks for point in model.hook_dict.values())
    )


def test_identity_splice_is_exact_and_a_wrong_sae_is_not(tiny_model):
    from sae_kit.splice import spliced

    tokens = tiny_model.to_tokens(PROMPT)
    clean = tiny_model(tokens)
    ident = identity_sae(32, "blocks.0.hook_resid_post", "float64")
    with spliced(tiny_model, ident) as splice:
        assert torch.equal(tiny_model(tokens), clean)
        assert len(splice.names) == 5
    with torch.no_grad():
        ident.W_dec.mul_(0.5)  # no longer the identity: the splice must show it
    with spliced(tiny_model, ident):
        assert not torch.allclose(tiny_model(tokens), clean, atol=1e-3)
    assert torch.equal(tiny_model(tokens), clean) and restored(tiny_model)


def test_error_term_is_exact_and_several_saes_splice_at_once(model, sae6):
    from sae_kit.splice import sae_hook_name, spliced

    tokens = model.to_tokens(PROMPT)
    clean = model(tokens)
    with spliced(model, sae6, use_error_term=True):
        assert torch.equal(model(tokens), clean)  # x̂ + (x − x̂) is x bit for bit
    with spliced(model, sae6):
        lossy = model(tokens)
    assert (lossy - clean).abs().max() > 0.1  # without the error term the SAE's error shows
    ident3 = identity_sae(576, "blocks.3.hook_resid_post", "float32")
    with spliced(model, sae6, ident3):  # an exact identity at layer 3 changes nothing downstream
        logits, cache = model.run_with_cache(tokens)
        assert torch.equal(logits, lossy)
    for sae in (sae6, ident3):
        assert sae_hook_name(sae, "hook_sae_acts_post") in cache
    assert restored(model)


def test_spliced_ce_equals_eval(model, sae6):
    from sae_kit.eval.core import CoreConfig, downstream
    from sae_kit.eval.inputs import prepare
    from sae_kit.heldout import next_token_ce
    from sae_kit.splice import spliced

    inputs = prepare(model, sae6, 300, context_size=64)
    report = downstream(inputs, inputs.encoded().x_hat, CoreConfig(ce_tokens=300, mean_ablation=False))
    ctxs = inputs.contexts
    ce, n = 0.0, 0
    with spliced(model, sae6), torch.inference_mode():
        for batch in ctxs.batches(8):
            per, mask = next_token_ce(model(batch.tokens).float(), batch.tokens, batch.pad)
            ce += float(per[mask].sum())
            n += int(mask.sum())
    assert n == report["ce_positions"]
    assert ce / n == pytest.approx(report["ce_spliced"], rel=1e-5, abs=1e-6)
    assert report["ce_spliced"] - report["ce_clean"] > 0.01  # the splice really costs loss: the check can fail


def test_cache_holds_codes_equal_to_encode(model, sae6):
    from sae_kit.heldout import harvest_config_for, prompt_tokens
    from sae_kit.splice import SAE_HOOKS, sae_hook_name, spliced

    tokens, keep = prompt_tokens(model, harvest_config_for(sae6), PROMPT)
    with spliced(model, sae6) as splice:
        _, cache = model.run_with_cache(tokens)
    part = {p: cache[sae_hook_name(sae6, p)] for p in SAE_HOOKS}
    assert set(splice.names) <= set(cache.keys())
    x, acts = part["hook_sae_input"], part["hook_sae_acts_post"]
    assert acts.shape == (1, tokens.shape[1], sae6.cfg.d_sae) and acts.dtype == torch.float32
    assert not keep.all() and keep.any()
    with torch.no_grad():
        expected = sae6.encode(x)
    assert torch.equal(acts[keep], expected[keep])  # the same codes, bit for bit
    assert torch.equal(acts[~keep], torch.zeros_like(acts[~keep]))  # BOS is not read
    assert int((acts[keep] != 0).sum(-1).max()) == sae6.cfg.k
    recons, out, err = part["hook_sae_recons"], part["hook_sae_output"], part["hook_sae_error"]
    with torch.no_grad():
        torch.testing.assert_close(recons[keep], sae6.decode(expected[keep]), rtol=1e-5, atol=1e-5)
    assert torch.equal(out, recons) and torch.equal(out[~keep], x[~keep])
    assert torch.equal(err[keep], x[keep] - recons[keep])
    assert torch.equal(cache[sae6.cfg.metadata["hook_name"]], out)  # the hook's own cache entry is the spliced output


def test_ablation_changes_the_output_by_exactly_the_decoder_contribution(model, sae6):
    from sae_kit.heldout import feature_edit, harvest_config_for, prompt_tokens, run_lm
    from sae_kit.splice import intervene, sae_hook_name

    tokens, keep = prompt_tokens(model, harvest_config_for(sae6), PROMPT)
    with torch.no_grad():
        x0 = run_lm(model, tokens, sae6.cfg.metadata["hook_name"], capture=True)[1]
        f = sae6.encode(x0)
    i = int((f[keep] != 0).sum(0).argmax())  # the feature active on most positions of the prompt
    assert int((f[..., i] != 0).sum()) >= 2
    with intervene(model, sae6, {i: 0.0}):
        logits, cache = model.run_with_cache(tokens)
        assert torch.equal(cache[sae_hook_name(sae6, "hook_sae_acts_post")][..., i], torch.zeros_like(f[..., i]))
    x = cache[sae_hook_name(sae6, "hook_sae_input")]
    out = cache[sae_hook_name(sae6, "hook_sae_output")]
    assert torch.equal(x, x0)
    contribution = f[..., i : i + 1] * sae6.W_dec[i].detach()
    ulp = 4 * torch.finfo(torch.float32).eps * float(x.abs().max())
    torch.testing.assert_close(out - x, -contribution, rtol=0, atol=ulp)
    assert float(contribution.abs().max()) > 100 * ulp  # the feature's contribution is far above rounding
    assert torch.equal(out[~keep], x[~keep])
    # the same edit through heldout.feature_edit (what eval-side exact ablations use) gives the same logits
    edited, _ = run_lm(model, tokens, sae6.cfg.metadata["hook_name"], edit=feature_edit(sae6, {i: 0.0}), keep=keep)
    torch.testing.assert_close(logits, edited, rtol=0, atol=1e-4)
    assert (logits - model(tokens)).abs().max() > 1e-2
    # restricted to the last position, only it changes
    with intervene(model, sae6, {i: 0.0}, positions=[-1]):
        _, cache = model.run_with_cache(tokens)
    moved = (cache[sae_hook_name(sae6, "hook_sae_output")] - x)[0].abs().sum(-1) != 0
    assert moved.tolist() == [False] * (tokens.shape[1] - 1) + [bool(f[0, -1, i] != 0)]


def test_positions_of_a_generation_step_index_the_whole_sequence():
    from sae_kit.heldout import position_mask
    from sae_kit.splice import _local

    step = torch.ones(1, 1, dtype=torch.bool)  # a KV-cached step: one new token at absolute position 5
    assert [bool(position_mask(_local(p, 5, 1), step)) for p in ([-1], [3], [5], [6])] == [True, False, True, False]
    mask = torch.zeros(8, dtype=torch.bool)
    mask[5] = True
    assert bool(position_mask(_local(mask, 5, 1), step)) and not bool(position_mask(_local(mask, 9, 1), step))
    assert position_mask(_local([2, 6], 5, 2), torch.ones(1, 2, dtype=torch.bool)).tolist() == [[False, True]]


def test_steering_raises_the_top_logit_lens_token(model, sae6):
    from sae_kit.heldout import harvest_config_for, logit_lens, prompt_tokens, steering_units
    from sae_kit.splice import max_activations, sae_hook_name, steer

    tokens, keep = prompt_tokens(model, harvest_config_for(sae6), "I went to the shop and bought some")
    max_abs = max_activations(model, sae6, 2048)
    features = max_abs.topk(6).indices  # the six strongest features (by their max activation, steer's unit)
    targets = logit_lens(model, sae6.W_dec[features].detach()).argmax(-1)  # each one's top logit-lens token
    clean = model(tokens).detach().log_softmax(-1)[0][keep[0]]
    rises = []
    for i, target in zip(features.tolist(), targets.tolist()):
        with steer(model, sae6, i, 8.0, unit_tokens=2048):
            logits, cache = model.run_with_cache(tokens)
        rises.append(float((logits.detach().log_softmax(-1)[0][keep[0]][:, target] - clean[:, target]).mean()))
    # measured on this SAE: each top token's log-probability rises by 2.8 to 12 nats on average over the prompt
    assert min(rises) > 0 and sum(rises) / len(rises) > 1.0, rises
    # the vector added is alpha · unit · d̂_i with eval's unit (max |activation| × ‖d_i‖), at the positions read only
    (direction,), (unit,) = steering_units(sae6.W_dec, torch.tensor([i]), max_abs)
    x = cache[sae_hook_name(sae6, "hook_sae_input")]
    added = cache[sae_hook_name(sae6, "hook_sae_output")] - x
    ulp = 4 * torch.finfo(torch.float32).eps * float(x.abs().max())
    expected = (8.0 * unit * direction).expand(int(keep.sum()), -1)
    torch.testing.assert_close(added[keep], expected, rtol=1e-5, atol=ulp)
    assert torch.equal(added[~keep], torch.zeros_like(added[~keep]))
    assert restored(model)


def test_generate_under_spliced_and_steer(model, sae6):
    from sae_kit.heldout import feature_edit, generate, harvest_config_for
    from sae_kit.splice import sae_hook_name, spliced, steer

    cfg = harvest_config_for(sae6)
    prompt = "My favourite food is"
    kwargs = {"max_new_tokens": 8, "do_sample": False, "verbose": False}
    clean = model.generate(prompt, **kwargs)  # the bridge's default: KV-cached steps
    with spliced(model, sae6, use_error_term=True):
        assert model.generate(prompt, **kwargs) == clean
    reads: list[list[bool]] = []

    def record(err, hook):  # the error is nonzero exactly where the SAE reads
        reads.append((err[0].abs().sum(-1) != 0).tolist())
        return err

    with spliced(model, sae6), model.hooks(fwd_hooks=[(sae_hook_name(sae6, "hook_sae_error"), record)]):
        model.generate(prompt, **kwargs)
    n_prompt = model.to_tokens(prompt).shape[1]
    assert reads[0] == [False] + [True] * (n_prompt - 1)  # the prompt: all but BOS
    assert all(r == [True] for r in reads[1:]) and len(reads) == 8  # each KV-cached step: its one new token
    # without the KV cache the splice continues exactly as eval's generation with the same splice does
    kwargs["use_past_kv_cache"] = False
    clean = model.generate(prompt, **kwargs)
    with spliced(model, sae6):
        text = model.generate(prompt, **kwargs)
    assert text == prompt + generate(model, cfg, prompt, 8, edit=feature_edit(sae6, {}, use_error_term=False))
    assert text != clean
    with steer(model, sae6, 0, 8.0, unit=20 * float(sae6.W_dec[0].detach().norm())):
        assert model.generate(prompt, **kwargs) != clean
    assert restored(model)


def test_bad_input_is_one_clear_line(model, sae6, tiny_model):
    from sae_kit.splice import SpliceError, intervene, spliced, steer

    def one_line(excinfo) -> str:
        msg = str(excinfo.value)
        assert "\n" not in msg
        return msg

    wide = identity_sae(32, "blocks.6.hook_resid_post", "float32")
    with pytest.raises(SpliceError) as e:
        with spliced(model, wide):
            pass
    assert one_line(e).startswith("the SAE reads d_in=32, but blocks.6.hook_resid_post of")
    typo = identity_sae(576, "blocks.6.hook_resid_pots", "float32")
    with pytest.raises(SpliceError) as e:
        with spliced(model, typo):
            pass
    assert "unknown hook 'blocks.6.hook_resid_pots'; closest valid names: blocks.6.hook_resid_post" in one_line(e)
    with pytest.raises(HeldoutError) as e:
        with intervene(model, sae6, {sae6.cfg.d_sae: 0.0}):
            pass
    assert one_line(e) == "feature 4608 is out of range: this SAE has d_sae=4608 latents (ids 0..4607)"
    with pytest.raises(HeldoutError, match="feature -3 is out of range"):
        with steer(model, sae6, -3, 1.0, unit=1.0):
            pass
    other = identity_sae(576, "blocks.6.hook_resid_post", "float32")
    with pytest.raises(SpliceError) as e:
        with spliced(model, sae6, other):
            pass
    assert one_line(e).startswith("two SAEs on one hook (blocks.6.hook_resid_post)")
    with spliced(model, sae6):
        with pytest.raises(SpliceError, match="two SAEs on one hook"):
            with spliced(model, other):
                pass
    # an error inside the context still restores the model and the SAE's mode
    sae6.train()
    with pytest.raises(RuntimeError, match="boom"):
        with spliced(model, sae6):
            assert not sae6.training
            raise RuntimeError("boom")
    assert sae6.training and restored(model)
    sae6.eval()


def test_an_sae_with_an_input_scale_is_folded_as_eval_folds_it(model, sae6):
    import copy

    from sae_kit.heldout import fold_input_scale, harvest_config_for
    from sae_kit.splice import sae_hook_name, spliced

    def normalising() -> SAE:  # sae6 as if trained on x·4 with normalize_activations
        sae = copy.deepcopy(sae6)
        sae.cfg.normalize_activations = "expected_average_only_in"
        with torch.no_grad():
            sae.b_dec.mul_(4.0)
            sae.b_enc.mul_(4.0)
        return sae

    reference = normalising()
    scale = fold_input_scale(model, reference, harvest_config_for(reference))
    sae = normalising()
    tokens = model.to_tokens(PROMPT)
    with spliced(model, sae):
        _, cache = model.run_with_cache(tokens)
    assert sae.cfg.normalize_activations == "none"
    folded = sae.cfg.metadata["activation_scale_folded"]  # (times any scale the trainer folded before)
    assert scale is not None and folded == reference.cfg.metadata["activation_scale_folded"]
    assert torch.equal(sae.b_dec, reference.b_dec)  # the same fold as eval's
    x = cache[sae_hook_name(sae, "hook_sae_input")]
    with torch.no_grad():
        assert torch.equal(cache[sae_hook_name(sae, "hook_sae_acts_post")][0, 1:], sae.encode(x)[0, 1:])
