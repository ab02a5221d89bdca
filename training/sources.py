"""Where a training run's batches come from: an ActivationCache, or the model harvested as training goes.

Both give `batches(position)`: (batch, position after it) from a saved position, forever (epoch after epoch), so a
checkpoint can record the position and a resumed run continue with exactly the next batch. A position is a pair
(JSON dict, tensors dict) that the checkpoint stores as it is.

Under data parallelism (sae_kit.distributed, W ranks) every rank yields its own b = B/W rows of each global batch:
- from a cache, rank r reads rows r, r + W, ... of the same seeded global order (the cache's rank reader), so global
  batch j holds the same rows at any W and the position (epoch, batch) is global: a run resumes exactly at any W;
- from the model, each rank harvests its own LM batches (batch i of the corpus goes to rank i mod W) into its own
  shuffle buffer of buffer_tokens/W rows; each rank's position is its own, and the checkpoint holds all of them
  (`checkpoint_position`), so such a run resumes at its own W only.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import threading
from collections.abc import Iterator
from typing import Any

import torch

from sae_kit import distributed
from sae_kit.activations import (
    DATA_SETTINGS,
    HarvestConfig,
    check_splits,
    contexts,
    harvester_for,
    open_corpus,
    stream,
)
from sae_kit.buffer import BufferPosition, ShuffleBuffer
from sae_kit.errors import SaeKitError
from sae_kit.models import default_device, dtype_name
from sae_kit.rows import ActivationRows

log = logging.getLogger(__name__)

Position = tuple[dict[str, Any], dict[str, torch.Tensor]]

_PROVENANCE = ("model_name", "model_dtype", *DATA_SETTINGS, "bos_token_id", "bos_token")
"""What every trained SAE records in its metadata about its data (besides the hook); `model_dtype` is the dtype the
LM ran in (float32 for caches from before the setting)."""


class CacheSource:
    """Batches from an ActivationCache: a seeded global shuffle per epoch; the position is (epoch, batch)."""

    prefetch_depth = 4

    def __init__(
        self, cache_dir, harvest: HarvestConfig, batch_size: int, seed: int, needs_grads: bool, eval_tokens: int
    ) -> None:
        from sae_kit.cache import ActivationCache

        self.cache_dir, self.batch_size, self.seed, self.needs_grads, self.eval_tokens = (
            cache_dir,
            batch_size,
            seed,
            needs_grads,
            eval_tokens,
        )
        self.cache = ActivationCache(cache_dir)
        wanted = harvest.hook[0]
        if harvest.hook != HarvestConfig().hook:  # an explicit --hook must be in the cache
            self.cache.check_compatible(hooks=[wanted])
        self.hook = wanted if wanted in self.cache.hooks else self.cache.hooks[0]
        # harvest flags given with --cache must agree with the cache: it fixes the data the SAEs train on
        given = {
            f.name: getattr(harvest, f.name)
            for f in dataclasses.fields(HarvestConfig)
            if f.name not in ("hook", "device")
        }
        defaults = HarvestConfig()
        self.cache.check_compatible(
            **{k: v for k, v in given.items() if k in self.cache.settings and v != getattr(defaults, k)}
        )
        if needs_grads and not self.cache.with_grads:
            raise SaeKitError(f"g-SAE needs gradients, and {cache_dir} has none; build it with `sae-kit cache --grads`")
        if self.cache.n_rows("heldout") == 0:
            raise SaeKitError(f"{cache_dir} has no held-out rows; rebuild it with --heldout-tokens > 0")
        self.world = distributed.world()
        if self.cache.n_rows("train") < batch_size:
            raise SaeKitError(
                f"{cache_dir} holds {self.cache.n_rows('train')} training rows, fewer than --batch-size {batch_size}"
            )
        # the SAEs train on the accelerator when there is one (a cache needs no LM, so nothing else picks it)
        self.d_in, self.device = self.cache.d_in, harvest.device or str(default_device())

    def describe(self) -> str:
        return f"cache {self.cache_dir}"

    def metadata(self) -> dict:
        s = self.cache.settings
        meta = {k: s.get(k) for k in _PROVENANCE} | {"model_dtype": s.get("model_dtype", "float32")}
        return {**meta, "hook_name": self.hook, "cache": str(self.cache_dir)}

    def batches(
        self, position: Position | None = None, stop: threading.Event | None = None
    ) -> Iterator[tuple[ActivationRows, Position]]:
        at = position[0] if position else {"epoch": 0, "batch": 0}
        start = at["batch"]
        for epoch in itertools.count(at["epoch"]):
            if epoch == 1 and start == 0:
                log.warning("the cache holds fewer rows than --tokens: starting epoch 2 over the same rows")
            rows = self.cache.batches(
                self.batch_size // self.world.world_size,  # this rank's share of every global batch
                seed=self.seed,
                epoch=epoch,
                hooks=[self.hook],
                with_grads=self.needs_grads,
                drop_last=True,
                start_batch=start,
                rank=self.world.rank,
                world_size=self.world.world_size,
                dtype=None,  # the cache's own dtype (half the bytes for a bf16 cache); the trainer upcasts on its device
            )
            for b, batch in enumerate(rows, start):
                yield batch, ({"epoch": epoch, "batch": b + 1}, {})
                if stop is not None and stop.is_set():
                    return
            start = 0

    def checkpoint_position(self, position: Position) -> Position:
        """The position a checkpoint records: (epoch, batch) is the same on every rank and at any world size."""
        return position

    def resume_position(self, saved: Position) -> Position:
        """This rank's position from what `checkpoint_position` saved (a run resumes at any world size)."""
        return saved

    def heldout(self) -> ActivationRows:
        n = min(self.eval_tokens, self.cache.n_rows("heldout"))
        return self.cache.read("heldout", 0, n, hooks=[self.hook], with_grads=self.needs_grads)


class ModelSource:
    """Batches harvested from the model as training goes, mixed by a ShuffleBuffer; the corpus repeats if needed.

    The source position is [epoch, next context row]; resuming re-harvests the current buffer chunk from where it
    began (the LM batches are the same, so are the activations) and skips the batches already trained on.
    """

    def __init__(
        self,
        harvest: HarvestConfig,
        batch_size: int,
        buffer_tokens: int,
        seed: int,
        needs_grads: bool,
        eval_tokens: int,
        model=None,
    ) -> None:
        from sae_kit.models import load_model, validate_hooks

        if buffer_tokens < batch_size:
            raise SaeKitError(f"--buffer-tokens ({buffer_tokens}) must be at least --batch-size ({batch_size})")
        self.batch_size, self.buffer_tokens, self.seed, self.needs_grads, self.eval_tokens = (
            batch_size,
            buffer_tokens,
            seed,
            needs_grads,
            eval_tokens,
        )
        open_corpus(harvest)  # hub datasets: streamed from their --corpus-config and --corpus-split
        self.model = model or load_model(harvest.model, device=harvest.device, dtype=harvest.torch_dtype(needs_grads))
        self.hook = validate_hooks(self.model, list(harvest.hook))[0]
        self.harvest = dataclasses.replace(harvest, hook=(self.hook,))
        check_splits(self.model, self.harvest)  # an empty split fails now, not after the whole run
        probe, _ = harvester_for(self.model, self.harvest).run(
            torch.full((1, 2), self.model.tokenizer.bos_token_id or 0)
        )
        self.d_in = probe[self.hook].shape[-1]
        self.device = str(next(self.model.parameters()).device)
        self.prefetch_depth = -(-buffer_tokens // batch_size) + 1  # one whole chunk ahead
        self.world = distributed.world()

    def describe(self) -> str:
        return f"hook {self.hook} of {self.model.sae_kit_name}"

    def metadata(self) -> dict:
        s = self.harvest.settings(self.model.sae_kit_name, dtype_name(self.model), self.model.tokenizer)
        return {**{k: s[k] for k in _PROVENANCE}, "hook_name": self.hook}

    def _rows(self, at: list[int] | None, stop: threading.Event | None) -> Iterator[tuple[ActivationRows, list[int]]]:
        """This rank's training rows from [epoch, row] on (LM batch i of the corpus is rank i mod W's), with the
        position after each LM batch; stops early once `stop` is set."""
        epoch, row = at or (0, 0)
        rank, size, lm_batch = self.world.rank, self.world.world_size, self.harvest.lm_batch_size
        harvester = harvester_for(self.model, self.harvest, self.needs_grads)
        while True:
            empty, start = True, row
            for ctx in contexts(self.model, self.harvest, "train", start):
                row = int(ctx.row[-1]) + 1
                if int(ctx.row[0]) // lm_batch % size != rank:
                    continue  # another rank's LM batch
                empty = False
                yield harvester.rows(ctx), [epoch, row]
                if stop is not None and stop.is_set():
                    return
            if empty and start == 0:
                ranks = f" for rank {rank} of {size} (fewer LM batches than ranks)" if size > 1 else ""
                raise SaeKitError(
                    f"corpus {self.harvest.corpus!r} gave no training tokens{ranks}; check --corpus and --holdout-fraction"
                )
            epoch, row = epoch + 1, 0
            if epoch == 1:
                log.warning("the corpus ran out before --tokens: starting over (epoch 2)")

    def batches(
        self, position: Position | None = None, stop: threading.Event | None = None
    ) -> Iterator[tuple[ActivationRows, Position]]:
        size = self.world.world_size
        # An LM in bf16/fp16 gives activations that the harvester upcasts to fp32: storing them back in the LM's dtype
        # is exact and halves the buffer. Gradients are computed in fp32 and stay so.
        lm = dtype_name(self.model)
        store = None if self.needs_grads or lm not in ("bfloat16", "float16") else getattr(torch, lm)
        buffer = ShuffleBuffer(
            lambda at: self._rows(at, stop),
            capacity=max(self.buffer_tokens // size, self.batch_size // size),
            batch_size=self.batch_size // size,
            seed=self.seed,
            drop_last=True,
            dtype=store,
        )
        start = BufferPosition.from_state(*position) if position else None
        for batch, pos in buffer.batches(start):
            yield batch, pos.state()

    def checkpoint_position(self, position: Position) -> Position:
        """The position a checkpoint records: every rank's own (gathered; a collective, so every rank calls it)."""
        if not self.world.distributed:
            return position
        from safetensors.torch import load as load_bytes
        from safetensors.torch import save as save_bytes

        blob = (
            json.dumps(position[0]).encode() + b"\n" + save_bytes({k: v.contiguous() for k, v in position[1].items()})
        )
        metas: list[dict] = []
        tensors: dict[str, torch.Tensor] = {}
        for r, part in enumerate(distributed.gather_bytes(blob)):
            head, _, body = part.partition(b"\n")
            metas.append(json.loads(head))
            tensors |= {f"rank{r}/{k}": v for k, v in load_bytes(body).items()}
        return {"world_size": self.world.world_size, "ranks": metas}, tensors

    def resume_position(self, saved: Position) -> Position:
        """This rank's position from what `checkpoint_position` saved, refused at another world size."""
        meta, tensors = saved
        saved_size = meta.get("world_size", 1) if "ranks" in meta else 1
        if saved_size != self.world.world_size:
            raise SaeKitError(
                f"this run harvested from the model with {saved_size} process(es), each with its own shard of the "
                f"corpus; resume it with {saved_size} (torchrun --nproc-per-node {saved_size}), or train from a cache "
                "(`sae-kit cache`), whose runs resume at any world size"
            )
        if not self.world.distributed:
            return saved
        prefix = f"rank{self.world.rank}/"
        mine = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
        return meta["ranks"][self.world.rank], mine

    def heldout(self) -> ActivationRows:
        parts, n = [], 0
        for rows, _ in stream(self.model, self.harvest, "heldout", with_grads=self.needs_grads):
            parts.append(rows)
            n += len(rows)
            if n >= self.eval_tokens:
                break
        if not parts:
            raise SaeKitError(f"corpus {self.harvest.corpus!r} has no held-out documents; raise --holdout-fraction")
        return ActivationRows.cat(parts).select(slice(0, self.eval_tokens))
