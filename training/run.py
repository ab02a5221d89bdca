"""`train`: the whole job behind `sae-kit train`, for one SAE or a sweep of them on the same batches.

The data come from the model (harvested in a background thread while the SAEs step, mixed by a ShuffleBuffer) or
from an ActivationCache. Every batch goes to every sweep member, so the LM runs once for all of them.

A run directory holds `config.json` (this run's settings), `checkpoints/step-<n>/` (the newest `keep_checkpoints`,
see training.checkpoint), `summary.json` (held-out FVU, L0 and dead % per member) and, per member, `metrics.jsonl`
and `sae/`. A one-member run keeps those two in the run directory itself; a sweep puts them in `<run>/<member>/`.
`resume=<run>` continues from the newest good checkpoint and ends bit-identical to an uninterrupted run. The
checkpoints are deleted once the run is complete (summary.json written).

Under `torchrun --nproc-per-node N -m sae_kit train` the run is data parallel (docs/distributed.md): every rank
trains every member on its own B/N rows of each global batch of B (training.sources), the trainers reduce what must
be global (training.trainer), and rank 0 alone writes the run directory; a failure on one rank stops every rank with
one line that names it (sae_kit.distributed). With `--distribute members` the ranks split the sweep instead: each
trains its own members (`assign`) on the whole of every global batch, exactly as one process would; rank 0 gathers
their metrics and checkpoint states (so a checkpoint is the same as one process's, and resumes at any world size in
either mode) and writes the run directory, and each rank writes its own members' `sae/`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
import tyro
from tqdm.auto import tqdm

from sae_kit import distributed, rundir
from sae_kit.activations import HarvestConfig
from sae_kit.atomic import write_json
from sae_kit.config_files import to_jsonable
from sae_kit.errors import SaeKitError
from sae_kit.models import default_device
from sae_kit.sae import SAE, SAEConfig
from sae_kit.sparsifiers import (
    DEFAULT_ARCHITECTURE,
    canonical_name,
    get_sparsifier,
    rule_config_of,
    rule_settings_class,
)
from sae_kit.sparsifiers.base import RuleConfigError
from sae_kit.training.checkpoint import checkpoint_dir, latest_checkpoint, save_checkpoint, set_rng_state
from sae_kit.training.metrics_log import MetricsLog
from sae_kit.training.prefetch import Prefetcher
from sae_kit.training.sources import CacheSource, ModelSource
from sae_kit.training.sweep import Member, expand, table
from sae_kit.training.trainer import NonFiniteError, TrainConfig, Trainer

log = logging.getLogger(__name__)

_SWEEP_AXES = ("architecture", "k", "expansion_factor", "d_sae", "seed")
_NOT_SETTINGS = (
    "out",
    "resume",
    "progress",
    "wandb",
    "wandb_project",
    "prefetch",
    "checkpoint_minutes",
    "dist_timeout",
    "dist_backend",
    "distribute",
)
"""Fields that may differ between a run and its resumption (they do not change what is computed)."""


RuleSettings = rule_settings_class()
"""One section per registered rule with settings (`--jumprelu.bandwidth`, `--mpsae.signed`, ...)."""


@dataclass
class TrainRunConfig:
    """Train SAEs on a model's activations, streamed from the model or read from an ActivationCache.

    Several values of --architecture, --k, --expansion-factor/--d-sae or --seed train the whole grid (a sweep) on the
    same batches. `sae-kit train --config sweep.yaml` reads these settings from a YAML/JSON file (flags override it).
    """

    out: Path | None = None
    """Run directory (None: runs/<architecture>-k<k>-<date-time>)."""
    cache: Path | None = None
    """Train from this ActivationCache (see `sae-kit cache`) instead of running the model."""
    harvest: Annotated[HarvestConfig, tyro.conf.OmitArgPrefixes] = field(default_factory=HarvestConfig)
    """Model, hook, corpus and tokenisation when streaming from the model (the first --hook is trained)."""
    architecture: tuple[str, ...] = (DEFAULT_ARCHITECTURE,)
    """Architectures (names in sae_kit.sparsifiers.REGISTRY: topk, abstopk, gsae, mpsae, mutual_choice (batchtopk),
    feature_choice, relu, jumprelu, gated, matryoshka_batchtopk, ...); several make a sweep."""
    k: tuple[int, ...] = (32,)
    """Active latents per token (batch average for mutual/feature choice, pursuit steps for mpsae); several make a sweep."""
    expansion_factor: tuple[int, ...] = (8,)
    """d_sae = expansion_factor x d_in, unless --d-sae is given; several make a sweep."""
    d_sae: tuple[int, ...] = ()
    """Numbers of latents (override --expansion-factor); several make a sweep."""
    seed: tuple[int, ...] = (0,)
    """Seeds of the SAEs' initialisation; several make a sweep."""
    data_seed: int = 0
    """Seed of the data order (shared by all members, so they see the same batches)."""
    d_in: int | None = None
    """Expected activation width; a data source of another width is an error (None: take it from the data)."""
    train: Annotated[TrainConfig, tyro.conf.OmitArgPrefixes] = field(default_factory=TrainConfig)
    """Optimiser, schedule, losses (shared by every member)."""
    rules: Annotated[RuleSettings, tyro.conf.arg(name="")] = field(default_factory=RuleSettings)  # type: ignore[valid-type]
    """Each architecture's own settings, one section per rule (flags --<rule>.<setting>; YAML rules: {<rule>: {...}})."""
    eval_tokens: int = 16384
    """Held-out tokens (from held-out documents) for the final FVU, L0 and dead % of every member."""
    buffer_tokens: int = 65536
    """Rows the shuffle buffer mixes at a time when streaming from the model."""
    prefetch: Literal["auto", "on", "off"] = "auto"
    """Produce the next batches (LM harvest or cache reads) in a background thread while the SAEs step. auto: on when
    the SAEs run on an accelerator or the CPU has a core per torch thread to spare; off on a CPU whose cores the SAE
    step already uses (there the two compete and the run gets slower, see BENCHMARKS.md)."""
    log_every: int = 10
    """Write a metrics.jsonl line every this many steps."""
    checkpoint_every: int | None = None
    """Write a resumable checkpoint every this many training tokens (0: not by tokens; None: 100,000 when the SAEs
    train on the CPU, not by tokens on an accelerator, where a checkpoint of a wide SAE is gigabytes and
    --checkpoint-minutes paces them)."""
    checkpoint_minutes: float | None = None
    """Also write a checkpoint when this many minutes have passed since the last one (0: not by time; None: 15 on an
    accelerator, not by time on the CPU). Either cadence resumes bit-identically: a checkpoint is a step's state."""
    keep_checkpoints: int = 2
    """Checkpoints kept (older ones are deleted; a damaged newest one falls back to the one before)."""
    resume: Path | None = None
    """Continue the run in this directory from its newest good checkpoint, with its saved settings."""
    dist_timeout: float = distributed.DEFAULT_TIMEOUT_S
    """Under torchrun: seconds a rank waits in a collective for the others before the job stops (a hung rank; a
    killed one is noticed at once). Above the time rank 0 takes to write a checkpoint."""
    dist_backend: Literal["auto", "nccl", "gloo"] = "auto"
    """Under torchrun: the collective backend (auto: NCCL for SAEs on CUDA, gloo on CPU; gloo on CUDA lets several
    ranks share one GPU)."""
    distribute: Literal["data", "members"] = "data"
    """Under torchrun: data (every rank trains every member on its share of each global batch, gradients reduced) or
    members (every rank reads whole batches and trains its own sweep members: no gradient traffic, each member exactly
    as one process trains it; needs at least as many members as ranks). Either mode resumes the other's checkpoints
    from a cache."""
    wandb: bool = False
    """Mirror the metrics to Weights & Biases (optional; metrics.jsonl stays the record)."""
    wandb_project: str = "sae-kit"
    """W&B project for --wandb."""
    progress: bool = True
    """Show the live progress bar."""

    def __post_init__(self) -> None:
        for name in _SWEEP_AXES:  # a single value is a one-member axis
            value = getattr(self, name)
            if isinstance(value, (str, int)):
                setattr(self, name, (value,))
            elif isinstance(value, list):
                setattr(self, name, tuple(value))

    def check(self) -> None:
        """One-line errors for settings that cannot work, before any work starts."""
        self.train.check()
        self.harvest.check()
        for name in ("eval_tokens", "log_every", "keep_checkpoints", "buffer_tokens"):
            if getattr(self, name) < 1:
                raise SaeKitError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        for name in ("checkpoint_every", "checkpoint_minutes"):
            if (getattr(self, name) or 0) < 0:
                raise SaeKitError(f"--{name.replace('_', '-')} must be 0 (off) or positive, got {getattr(self, name)}")
        for arch in self.architecture:
            if self.train.aux in ("auxk", "zipf") and not get_sparsifier(arch).uses_encoder:
                raise SaeKitError(
                    f"--aux {self.train.aux} ranks latents by encoder pre-activations, and {arch} has none; use --aux auto or none"
                )
            try:
                rule_config_of(self.rules, arch).check()
            except RuleConfigError as err:
                flag = f"--{canonical_name(arch).replace('_', '-')}.{err.field.replace('_', '-')}"
                raise SaeKitError(f"{flag}: {err}") from None

    def settings(self) -> dict[str, Any]:
        """The settings that determine what the run computes, JSON-friendly (config.json)."""
        return {k: v for k, v in to_jsonable(dataclasses.asdict(self)).items() if k not in _NOT_SETTINGS}


def use_prefetch(setting: str, device: str) -> bool:
    """Whether `prefetch=setting` runs the data source in a background thread for SAEs on `device`."""
    if setting != "auto":
        return setting == "on"
    return torch.device(device).type != "cpu" or (os.cpu_count() or 1) >= 2 * torch.get_num_threads()


def checkpoint_cadence(cfg: TrainRunConfig, device: str) -> tuple[int, float]:
    """(tokens, seconds) between checkpoints for SAEs on `device` (0: that trigger is off); see the two fields."""
    on_cpu = torch.device(device).type == "cpu"
    tokens = cfg.checkpoint_every if cfg.checkpoint_every is not None else (100_000 if on_cpu else 0)
    minutes = cfg.checkpoint_minutes if cfg.checkpoint_minutes is not None else (0.0 if on_cpu else 15.0)
    return tokens, 60.0 * minutes


def members_of(cfg: TrainRunConfig, d_in: int) -> list[Member]:
    """The run's sweep members for activations of width d_in."""
    return expand(cfg.architecture, cfg.k, cfg.d_sae or tuple(e * d_in for e in cfg.expansion_factor), cfg.seed)


def assign(team: list[Member], ranks: int) -> dict[str, int]:
    """Members mode: the rank that trains each member, balancing d_sae (the step's cost grows with it) greedily,
    widest first (ties: the grid order); the same on every rank."""
    if len(team) < ranks:
        raise SaeKitError(
            f"--distribute members gives each rank whole sweep members, and this sweep has {len(team)} for {ranks} "
            f"ranks; launch at most {len(team)} ranks, add members, or use --distribute data"
        )
    load, owner = [0] * ranks, {}
    for i in sorted(range(len(team)), key=lambda i: (-team[i].d_sae, i)):
        rank = min(range(ranks), key=lambda r: (load[r], r))
        owner[team[i].name] = rank
        load[rank] += team[i].d_sae
    return owner


def train(cfg: TrainRunConfig, model=None) -> dict:
    """Run the job; returns the summary (also written to summary.json). Bad settings fail before any work.

    Under torchrun every rank calls it; rank 0 returns the summary and the other ranks {}. An error names the rank
    it happened on, and is marked `quiet` on the ranks that should not print it (distributed.quiet), so the user
    reads one line: a setting's error once (rank 0), a rank's own failure from that rank, a lost rank from the
    lowest surviving one.
    """
    device = cfg.harvest.device or str(default_device())
    world = distributed.init(device, cfg.dist_timeout, cfg.dist_backend)
    started = False

    def begun() -> None:
        nonlocal started
        started = True

    try:
        with distributed.terminated_as_error():
            summary = _train(cfg, model, world, begun)
    except distributed.PeerLost:
        raise
    except SaeKitError as err:
        if not world.distributed:
            raise
        if not started or isinstance(err, NonFiniteError):  # the same error on every rank: rank 0 prints it
            err.quiet = not world.is_main  # type: ignore[attr-defined]
            raise
        distributed.record_failure(str(err))
        raise SaeKitError(f"rank {world.rank}: {err}") from None
    except Exception as err:
        distributed.record_failure(f"{type(err).__name__}: {err}")
        raise
    distributed.barrier()  # the others wait for rank 0's summary, then every rank leaves the group together
    distributed.shutdown()
    return summary


def _train(cfg: TrainRunConfig, model, world: distributed.World, begun) -> dict:
    if cfg.resume is not None:
        cfg = _resumed(cfg)
    cfg.check()
    split = cfg.distribute == "members" and world.distributed
    if split:
        distributed.split_members()  # the trainers, rules and sources now see whole batches on every rank
    elif cfg.train.batch_size % world.world_size:
        raise SaeKitError(
            f"--batch-size {cfg.train.batch_size} is not a multiple of the {world.world_size} ranks; "
            f"use a multiple of {world.world_size} (each rank takes an equal share of the global batch)"
        )
    if world.device is not None and world.device.startswith("cuda"):  # under NCCL, each rank on its own GPU
        cfg = dataclasses.replace(cfg, harvest=dataclasses.replace(cfg.harvest, device=world.device))
    needs_grads = any(get_sparsifier(a).uses_grad for a in cfg.architecture)
    b = cfg.train.batch_size
    source = (
        CacheSource(cfg.cache, cfg.harvest, b, cfg.data_seed, needs_grads, cfg.eval_tokens)
        if cfg.cache
        else ModelSource(cfg.harvest, b, cfg.buffer_tokens, cfg.data_seed, needs_grads, cfg.eval_tokens, model)
    )
    if cfg.d_in is not None and cfg.d_in != source.d_in:
        raise SaeKitError(
            f"--d-in {cfg.d_in} does not match the data's width {source.d_in} ({source.describe()}); drop --d-in or pick the matching hook/cache"
        )
    team = members_of(cfg, source.d_in)
    run_dir = Path(cfg.out or rundir.default_run_dir(cfg.architecture[0], cfg.k[0], sweep=len(team) > 1))
    ckpt = None
    if cfg.resume is None:
        if rundir.holds_run(run_dir):
            raise SaeKitError(
                f"{run_dir} already holds a run; continue it with --resume {run_dir}, or pass a new --out"
            )
        distributed.barrier()  # every rank has looked before rank 0 creates it
        if world.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            write_json(run_dir / rundir.CONFIG, cfg.settings())
    else:
        ckpt = latest_checkpoint(run_dir)  # every rank reads the same checkpoint (a shared file system)
        if ckpt is None and world.is_main:
            log.warning("%s has no usable checkpoint: starting it from the beginning", run_dir)
    distributed.set_resume_hint(str(run_dir))
    dirs = rundir.member_dirs(run_dir, [m.name for m in team])
    owner = assign(team, world.world_size) if split else {m.name: world.rank for m in team}
    mine = [m for m in team if owner[m.name] == world.rank]
    trainers = {m.name: _trainer(cfg, m, source) for m in mine}
    failed: dict[str, str] = {}
    position = None
    if ckpt is not None:
        for name, (tensors, meta) in ckpt.members.items():
            if name not in trainers:
                continue  # another rank's member (members mode)
            if "failed" in meta:
                failed[name] = meta["failed"]
            else:
                trainers[name].load_state(tensors, meta)
        set_rng_state(*ckpt.rng)
        position = source.resume_position(ckpt.data)
    step = ckpt.step if ckpt else 0
    metrics_log = (
        MetricsLog(
            run_dir,
            {name: d / rundir.METRICS for name, d in dirs.items()},
            step if cfg.resume else None,
            cfg.wandb_project if cfg.wandb else None,
            cfg.settings(),
        )
        if world.is_main
        else MetricsLog.disabled()  # rank 0 alone writes
    )
    begun()
    last: dict[str, dict] = {}
    try:
        step = _steps(cfg, source, trainers, failed, dirs, metrics_log, run_dir, step, position, owner, last)
        if len(team) == 1 and failed:
            raise NonFiniteError(failed[team[0].name])
        live = [p for name, t in trainers.items() if name not in failed for p in t.sae.parameters()]
        distributed.check_same(live, "SAE weights")  # data parallel: every rank holds the same SAEs
        if not world.is_main and not split:
            return {}
        heldout = source.heldout()
        rows = []
        for m in mine:
            row: dict[str, Any] = {
                "name": m.name,
                "architecture": m.architecture,
                "k": m.k,
                "d_sae": m.d_sae,
                "seed": m.seed,
                "sae_dir": str(rundir.sae_dir(dirs[m.name])),
            }
            if m.name in failed:
                rows.append(row | {"failed": failed[m.name]})
                continue
            final = trainers[m.name].export()
            grads = heldout.grads[source.hook] if final.sparsifier.uses_grad and heldout.grads is not None else None
            row["heldout"] = heldout_metrics(final, heldout.acts[source.hook], grads)
            row["training"] = _training_summary(last.get(m.name, {}))
            final.cfg.metadata["heldout"] = row["heldout"]
            final.cfg.metadata["training_l0"] = row["training"].get("l0")  # eval reports it next to the inference L0
            final.save(rundir.sae_dir(dirs[m.name]))
            rows.append(row)
        if split:  # every rank saved its own members; rank 0 collects their rows, in the grid's order
            got = {
                r["name"]: r for part in distributed.gather_bytes(json.dumps(rows).encode()) for r in json.loads(part)
            }
            if not world.is_main:
                return {}
            rows = [got[m.name] for m in team]
        summary = {"steps": step, "tokens": step * cfg.train.batch_size, "members": rows, "table": table(rows)}
        metrics_log.summary({f"{r['name']}/heldout_{k}": v for r in rows for k, v in r.get("heldout", {}).items()})
    finally:
        metrics_log.close()
    write_json(run_dir / rundir.SUMMARY, summary)
    shutil.rmtree(checkpoint_dir(run_dir), ignore_errors=True)  # the run is complete: its SAEs are saved
    return summary


def _steps(
    cfg: TrainRunConfig,
    source,
    trainers: dict[str, Trainer],
    failed: dict[str, str],
    dirs: dict[str, Path],
    metrics_log: MetricsLog,
    run_dir: Path,
    step: int,
    position,
    owner: dict[str, int],
    last: dict[str, dict],
) -> int:
    """Feed every batch to every member of this rank from `step` to the end, logging and checkpointing; returns the
    last step. `owner`: each member's rank (all this one's but in members mode); `last` gets each member's last
    logged metrics."""
    b, total = cfg.train.batch_size, cfg.train.tokens // cfg.train.batch_size
    world = distributed.job()
    split = distributed.splits_members()
    solo = len(owner) == 1
    desc = f"train {next(iter(owner)) if solo else f'{len(owner)} SAEs'}"
    # smoothing=0: the rate and ETA are the average since the start, not of the last few updates, which swing
    # between buffer fills (the LM harvest) and bursts of SAE steps; the description names the current phase.
    bar = tqdm(
        total=total * b,
        initial=step * b,
        unit="tok",
        unit_scale=True,
        desc=desc,
        disable=not cfg.progress or not world.is_main,
        dynamic_ncols=True,
        smoothing=0,
    )
    fetching = "reading cache" if isinstance(source, CacheSource) else "harvest"
    spent = {"data": 0.0, "sae_steps": 0.0}
    shown = ""
    started, first_step = time.perf_counter(), step
    every_tokens, every_seconds = checkpoint_cadence(cfg, source.device)
    last_checkpoint = started
    stop = threading.Event()
    batches = source.batches(position, stop)
    if use_prefetch(cfg.prefetch, source.device):
        batches = Prefetcher(batches, source.prefetch_depth, stop)
    try:
        stream = iter(batches)
        while step < total and (split or len(failed) < len(trainers)):  # members mode: every rank reads every batch
            t0 = time.perf_counter()
            bar.set_description_str(f"{desc} [{fetching}]")
            batch, position = next(stream)
            t1 = time.perf_counter()
            bar.set_description_str(f"{desc} [SAE steps]", refresh=False)
            x = batch.acts[source.hook]
            g = batch.grads[source.hook] if batch.grads is not None else None
            step += 1
            logging = step % cfg.log_every == 0 or step == total  # the only host read of the step's metrics
            rows: dict[str, dict] = {}
            for name, trainer in trainers.items():
                if name in failed:
                    continue
                try:
                    m = trainer.step(x, g if trainer.sae.sparsifier.uses_grad else None)
                    if step == total:
                        trainer.sync_finite()  # a NaN/inf in the last steps, before the SAE is exported
                except NonFiniteError as err:
                    failed[name] = _keep_last_good(trainer, rundir.sae_dir(dirs[name]), err)
                    continue
                if logging:
                    rows[name] = dict(m.mean_over_ranks()) | {
                        "tok_per_s": (step - first_step) * b / max(1e-9, time.perf_counter() - started)
                    }
            if logging:
                last.update(rows)
                if split:  # rank 0 writes every member's lines, in the grid's order
                    for part in distributed.gather_bytes(json.dumps(rows).encode()):
                        rows |= json.loads(part)
                    rows = {name: rows[name] for name in owner if name in rows}
                for name, row in rows.items():
                    metrics_log.write(name, row)
                if solo and rows:
                    row = next(iter(rows.values()))
                    shown = (
                        f"loss={row['loss']:.3f}, fvu={row['fvu']:.3f}, l0={row['l0']:.1f}, "
                        f"dead={100 * row['dead_frac']:.1f}%, "
                    )
            spent["data"] += t1 - t0
            spent["sae_steps"] += time.perf_counter() - t1
            share = spent["data"] / max(1e-9, sum(spent.values()))
            bar.set_postfix_str(f"{shown}{fetching} {100 * share:.0f}% of the time", refresh=False)
            bar.update(b)
            by_tokens = every_tokens and step * b // every_tokens > (step - 1) * b // every_tokens
            by_time = bool(every_seconds) and time.perf_counter() - last_checkpoint >= every_seconds
            if world.distributed:  # the ranks' clocks differ: rank 0's decides, asked on sync steps only
                by_time = step % cfg.train.sync_every == 0 and distributed.rank0_flag(by_time)
            if step < total and (by_tokens or by_time):
                states = {}
                for name, t in trainers.items():
                    if name not in failed:
                        try:
                            states[name] = t.state()
                        except NonFiniteError as err:
                            failed[name] = _keep_last_good(t, rundir.sae_dir(dirs[name]), err)
                    if name in failed:
                        states[name] = ({}, {"failed": failed[name]})
                if split:  # rank 0 collects every member's state, one member at a time (bounded memory)
                    states = {name: _state_from(owner[name], states.get(name)) for name in owner}
                at = source.checkpoint_position(position)  # every rank's, under data parallelism
                if world.is_main:
                    save_checkpoint(run_dir, step, step * b, at, states, cfg.keep_checkpoints)
                last_checkpoint = time.perf_counter()
        _calibrate({name: t for name, t in trainers.items() if name not in failed}, stream, source.hook)
    finally:
        stop.set()
        if isinstance(batches, Prefetcher):
            batches.close()
        bar.close()
    log.info("time: %.0f s waiting for data (%s), %.0f s in SAE steps", spent["data"], fetching, spent["sae_steps"])
    return step


def _state_from(rank: int, state: tuple[dict, dict] | None) -> tuple[dict, dict]:
    """Members mode: the member state that `rank` holds (None on the others), on rank 0 (a collective)."""
    from safetensors.torch import load as load_bytes
    from safetensors.torch import save as save_bytes

    blob = b""
    if state is not None:
        tensors, meta = state
        blob = (
            json.dumps(meta).encode()
            + b"\n"
            + save_bytes({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
        )
    part = distributed.gather_bytes(blob)[rank]
    if not distributed.job().is_main:
        return {}, {}
    head, _, body = part.partition(b"\n")
    return load_bytes(body) if body else {}, json.loads(head)


def _calibrate(trainers: dict[str, Trainer], stream, hook: str) -> None:
    """End of training: the batches that follow the last step (the same ones after a resume) go to every rule that
    calibrates inference state on training data (MC/FC thresholds)."""
    wanted = {name: t.rule.calibration_batches() for name, t in trainers.items()}
    batches = [next(stream)[0].acts[hook] for _ in range(max(wanted.values(), default=0))]
    for name, n in wanted.items():
        if n:
            trainers[name].calibrate(batches[:n])


def _trainer(cfg: TrainRunConfig, member: Member, source) -> Trainer:
    """A fresh trainer for `member`: the SAE initialised from the member's seed alone."""
    torch.manual_seed(member.seed)
    sae_cfg = SAEConfig(
        architecture=member.architecture,
        d_in=source.d_in,
        d_sae=member.d_sae,
        k=member.k,
        rule_config=rule_config_of(cfg.rules, member.architecture),
        device=source.device,
        metadata=source.metadata() | {"seed": member.seed, "data_seed": cfg.data_seed},
    )
    return Trainer(SAE(sae_cfg), cfg.train)


def _keep_last_good(trainer: Trainer, sae_dir: Path, err: NonFiniteError) -> str:
    """Save the member's SAE as it was before the failing step (when it is finite; rank 0 saves); the message."""
    if distributed.world().is_main and all(bool(torch.isfinite(p).all()) for p in trainer.sae.parameters()):
        trainer.export().save(sae_dir)
    where = f"the last good SAE is in {sae_dir}" if sae_dir.exists() else "no SAE was saved"
    return f"{err}; {where}"


def _training_summary(last: dict) -> dict:
    """The last logged training L0, FVU and dead fraction (and inference L0, for batch-level rules) of a member."""
    return {k: last[k] for k in ("l0", "fvu", "dead_frac", "inference_l0") if k in last}


def _resumed(cfg: TrainRunConfig) -> TrainRunConfig:
    """The saved settings of the run in cfg.resume, with this invocation's non-computing options."""
    from sae_kit.config_files import ConfigFileError, load_config

    assert cfg.resume is not None
    run_dir = Path(cfg.resume)
    if not (run_dir / "config.json").is_file():
        raise SaeKitError(
            f"--resume {run_dir}: no config.json there; pass the directory of a run started by `sae-kit train`"
        )
    if (run_dir / "summary.json").exists():
        raise SaeKitError(f"--resume {run_dir}: that run is complete (summary.json exists); start a new one with --out")
    try:
        saved = load_config(TrainRunConfig, run_dir / "config.json")
    except ConfigFileError as err:
        raise SaeKitError(f"--resume {run_dir}: {err}") from None
    # A run started before the precision settings existed ran in fp32 throughout: it continues so.
    raw = json.loads((run_dir / "config.json").read_text())
    if "compute_dtype" not in raw.get("train", {}):
        saved.train = dataclasses.replace(saved.train, compute_dtype="float32")
    if "model_dtype" not in raw.get("harvest", {}):
        saved.harvest = dataclasses.replace(saved.harvest, model_dtype="float32")
    return dataclasses.replace(
        saved, out=run_dir, resume=run_dir, **{k: getattr(cfg, k) for k in _NOT_SETTINGS if k not in ("out", "resume")}
    )


def heldout_metrics(sae: SAE, x: torch.Tensor, grad: torch.Tensor | None = None) -> dict:
    """FVU (the held-out definition eval reports too, sae_kit.heldout.fvu), MSE, mean L0 and the fraction of latents
    that never fire, over held-out rows, in eval mode."""
    from sae_kit.heldout import encode, fvu

    x = x.float().cpu()
    enc = encode(sae, x, None if grad is None else grad.float())
    err = sum(float((a.double() - b.double()).square().sum()) for a, b in zip(x.split(16384), enc.x_hat.split(16384)))
    return {
        "tokens": len(x),
        "fvu": fvu(x, enc.x_hat),
        "mse": err / len(x),
        "l0": float(enc.l0.double().mean()),
        "dead_frac": float((enc.counts == 0).double().mean()),
    }
