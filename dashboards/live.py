"""What the browser computes live with the LM: a prompt's codes token by token, and steered generation, both under the
SAE's own data settings and position rules (sae_kit.heldout)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sae_kit.errors import SaeKitError
from sae_kit.heldout import (
    HeldoutContexts,
    activations,
    encode_chunks,
    fold_input_scale,
    generate,
    harvest_config_for,
    prompt_tokens,
    steer_edit,
)
from sae_kit.sae import SAE

MAX_PROMPT_TOKENS = 512


@dataclass
class PromptCodes:
    """A prompt's tokens and the SAE's code at each."""

    tokens: list[str]
    """Display string of each token."""
    read: list[bool]
    """Whether the SAE reads the position (its training rule: by default not BOS, special tokens or position 0)."""
    codes: Tensor
    """[T, d_sae] fp32 code per position (zero where not read)."""


@torch.no_grad()
def encode_prompt(model, sae: SAE, text: str) -> PromptCodes:
    """Run `text` through the LM to the SAE's hook and encode every position the SAE reads."""
    hcfg = harvest_config_for(sae)
    fold_input_scale(model, sae, hcfg)
    tokens, keep = prompt_tokens(model, hcfg, text)
    if tokens.shape[1] > MAX_PROMPT_TOKENS:
        raise SaeKitError(f"the prompt is {tokens.shape[1]} tokens; shorten it to at most {MAX_PROMPT_TOKENS}")
    codes = torch.zeros(tokens.shape[1], sae.cfg.d_sae)
    if keep.any():
        x, grad = activations(
            model, hcfg, HeldoutContexts(tokens, keep, torch.zeros_like(keep)), grads=sae.sparsifier.uses_grad
        )
        codes[keep[0]] = torch.cat([c.to_dense().float().cpu() for _, c in encode_chunks(sae.eval(), x, grad)])
    return PromptCodes([model.tokenizer.decode([t]) for t in tokens[0].tolist()], keep[0].tolist(), codes)


def steered_generation(
    model, sae: SAE, prompt: str, feature: int, alpha: float, unit: float, n_tokens: int
) -> tuple[str, str]:
    """(greedy continuation of `prompt`, the same with alpha·unit·d_feature added at the SAE's hook on every
    position the SAE reads). `unit` is the feature's max activation, so alpha = 1 adds its strongest observed
    contribution (the steering section of `sae-kit eval` uses the same unit)."""
    hcfg = harvest_config_for(sae)
    fold_input_scale(model, sae, hcfg)
    direction = sae.W_dec[feature].detach().float().cpu() * unit
    return generate(model, hcfg, prompt, n_tokens), generate(
        model, hcfg, prompt, n_tokens, edit=steer_edit(direction, alpha)
    )
