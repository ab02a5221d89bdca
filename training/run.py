"""`train`: the whole job behind `sae-kit train`, from a model (streamed through the shuffle buffer) or a cache.

A run directory holds `config.json` (this run's settings), `metrics.jsonl` (one line per logged step),
`sae/` (the SAE, re-saved atomically every `save_every` steps and at the end) and `summary.json` (held-out metrics).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from tqdm.auto import tqdm

from sae_kit.activations import HarvestConfig, stream
from sae_kit.buffer import ShuffleBuffer
from sae_kit.errors import SaeKitError
from sae_kit.rows import ActivationRows
from sae_kit.sae import SAE, SAEConfig
from sae_kit.sparsifiers import get_sparsifier
from sae_kit.training.trainer import NonFiniteError, TrainConfig, Trainer

log = logging.getLogger(__name__)


@dataclass
class TrainRunConfig:
    """Train one SAE on a model's activations, streamed from the model or read from an ActivationCache."""

    out: Path | None = None
    """Run directory (None: runs/<architecture>-k<k>-<date-time>)."""
    cache: Path | None = None
    """Train from this ActivationCache (see `sae-kit cache`) instead of running the model."""
    harvest: HarvestConfig = field(default_factory=HarvestConfig)
    """Model, hook, corpus and tokenisation when streaming from the model (the first --hook is trained)."""
    architecture: str = "topk"
    """topk, abstopk, gsae, mpsae, mutual_choice (batchtopk), feature_choice, relu or jumprelu."""
    k: int = 32
    """Active latents per token (batch average for mutual/feature choice, pursuit steps for mpsae)."""
    expansion_factor: int = 8
    """d_sae = expansion_factor x d_in, unless --d-sae is given."""
    d_sae: int | None = None
    """Number of latents (overrides --expansion-factor)."""
    d_in: int | None = None
    """Expected activation width; a data source of another width is an error (None: take it from the data)."""
    gsae_beta: float = 1.0
    """g-SAE: weight of the gradient term in the selection score (0 gives plain TopK)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimiser, schedule, losses."""
    eval_tokens: int = 16384
    """Held-out tokens (from held-out documents) for the final FVU, L0 and dead %."""
    buffer_tokens: int = 65536
    """Capacity of the shuffle buffer when streaming from the model."""
    log_every: int = 10
    """Write a metrics.jsonl line every this many steps."""
    save_every: int = 100
    """Re-save the SAE every this many steps, so a crash keeps the last good one."""
    progress: bool = True
    """Show the live progress bar."""


def train(cfg: TrainRunConfig, model=None) -> dict:
    """Run the job; returns the summary (also written to summary.json). Bad settings fail before any work."""
    cfg.train.check()
    if cfg.k < 1 or (cfg.d_sae is not None and cfg.k > cfg.d_sae):
        raise SaeKitError(f"--k {cfg.k} must be between 1 and d_sae ({cfg.d_sae}); lower --k or raise --d-sae")
    needs_grads = get_sparsifier(cfg.architecture).uses_grad
    if cfg.eval_tokens < 1 or cfg.log_every < 1 or cfg.save_every < 1:
        raise SaeKitError("--eval-tokens, --log-every and --save-every must be positive")
    source = _CacheSource(cfg, needs_grads) if cfg.cache else _ModelSource(cfg, needs_grads, model)
    d_in = source.d_in
    if cfg.d_in is not None and cfg.d_in != d_in:
        raise SaeKitError(f"--d-in {cfg.d_in} does not match the data's width {d_in} ({source.describe()}); drop --d-in or pick the matching hook/cache")
    torch.manual_seed(cfg.train.seed)
    sae_cfg = SAEConfig(architecture=cfg.architecture, d_in=d_in, d_sae=cfg.d_sae or cfg.expansion_factor * d_in, k=cfg.k,
                        gsae_beta=cfg.gsae_beta, device=source.device, metadata=source.metadata())
    sae = SAE(sae_cfg)
    trainer = Trainer(sae, cfg.train)
    run_dir = Path(cfg.out or f"runs/{cfg.architecture}-k{cfg.k}-{time.strftime('%Y%m%d-%H%M%S')}")
    if (run_dir / "sae").exists():
        raise SaeKitError(f"{run_dir} already holds a trained SAE; pass a new --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    from sae_kit.atomic import write_json

    write_json(run_dir / "config.json", _jsonable(dataclasses.asdict(cfg)) | {"sae": sae_cfg.to_dict()})
    bar = tqdm(total=trainer.total_steps * cfg.train.batch_size, unit="tok", unit_scale=True, desc=f"train {cfg.architecture}",
               disable=not cfg.progress, dynamic_ncols=True)
    saved = False
    with open(run_dir / "metrics.jsonl", "a") as metrics_file:
        for batch in itertools.islice(source.batches(), trainer.total_steps):
            x = batch.acts[source.hook]
            g = batch.grads[source.hook] if needs_grads else None
            try:
                m = trainer.step(x, g)
            except NonFiniteError as err:
                if all(bool(torch.isfinite(p).all()) for p in sae.parameters()):
                    trainer.export().save(run_dir / "sae")
                    saved = True
                where = f"the last good SAE is in {run_dir / 'sae'}" if saved or (run_dir / "sae").exists() else "no SAE was saved yet"
                raise NonFiniteError(f"{err}; {where}") from None
            bar.update(x.shape[0])
            if trainer.step_count % cfg.log_every == 0 or trainer.step_count == trainer.total_steps:
                m["tok_per_s"] = bar.format_dict["rate"] or 0.0
                metrics_file.write(json.dumps(m) + "\n")
                metrics_file.flush()
                bar.set_postfix(loss=f"{m['loss']:.3f}", fvu=f"{m['fvu']:.3f}", l0=f"{m['l0']:.1f}", dead=f"{100 * m['dead_frac']:.1f}%")
            if trainer.step_count % cfg.save_every == 0:
                trainer.export().save(run_dir / "sae")
                saved = True
    bar.close()
    if trainer.step_count == 0:
        raise SaeKitError(f"the data source gave no batch of {cfg.train.batch_size} tokens; lower --batch-size or add data")
    final = trainer.export()
    heldout = source.heldout()
    summary = {"sae_dir": str(run_dir / "sae"), "steps": trainer.step_count, "tokens": trainer.tokens_seen,
               "heldout": heldout_metrics(final, heldout.acts[source.hook], heldout.grads[source.hook] if needs_grads else None),
               "training": {"l0": m["l0"], "fvu": m["fvu"], "dead_frac": m["dead_frac"], **({"inference_l0": m["inference_l0"]} if "inference_l0" in m else {})}}
    final.cfg.metadata["heldout"] = summary["heldout"]
    final.save(run_dir / "sae")
    write_json(run_dir / "summary.json", summary)
    return summary


@torch.no_grad()
def heldout_metrics(sae: SAE, x: torch.Tensor, grad: torch.Tensor | None = None, batch: int = 4096) -> dict:
    """FVU, MSE, mean L0 and the fraction of latents that never fire, over held-out rows, in eval mode."""
    sae.eval()
    err = 0.0
    l0 = 0.0
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool, device=sae.W_dec.device)
    x = x.to(sae.W_dec.device, torch.float32)
    for i in range(0, len(x), batch):
        xb = x[i : i + batch]
        gb = None if grad is None else grad[i : i + batch].to(xb.device, torch.float32)
        out = sae(xb, grad=gb)
        err += float((out.x_hat - xb).square().sum())
        l0 += float(out.codes.l0().sum())
        fired |= out.codes.feature_counts() > 0
    total = float((x - x.mean(0)).square().sum())
    return {"tokens": len(x), "fvu": err / total, "mse": err / len(x), "l0": l0 / len(x), "dead_frac": float((~fired).float().mean())}


class _CacheSource:
    """Batches from an ActivationCache: seeded global shuffles, epoch after epoch."""

    def __init__(self, cfg: TrainRunConfig, needs_grads: bool) -> None:
        from sae_kit.cache import ActivationCache

        self.cfg, self.needs_grads = cfg, needs_grads
        self.cache = ActivationCache(cfg.cache)
        wanted = cfg.harvest.hook[0]
        if cfg.harvest.hook != HarvestConfig().hook:  # an explicit --hook must be in the cache
            self.cache.check_compatible(hooks=[wanted])
        self.hook = wanted if wanted in self.cache.hooks else self.cache.hooks[0]
        if needs_grads and not self.cache.with_grads:
            raise SaeKitError(f"g-SAE needs gradients, and {cfg.cache} has none; build it with `sae-kit cache --grads`")
        if self.cache.n_rows("heldout") == 0:
            raise SaeKitError(f"{cfg.cache} has no held-out rows; rebuild it with --heldout-tokens > 0")
        self.d_in, self.device = self.cache.d_in, cfg.harvest.device or "cpu"

    def describe(self) -> str:
        return f"cache {self.cfg.cache}"

    def metadata(self) -> dict:
        s = self.cache.settings
        return {**{k: s.get(k) for k in ("model_name", "context_size", "prepend_bos", "dataset_path", "exclude_special_tokens")}, "hook_name": self.hook,
                "exclude_first_position": s.get("exclude_first_position"), "cache": str(self.cfg.cache)}

    def batches(self) -> Iterator[ActivationRows]:
        for epoch in itertools.count():
            if epoch == 1:
                log.warning("the cache holds fewer rows than --tokens: starting epoch 2 over the same rows")
            yield from self.cache.batches(self.cfg.train.batch_size, seed=self.cfg.train.seed, epoch=epoch, hooks=[self.hook], with_grads=self.needs_grads, drop_last=True)

    def heldout(self) -> ActivationRows:
        n = min(self.cfg.eval_tokens, self.cache.n_rows("heldout"))
        return self.cache.read("heldout", 0, n, hooks=[self.hook], with_grads=self.needs_grads)


class _ModelSource:
    """Batches harvested from the model as training goes, mixed by a shuffle buffer; the corpus repeats if needed."""

    def __init__(self, cfg: TrainRunConfig, needs_grads: bool, model=None) -> None:
        from sae_kit.data import load_corpus
        from sae_kit.models import load_model, validate_hooks

        self.cfg, self.needs_grads = cfg, needs_grads
        if cfg.buffer_tokens < cfg.train.batch_size:
            raise SaeKitError(f"--buffer-tokens ({cfg.buffer_tokens}) must be at least --batch-size ({cfg.train.batch_size})")
        load_corpus(cfg.harvest.corpus, text_field=cfg.harvest.text_field)
        self.model = model or load_model(cfg.harvest.model, device=cfg.harvest.device)
        self.hook = validate_hooks(self.model, list(cfg.harvest.hook))[0]
        self.harvest = dataclasses.replace(cfg.harvest, hook=(self.hook,))
        from sae_kit.activations import harvester_for

        probe, _ = harvester_for(self.model, self.harvest).run(torch.full((1, 2), self.model.tokenizer.bos_token_id or 0))
        self.d_in = probe[self.hook].shape[-1]
        self.device = str(next(self.model.parameters()).device)

    def describe(self) -> str:
        return f"hook {self.hook} of {self.model.sae_kit_name}"

    def metadata(self) -> dict:
        s = self.harvest.settings(self.model.sae_kit_name)
        return {**{k: s[k] for k in ("model_name", "context_size", "prepend_bos", "dataset_path", "exclude_special_tokens", "exclude_first_position")}, "hook_name": self.hook}

    def _rows(self) -> Iterator[ActivationRows]:
        for epoch in itertools.count():
            if epoch == 1:
                log.warning("the corpus ran out before --tokens: starting over (epoch 2)")
            for rows, _ in stream(self.model, self.harvest, "train", with_grads=self.needs_grads):
                yield rows

    def batches(self) -> Iterator[ActivationRows]:
        capacity = max(self.cfg.buffer_tokens, self.cfg.train.batch_size)
        yield from ShuffleBuffer(self._rows(), capacity=capacity, batch_size=self.cfg.train.batch_size, seed=self.cfg.train.seed, drop_last=True)

    def heldout(self) -> ActivationRows:
        parts, n = [], 0
        for rows, _ in stream(self.model, self.harvest, "heldout", with_grads=self.needs_grads):
            parts.append(rows)
            n += len(rows)
            if n >= self.cfg.eval_tokens:
                break
        if not parts:
            raise SaeKitError(f"corpus {self.cfg.harvest.corpus!r} has no held-out documents; raise --holdout-fraction")
        return ActivationRows.cat(parts).select(slice(0, self.cfg.eval_tokens))


def _jsonable(obj):
    """dataclasses.asdict output with Paths and tuples made JSON-friendly."""
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return str(obj) if isinstance(obj, Path) else obj
