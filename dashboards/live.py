"""What the browser computes live with the LM: a prompt's codes token by token, and steered generation."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sae_kit.activations import harvester_for
from sae_kit.errors import SaeKitError
from sae_kit.eval.inputs import activations
from sae_kit.eval.lm import EvalContexts, harvest_config_for
from sae_kit.eval.steering import generate, steer_edit
from sae_kit.sae import SAE

MAX_PROMPT_TOKENS = 512


@dataclass
class PromptCodes:
    """A prompt's tokens and the SAE's code at each."""

    tokens: list[str]
    """Display string of each token."""
    read: list[bool]
    """Whether the SAE reads the position (not BOS, special tokens or position 0: the training rule)."""
    codes: Tensor
    """[T, d_sae] fp32 code per position (zero where not read)."""


@torch.no_grad()
def encode_prompt(model, sae: SAE, text: str) -> PromptCodes:
    """Run `text` through the LM to the SAE's hook and encode every position the SAE reads."""
    hcfg = harvest_config_for(sae)
    tokens = model.to_tokens(text).cpu()
    if tokens.shape[1] > MAX_PROMPT_TOKENS:
        raise SaeKitError(f"the prompt is {tokens.shape[1]} tokens; shorten it to at most {MAX_PROMPT_TOKENS}")
    pad = torch.zeros_like(tokens, dtype=torch.bool)
    keep = harvester_for(model, hcfg).keep_positions(tokens, pad)
    codes = torch.zeros(tokens.shape[1], sae.cfg.d_sae)
    if keep.any():
        x, grad = activations(model, sae, hcfg.hook[0], EvalContexts(tokens, keep, pad), 1, hcfg)
        device = sae.W_dec.device
        code = sae.forward_codes(x.to(device), None if grad is None else grad.to(device)).to_dense()
        codes[keep[0]] = code.float().cpu()
    return PromptCodes([model.tokenizer.decode([t]) for t in tokens[0].tolist()], keep[0].tolist(), codes)


def steered_generation(model, sae: SAE, prompt: str, feature: int, alpha: float, unit: float, n_tokens: int) -> tuple[str, str]:
    """(greedy continuation of `prompt`, the same with alpha·unit·d_feature added at the SAE's hook on every
    position the SAE reads). `unit` is the feature's max activation, so alpha = 1 adds its strongest observed
    contribution (the steering section of `sae-kit eval` uses the same unit)."""
    hook = harvest_config_for(sae).hook[0]
    direction = sae.W_dec[feature].detach().float().cpu() * unit
    plain = generate(model, hook, prompt, n_tokens)
    steered = generate(model, hook, prompt, n_tokens, edit=steer_edit(direction, alpha))
    return plain, steered
