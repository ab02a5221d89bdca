"""The LM's dtype (`HarvestConfig.model_dtype`, `fast_bf16`) and the chunked-CE gradient harvest, on the real model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sae_kit.activations import HarvestConfig, Harvester, ce_and_grad, contexts
from sae_kit.errors import SaeKitError
from sae_kit.models import dtype_name, fast_bf16, load_model

HOOK = "blocks.6.hook_resid_post"


def test_chunked_ce_equals_autograd_of_the_full_logits():
    torch.manual_seed(0)
    h = torch.randn(3, 7, 16, dtype=torch.float64)
    W, b = torch.randn(16, 50, dtype=torch.float64), torch.randn(50, dtype=torch.float64)
    targets = torch.randint(0, 50, (3, 7))
    targets[:, -1] = -100
    targets[1, 2] = -100
    leaf = h.clone().requires_grad_(True)
    ref = F.cross_entropy((leaf @ W + b).flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
    (want,) = torch.autograd.grad(ref, [leaf])
    ce, grad = ce_and_grad(h, targets, W, b, max_cells=3 * 50)  # 3 positions per chunk: 7 chunks
    torch.testing.assert_close(ce.double(), ref.detach(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(grad.double(), want, rtol=1e-5, atol=1e-5)
    assert grad[:, -1].abs().max() == 0 and grad[1, 2].abs().max() == 0
    # Gemma 2's soft-capped logits c·tanh(z / c): W scaled up so the cap bends them (|z| up to ~100 > c = 5)
    W = W * 8
    capped = lambda z: 5.0 * torch.tanh(z / 5.0)  # noqa: E731
    ref = F.cross_entropy(capped(leaf @ W + b).flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
    (want,) = torch.autograd.grad(ref, [leaf])
    ce, grad = ce_and_grad(h, targets, W, b, max_cells=3 * 50, soft_cap=5.0)
    torch.testing.assert_close(ce.double(), ref.detach(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(grad.double(), want, rtol=1e-5, atol=1e-5)
    uncapped, _ = ce_and_grad(h, targets, W, b)
    assert abs(float(uncapped) - float(ref)) > 1.0  # the cap matters at these logits


@pytest.mark.slow
def test_chunked_gradient_equals_the_full_logits_path(model):
    ctx = next(contexts(model, HarvestConfig(context_size=48, lm_batch_size=3)))
    pad = torch.zeros_like(ctx.tokens, dtype=torch.bool)
    pad[2, 40:] = True
    harv = Harvester(model, [HOOK, "blocks.2.hook_resid_post"], with_grads=True)
    assert harv._chunked  # SmolLM2's logits are h @ W_U (+ b_U) of unembed.hook_in: the fast path applies
    acts, grads = harv.run(ctx.tokens, pad)
    device = ctx.tokens.device
    targets = ctx.tokens.roll(-1, 1)
    targets[:, -1] = -100
    targets = targets.masked_fill(pad.roll(-1, 1), -100)
    store, plain = harv._grads_full(ctx.tokens.to(device), targets)
    for name, g in zip(harv.hooks, plain):
        assert grads[name].dtype == torch.float32 and acts[name].dtype == torch.float32
        torch.testing.assert_close(acts[name], store[name].detach().flatten(2))
        rel = float((grads[name] - g).norm() / g.norm())
        assert rel < 1e-4, (name, rel)
    assert grads[HOOK][2, 39:].abs().max() == 0  # padding targets and what only feeds them carry no gradient


@pytest.mark.slow
def test_bf16_model_agrees_with_fp32(model):
    bf16 = load_model(device="cpu", dtype="bfloat16")
    assert dtype_name(bf16) == "bfloat16" and dtype_name(model) == "float32"
    ctx = next(contexts(model, HarvestConfig(context_size=64, lm_batch_size=4)))
    keep = Harvester(model, [HOOK]).keep_mask(ctx)
    a32, _ = Harvester(model, [HOOK]).run(ctx.tokens)
    a16, _ = Harvester(bf16, [HOOK]).run(ctx.tokens)
    assert a16[HOOK].dtype == torch.float32  # handed out as float32 for the SAE
    x32, x16 = a32[HOOK][keep], a16[HOOK][keep]
    cos = F.cosine_similarity(x16, x32)
    assert cos.mean() > 0.9998 and cos.min() > 0.99
    assert (x16 - x32).norm() / x32.norm() < 0.03
    # gradients: most positions agree closely; a few stray (why `auto` keeps gradient harvests in float32)
    _, g32 = Harvester(model, [HOOK], with_grads=True).run(ctx.tokens)
    harv16 = Harvester(bf16, [HOOK], with_grads=True)
    assert harv16._chunked
    _, g16 = harv16.run(ctx.tokens)
    keep[:, -1] = False  # the last position has no target: zero gradient in both
    cos = F.cosine_similarity(g16[HOOK][keep], g32[HOOK][keep])  # type: ignore[index]
    assert cos.median() > 0.99 and cos.quantile(0.1) > 0.98 and cos.mean() > 0.95


def test_model_dtype_setting(monkeypatch):
    fast = fast_bf16("cpu")
    assert isinstance(fast, bool)
    assert HarvestConfig().torch_dtype() == (torch.bfloat16 if fast else torch.float32)
    assert HarvestConfig().torch_dtype(with_grads=True) == torch.float32
    assert HarvestConfig(model_dtype="bfloat16").torch_dtype(with_grads=True) == torch.bfloat16
    assert HarvestConfig(model_dtype="float32").torch_dtype() == torch.float32
    assert HarvestConfig(model_dtype="float32").settings("m")["model_dtype"] == "float32"
    assert HarvestConfig().settings("m", "bfloat16")["model_dtype"] == "bfloat16"
    assert HarvestConfig(model_dtype="float16").torch_dtype() == torch.float16  # GPUs without bf16
    assert HarvestConfig(model_dtype="float16").torch_dtype(with_grads=True) == torch.float16  # an explicit choice
    assert HarvestConfig(model_dtype="float16").settings("m")["model_dtype"] == "float16"
    with pytest.raises(
        SaeKitError, match=r"unknown --model-dtype 'float8'; use auto, float32, bfloat16 or float16"
    ) as err:
        HarvestConfig(model_dtype="float8").check()  # type: ignore[arg-type]
    assert "\n" not in str(err.value)
    assert fast_bf16("mps") is False
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert fast_bf16("cuda") is False
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: not including_emulation)
    assert fast_bf16("cuda") is True


def test_heldout_data_is_recreated_by_an_fp32_lm():
    from sae_kit.heldout import harvest_config_for
    from sae_kit.sae import SAE, SAEConfig

    old = SAE(SAEConfig(architecture="topk", d_in=576, d_sae=64, k=4, metadata={"hook_name": HOOK}))  # no model_dtype
    new = SAE(
        SAEConfig(architecture="topk", d_in=576, d_sae=64, k=4, metadata={"hook_name": HOOK, "model_dtype": "bfloat16"})
    )
    assert harvest_config_for(old).model_dtype == harvest_config_for(new).model_dtype == "float32"


@pytest.mark.slow
def test_caches_record_the_model_dtype_and_old_caches_resume(model, tmp_path):
    import json

    from sae_kit.build_cache import CacheConfig, build_cache
    from sae_kit.cache import ActivationCache

    cfg = CacheConfig(
        out=tmp_path / "c", harvest=HarvestConfig(context_size=32), tokens=64, heldout_tokens=0, progress=False
    )
    build_cache(cfg, model=model)
    assert ActivationCache(cfg.out).settings["model_dtype"] == "float32"  # what the LM ran in, not the setting
    manifest = json.loads((cfg.out / "manifest.json").read_text())
    assert manifest["settings"]["bos_token_id"] == model.tokenizer.bos_token_id
    for key in ("model_dtype", "corpus_config", "corpus_split", "bos_token_id", "bos_token"):
        del manifest["settings"][key]  # a cache from before these settings were recorded
    manifest["complete"] = False
    (cfg.out / "manifest.json").write_text(json.dumps(manifest))
    build_cache(CacheConfig(**{**vars(cfg), "tokens": 128}), model=model)  # resumes it (its LM ran in float32)
    cache = ActivationCache(cfg.out)
    assert cache.n_rows("train") >= 128 and "model_dtype" not in cache.settings and "bos_token" not in cache.settings
