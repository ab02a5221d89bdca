"""The held-out LM layer: how every consumer of a trained SAE (eval, the feature index, the browser, notebooks) runs the
language model for it, always under the SAE's own data settings and position rules (`harvest_config_for`, from its
cfg.json metadata): its held-out contexts and their activations, forward passes that capture or edit the hook, the
logit lens, generation, bounded-chunk encoding, the one held-out FVU, and the input scale of normalising SAEs.

A multi-dimensional hook (attn.hook_z: [R, T, heads, d_head]) is seen flattened to [R, T, d_in] and reshaped back when
edited. Positions the SAE does not read (its recorded rule: by default position 0, special tokens and padding) are
never edited; `keep` marks the others.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from sae_kit.activations import DATA_SETTINGS, HarvestConfig, contexts, harvester_for
from sae_kit.errors import SaeKitError
from sae_kit.sae import SAE
from sae_kit.sparsifiers.base import Codes

Edit = Callable[[Tensor, Tensor], Tensor]
"""edit(acts [R, T, d_in], keep [R, T]) -> new acts [R, T, d_in] (keep: positions the edit may change)."""
MAX_CELLS = 1 << 25
"""Code entries [rows × d_sae] one encode chunk may hold (dense rules materialise them)."""
LOGIT_CELLS = 1 << 28
"""fp32 logits [rows × T × vocab] one eval LM forward may return (1 GiB): the CE/KL passes split their LM batches
into fewer rows for a large vocabulary (Gemma's 256k: 8 contexts of 128 tokens per forward)."""
SCALE_TOKENS = 8192
"""Leading held-out positions the input scale of a normalising SAE is estimated on."""


class HeldoutError(SaeKitError):
    """The SAE cannot be run on its held-out data as asked (mismatched SAE and model, unknown hook, no held-out documents)."""


@dataclass
class HeldoutContexts:
    """Held-out context rows and which of their positions the SAE reads."""

    tokens: Tensor
    """[R, T] token ids."""
    keep: Tensor
    """[R, T] bool: positions whose activations the SAE encodes (and edits may change)."""
    pad: Tensor
    """[R, T] bool: padding (never a prediction target)."""

    def rows(self, a: int, b: int | None = None) -> HeldoutContexts:
        """Context rows a:b."""
        return HeldoutContexts(self.tokens[a:b], self.keep[a:b], self.pad[a:b])

    def batches(self, size: int) -> Iterator[HeldoutContexts]:
        """Row batches of at most `size` contexts."""
        for i in range(0, len(self.tokens), size):
            yield self.rows(i, i + size)

    def first(self, n_kept: int) -> HeldoutContexts:
        """The fewest leading rows that hold at least `n_kept` kept positions (all rows if they hold fewer)."""
        return self.rows(0, min(int((self.keep.sum(1).cumsum(0) < n_kept).sum()) + 1, len(self.keep)))

    @property
    def n_kept(self) -> int:
        return int(self.keep.sum())

    def logit_batches(self, vocab: int, max_cells: int | None = None) -> Iterator[tuple[int, HeldoutContexts]]:
        """(kept positions before it, rows) for sub-batches of these rows whose fp32 logits [rows, T, vocab] hold at
        most `max_cells` (None: LOGIT_CELLS) entries, at least one row each: an LM batch split for a large vocabulary."""
        step = max(1, (max_cells or LOGIT_CELLS) // max(1, self.tokens.shape[1] * vocab))
        before = 0
        for i in range(0, len(self.tokens), step):
            sub = self.rows(i, i + step)
            yield before, sub
            before += sub.n_kept


# ------------------------------------------------------------------------------------------------ data settings
def harvest_config_for(sae: SAE, **overrides) -> HarvestConfig:
    """The tokenisation, held-out split and position rules the SAE was trained with (its metadata), with `overrides`.

    The LM's dtype is not among them: its recorded `model_dtype` (missing: float32) says how the SAE's training data was
    made, but held-out data is always re-created by an fp32 LM (`model_dtype="float32"` here), the exact reference, so
    an SAE trained on bf16-LM activations is scored on what the model really computes and compares with fp32 ones.
    """
    meta = sae.cfg.metadata
    settings: dict[str, Any] = {"hook": (meta["hook_name"],)} if meta.get("hook_name") else {}
    settings["model_dtype"] = "float32"
    for key in DATA_SETTINGS:
        if meta.get(key) is not None:
            settings["corpus" if key == "dataset_path" else key] = meta[key]
    given = {k: v for k, v in overrides.items() if v is not None}
    if "corpus" in given and given["corpus"] != settings.get("corpus"):
        # another corpus: the training corpus's hub subset and split do not apply to it (unless given too)
        settings.pop("corpus_config", None)
        settings.pop("corpus_split", None)
    settings |= given
    unknown = set(settings) - {f.name for f in dataclasses.fields(HarvestConfig)}
    if unknown:
        raise HeldoutError(f"unknown harvest setting(s) {sorted(unknown)}; use fields of HarvestConfig")
    if isinstance(settings.get("hook"), str):
        settings["hook"] = (settings["hook"],)
    return HarvestConfig(**settings)


def check_pair(model, sae: SAE, hook: str) -> None:
    """One-line errors when the SAE cannot read `hook` of `model` (unknown hook, different width)."""
    from sae_kit.models import validate_hooks

    try:
        validate_hooks(model, [hook])
    except SaeKitError as err:
        raise HeldoutError(str(err)) from None
    probe, _ = harvester_for(model, HarvestConfig(hook=(hook,), context_size=2)).run(  # (2 tokens: any model)
        torch.full((1, 2), model.tokenizer.bos_token_id or 0)
    )
    width = probe[hook].shape[-1]
    if width != sae.cfg.d_in:
        raise HeldoutError(
            f"the SAE reads d_in={sae.cfg.d_in}, but {hook} of {getattr(model, 'sae_kit_name', 'the model')} has width {width}; "
            "pick the hook the SAE was trained on (cfg.json metadata.hook_name) or the matching model"
        )


# ------------------------------------------------------------------------------------------------ held-out data
def heldout_contexts(model, cfg: HarvestConfig, n_tokens: int) -> HeldoutContexts:
    """The fewest held-out context rows that hold `n_tokens` kept positions (all of them if the split holds fewer)."""
    harvester = harvester_for(model, cfg)
    parts, kept = [], 0
    for ctx in contexts(model, cfg, "heldout"):
        keep = harvester.keep_mask(ctx)
        parts.append((ctx.tokens, keep, ctx.pad if ctx.pad.numel() else torch.zeros_like(keep)))
        kept += int(keep.sum())
        if kept >= n_tokens:
            break
    if not parts:
        raise HeldoutError(
            f"corpus {cfg.corpus!r} has no held-out documents; raise --holdout-fraction or use another corpus"
        )
    return HeldoutContexts(*(torch.cat([p[i] for p in parts]) for i in range(3))).first(n_tokens)


def activations(model, cfg: HarvestConfig, ctxs: HeldoutContexts, grads: bool = False) -> tuple[Tensor, Tensor | None]:
    """The activations [n_kept, d_in] at cfg's hook on the kept positions of `ctxs` (row-major, fp32, CPU), and ∂CE/∂x
    at the same positions when `grads` (for SAEs that read gradients), else None."""
    hook = cfg.hook[0]
    harvester = harvester_for(model, dataclasses.replace(cfg, hook=(hook,)), with_grads=grads)
    xs, gs = [], []
    for batch in ctxs.batches(cfg.lm_batch_size):
        acts, grad = harvester.run(batch.tokens, batch.pad)
        xs.append(acts[hook][batch.keep.to(acts[hook].device)].float().cpu())
        if grad is not None:
            gs.append(grad[hook][batch.keep.to(grad[hook].device)].float().cpu())
    return torch.cat(xs), torch.cat(gs) if gs else None


def prompt_tokens(model, cfg: HarvestConfig, text: str) -> tuple[Tensor, Tensor]:
    """(tokens [1, T], keep [1, T]) of a prompt, tokenised with the SAE's BOS setting and its position rule."""
    tokens = model.to_tokens(text, prepend_bos=cfg.prepend_bos).cpu()
    return tokens, harvester_for(model, cfg).keep_positions(tokens)


# ------------------------------------------------------------------------------------------------ the LM runner
def run_lm(
    model,
    tokens: Tensor,
    hook: str,
    edit: Edit | None = None,
    keep: Tensor | None = None,
    capture: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """One forward pass: (logits [R, T, vocab] in fp32; the hook's activations [R, T, d_in] before any edit, when
    `capture`). `edit` replaces the activations at `hook` (see `Edit`). (To capture only: `activations`.)"""
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
        logits = model(tokens).float()
    return logits, captured.get("acts")


def grad_at_hook(
    model,
    tokens: Tensor,
    hook: str,
    metric: Callable[[Tensor, Tensor], Tensor],
    edit: Edit | None = None,
    keep: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """One forward with a gradient at `hook` and one backward: (metric(logits, tokens) as a 0-dim tensor, the hook's
    activations [R, T, d_in] before any edit, ∂metric/∂(the hook's output) [R, T, d_in]), detached, on the model's
    device. `metric` gets the logits [R, T, vocab] (fp32, or fp64 for a float64 model) and the tokens [R, T].

    The mechanism is the gradient harvest's (`activations.Harvester`): the hook's output becomes a leaf, so nothing
    below it is recorded, and autograd runs from the metric down to it; the model's weights are not differentiated.
    `edit` (see `Edit`) changes the output first, at `keep` (default: every position).
    """
    device = next(model.parameters()).device
    tokens = tokens.to(device)
    keep = keep.to(device) if keep is not None else torch.ones_like(tokens, dtype=torch.bool)
    store: dict[str, Tensor] = {}

    def fn(act: Tensor, hook) -> Tensor:  # noqa: ARG001 (TransformerLens passes the hook point by this name)
        flat = act.detach().flatten(2)
        store["acts"] = flat.clone()
        out = flat if edit is None else edit(flat, keep).to(act.dtype)
        store["leaf"] = out.detach().requires_grad_(True)
        return store["leaf"].reshape(act.shape)

    with torch.enable_grad(), model.hooks(fwd_hooks=[(hook, fn)]):
        logits = model(tokens)
        if "leaf" not in store:
            raise HeldoutError(
                f"{hook} did not run in the forward pass; pick a hook of this model (sae_kit.hook_names)"
            )
        value = metric(logits if logits.dtype == torch.float64 else logits.float(), tokens)
        if not isinstance(value, Tensor) or value.numel() != 1 or not value.is_floating_point():
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise HeldoutError(
                f"the metric returned {shape}; it must return one number as a 0-dim float tensor (e.g. logits[0, -1, i] - logits[0, -1, j])"
            )
        if not value.requires_grad:
            raise HeldoutError("the metric does not depend on the logits it is given; compute it from them")
        (grad,) = torch.autograd.grad(value.reshape(()), [store["leaf"]], allow_unused=True)
    if grad is None:
        grad = torch.zeros_like(store["leaf"])
    return value.detach().reshape(()), store["acts"], grad.detach()


def vocab_size(model) -> int:
    """The LM's vocabulary (the width of its logits)."""
    return int(getattr(getattr(model, "cfg", None), "d_vocab", 0) or model.W_U.shape[-1])


def splice(x_new: Tensor) -> Edit:
    """An edit that writes the rows of `x_new` [n_kept, d_in] into the kept positions (in row-major order)."""

    def edit(acts: Tensor, keep: Tensor) -> Tensor:
        out = acts.clone()
        out[keep] = x_new.to(out.device, out.dtype)
        return out

    return edit


def fill(value: Tensor) -> Edit:
    """An edit that sets every kept position to `value` [d_in] (zero and mean ablation)."""

    def edit(acts: Tensor, keep: Tensor) -> Tensor:
        return torch.where(keep.unsqueeze(-1), value.to(acts.device, acts.dtype), acts)

    return edit


def steer_edit(direction: Tensor, alpha: float) -> Edit:
    """An edit adding alpha·direction [d_in] at the kept positions."""

    def edit(acts: Tensor, keep: Tensor) -> Tensor:
        return acts + keep.unsqueeze(-1).to(acts.dtype) * (alpha * direction).to(acts.device, acts.dtype)

    return edit


FeatureMode = Literal["clamp", "scale", "add"]
FEATURE_MODES: tuple[str, ...] = ("clamp", "scale", "add")
"""How `feature_edit` changes a feature's value f: "clamp" sets it to v, "scale" multiplies it by v, "add" adds v."""


def feature_ids(sae: SAE, features: Sequence[int] | Tensor) -> Tensor:
    """`features` as an int64 tensor [j], or a one-line HeldoutError naming the first id that is not a latent of `sae`."""
    ids = torch.as_tensor(features, dtype=torch.int64 if len(features) == 0 else None).reshape(-1)
    if ids.is_floating_point() or ids.dtype == torch.bool:
        raise HeldoutError(
            f"feature ids must be integers, got {ids.tolist()[:5]}; pass latent indices 0..{sae.cfg.d_sae - 1}"
        )
    ids = ids.long()
    bad = ids[(ids < 0) | (ids >= sae.cfg.d_sae)]
    if len(bad):
        raise HeldoutError(
            f"feature {int(bad[0])} is out of range: this SAE has d_sae={sae.cfg.d_sae} latents (ids 0..{sae.cfg.d_sae - 1})"
        )
    return ids


def position_mask(positions: Sequence[int] | Tensor | None, keep: Tensor) -> Tensor:
    """The positions [R, T] (bool) of `keep` that are also in `positions`: None (every kept one), token indices along
    T (negative ones count from the end, so -1 is the last token of each row; indices beyond T select nothing), or a
    bool mask [T] or [R, T]."""
    if positions is None:
        return keep
    R, T = keep.shape
    pos = torch.as_tensor(positions, device=keep.device)
    if pos.dtype == torch.bool:
        if pos.shape not in ((T,), (R, T)):
            raise HeldoutError(f"a position mask has shape {tuple(pos.shape)}; use [T]={T} or [R, T]=[{R}, {T}]")
        return keep & pos.expand(R, T)
    if pos.is_floating_point():
        raise HeldoutError(f"positions must be integer token indices or a bool mask, got {pos.tolist()[:5]}")
    pos = pos.reshape(-1).long()
    pos = torch.where(pos < 0, pos + T, pos)
    pos = pos[(pos >= 0) & (pos < T)]
    chosen = torch.zeros(T, dtype=torch.bool, device=keep.device)
    chosen[pos] = True
    return keep & chosen


def edited_values(f: Tensor, values: Tensor, mode: FeatureMode) -> Tensor:
    """The new values of features whose current values are f [..., j] under `mode` with `values` [j] (clamp: v,
    scale: f·v, add: f + v): the one rule `feature_edit` and the notebook API (sae_kit.splice) edit codes by."""
    if mode == "clamp":
        return values.to(f.dtype).expand_as(f)
    return f * values.to(f.dtype) if mode == "scale" else f + values.to(f.dtype)


def feature_edit(
    sae: SAE,
    features: Mapping[int, float],
    mode: FeatureMode = "clamp",
    positions: Sequence[int] | Tensor | None = None,
    use_error_term: bool = True,
) -> Edit:
    """An edit that changes the SAE's features {id: v} at the kept positions (those also in `positions`, see
    `position_mask`): "clamp" sets feature i to v (0.0 ablates it), "scale" multiplies it by v, "add" adds v.

    With `use_error_term` (the default) the output is x + Σ_i (f_i' − f_i)·d_i: the activations stay exact except
    for the edited features' decoder contributions (clamping feature i from f to v adds exactly (v − f)·d_i, and a
    feature that does not change leaves x bit-for-bit). Without it every kept position becomes the reconstruction x̂
    with the edited codes (f'·W_dec + b_dec), as in the eval's spliced pass. The SAE is run on its own device and in
    its own dtype, in its current mode (put it in eval mode), and must take raw activations (`fold_input_scale`).
    """
    if mode not in FEATURE_MODES:
        raise HeldoutError(f"mode={mode!r}; use one of: {', '.join(FEATURE_MODES)}")
    ids = feature_ids(sae, list(features.keys()))
    device, dtype = sae.W_dec.device, sae.W_dec.dtype
    ids = ids.to(device)
    values = torch.tensor([float(v) for v in features.values()], device=device, dtype=dtype)

    def edit(acts: Tensor, keep: Tensor) -> Tensor:
        chosen = position_mask(positions, keep)[keep].to(device)  # [n] which kept rows are edited
        x = acts[keep]
        atoms = sae.W_dec[ids]  # [j, d_in]
        parts = []
        for rows in row_chunks(len(x), sae.cfg.d_sae):
            codes = sae.forward_codes(x[rows].to(device))
            f = codes.to_dense()[:, ids]  # [n, j]
            new = edited_values(f, values, mode)
            delta = torch.where(chosen[rows, None], new - f, torch.zeros_like(f)) @ atoms
            parts.append(delta if use_error_term else sae.decode_codes(codes) + delta)
        out = acts.clone()
        if not parts:
            return out
        change = torch.cat(parts).to(acts.device, acts.dtype)
        out[keep] = x + change if use_error_term else change
        return out

    return edit


def atoms(W_dec: Tensor, features: Tensor) -> tuple[Tensor, Tensor]:
    """(unit rows [n, d_in], their norms [n]) of the decoder rows `features` (fp32, CPU): only those rows are
    gathered and copied, on the decoder's own device, never the whole decoder."""
    rows = W_dec.detach()[features.to(W_dec.device)].float().cpu()
    norms = rows.norm(dim=-1)
    return rows / norms[:, None], norms


def steering_units(W_dec: Tensor, features: Tensor, max_abs: Tensor) -> tuple[Tensor, Tensor]:
    """(unit directions d̂_i [n, d_in], the unit of steering strength of each feature [n]) for `features`.

    The one steering unit of sae-kit (eval's steering section, the notebook API's `steer`, the browser): a feature's
    max |activation| over held-out tokens (`max_abs` [d_sae], e.g. `Encoded.max_abs`) times ‖d_i‖, so steering
    with strength α adds α·unit·d̂_i = α·max|f_i|·d_i, and α = 1 adds the feature's strongest observed contribution."""
    directions, norms = atoms(W_dec, features)
    return directions, max_abs[features.to(max_abs.device)].float().cpu() * norms


def position_chunks(n: int, width: int, max_cells: int = MAX_CELLS) -> list[slice]:
    """Consecutive slices of n positions whose [positions × width] fp32 scratch holds at most `max_cells` entries
    (at least one position each): the unit CE and KL over a vocabulary of `width` are computed in."""
    return row_chunks(n, width, max_cells)


def next_token_ce(logits: Tensor, tokens: Tensor, pad: Tensor, max_cells: int = MAX_CELLS) -> tuple[Tensor, Tensor]:
    """(per-position next-token cross-entropy [R, T-1], mask [R, T-1] of positions with a real target).

    Computed in `position_chunks` of at most `max_cells` logits (in fp32, whatever the logits' dtype), so a 256k
    vocabulary never needs more than one chunk of scratch beside `logits` itself; the same values as one
    cross_entropy over every position."""
    R, T, V = logits.shape
    flat = logits.reshape(R * T, V)  # a view of contiguous logits
    where = (torch.arange(R, device=logits.device)[:, None] * T + torch.arange(T - 1, device=logits.device)).flatten()
    targets = tokens.to(logits.device).flatten()
    ce = torch.empty(len(where), device=logits.device)
    for rows in position_chunks(len(where), V, max_cells):
        idx = where[rows]
        ce[rows] = F.cross_entropy(flat.index_select(0, idx).float(), targets[idx + 1], reduction="none")
    return ce.view(R, T - 1), ~pad[:, 1:].to(logits.device)


def kl_from(clean_logits: Tensor, other_logits: Tensor, max_cells: int = MAX_CELLS) -> Tensor:
    """KL(p_clean ‖ p_other) per position [...] for logits [..., vocab] (either may be log-probabilities already),
    summed over the vocabulary in fp32, in `position_chunks` of at most `max_cells` logits (the same values as the
    unchunked formula; scratch of a few chunks, never of the whole [..., vocab])."""
    V = clean_logits.shape[-1]
    clean, other = clean_logits.reshape(-1, V), other_logits.reshape(-1, V)
    out = torch.empty(len(clean), device=clean.device)
    for rows in position_chunks(len(clean), V, max_cells):
        p = clean[rows].float().log_softmax(-1)
        q = other[rows].float().log_softmax(-1).neg_().add_(p)  # log p − log q
        out[rows] = p.exp_().mul_(q).sum(-1)
        del p, q  # before the next chunk's: two chunks of scratch at most
    return out.view(clean_logits.shape[:-1])


def logit_lens(model, directions: Tensor) -> Tensor:
    """Direct effect of residual directions [n, d_in] on the logits: [n, vocab] = (d ⊙ γ)·W_U (fp32, CPU).

    The final norm's linear part is applied (γ = the scale it multiplies by, `sae_kit.models.final_norm_scale`: its
    weight w, or (1 + w) for Gemma's RMSNorm; LayerNorm models also centre d), its division by the position's scale
    is not: that scale is a positive number per position, so it changes no token ranking. The unembedding bias, the
    same for every direction, is left out.
    """
    from sae_kit.models import final_norm_scale

    W_U = model.W_U
    d = directions.to(W_U.device, W_U.dtype)
    if str(getattr(model.cfg, "normalization_type", "")).startswith("LN"):
        d = d - d.mean(-1, keepdim=True)
    scale = final_norm_scale(model)
    if scale is not None:
        d = d * scale.to(W_U.device, W_U.dtype)
    return (d @ W_U).float().cpu()


def generate(model, cfg: HarvestConfig, prompt: str, n_tokens: int, edit: Edit | None = None) -> str:
    """Greedy continuation of `prompt` (without it), with `edit` at cfg's hook applied on every step to the positions
    the SAE's rule keeps, prompt and generated tokens alike (no KV cache: a full forward per token)."""
    tokens, _ = prompt_tokens(model, cfg, prompt)
    start, eos = tokens.shape[1], model.tokenizer.eos_token_id
    keep_rule = harvester_for(model, cfg)
    for _ in range(n_tokens):
        logits, _ = run_lm(model, tokens, cfg.hook[0], edit=edit, keep=keep_rule.keep_positions(tokens))
        nxt = logits[0, -1].argmax().cpu()
        tokens = torch.cat([tokens, nxt.view(1, 1)], 1)
        if int(nxt) == eos:
            break
    return model.tokenizer.decode(tokens[0, start:], skip_special_tokens=True)


def mean_activation(model, cfg: HarvestConfig, prompts: tuple[str, ...]) -> Tensor:
    """Mean activation [d_in] at cfg's hook over the positions of all `prompts` pooled that the SAE's rule keeps."""
    harvester, acts = harvester_for(model, cfg), []  # (it stops the forward after the hook's block)
    for prompt in prompts:
        tokens, keep = prompt_tokens(model, cfg, prompt)
        act = harvester.run(tokens)[0][cfg.hook[0]]
        acts.append(act[keep.to(act.device)].float().cpu())
    return torch.cat(acts).mean(0)


# ------------------------------------------------------------------------------------------------ encoding
def row_chunks(n: int, d_sae: int, max_cells: int = MAX_CELLS) -> list[slice]:
    """Consecutive slices of n rows whose [rows × d_sae] codes hold at most `max_cells` entries (at least one row each)."""
    step = max(1, max_cells // d_sae)
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


@torch.no_grad()
def encode_chunks(
    sae: SAE, x: Tensor, grad: Tensor | None = None, max_cells: int = MAX_CELLS
) -> Iterator[tuple[slice, Codes]]:
    """(rows, codes) for the `row_chunks` of x [n, d_in], encoded on the SAE's device in its current mode (callers
    put it in eval mode), with the matching rows of `grad`."""
    device = sae.W_dec.device
    for rows in row_chunks(len(x), sae.cfg.d_sae, max_cells):
        yield rows, sae.forward_codes(x[rows].to(device), None if grad is None else grad[rows].to(device))


def encode_positions(sae: SAE, model, cfg: HarvestConfig, ctxs: HeldoutContexts, offset: int = 0) -> dict[str, Tensor]:
    """The nonzero codes of the SAE on the kept positions of `ctxs` as entries {"feature", "position", "value"}
    (int64, int64, fp32, CPU), where position = offset + row·T + t is the flat position in `ctxs` shifted by
    `offset` (the index of ctxs' first row times T, for a slice of a larger set)."""
    x, grad = activations(model, cfg, ctxs, grads=sae.sparsifier.uses_grad)
    where = ctxs.keep.flatten().nonzero().squeeze(1) + offset  # flat position of each row of x
    feature, position, value = (
        [torch.zeros(0, dtype=torch.int64)],
        [torch.zeros(0, dtype=torch.int64)],
        [torch.zeros(0)],
    )
    for rows, codes in encode_chunks(sae, x, grad):
        tok, lat, val = codes.nonzeros()
        position.append(where[rows][tok.cpu()])
        feature.append(lat.cpu())
        value.append(val.float().cpu())
    return {"feature": torch.cat(feature), "position": torch.cat(position), "value": torch.cat(value)}


@dataclass
class Encoded:
    """One encoding pass over held-out rows: what eval, training's summary and the browser read from it."""

    x_hat: Tensor
    """[n, d_in] reconstruction (fp32, CPU)."""
    l0: Tensor
    """[n] active latents per row (int64)."""
    counts: Tensor
    """[d_sae] rows each latent fires on (int64)."""
    max_abs: Tensor
    """[d_sae] max |code value| of each latent (fp32; 0 for a latent that never fires)."""
    signed: bool
    """Whether any code value is negative (AbsTopK, MP-SAE with mp_signed)."""


@torch.no_grad()
def encode(sae: SAE, x: Tensor, grad: Tensor | None = None, max_cells: int = MAX_CELLS) -> Encoded:
    """Encode and decode every row of x (with grad for SAEs that read it) in bounded chunks, in eval mode."""
    sae.eval()
    d_sae, device = sae.cfg.d_sae, sae.W_dec.device
    x_hat, l0 = [], []
    counts = torch.zeros(d_sae, dtype=torch.int64, device=device)
    max_abs = torch.zeros(d_sae, device=device)
    signed = torch.zeros((), dtype=torch.bool, device=device)
    for _, codes in encode_chunks(sae, x, grad, max_cells):
        x_hat.append(sae.decode_codes(codes).float().cpu())
        l0.append(codes.l0().cpu())
        counts += codes.feature_counts()
        _, latent, value = codes.nonzeros()
        max_abs.scatter_reduce_(0, latent, value.abs().float(), "amax")
        signed |= (value < 0).any()
    empty = torch.zeros(0, sae.cfg.d_in)
    return Encoded(
        torch.cat(x_hat) if x_hat else empty,
        torch.cat(l0) if l0 else torch.zeros(0, dtype=torch.int64),
        counts.cpu(),
        max_abs.cpu(),
        bool(signed),
    )


def feature_max_abs(model, sae: SAE, cfg: HarvestConfig, n_tokens: int) -> Tensor:
    """Every feature's max |activation| [d_sae] (fp32, CPU) over the first `n_tokens` kept positions of the held-out
    split of `cfg` (with gradients for SAEs that read them): the `max_abs` that `steering_units` turns into units."""
    ctxs = heldout_contexts(model, cfg, n_tokens)
    x, grad = activations(model, cfg, ctxs, grads=sae.sparsifier.uses_grad)
    return encode(sae, x, grad).max_abs


def fvu(x: Tensor, x_hat: Tensor, chunk: int = 16384) -> float:
    """The held-out FVU: Σ_t ||x_t − x̂_t||² / Σ_t ||x_t − μ||² (μ the row mean of x), summed in float64 chunks."""
    mu = sum(part.double().sum(0) for part in x.split(chunk)) / len(x)
    err = sum(float((a.double() - b.double()).square().sum()) for a, b in zip(x.split(chunk), x_hat.split(chunk)))
    total = sum(float((part.double() - mu).square().sum()) for part in x.split(chunk))
    return err / total if total > 0 else math.nan


# ------------------------------------------------------------------------------------------------ input scale
def fold_input_scale(model, sae: SAE, cfg: HarvestConfig, x: Tensor | None = None) -> float | None:
    """For an SAE that expects normalised inputs (normalize_activations="expected_average_only_in"): estimate
    s = sqrt(d_in)/E||x|| on the first SCALE_TOKENS kept positions of its held-out split (from `x` when it holds them,
    else harvested) and fold s into the SAE in place, so it takes raw activations like every other; returns s.
    None for an SAE that already takes raw activations."""
    if sae.cfg.normalize_activations == "none":
        return None
    if x is None or len(x) < SCALE_TOKENS:
        x, _ = activations(model, cfg, heldout_contexts(model, cfg, SCALE_TOKENS))
    scale = math.sqrt(sae.cfg.d_in) / float(x[:SCALE_TOKENS].double().norm(dim=1).mean())
    sae.fold_activation_scale(scale)
    return scale
