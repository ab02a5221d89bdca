"""Harvesting: one LM pass gives activations (and optionally ∂CE/∂x) at one or more hooks, with their provenance.

Without gradients the forward stops after the last block any hook needs (`stop_at_layer`). With gradients it runs
to the logits, makes the activation at the earliest hook a leaf, and differentiates the summed next-token
cross-entropy with respect to every hooked activation; the LM weights stay frozen.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Literal

import torch

from sae_kit.data import Contexts, PackConfig, documents, load_corpus, pack
from sae_kit.models import DEFAULT_HOOK, stop_layer, validate_hooks
from sae_kit.rows import ActivationRows


@dataclass
class HarvestConfig:
    """What to harvest, from which model and corpus."""

    model: str | None = None
    """Model: None for the embedded SmolLM2-135M-Instruct, a local HF directory, or a hub id."""
    hook: tuple[str, ...] = (DEFAULT_HOOK,)
    """Hook name(s) to harvest in one pass, e.g. blocks.6.hook_resid_post."""
    corpus: str = "default"
    """Corpus: `default`/`fortunes`/`pydoc` (built in), a local .txt/.jsonl/.parquet file or dir, or a hub dataset."""
    text_field: str = "text"
    """Field holding the text in .jsonl/.parquet/hub corpora."""
    context_size: int = 128
    """Tokens per context row, BOS included."""
    prepend_bos: bool = True
    """Start every context with BOS (as TransformerBridge.to_tokens does)."""
    packing: Literal["concat", "doc"] = "concat"
    """`concat`: documents joined with a separator token; `doc`: every document starts its own context."""
    separator: Literal["bos", "eos"] = "bos"
    """The token between two documents in `concat` packing."""
    exclude_special_tokens: bool = True
    """Drop positions holding BOS/EOS/pad/other special tokens (SmolLM2's BOS residual has ~7x the norm of others)."""
    exclude_first_position: bool = True
    """Drop position 0 of every context, whatever token it holds."""
    holdout_fraction: float = 0.05
    """Fraction of documents (chosen by hashing their index) kept out of training for evaluation."""
    lm_batch_size: int = 16
    """Contexts per LM forward pass."""
    device: str | None = None
    """Torch device for the LM (None: cuda if available, else cpu)."""

    def pack_config(self) -> PackConfig:
        return PackConfig(context_size=self.context_size, prepend_bos=self.prepend_bos, packing=self.packing, separator=self.separator)

    def settings(self, model_name: str) -> dict:
        """The tokenisation and data settings as JSON, recorded in caches and SAE metadata."""
        from sae_kit.data import corpus_fingerprint

        return {
            "model_name": model_name,
            "hook_names": list(self.hook),
            "dataset_path": self.corpus,
            "dataset_fingerprint": corpus_fingerprint(self.corpus),
            "text_field": self.text_field,
            "context_size": self.context_size,
            "prepend_bos": self.prepend_bos,
            "packing": self.packing,
            "separator": self.separator,
            "exclude_special_tokens": self.exclude_special_tokens,
            "exclude_first_position": self.exclude_first_position,
            "holdout_fraction": self.holdout_fraction,
        }


@dataclass
class Harvester:
    """Runs the LM over packed contexts and returns the kept positions' activations as ActivationRows."""

    model: object
    """A TransformerBridge (see sae_kit.load_model)."""
    hooks: list[str]
    """Validated hook names."""
    exclude_special_tokens: bool = True
    """Drop special-token positions."""
    exclude_first_position: bool = True
    """Drop position 0."""
    with_grads: bool = False
    """Also return ∂CE/∂x at every hook (needs a full forward and one backward)."""
    _special: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.hooks = validate_hooks(self.model, self.hooks)
        tok = self.model.tokenizer
        ids = set(tok.all_special_ids) | {i for i in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) if i is not None}
        self._special = torch.tensor(sorted(ids), dtype=torch.int64)
        self._stop = None if self.with_grads else stop_layer(self.model, self.hooks)

    def keep_mask(self, ctx: Contexts) -> torch.Tensor:
        """[R, T] bool: positions whose activations are kept."""
        return self.keep_positions(ctx.tokens, ctx.pad if ctx.pad.numel() else None)

    def keep_positions(self, tokens: torch.Tensor, pad: torch.Tensor | None = None) -> torch.Tensor:
        """[R, T] bool: the positions of a token batch (e.g. a prompt) that this harvester's rule keeps."""
        keep = torch.ones_like(tokens, dtype=torch.bool)
        if pad is not None:
            keep &= ~pad
        if self.exclude_special_tokens:
            keep &= ~torch.isin(tokens, self._special.to(tokens.device))
        if self.exclude_first_position:
            keep[:, 0] = False
        return keep

    def run(self, tokens: torch.Tensor, pad: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
        """Activations [R, T, d] (and gradients) at every hook for a token batch, multi-dim hooks flattened to d."""
        store: dict[str, torch.Tensor] = {}

        def capture(name: str):
            # Hook points can be aliases (blocks.N.hook_resid_post is blocks.N.hook_out), so key by the requested name.
            def fn(act: torch.Tensor, hook) -> torch.Tensor:
                if self.with_grads and not act.requires_grad:
                    act = act.detach().requires_grad_(True)
                store[name] = act
                return act

            return fn

        device = next(self.model.parameters()).device
        tokens = tokens.to(device)
        fwd = [(name, capture(name)) for name in self.hooks]
        if not self.with_grads:
            with torch.inference_mode(), self.model.hooks(fwd_hooks=fwd):
                self.model(tokens, stop_at_layer=self._stop)
            return {h: store[h].flatten(2) for h in self.hooks}, None
        with torch.enable_grad(), self.model.hooks(fwd_hooks=fwd):
            logits = self.model(tokens)
            # Next-token targets; the last position and padding targets are ignored (no slice of the logits, whose
            # backward would zero-fill a [R, T, vocab] tensor).
            targets = tokens.roll(-1, dims=1)
            targets[:, -1] = -100
            if pad is not None and pad.numel():
                targets = targets.masked_fill(pad.to(device).roll(-1, dims=1), -100)
            ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1).to(torch.promote_types(logits.dtype, torch.float32)), targets.flatten(), ignore_index=-100, reduction="sum")
            grads = torch.autograd.grad(ce, [store[h] for h in self.hooks])
        acts = {h: store[h].detach().flatten(2) for h in self.hooks}
        return acts, {h: g.flatten(2) for h, g in zip(self.hooks, grads)}

    def rows(self, ctx: Contexts) -> ActivationRows:
        """Harvest one batch of contexts and keep the selected positions, with their provenance."""
        acts, grads = self.run(ctx.tokens, ctx.pad)
        keep = self.keep_mask(ctx)
        flat = keep.flatten().nonzero().squeeze(1)
        T = ctx.tokens.shape[1]
        pick = lambda t: t.flatten(0, 1).index_select(0, flat.to(t.device)).cpu()  # noqa: E731
        return ActivationRows(
            acts={h: pick(a) for h, a in acts.items()},
            grads=None if grads is None else {h: pick(g) for h, g in grads.items()},
            token=ctx.tokens.flatten()[flat],
            doc=ctx.doc.flatten()[flat],
            row=ctx.row.repeat_interleave(T)[flat],
            pos=(flat % T),
        )


def harvester_for(model, cfg: HarvestConfig, with_grads: bool = False) -> Harvester:
    """A Harvester configured from a HarvestConfig."""
    return Harvester(model, list(cfg.hook), cfg.exclude_special_tokens, cfg.exclude_first_position, with_grads)


def contexts(model, cfg: HarvestConfig, split: Literal["train", "heldout"] = "train", start_row: int = 0) -> Iterator[Contexts]:
    """Packed context batches of one corpus split, starting at context row `start_row`."""
    ds = load_corpus(cfg.corpus, text_field=cfg.text_field)
    docs = documents(ds, split, cfg.holdout_fraction)
    return pack(docs, model.tokenizer, cfg.pack_config(), rows_per_batch=cfg.lm_batch_size, start_row=start_row)


def stream(model, cfg: HarvestConfig, split: Literal["train", "heldout"] = "train", with_grads: bool = False, start_row: int = 0) -> Iterator[tuple[ActivationRows, int]]:
    """Yield (rows, contexts consumed so far) over one pass of a corpus split, for training or caching."""
    harvester = harvester_for(model, cfg, with_grads)
    for ctx in contexts(model, cfg, split, start_row):
        yield harvester.rows(ctx), int(ctx.row[-1]) + 1
