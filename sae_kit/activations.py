"""Harvesting: one LM pass gives activations (and optionally ∂CE/∂x) at one or more hooks, with their provenance.

Without gradients the forward stops after the last block any hook needs (`stop_at_layer`). With gradients the
activation at the earliest hook becomes a leaf (so nothing below it is recorded for backward, and the LM weights stay
frozen), the forward runs on to the input of the unembedding, and the summed next-token cross-entropy and its gradient
with respect to that final hidden state are computed a chunk of positions at a time (`ce_and_grad`: never the whole
[R, T, vocab] logits or their gradient); one backward from there gives ∂CE/∂x at every hook. Models whose unembedding
is not a plain affine map of `unembed.hook_in` (checked once per Harvester) take the straightforward path through the
full logits. Activations and gradients are handed out as float32 whatever the LM's dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch

from sae_kit.data import Contexts, HarvestError, PackConfig, bos_id, documents, is_hub_name, load_corpus, pack
from sae_kit.models import (
    DEFAULT_HOOK,
    LanguageModel,
    ModelDtype,
    check_device,
    context_limit,
    resolve_dtype,
    stop_layer,
    validate_hooks,
)
from sae_kit.rows import ActivationRows

Split = Literal["train", "heldout"]


DATA_SETTINGS = (
    "context_size",
    "prepend_bos",
    "dataset_path",
    "text_field",
    "corpus_config",
    "corpus_split",
    "packing",
    "separator",
    "exclude_special_tokens",
    "exclude_first_position",
    "holdout_fraction",
)
"""The data settings (keys of `HarvestConfig.settings`) every trained SAE records in its metadata: its tokenisation,
held-out split and position rules, from which eval, the index and the browser re-create its held-out data."""
LATER_SETTINGS: dict[str, str | None] = {
    "corpus_config": None,
    "corpus_split": "train",
    "bos_token_id": None,
    "bos_token": None,
}
"""Keys of `HarvestConfig.settings` added after caches were first written, with the value they had implicitly before
(None: any, they only describe the tokenizer): a cache from before them resumes when the value is that one."""


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
    corpus_config: str | None = None
    """Configuration (subset) of a hub dataset, e.g. `sample-10BT` for HuggingFaceFW/fineweb; hub datasets are streamed,
    so only the documents the harvest reads are downloaded. Only for hub corpora."""
    corpus_split: str = "train"
    """Split of a hub dataset to read (its documents are then divided into training and held-out ones by
    --holdout-fraction). Only for hub corpora."""
    context_size: int = 128
    """Tokens per context row, BOS included."""
    prepend_bos: bool = True
    """Start every context with BOS (as TransformerBridge.to_tokens does). A tokenizer without a BOS token (Qwen) gets
    its EOS token instead, the stand-in TransformerBridge uses too; metadata records the token as `bos_token`."""
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
    model_dtype: ModelDtype = "auto"
    """The LM's dtype when a harvest loads it. `auto`: bfloat16 for activation-only harvests where the device has fast
    bf16 (`sae_kit.models.fast_bf16`: CUDA GPUs with bf16, CPUs with AVX-512 BF16/AMX; ~3x faster, activations within
    1% of fp32), float32 otherwise and for gradient (g-SAE) harvests, whose bf16 ∂CE/∂x strays on a few positions
    (BENCHMARKS.md). `float16` for GPUs without bf16 (models trained in bf16, e.g. Gemma, can overflow in it).
    Activations and gradients are handed out as float32 either way; the dtype used is recorded as `model_dtype` in
    caches and SAE metadata."""

    def check(self, model: LanguageModel | None = None) -> None:
        """One-line HarvestErrors for settings that cannot work, before anything runs or is written.

        Without a model only the settings themselves are checked; with one, also what the model can serve
        (the context size against its maximum context, the hook names).
        """
        if self.context_size < 2:
            raise HarvestError(
                f"--context-size must be at least 2 (BOS and one token), got {self.context_size}; "
                f"use a value in [2, {_limit_text(model)}], e.g. 128"
            )
        if not (math.isfinite(self.holdout_fraction) and 0 <= self.holdout_fraction < 1):
            raise HarvestError(
                f"--holdout-fraction must be in [0, 1), got {self.holdout_fraction}; e.g. 0.05 keeps 5% of the "
                "documents out of training for evaluation"
            )
        if self.lm_batch_size < 1:
            raise HarvestError(
                f"--lm-batch-size must be at least 1, got {self.lm_batch_size}; e.g. 16 contexts per LM forward pass"
            )
        if len(set(self.hook)) != len(self.hook):
            raise HarvestError(f"--hook names a hook twice ({' '.join(self.hook)}); pass each hook once")
        if (self.corpus_config is not None or self.corpus_split != "train") and not is_hub_name(self.corpus):
            raise HarvestError(
                f"--corpus-config/--corpus-split choose a subset and split of a hub dataset, but corpus {self.corpus!r} "
                "is a local or built-in one: drop them, or pass a hub dataset id as --corpus"
            )
        if self.device is not None:
            check_device(self.device)
        resolve_dtype(self.model_dtype, self.device)
        if model is not None:
            limit = context_limit(model)
            if limit is not None and self.context_size > limit:
                raise HarvestError(
                    f"--context-size {self.context_size} is longer than {getattr(model, 'sae_kit_name', 'the model')}'s "
                    f"maximum context of {limit} tokens; use a value in [2, {limit}], e.g. 128"
                )
            validate_hooks(model, list(self.hook))

    def pack_config(self) -> PackConfig:
        return PackConfig(
            context_size=self.context_size, prepend_bos=self.prepend_bos, packing=self.packing, separator=self.separator
        )

    def torch_dtype(self, with_grads: bool = False) -> torch.dtype:
        """The dtype a harvest (with gradients or not) loads the LM in: `model_dtype` resolved for `device`."""
        if with_grads and self.model_dtype == "auto":
            return torch.float32
        return resolve_dtype(self.model_dtype, self.device)

    def settings(self, model_name: str, model_dtype: str | None = None, tokenizer=None) -> dict:
        """The tokenisation and data settings as JSON, recorded in caches and SAE metadata.

        `model_dtype` is the dtype the LM actually ran in (`sae_kit.models.dtype_name(model)`); None records
        `model_dtype` resolved for `device` (for an activation-only harvest). With the model's `tokenizer`, also the
        token put first in every context (`bos_token_id`, `bos_token`: for a BOS-less tokenizer, its EOS stand-in).
        """
        from sae_kit.data import corpus_fingerprint

        out = {
            "model_name": model_name,
            "model_dtype": model_dtype or str(self.torch_dtype()).removeprefix("torch."),
            "hook_names": list(self.hook),
            "dataset_path": self.corpus,
            "dataset_fingerprint": corpus_fingerprint(self.corpus, self.corpus_config, self.corpus_split),
            "corpus_config": self.corpus_config,
            "corpus_split": self.corpus_split,
            "text_field": self.text_field,
            "context_size": self.context_size,
            "prepend_bos": self.prepend_bos,
            "packing": self.packing,
            "separator": self.separator,
            "exclude_special_tokens": self.exclude_special_tokens,
            "exclude_first_position": self.exclude_first_position,
            "holdout_fraction": self.holdout_fraction,
        }
        if tokenizer is not None:
            out |= bos_settings(tokenizer)
        return out


def bos_settings(tokenizer) -> dict:
    """What sae-kit puts first in every context for this tokenizer, as metadata: `bos_token_id`, `bos_token` (the
    tokenizer's BOS; for a tokenizer without one, e.g. Qwen's, its EOS token, as TransformerBridge does)."""
    bos = bos_id(tokenizer)
    return {"bos_token_id": bos, "bos_token": None if bos is None else tokenizer.convert_ids_to_tokens(bos)}


def open_corpus(cfg: HarvestConfig):
    """The corpus of a harvest config as a `datasets` dataset (hub datasets streamed from their config and split);
    one-line CorpusErrors for a missing file, a gated or unreachable hub dataset, an unknown config or split."""
    return load_corpus(cfg.corpus, text_field=cfg.text_field, config=cfg.corpus_config, split=cfg.corpus_split)


def _limit_text(model: LanguageModel | None) -> str:
    limit = None if model is None else context_limit(model)
    return "the model's maximum context" if limit is None else str(limit)


@dataclass
class Harvester:
    """Runs the LM over packed contexts and returns the kept positions' activations as ActivationRows."""

    model: LanguageModel
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
        ids = set(tok.all_special_ids) | {
            i for i in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) if i is not None
        }
        self._special = torch.tensor(sorted(ids), dtype=torch.int64)
        self._stop = None if self.with_grads else stop_layer(self.model, self.hooks)
        self._chunked = self.with_grads and self._chunked_ok()

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

    def run(
        self, tokens: torch.Tensor, pad: torch.Tensor | None = None
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
        """Activations [R, T, d] (and gradients) at every hook for a token batch, multi-dim hooks flattened to d.

        Both come back as float32 on the model's device, whatever the LM's dtype.
        """
        device = next(self.model.parameters()).device
        tokens = tokens.to(device)
        if not self.with_grads:
            store: dict[str, torch.Tensor] = {}
            with torch.inference_mode(), self.model.hooks(fwd_hooks=self._capture(store)):
                self.model(tokens, stop_at_layer=self._stop)
            return {h: store[h].flatten(2).float() for h in self.hooks}, None
        targets = tokens.roll(-1, dims=1)  # next-token targets; the last position and padding targets are ignored
        targets[:, -1] = -100
        if pad is not None and pad.numel():
            targets = targets.masked_fill(pad.to(device).roll(-1, dims=1), -100)
        if self._chunked:
            acts, grads = self._grads_chunked(tokens, targets)
        else:
            acts, grads = self._grads_full(tokens, targets)
        return (
            {h: acts[h].detach().flatten(2).float() for h in self.hooks},
            {h: g.flatten(2).float() for h, g in zip(self.hooks, grads)},
        )

    def _capture(self, store: dict[str, torch.Tensor]) -> list[tuple[str, Callable]]:
        """Forward hooks that put each requested hook's activation in `store`; with gradients the first one to fire
        (the earliest hook) becomes a leaf, so nothing below it is recorded for backward."""

        def capture(name: str) -> Callable:
            # Hook points can be aliases (blocks.N.hook_resid_post is blocks.N.hook_out), so key by the requested name.
            def fn(act: torch.Tensor, hook) -> torch.Tensor:  # noqa: ARG001
                if self.with_grads and not act.requires_grad:
                    act = act.detach().requires_grad_(True)
                store[name] = act
                return act

            return fn

        return [(name, capture(name)) for name in self.hooks]

    def _grads_full(
        self, tokens: torch.Tensor, targets: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], tuple[torch.Tensor, ...]]:
        """The straightforward path: the full [R, T, vocab] logits, cross-entropy, autograd down to the hooks."""
        store: dict[str, torch.Tensor] = {}
        with torch.enable_grad(), self.model.hooks(fwd_hooks=self._capture(store)):
            logits = self.model(tokens)
            # No slice of the logits (its backward would zero-fill a [R, T, vocab] tensor): ignored targets instead.
            ce = torch.nn.functional.cross_entropy(
                logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="sum"
            )
            grads = torch.autograd.grad(ce, [store[h] for h in self.hooks])
        return store, grads

    def _grads_chunked(
        self, tokens: torch.Tensor, targets: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], tuple[torch.Tensor, ...]]:
        """Forward to the unembedding's input, CE and its gradient there chunk by chunk, one backward to the hooks."""
        store: dict[str, torch.Tensor] = {}

        def stop(h: torch.Tensor, hook) -> torch.Tensor:  # noqa: ARG001
            store[_FINAL] = h
            raise _StopForward

        with torch.enable_grad(), self.model.hooks(fwd_hooks=[*self._capture(store), (_FINAL, stop)]):
            try:
                self.model(tokens)
            except _StopForward:
                pass
            h = store[_FINAL]
            _, grad_h = ce_and_grad(h.detach(), targets, *_unembedding(self.model), soft_cap=logit_soft_cap(self.model))
            grads = torch.autograd.grad(h, [store[name] for name in self.hooks], grad_h.to(h.dtype))
        return store, grads

    def _chunked_ok(self) -> bool:
        """Whether the chunked CE reproduces this model's logits: `unembed.hook_in` exists, no requested hook sits at
        or after it, and the logits of a 3-token probe equal h @ W_U + b_U (soft-capped for Gemma 2: `logit_soft_cap`)
        (else the straightforward path is used)."""
        if _FINAL not in self.model.hook_dict or any(h.startswith(("unembed.", "hook_unembed")) for h in self.hooks):
            return False
        tokens = torch.full((1, 3), self.model.tokenizer.bos_token_id or 0, device=next(self.model.parameters()).device)
        seen: dict[str, torch.Tensor] = {}

        def grab(h: torch.Tensor, hook) -> torch.Tensor:  # noqa: ARG001
            seen["h"] = h
            return h

        try:
            with torch.inference_mode(), self.model.hooks(fwd_hooks=[(_FINAL, grab)]):
                logits = self.model(tokens)
            W, b = _unembedding(self.model)
        except Exception:  # noqa: BLE001  (any model this cannot be checked on takes the plain path)
            return False
        if "h" not in seen or not isinstance(logits, torch.Tensor) or logits.shape[-1] != W.shape[1]:
            return False
        mine = seen["h"].float() @ W.float() + (0 if b is None else b.float())
        cap = logit_soft_cap(self.model)
        if cap is not None:
            mine = cap * torch.tanh(mine / cap)
        tol = 1e-4 if logits.dtype in (torch.float32, torch.float64) else 3e-2
        return bool(torch.allclose(mine, logits.float(), rtol=tol, atol=tol * float(logits.float().abs().max())))

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


_FINAL = "unembed.hook_in"
"""The hook on the unembedding's input (the final, normalised residual stream) where the gradient harvest stops."""
CE_CHUNK_CELLS = 1 << 24
"""Logit entries [positions × vocab] one chunk of the chunked cross-entropy holds (64 MB in float32)."""


class _StopForward(Exception):
    """Raised by the hook on the unembedding's input to end a gradient-harvest forward there."""


def _unembedding(model: LanguageModel) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The unembedding as (W_U [d_model, vocab], b_U [vocab] or None), in the model's dtype."""
    W = model.W_U
    b = getattr(model, "b_U", None)
    return W, (b if isinstance(b, torch.Tensor) and bool(b.any()) else None)


def logit_soft_cap(model: LanguageModel) -> float | None:
    """The final-logit soft cap c of models that squash their logits as c·tanh(logits / c) (Gemma 2: 30), else None."""
    cap = getattr(getattr(model, "cfg", None), "output_logits_soft_cap", None)
    return float(cap) if isinstance(cap, (int, float)) and cap > 0 else None


def ce_and_grad(
    h: torch.Tensor,
    targets: torch.Tensor,
    W: torch.Tensor,
    b: torch.Tensor | None = None,
    max_cells: int = CE_CHUNK_CELLS,
    soft_cap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The summed next-token cross-entropy of logits h @ W + b and its gradient with respect to h, in float32.

    h: [..., d] final hidden states; targets: [...] token ids, -100 for ignored positions; W: [d, vocab]. Works through
    chunks of positions so no more than `max_cells` logits exist at a time; the matmuls run in W's dtype (bf16 GEMMs
    for a bf16 model), the softmax in float32. Exact: ∂CE/∂h = (softmax(logits) - onehot(target)) @ W^T. With
    `soft_cap` c the logits are c·tanh(z / c) of z = h @ W + b (Gemma 2), and the gradient carries (1 - tanh²).
    """
    flat, tgt = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    grad = torch.zeros(flat.shape, dtype=torch.float32, device=h.device)
    ce = torch.zeros((), dtype=torch.float32, device=h.device)
    rows = (tgt != -100).nonzero().squeeze(1)
    step = max(1, max_cells // W.shape[1])
    for i in range(0, len(rows), step):
        idx = rows[i : i + step]
        logits = (flat.index_select(0, idx).to(W.dtype) @ W).float()
        if b is not None:
            logits += b.float()
        squash = None
        if soft_cap is not None:
            squash = torch.tanh(logits / soft_cap)
            logits = squash * soft_cap
        lse = logits.logsumexp(-1, keepdim=True)
        t = tgt.index_select(0, idx)
        ce += (lse.squeeze(1) - logits.gather(1, t[:, None]).squeeze(1)).sum()
        p = logits.sub_(lse).exp_()
        p[torch.arange(len(idx), device=h.device), t] -= 1
        if squash is not None:
            p.mul_(1 - squash.square_())
        grad.index_copy_(0, idx, (p.to(W.dtype) @ W.T).float())
    return ce, grad.view(h.shape)


def harvester_for(model: LanguageModel, cfg: HarvestConfig, with_grads: bool = False) -> Harvester:
    """A Harvester configured from a HarvestConfig (checked against the model first: one-line errors)."""
    cfg.check(model)
    return Harvester(model, list(cfg.hook), cfg.exclude_special_tokens, cfg.exclude_first_position, with_grads)


def contexts(
    model: LanguageModel, cfg: HarvestConfig, split: Split = "train", start_row: int = 0
) -> Iterator[Contexts]:
    """Packed context batches of one corpus split, starting at context row `start_row`."""
    docs = documents(open_corpus(cfg), split, cfg.holdout_fraction)
    return pack(docs, model.tokenizer, cfg.pack_config(), rows_per_batch=cfg.lm_batch_size, start_row=start_row)


def check_splits(
    model: LanguageModel, cfg: HarvestConfig, splits: tuple[Split, ...] = ("train", "heldout"), hint: str = ""
) -> None:
    """Raise a one-line HarvestError when a split of the corpus gives no context at all with these settings.

    A corpus whose split holds fewer tokens than one context (or, for the held-out split, no document at all) would
    otherwise give an empty cache or an empty training stream. Costs one LM batch of tokenisation per split.
    `hint` ends the held-out split's message (e.g. how to do without held-out data).
    """
    cfg.check(model)
    for split in splits:
        if next(contexts(model, cfg, split), None) is not None:
            continue
        where = f"the {'held-out' if split == 'heldout' else split} split of corpus {cfg.corpus!r}"
        if split == "heldout" and cfg.holdout_fraction == 0:
            raise HarvestError(f"{where} is empty because --holdout-fraction is 0; raise it, e.g. 0.05{hint}")
        fixes = [f"raise --holdout-fraction (now {cfg.holdout_fraction})"] if split == "heldout" else []
        fixes += ["use a larger corpus", "lower --context-size"] + (
            [] if cfg.packing == "doc" else ["pass --packing doc"]
        )
        raise HarvestError(
            f"{where} gives no context of {cfg.context_size} tokens (too few or too short documents); "
            f"{', '.join(fixes[:-1])} or {fixes[-1]}{hint if split == 'heldout' else ''}"
        )


def stream(
    model: LanguageModel, cfg: HarvestConfig, split: Split = "train", with_grads: bool = False, start_row: int = 0
) -> Iterator[tuple[ActivationRows, int]]:
    """Yield (rows, contexts consumed so far) over one pass of a corpus split, for training or caching."""
    harvester = harvester_for(model, cfg, with_grads)
    for ctx in contexts(model, cfg, split, start_row):
        yield harvester.rows(ctx), int(ctx.row[-1]) + 1
