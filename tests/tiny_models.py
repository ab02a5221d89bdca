"""Tiny random-weight Hugging Face model directories of each family sae-kit supports, built offline at test time.

Each directory is what `save_pretrained` writes for a family's own config class at tiny sizes (2 layers, width 64),
plus a tokenizer: the embedded SmolLM2 tokenizer (from the cached converted default model, so nothing downloads),
made BOS-less for Qwen as the real Qwen tokenizers are. Nothing large is committed: `build(family, root)` writes
~7 MB per model (almost all of it the 49k-token embedding) into `root`.

    python3 -m tests.tiny_models /tmp/tiny     # build every family there (for trying the CLI by hand)
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

FAMILIES = ("llama", "gemma2", "gemma3", "qwen2", "qwen3", "gpt2", "pythia")
"""The model families tested end to end (tests/test_model_families.py)."""
BOS_LESS = ("qwen2", "qwen3")
"""Families whose real tokenizers have no BOS token (bos_token None): their tiny tokenizer has none either."""
D_MODEL = 64
N_LAYERS = 2


def _config(family: str, vocab: int, bos: int | None, eos: int) -> Any:
    """The family's transformers config at tiny sizes."""
    import transformers as tf

    common: dict[str, Any] = {"vocab_size": vocab, "bos_token_id": bos, "eos_token_id": eos}
    llama_like = {
        **common,
        "hidden_size": D_MODEL,
        "intermediate_size": 2 * D_MODEL,
        "num_hidden_layers": N_LAYERS,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
    }
    if family == "llama":
        return tf.LlamaConfig(**llama_like)
    if family == "gemma2":
        return tf.Gemma2Config(**llama_like, head_dim=16, sliding_window=32, query_pre_attn_scalar=16)
    if family == "gemma3":
        return tf.Gemma3TextConfig(**llama_like, head_dim=16, sliding_window=32, query_pre_attn_scalar=16)
    if family == "qwen2":
        return tf.Qwen2Config(**llama_like, tie_word_embeddings=True)
    if family == "qwen3":
        return tf.Qwen3Config(**llama_like, head_dim=16, tie_word_embeddings=True)
    if family == "gpt2":
        return tf.GPT2Config(**common, n_embd=D_MODEL, n_layer=N_LAYERS, n_head=4, n_positions=256)
    if family == "pythia":
        return tf.GPTNeoXConfig(
            **common,
            hidden_size=D_MODEL,
            intermediate_size=4 * D_MODEL,
            num_hidden_layers=N_LAYERS,
            num_attention_heads=4,
            max_position_embeddings=256,
            rotary_pct=0.25,
        )
    raise ValueError(f"unknown family {family!r}; one of {FAMILIES}")


def tokenizer_for(family: str):
    """The SmolLM2 tokenizer of the cached default model (BOS-less for the Qwen families)."""
    from transformers import AutoTokenizer

    from sae_kit.models import default_model_dir

    tok = AutoTokenizer.from_pretrained(default_model_dir())
    if family in BOS_LESS:
        tok.bos_token = None
        tok.pad_token = tok.eos_token
    return tok


def build(family: str, root: Path, seed: int = 0) -> Path:
    """Write a tiny random `family` model with its tokenizer into root/<family> (once) and return the directory."""
    from transformers import AutoModelForCausalLM

    out = Path(root) / family
    if (out / "config.json").is_file():
        return out
    tok = tokenizer_for(family)
    cfg = _config(family, len(tok), tok.bos_token_id, tok.eos_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # random norm weights, so a norm's scale convention (w vs 1 + w) shows in every test
        for name, p in model.named_parameters():
            if "norm" in name or "ln" in name:
                p.normal_(0.0, 0.3).add_(0.0 if "gemma" in family else 1.0)
    tmp = out.with_name(f".{family}.tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)
    return out


if __name__ == "__main__":
    for fam in FAMILIES:
        print(build(fam, Path(sys.argv[1] if len(sys.argv) > 1 else "tiny-models")))
