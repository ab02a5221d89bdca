"""The notebook analysis API: splice SAEs into the LM, cache their features, intervene on them, steer with them.

Like SAELens's `HookedSAETransformer` (`add_sae`, `run_with_cache_with_saes`, `use_error_term`), but as context
managers around a plain TransformerBridge, with the same splice and position rules as `sae-kit eval`::

    import sae_kit
    model, sae = sae_kit.load_model(), sae_kit.load_sae("runs/topk/sae")
    with sae_kit.spliced(model, sae):                     # the hook's output is the SAE's reconstruction
        logits, cache = model.run_with_cache("The cat sat on the mat")
    acts = cache[sae_kit.sae_hook_name(sae, "hook_sae_acts_post")]   # [1, T, d_sae] codes
    with sae_kit.intervene(model, sae, {123: 0.0}):       # ablate feature 123 (the rest of the output exact)
        ablated = model("The cat sat on the mat")
    with sae_kit.steer(model, sae, 123, alpha=4.0):       # add 4 × its typical max contribution
        text = model.generate("My favourite food is", max_new_tokens=20, do_sample=False)

Positions. Each SAE edits only the positions it reads, by the rule recorded in its cfg.json metadata
(`sae_kit.heldout.harvest_config_for`): by default not position 0 (BOS), special tokens or padding, exactly as eval
splices. The rule is applied to the token ids that actually enter the model, whatever the call: `model(text)`,
`model(tokens)`, `model.run_with_cache(...)`, `model.generate(...)`. During generation with the KV cache (the
bridge's default) each step's forward sees only the new token; the splice takes its absolute position from the
step's attention mask, so a generated token is never mistaken for position 0 and the rule matches a full forward
over the whole sequence. `model.generate(..., use_past_kv_cache=False)` re-runs the full sequence per token, as
eval's `sae_kit.heldout.generate` does, and continues exactly as it (tested). Note: with the pinned transformers
5.x, KV-cached greedy steps of SmolLM2 already differ from full forwards without any SAE (Hugging Face's own
`generate` too), so prefer use_past_kv_cache=False when comparing texts.

Hook names. Inside `spliced`, each SAE adds five real TransformerLens HookPoints named `sae_hook_name(sae, part)`,
e.g. `blocks.6.hook_resid_post.sae.hook_sae_acts_post` (one per `SAE_HOOKS` entry): `run_with_cache` caches them,
and `model.hooks(fwd_hooks=[(name, fn)])` may read or replace them (`fn(tensor, hook) -> tensor`, as for any hook):

- `hook_sae_input`   [B, T, d_in]  the hook's output the SAE reads (the model's dtype);
- `hook_sae_acts_post` [B, T, d_sae] the dense codes (fp32, or the SAE's dtype when wider), 0 at unread positions;
  a hook that returns changed codes edits the output by exactly the changed features' decoder contributions;
- `hook_sae_recons`  [B, T, d_in]  x̂, the SAE's decode of (the possibly edited) codes; the input at unread positions;
- `hook_sae_error`   [B, T, d_in]  x − x̂ of the clean codes (0 at unread positions);
- `hook_sae_output`  [B, T, d_in]  what replaces the hook's output: x̂ without the error term; with it, x plus the
  edited features' change (f'_i − f_i)·d_i, which is x bit for bit when nothing is edited.

Everything is restored on exit, also on error: the hook points are removed, the SAE's train/eval mode comes back.
An SAE that expects normalised inputs (normalize_activations="expected_average_only_in") has its input scale folded
in first, in place, as eval and the browser do (`sae_kit.heldout.fold_input_scale`): afterwards it takes raw
activations and records the scale in metadata["activation_scale_folded"].
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from sae_kit.activations import HarvestConfig, Harvester, harvester_for
from sae_kit.heldout import (
    HeldoutError,
    check_pair,
    edited_values,
    feature_ids,
    feature_max_abs,
    fold_input_scale,
    harvest_config_for,
    position_mask,
    steering_units,
)
from sae_kit.sae import SAE

SAE_HOOKS = ("hook_sae_input", "hook_sae_acts_post", "hook_sae_recons", "hook_sae_error", "hook_sae_output")
"""The hook points each spliced SAE adds, in the order they fire (see the module docstring)."""
UNIT_TOKENS = 8192
"""Held-out positions `steer` measures a feature's max |activation| on when no `unit` is given."""


class SpliceError(HeldoutError):
    """An SAE cannot be spliced into the model as asked (unknown hook, width mismatch, two SAEs on one hook...)."""


def sae_hook_name(sae: SAE, part: str) -> str:
    """The hook name of `part` (one of SAE_HOOKS) of a spliced SAE: f"{hook}.sae.{part}", e.g.
    "blocks.6.hook_resid_post.sae.hook_sae_acts_post" for an SAE on blocks.6.hook_resid_post."""
    if part not in SAE_HOOKS:
        raise SpliceError(f"unknown SAE hook part {part!r}; use one of: {', '.join(SAE_HOOKS)}")
    return f"{_hook_of(sae)}.sae.{part}"


def _hook_of(sae: SAE) -> str:
    hook = sae.cfg.metadata.get("hook_name")
    if not hook:
        raise SpliceError(
            "the SAE records no hook (cfg.metadata['hook_name'] is empty); set it to the hook it reads, "
            "e.g. sae.cfg.metadata['hook_name'] = 'blocks.6.hook_resid_post'"
        )
    return str(hook)


# ------------------------------------------------------------------------------------------------ positions
@dataclass
class _Step:
    """What the current forward feeds the model: its token ids and where they sit in the whole sequence."""

    tokens: Tensor | None = None
    """[B, T] token ids of this forward (from the embedding's input), None before the embedding runs."""
    offset: int = 0
    """Absolute position of the first of them (> 0 for a KV-cached generation step)."""
    pad: Tensor | None = None
    """[B, T] bool padding of this forward (from its attention mask), or None."""

    def keep(self, rule: Harvester, shape: tuple[int, int], hook: str) -> Tensor:
        """[B, T] bool: the positions of this forward the SAE's rule reads."""
        if self.tokens is None:
            raise SpliceError(
                f"{hook} ran without token ids (start_at_layer or inputs_embeds), so the SAE's position rule cannot "
                "be applied; call the model on text or token ids inside `spliced`"
            )
        tokens, pad = self.tokens, self.pad
        if tuple(tokens.shape) != shape:
            raise SpliceError(
                f"{hook} has [batch, pos] {list(shape)} but the forward's tokens are {list(tokens.shape)}; "
                "splice SAEs on hooks with a position axis"
            )
        if self.offset == 0:
            return rule.keep_positions(tokens, pad)
        # a later chunk of the sequence: none of its tokens is position 0 (a dummy column takes that rule)
        tokens = torch.cat([tokens[:, :1], tokens], 1)
        pad = None if pad is None else torch.cat([pad[:, :1], pad], 1)
        return rule.keep_positions(tokens, pad)[:, 1:]


def _step_from(kwargs: dict[str, Any], n_tokens: int | None) -> tuple[int, Tensor | None]:
    """(offset, pad) of a forward from its keyword arguments (the bridge's generation loop passes the attention
    mask over past + new tokens, and the KV cache)."""
    mask = kwargs.get("attention_mask")
    if isinstance(mask, Tensor) and mask.dim() == 2 and n_tokens is not None and mask.shape[1] >= n_tokens:
        return mask.shape[1] - n_tokens, mask[:, mask.shape[1] - n_tokens :] == 0
    past = kwargs.get("past_key_values")
    if past is not None and hasattr(past, "get_seq_length"):
        return int(past.get_seq_length()), None
    return 0, None


# ------------------------------------------------------------------------------------------------ the splice
@dataclass(eq=False)
class SplicedSAE:
    """One SAE inside a `spliced` context."""

    sae: SAE
    """The SAE (in eval mode while spliced)."""
    hook: str
    """The model hook whose output it replaces."""
    data: HarvestConfig
    """Its data settings and position rule (`heldout.harvest_config_for`)."""
    use_error_term: bool
    """Whether the output keeps the SAE's error (x exactly, up to edits) or is the reconstruction."""
    points: dict[str, Any]
    """Its HookPoints by part (SAE_HOOKS)."""
    rule: Harvester
    """The position rule (keep_positions)."""
    keep: Tensor | None = None
    """[B, T] positions read in the forward now running (for code edits registered by `intervene`/`steer`)."""
    offset: int = 0
    """Absolute position of the first token of the forward now running (> 0 in a KV-cached generation step)."""

    def name(self, part: str) -> str:
        """The hook name of `part` (see `sae_hook_name`)."""
        return f"{self.hook}.sae.{part}"


@dataclass(eq=False)
class Splice:
    """What `spliced` yields: the model and its spliced SAEs (their hook names: `names`)."""

    model: Any
    """The TransformerBridge."""
    saes: list[SplicedSAE] = field(default_factory=list)
    """The spliced SAEs, in the order given."""

    @property
    def names(self) -> list[str]:
        """Every hook name the splice added (five per SAE, see SAE_HOOKS)."""
        return [s.name(part) for s in self.saes for part in SAE_HOOKS]

    def entry(self, sae: SAE) -> SplicedSAE | None:
        """The entry of `sae` (the same object), or None when it is not part of this splice."""
        return next((s for s in self.saes if s.sae is sae), None)


_ACTIVE: weakref.WeakKeyDictionary[Any, list[Splice]] = weakref.WeakKeyDictionary()
"""The splices open on each model, innermost last (intervene/steer join an open splice of their SAE)."""
_SUSPENDED: list[bool] = []
"""Non-empty while `clean_forwards` runs: every splice passes its hook's output through untouched."""


@contextmanager
def clean_forwards() -> Iterator[None]:
    """Inside it, open splices (and their edits) are switched off: forwards see the clean model (how `steer`
    measures a feature's max activation while other SAEs are spliced)."""
    _SUSPENDED.append(True)
    try:
        yield
    finally:
        _SUSPENDED.pop()


def _active_entry(model, sae: SAE) -> SplicedSAE | None:
    for splice in reversed(_ACTIVE.get(model, [])):
        found = splice.entry(sae)
        if found is not None:
            return found
    return None


def _check(model, saes: Sequence[SAE]) -> list[tuple[SAE, str, HarvestConfig]]:
    """(sae, hook, data settings) of each SAE, or the one-line error for the first that cannot be spliced."""
    if not saes:
        raise SpliceError("spliced() got no SAE; pass one or more, e.g. spliced(model, sae)")
    out, seen = [], {}
    taken = {s.hook for splice in _ACTIVE.get(model, []) for s in splice.saes}
    for sae in saes:
        if not isinstance(sae, SAE):
            raise SpliceError(
                f"spliced() takes SAE objects, got {type(sae).__name__}; load one with sae_kit.load_sae(path)"
            )
        hook = _hook_of(sae)
        if hook in seen or hook in taken:
            raise SpliceError(
                f"two SAEs on one hook ({hook}); splice one SAE per hook (open another spliced() after this one)"
            )
        seen[hook] = sae
        try:
            with clean_forwards():
                check_pair(model, sae, hook)
        except HeldoutError as err:
            raise SpliceError(str(err)) from None
        out.append((sae, hook, harvest_config_for(sae)))
    return out


@contextmanager
def spliced(model, *saes: SAE, use_error_term: bool = False) -> Iterator[Splice]:
    """Splice SAEs into `model`: inside the context, each SAE's hook output is replaced by its reconstruction at
    the positions the SAE reads, for `model(...)`, `model.run_with_cache(...)` and `model.generate(...)`.

    Args:
        model: the TransformerBridge (`sae_kit.load_model()`).
        *saes: one or more SAEs, on different hooks (each reads cfg.metadata["hook_name"]).
        use_error_term: keep the SAE's error x − x̂ in the output, so the model computes exactly what it does
            without the SAE while the SAE's features are exposed (cached, and editable by `intervene`, `steer` or
            a hook on `sae_hook_name(sae, "hook_sae_acts_post")`). False: the output is x̂ (the CE eval reports).

    Yields a `Splice` (its `names` are the added hook names; see the module docstring for what each holds).
    Raises SpliceError (one line) for an SAE whose hook the model lacks, whose d_in differs from the hook's width,
    or two SAEs on one hook. The model and the SAEs are restored on exit, also on error.
    """
    checked = _check(model, saes)
    splice = Splice(model)
    step = _Step()
    with ExitStack() as stack:
        for sae, hook, data in checked:
            was_training = sae.training
            stack.callback(sae.train, was_training)
            with clean_forwards():
                fold_input_scale(model, sae.eval(), data)
            points = {part: _hook_point(f"{hook}.sae.{part}") for part in SAE_HOOKS}
            splice.saes.append(SplicedSAE(sae, hook, data, use_error_term, points, harvester_for(model, data)))
        _register_points(model, splice, stack)
        _capture_tokens(model, step, stack)
        fwd_hooks = [(s.hook, _splice_hook(s, step)) for s in splice.saes]
        stack.enter_context(model.hooks(fwd_hooks=fwd_hooks))
        _ACTIVE.setdefault(model, []).append(splice)
        stack.callback(_ACTIVE[model].remove, splice)
        yield splice


def _hook_point(name: str):
    from transformer_lens.hook_points import HookPoint

    point = HookPoint()
    point.name = name
    return point


def _register_points(model, splice: Splice, stack: ExitStack) -> None:
    """Add the SAEs' HookPoints to the model's hook registry (what hook_dict, hooks() and run_with_cache read),
    removed on exit."""
    registry: dict[str, Any] = model._hook_registry
    added = {s.name(part): point for s in splice.saes for part, point in s.points.items()}
    clash = sorted(set(added) & set(registry))
    if clash:
        raise SpliceError(f"the model already has hook {clash[0]}; exit the other spliced() first")

    def remove() -> None:
        for name, point in added.items():
            point.remove_hooks(including_permanent=True)
            if registry.get(name) is point:
                del registry[name]

    registry.update(added)
    stack.callback(remove)


def _capture_tokens(model, step: _Step, stack: ExitStack) -> None:
    """Record each forward's token ids (a pre-hook on the embedding) and where they sit in the sequence (the
    forward's attention mask / KV cache, read by wrapping the instance's forward), both undone on exit."""

    def on_embed(_module, args, kwargs):
        ids = args[0] if args else kwargs.get("input_ids", kwargs.get("input"))
        step.tokens = ids if isinstance(ids, Tensor) and not ids.is_floating_point() else None

    handle = model.embed.register_forward_pre_hook(on_embed, with_kwargs=True)
    stack.callback(handle.remove)

    had = "forward" in model.__dict__
    previous = model.__dict__.get("forward")
    inner = model.forward

    def forward(*args, **kwargs):
        first = args[0] if args else kwargs.get("input")
        n_tokens = first.shape[-1] if isinstance(first, Tensor) and first.dim() == 2 else None
        saved = (step.tokens, step.offset, step.pad)
        step.tokens = None
        step.offset, step.pad = _step_from(kwargs, n_tokens)
        try:
            return inner(*args, **kwargs)
        finally:
            step.tokens, step.offset, step.pad = saved

    def restore() -> None:
        if had:
            model.__dict__["forward"] = previous
        else:
            model.__dict__.pop("forward", None)

    model.__dict__["forward"] = forward
    stack.callback(restore)


def _codes_dtype(sae: SAE) -> torch.dtype:
    return torch.promote_types(sae.W_dec.dtype, torch.float32)


def _splice_hook(entry: SplicedSAE, step: _Step):
    """The hook that replaces entry.hook's output (see the module docstring for the parts it fires)."""
    sae, points = entry.sae, entry.points

    def fn(act: Tensor, hook) -> Tensor:  # noqa: ARG001 (TransformerLens passes the hook point by this name)
        if _SUSPENDED:
            return act
        flat = act.flatten(2)
        B, T, d_in = flat.shape
        keep = step.keep(entry.rule, (B, T), entry.hook).to(flat.device)
        entry.keep, entry.offset = keep, step.offset
        x = points["hook_sae_input"](flat)
        device = sae.W_dec.device
        codes = sae.forward_codes(x.reshape(-1, d_in).to(device))
        kept = keep.reshape(-1, 1).to(device)
        dense = codes.to_dense()
        f = torch.where(kept, dense, torch.zeros((), dtype=dense.dtype, device=device)).to(_codes_dtype(sae))
        f = f.reshape(B, T, -1)
        f_new = points["hook_sae_acts_post"](f)
        x_hat = sae.decode_codes(codes).reshape(B, T, d_in)
        delta = _delta(sae, f, f_new)  # [B, T, d_in] in the SAE's dtype, or None when no code changed
        recons = x_hat if delta is None else x_hat + delta
        mask = keep.unsqueeze(-1)
        recons_x = torch.where(mask, recons.to(flat.device, flat.dtype), x)
        error = torch.where(
            mask, x - x_hat.to(flat.device, flat.dtype), torch.zeros((), dtype=x.dtype, device=x.device)
        )
        recons_x = points["hook_sae_recons"](recons_x)
        error = points["hook_sae_error"](error)
        if entry.use_error_term:
            out = x if delta is None else x + torch.where(mask, delta.to(flat.device, flat.dtype), 0.0)
        else:
            out = recons_x
        out = points["hook_sae_output"](out)
        entry.keep = None
        return out.to(act.dtype).reshape(act.shape)

    return fn


def _delta(sae: SAE, f: Tensor, f_new: Tensor) -> Tensor | None:
    """(f_new − f)·W_dec over the features that changed anywhere ([B, T, d_in], the SAE's dtype), None if none."""
    if f_new is f:
        return None
    if f_new.shape != f.shape:
        raise SpliceError(
            f"a hook on hook_sae_acts_post returned shape {tuple(f_new.shape)}; return codes shaped {tuple(f.shape)}"
        )
    diff = f_new.to(f.device, f.dtype) - f
    changed = (diff != 0).flatten(0, 1).any(0).nonzero().squeeze(1)
    if len(changed) == 0:
        return None
    W = sae.W_dec[changed.to(sae.W_dec.device)]
    return diff[..., changed].to(W.device, W.dtype) @ W


# ------------------------------------------------------------------------------------------------ interventions
@contextmanager
def intervene(
    model,
    sae: SAE,
    features: Mapping[int, float],
    *,
    mode: Literal["clamp", "scale", "add"] = "clamp",
    positions: Sequence[int] | Tensor | None = None,
    use_error_term: bool = True,
) -> Iterator[None]:
    """Edit chosen features of `sae` in every forward inside the context.

    `features` maps feature id -> value: mode "clamp" sets the feature to the value ({123: 0.0} ablates feature
    123, {123: 5.0} clamps it to 5), "scale" multiplies it, "add" adds to it. `positions` restricts the edit to
    token positions (indices into the sequence, negative from its end, so [-1] is the last token; or a bool mask
    [T] or [B, T]); during KV-cached generation they still index the whole sequence, so [-1] edits every newly
    generated token and [3] only the prompt's fourth. The edit applies only where the SAE reads (its position rule). With `use_error_term` (the default) the rest of
    the output stays exact, so the output changes by exactly the edited features' decoder contributions
    (ablating feature i subtracts f_i·d_i); without it the output is the reconstruction from the edited codes.

    Inside an open `spliced(model, sae, ...)` of the same SAE the edit joins that splice (and its error-term
    setting); otherwise it opens one. The edit is the rule of `sae_kit.heldout.feature_edit`, which eval-side code
    (exact ablations in attribution) uses on its own forwards.
    """
    ids = feature_ids(sae, list(features.keys()))
    if mode not in ("clamp", "scale", "add"):
        raise SpliceError(f"mode={mode!r}; use one of: clamp, scale, add")
    values = torch.tensor([float(v) for v in features.values()], dtype=torch.float64)
    with ExitStack() as stack:
        entry = _active_entry(model, sae)
        if entry is None:
            entry = stack.enter_context(spliced(model, sae, use_error_term=use_error_term)).saes[0]
        on = entry

        def edit(f: Tensor, hook) -> Tensor:  # noqa: ARG001
            keep = on.keep if on.keep is not None else torch.ones(f.shape[:2], dtype=torch.bool, device=f.device)
            where = position_mask(_local(positions, on.offset, keep.shape[1]), keep).to(f.device).unsqueeze(-1)
            idx = ids.to(f.device)
            sel = f[..., idx]
            new = edited_values(sel, values.to(f.device), mode)
            out = f.clone()
            out[..., idx] = torch.where(where, new, sel)
            return out

        handle = entry.points["hook_sae_acts_post"].add_hook(edit)
        stack.callback(_remove_handle, entry.points["hook_sae_acts_post"], handle)
        yield


def _local(positions: Sequence[int] | Tensor | None, offset: int, n: int) -> Sequence[int] | Tensor | None:
    """`positions` of the whole sequence as positions of a forward over its tokens offset..offset+n (a KV-cached
    generation step): index p ≥ 0 becomes p − offset, negative ones still count from the end, and a bool mask over
    the sequence is cut to those tokens (positions beyond it select nothing)."""
    if positions is None or offset == 0:
        return positions
    pos = torch.as_tensor(positions)
    if pos.dtype == torch.bool:
        part = pos[..., offset : offset + n]
        if part.shape[-1] < n:
            part = torch.cat([part, part.new_zeros(*part.shape[:-1], n - part.shape[-1])], -1)
        return part
    pos = pos.reshape(-1).long()
    return torch.where(pos >= 0, pos - offset, pos).masked_fill((pos >= 0) & (pos < offset), n)


def _remove_handle(point, handle) -> None:
    handle.hook.remove()
    point.fwd_hooks[:] = [h for h in point.fwd_hooks if h is not handle]


@contextmanager
def steer(
    model,
    sae: SAE,
    feature: int,
    alpha: float,
    *,
    positions: Sequence[int] | Tensor | None = None,
    unit: float | None = None,
    unit_tokens: int = UNIT_TOKENS,
) -> Iterator[None]:
    """Add alpha·unit·d̂_i (d̂_i the feature's unit decoder direction) to the SAE's hook output at the positions the
    SAE reads (or those of them in `positions`, as in `intervene`), in every forward inside the context; the rest
    of the output stays exact. Negative alpha steers along −d̂_i.

    `unit` is the strength that alpha multiplies; None: the rule eval's steering section and the browser use
    (`sae_kit.heldout.steering_units`): the feature's max |activation| over the SAE's held-out tokens (the first
    `unit_tokens` positions it reads, measured once per SAE and remembered) times ‖d_i‖, so alpha = 1 adds the
    feature's strongest observed contribution.
    """
    (i,) = feature_ids(sae, [feature]).tolist()
    norm = float(sae.W_dec[i].detach().float().norm())
    if unit is None:
        _, units = steering_units(sae.W_dec, torch.tensor([i]), max_activations(model, sae, unit_tokens))
        unit = float(units[0])
    with intervene(model, sae, {i: alpha * unit / norm}, mode="add", positions=positions, use_error_term=True):
        yield


_MAX_ABS: weakref.WeakKeyDictionary[SAE, tuple[int, Tensor]] = weakref.WeakKeyDictionary()


def max_activations(model, sae: SAE, n_tokens: int = UNIT_TOKENS) -> Tensor:
    """Every feature's max |activation| [d_sae] (fp32, CPU) over the first `n_tokens` held-out positions the SAE
    reads (its own data settings), measured once per SAE and token count (the unit of `steer`)."""
    known = _MAX_ABS.get(sae)
    if known is not None and known[0] == n_tokens:
        return known[1]
    data = harvest_config_for(sae)
    try:
        with clean_forwards():
            check_pair(model, sae, _hook_of(sae))
    except HeldoutError as err:
        raise SpliceError(str(err)) from None
    was_training = sae.training
    try:
        with clean_forwards():
            fold_input_scale(model, sae.eval(), data)
            max_abs = feature_max_abs(model, sae, data, n_tokens)
    finally:
        sae.train(was_training)
    _MAX_ABS[sae] = (n_tokens, max_abs)
    return max_abs
