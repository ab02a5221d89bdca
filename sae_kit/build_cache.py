"""`build_cache`: harvest a corpus through the LM into an on-disk ActivationCache, resumably."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm

from sae_kit.activations import (
    LATER_SETTINGS,
    HarvestConfig,
    Split,
    check_splits,
    harvester_for,
    open_corpus,
    stream,
)
from sae_kit.cache import MANIFEST, CacheWriter
from sae_kit.errors import SaeKitError
from sae_kit.models import LanguageModel, ModelDtype, dtype_name, load_model

log = logging.getLogger(__name__)


@dataclass
class CacheConfig:
    """Harvest activations into an on-disk ActivationCache (re-running the same command resumes it).

    `sae-kit cache --config cache.yaml` reads these settings from a YAML/JSON file (flags override it).
    """

    out: Path
    """Cache directory to create, or to resume when it holds a cache with the same settings."""
    harvest: HarvestConfig = field(default_factory=HarvestConfig)
    """Model, hooks, corpus and tokenisation."""
    tokens: int = 1_000_000
    """Training tokens (kept positions) to cache; stops early, with a warning, if the corpus runs out."""
    heldout_tokens: int | None = None
    """Held-out tokens for evaluation, from held-out documents (None: 5% of --tokens, at least 2048)."""
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """Storage dtype of the activations (and gradients)."""
    grads: bool = False
    """Also store ∂CE/∂x at each hook, row-aligned with the activations (for g-SAE training)."""
    shard_rows: int = 65536
    """Rows per shard file; a killed run loses at most one shard of work."""
    progress: bool = True
    """Show the live progress bar (tokens/s)."""

    def targets(self) -> dict[Split, int]:
        """Rows to cache per split (held-out first)."""
        held = self.heldout_tokens if self.heldout_tokens is not None else max(2048, self.tokens // 20)
        return {"heldout": held, "train": self.tokens}


def check(cfg: CacheConfig) -> None:
    """One-line errors for cache settings that cannot work, before the corpus or the model is loaded."""
    if cfg.tokens <= 0:
        raise SaeKitError(f"--tokens must be positive, got {cfg.tokens}; e.g. --tokens 1000000")
    if cfg.heldout_tokens is not None and cfg.heldout_tokens < 0:
        raise SaeKitError(f"--heldout-tokens must be 0 or more, got {cfg.heldout_tokens} (0: no held-out split)")
    if cfg.shard_rows <= 0:
        raise SaeKitError(f"--shard-rows must be positive, got {cfg.shard_rows}; e.g. 65536")
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise SaeKitError(f"--out {out} is a file; pass a new directory (or an existing cache to resume)")
    base = next((p for p in out.absolute().parents if p.exists()), None)
    if base is not None and (not base.is_dir() or not os.access(base, os.W_OK | os.X_OK)):
        why = "is a file, not a directory" if not base.is_dir() else "is not writable"
        raise SaeKitError(f"--out {out}: cannot create it, {base} {why}; pass another --out")
    cfg.harvest.check()


def _resumed_settings(cfg: CacheConfig) -> dict | None:
    """The settings of the cache `cfg.out` already holds (a run to resume), or None when there is none."""
    manifest = Path(cfg.out) / MANIFEST
    if not manifest.is_file():
        return None
    try:
        settings = json.loads(manifest.read_text()).get("settings")
    except (OSError, ValueError, AttributeError):
        return None  # CacheWriter names what is wrong with it
    return settings if isinstance(settings, dict) else None


def _model_dtype(cfg: CacheConfig) -> ModelDtype:
    """`--model-dtype`, except that `auto` resumes a cache in the dtype it was started in (float32 for caches from
    before the setting), so one cache never mixes LM precisions."""
    resumed = _resumed_settings(cfg)
    if cfg.harvest.model_dtype != "auto" or resumed is None:
        return cfg.harvest.model_dtype
    recorded = resumed.get("model_dtype", "float32")
    return recorded if recorded in ("bfloat16", "float16") else "float32"


def build_cache(cfg: CacheConfig, model: LanguageModel | None = None) -> Path:
    """Harvest `cfg.harvest` into `cfg.out`; every argument is checked before anything is written."""
    check(cfg)
    open_corpus(cfg.harvest)  # fail on a bad corpus before loading the model
    cfg = dataclasses.replace(cfg, harvest=dataclasses.replace(cfg.harvest, model_dtype=_model_dtype(cfg)))
    model = model or load_model(cfg.harvest.model, device=cfg.harvest.device, dtype=cfg.harvest.torch_dtype(cfg.grads))
    harvester = harvester_for(model, cfg.harvest, with_grads=cfg.grads)  # checks the settings against the model
    probe, _ = harvester.run(torch.full((1, 2), model.tokenizer.bos_token_id or 0))
    widths = {h: a.shape[-1] for h, a in probe.items()}
    if len(set(widths.values())) != 1:
        raise SaeKitError(
            f"hooks of different widths {widths} cannot share a cache: run `sae-kit cache` once per width"
        )
    targets = cfg.targets()
    check_splits(model, cfg.harvest, tuple(s for s, n in targets.items() if n > 0), hint=", or pass --heldout-tokens 0")
    settings = cfg.harvest.settings(model.sae_kit_name, dtype_name(model), model.tokenizer)
    resumed = _resumed_settings(cfg)
    if resumed is not None and "model_dtype" not in resumed and settings["model_dtype"] == "float32":
        del settings["model_dtype"]  # resuming a cache from before the setting (its LM ran in float32)
    for key, before in LATER_SETTINGS.items():  # resuming a cache from before these were recorded
        if resumed is not None and key not in resumed and before in (None, settings.get(key)):
            settings.pop(key, None)
    writer = CacheWriter(
        cfg.out,
        settings=settings,
        hooks=list(cfg.harvest.hook),
        d_in=next(iter(widths.values())),
        dtype=cfg.dtype,
        with_grads=cfg.grads,
        shard_rows=cfg.shard_rows,
    )
    done = {s: writer.rows_written(s) for s in targets}
    if writer.complete or all(done[s] >= targets[s] for s in targets):
        writer.close(complete=True)
        log.warning("%s is already complete (%s)", cfg.out, ", ".join(f"{s}: {n} rows" for s, n in done.items()))
        return Path(cfg.out)
    bar = tqdm(
        total=sum(targets.values()),
        initial=sum(min(done[s], targets[s]) for s in targets),
        unit="tok",
        unit_scale=True,
        desc="harvest",
        disable=not cfg.progress,
        dynamic_ncols=True,
    )
    for split, target in targets.items():
        written = done[split]
        for rows, position in stream(model, cfg.harvest, split, with_grads=cfg.grads, start_row=writer.position(split)):
            if written >= target:
                break
            rows = rows.select(slice(0, target - written))
            writer.add(split, rows, position)
            written += len(rows)
            bar.update(len(rows))
        if written < target:
            log.warning(
                "the %s split of corpus %r ran out at %d of %d tokens", split, cfg.harvest.corpus, written, target
            )
    bar.close()
    writer.close(complete=True)
    return Path(cfg.out)
