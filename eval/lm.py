"""The LM side of evaluation: held-out contexts for an SAE, and forward passes that capture or edit the activation at
the SAE's hook.

Every measurement runs on documents the SAE never trained on (the corpus's held-out split, tokenised exactly as the
SAE's training data, read from its cfg.json metadata). A multi-dimensional hook (attn.hook_z: [R, T, heads, d_head])
is seen flattened to [R, T, d_in] and reshaped back when edited. Positions the SAE does not read (position 0, special
tokens, padding: the same rule as training) are never edited; `keep` marks the others.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from sae_kit.activations import HarvestConfig, contexts, harvester_for
from sae_kit.errors import SaeKitError
from sae_kit.sae import SAE

Edit = Callable[[Tensor, Tensor], Tensor]
"""edit(acts [R, T, d_in], keep [R, T]) -> new acts [R, T, d_in] (keep: positions the edit may change)."""


class EvalError(SaeKitError):
    """Evaluation cannot run as asked (mismatched SAE and model, unknown hook, too few tokens)."""


@dataclass
class EvalContexts:
    """Held-out context rows and which of their positions the SAE reads."""

    tokens: Tensor
    """[R, T] token ids."""
    keep: Tensor
    """[R, T] bool: positions whose activations the SAE encodes (and edits may change)."""
    pad: Tensor
    """[R, T] bool: padding (never a prediction target)."""

    def batches(self, size: int):
        """Row batches of at most `size` contexts, as EvalContexts."""
        for i in range(0, len(self.tokens), size):
            yield EvalContexts(self.tokens[i : i + size], self.keep[i : i + size], self.pad[i : i + size])

    @property
    def n_kept(self) -> int:
        return int(self.keep.sum())


def harvest_config_for(sae: SAE, **overrides) -> HarvestConfig:
    """The tokenisation and data settings the SAE was trained with (from its metadata), with `overrides`."""
    meta = sae.cfg.metadata
    known = {f.name for f in dataclasses.fields(HarvestConfig)}
    settings = {"hook": (meta["hook_name"],)} if meta.get("hook_name") else {}
    for key in ("context_size", "prepend_bos", "dataset_path", "text_field", "packing", "separator", "exclude_special_tokens",
                "exclude_first_position", "holdout_fraction"):
        if meta.get(key) is not None:
            settings["corpus" if key == "dataset_path" else key] = meta[key]
    settings |= {k: v for k, v in overrides.items() if v is not None}
    unknown = set(settings) - known
    if unknown:
        raise EvalError(f"unknown harvest setting(s) {sorted(unknown)}; use fields of HarvestConfig")
    if isinstance(settings.get("hook"), str):
        settings["hook"] = (settings["hook"],)
    return HarvestConfig(**settings)


def check_pair(model, sae: SAE, hook: str) -> None:
    """One-line errors when the SAE cannot read `hook` of `model` (unknown hook, different width)."""
    from sae_kit.models import validate_hooks

    try:
        validate_hooks(model, [hook])
    except SaeKitError as err:
        raise EvalError(str(err)) from None
    probe, _ = harvester_for(model, HarvestConfig(hook=(hook,))).run(torch.full((1, 2), model.tokenizer.bos_token_id or 0))
    width = probe[hook].shape[-1]
    if width != sae.cfg.d_in:
        raise EvalError(f"the SAE reads d_in={sae.cfg.d_in}, but {hook} of {getattr(model, 'sae_kit_name', 'the model')} has width {width}; "
                        "pick the hook the SAE was trained on (cfg.json metadata.hook_name) or the matching model")


def heldout_contexts(model, cfg: HarvestConfig, n_tokens: int) -> EvalContexts:
    """The fewest held-out context rows that hold `n_tokens` kept positions (all of them if the split holds fewer)."""
    harvester = harvester_for(model, cfg)
    parts, kept = [], 0
    for ctx in contexts(model, cfg, "heldout"):
        keep = harvester.keep_mask(ctx)
        pad = ctx.pad if ctx.pad.numel() else torch.zeros_like(keep)
        parts.append((ctx.tokens, keep, pad))
        kept += int(keep.sum())
        if kept >= n_tokens:
            break
    if not parts:
        raise EvalError(f"corpus {cfg.corpus!r} has no held-out documents; raise --holdout-fraction or use another corpus")
    tokens, keep, pad = (torch.cat([p[i] for p in parts]) for i in range(3))
    rows = min(int((keep.sum(1).cumsum(0) < n_tokens).sum()) + 1, len(keep))  # the last batch may overshoot
    return EvalContexts(tokens[:rows], keep[:rows], pad[:rows])


def run_lm(model, tokens: Tensor, hook: str, edit: Edit | None = None, keep: Tensor | None = None,
           capture: bool = False, stop_at_layer: int | None = None) -> tuple[Tensor | None, Tensor | None]:
    """One forward pass: (logits [R, T, vocab] in fp32, or None when stopped early; the hook's activations [R, T, d_in]
    before any edit, when `capture`). `edit` replaces the activations at `hook` (see `Edit`)."""
    device = next(model.parameters()).device
    tokens = tokens.to(device)
    keep = keep.to(device) if keep is not None else torch.ones_like(tokens, dtype=torch.bool)
    captured: dict[str, Tensor] = {}

    def fn(act: Tensor, hook) -> Tensor:  # noqa: ARG001 (TransformerLens passes the hook point by this name)
        flat = act.flatten(2)
        if capture:
            captured["acts"] = flat.detach().clone()
        if edit is None:
            return act
        return edit(flat, keep).to(act.dtype).reshape(act.shape)

    with torch.inference_mode(), model.hooks(fwd_hooks=[(hook, fn)]):
        out = model(tokens, stop_at_layer=stop_at_layer) if stop_at_layer is not None else model(tokens)
    logits = None if stop_at_layer is not None else out.float()
    return logits, captured.get("acts")


def next_token_ce(logits: Tensor, tokens: Tensor, pad: Tensor) -> tuple[Tensor, Tensor]:
    """(per-position next-token cross-entropy [R, T-1], mask [R, T-1] of positions with a real target)."""
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten().to(logits.device), reduction="none")
    mask = ~pad[:, 1:].to(logits.device)
    return ce.view(tokens.shape[0], -1), mask


def kl_from(clean_logits: Tensor, other_logits: Tensor) -> Tensor:
    """KL(p_clean ‖ p_other) per position [R, T], summed over the vocabulary."""
    p = clean_logits.log_softmax(-1)
    q = other_logits.log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1)


def splice(x_new: Tensor) -> Edit:
    """An edit that writes the rows of `x_new` [n_kept, d_in] into the kept positions (in row-major order)."""
    def edit(acts: Tensor, keep: Tensor) -> Tensor:
        out = acts.clone()
        out[keep] = x_new.to(out.device, out.dtype)
        return out

    return edit
