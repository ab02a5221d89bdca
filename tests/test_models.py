"""Model loading, the default-model cache, hook validation and early stop."""

from __future__ import annotations

import pytest
import torch

import sae_kit.models as models
from sae_kit.models import (
    HookError,
    LanguageModel,
    ModelError,
    check_device,
    context_limit,
    hook_names,
    resolve_model,
    stop_layer,
    validate_hooks,
)
from sae_kit.paths import cache_root


def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("SAE_KIT_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "b"))
    assert cache_root() == tmp_path / "a"
    monkeypatch.delenv("SAE_KIT_CACHE")
    assert cache_root() == tmp_path / "b" / "sae-kit"


def test_interrupted_conversion_leaves_no_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("SAE_KIT_CACHE", str(tmp_path))
    import transformers

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", boom)
    with pytest.raises(KeyboardInterrupt):
        models.default_model_dir()
    assert list((tmp_path / "models").iterdir()) == []


def test_bad_model_names(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model(str(tmp_path / "nope"))
    with pytest.raises(ModelError, match="config.json"):
        resolve_model(str(tmp_path))


def test_unknown_architecture_is_a_one_line_error(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "foo", "architectures": ["FooForCausalLM"]}')
    with pytest.raises(
        ModelError, match=r"could not load model .* as a TransformerBridge \(.*model type `foo`.*\); use a causal LM"
    ) as err:
        models.load_model(str(tmp_path), device="cpu")
    assert "\n" not in str(err.value)


def test_bad_devices_are_one_line_errors(monkeypatch):
    assert check_device("cpu") == torch.device("cpu")
    with pytest.raises(ModelError, match="unknown --device 'gpu0'; use cpu, cuda"):
        check_device("gpu0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ModelError, match="sees no CUDA GPU; use --device cpu"):
        check_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert check_device("cuda:1").index == 1
    with pytest.raises(ModelError, match="has 2 CUDA GPU.*cuda:0 to cuda:1"):
        check_device("cuda:2")
    with pytest.raises(ModelError, match="no CUDA GPU"):  # checked before the (slow) model load
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        models.load_model(device="cuda")


@pytest.mark.slow
def test_default_model_and_hooks(model):
    assert model.sae_kit_name == "SmolLM2-135M-Instruct"
    assert isinstance(model, LanguageModel) and context_limit(model) == model.cfg.n_ctx == 8192
    assert model.cfg.d_model == 576 and model.cfg.n_layers == 30
    assert not any(p.requires_grad for p in model.parameters())
    names = hook_names(model)
    assert "blocks.6.hook_resid_post" in names
    assert validate_hooks(model, "blocks.6.hook_resid_post") == ["blocks.6.hook_resid_post"]
    with pytest.raises(HookError) as err:
        validate_hooks(model, ["blocks.6.hook_resid_pots"])
    msg = str(err.value)
    assert "\n" not in msg and "blocks.6.hook_resid_post" in msg
    assert stop_layer(model, ["blocks.6.hook_resid_post", "blocks.2.attn.hook_z"]) == 7
    assert stop_layer(model, ["ln_final.hook_normalized"]) is None


@pytest.mark.slow
def test_bridge_prepends_bos_like_our_packing(model):
    from sae_kit.data import PackConfig, pack

    text = "The quick brown fox jumps over the lazy dog."
    row = next(pack([(0, text)], model.tokenizer, PackConfig(context_size=11), rows_per_batch=1)).tokens[0]
    assert torch.equal(model.to_tokens(text)[0, :11], row)
