"""Shared fixtures: the real SmolLM2 model (loaded once per session) and a tiny random Llama for exact checks."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def model():
    """The embedded SmolLM2-135M-Instruct as a TransformerBridge."""
    from sae_kit import load_model

    return load_model(device="cpu")


@pytest.fixture(scope="session")
def tokenizer(model):
    return model.tokenizer


@pytest.fixture(scope="session")
def tiny_model(tokenizer):
    """A 2-layer random Llama in float64 sharing SmolLM2's tokenizer: small enough for finite differences."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    hf = LlamaForCausalLM(cfg).to(torch.float64).eval()
    bridge = TransformerBridge.boot_transformers("tiny-llama", hf_model=hf, tokenizer=tokenizer, dtype=torch.float64, device="cpu")
    for p in bridge.parameters():
        p.requires_grad_(False)
    return bridge
