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
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    hf = LlamaForCausalLM(cfg).to(torch.float64).eval()
    bridge = TransformerBridge.boot_transformers(
        "tiny-llama", hf_model=hf, tokenizer=tokenizer, dtype=torch.float64, device="cpu"
    )
    for p in bridge.parameters():
        p.requires_grad_(False)
    return bridge


@pytest.fixture(scope="session")
def browse_run(model, tmp_path_factory):
    """A real sweep for the browser: TopK and AbsTopK SAEs (1152 latents, k 16) trained briefly on SmolLM2 layer-6
    batches, evaluated together into <sweep>/eval, and indexed on ~3k held-out tokens each."""
    from sae_kit import HarvestConfig
    from sae_kit.build_cache import CacheConfig, build_cache
    from sae_kit.dashboards.indexer import IndexConfig, build_index
    from sae_kit.eval.core import CoreConfig
    from sae_kit.eval.dark_matter import DarkMatterConfig
    from sae_kit.eval.evaluate import EvalConfig, evaluate
    from sae_kit.eval.steering import SteeringConfig
    from sae_kit.training import TrainConfig
    from sae_kit.training.run import TrainRunConfig, train

    root = tmp_path_factory.mktemp("browse")
    cache = build_cache(
        CacheConfig(
            out=root / "cache", harvest=HarvestConfig(context_size=64), tokens=12288, heldout_tokens=512, progress=False
        ),
        model=model,
    )
    sweep = root / "sweep"
    train(
        TrainRunConfig(
            out=sweep,
            cache=cache,
            architecture=("topk", "abstopk"),
            k=(16,),
            expansion_factor=(2,),
            eval_tokens=512,
            progress=False,
            train=TrainConfig(batch_size=512, tokens=512 * 24, lr=2e-3, warmup_steps=4),
        )
    )
    evaluate(
        EvalConfig(
            saes=(sweep,),
            out=sweep / "eval",
            tokens=10000,
            context_size=64,
            core=CoreConfig(ce_tokens=600),
            dark_matter=DarkMatterConfig(ce_tokens=600),
            steering=SteeringConfig(n_features=3, alphas=(1.0, 4.0), contexts=2, generate_tokens=8),
        ),
        model=model,
    )
    build_index(
        IndexConfig(sae=sweep, tokens=3000, context_size=64, shard_size=256, row_group=8, progress=False), model=model
    )
    return sweep
