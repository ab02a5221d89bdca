"""Data parallelism under `torchrun`: the process group, the reductions the trainer needs, and failures that end the job.

`init(device, timeout_s)` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) and joins the
process group: NCCL when the SAEs run on CUDA (each rank on cuda:LOCAL_RANK), gloo on CPU, with a bounded collective
timeout. Without torchrun (WORLD_SIZE unset or 1) it returns the single-process `World` and every function here is a
no-op or the identity, so the trainer calls the same functions either way (one code path).

What is reduced (see docs/distributed.md):
- gradients: one flattened all-reduce per step, the mean over ranks (every rank holds B/world_size rows of the global
  batch B, so the mean of the ranks' per-token means is the global per-token mean);
- the dead-latent statistics (feature counts summed), so `tokens_since_fired`, `fired_count` and the density EMA are
  global and the same on every rank;
- scalars over the global batch (the AuxK normaliser, the logged metrics) as sums;
- the initial statistics (input scale, data variance, b_dec, a rule's own initialisation) and the end-of-training
  threshold calibration: from the global batches themselves, gathered row by row in the order of the single-process
  batch (`gather_rows`), so they come out bit-identical to one process on the same global batch.
- Mutual Choice and Feature Choice merge their batch-level selections (`gather_candidates`; sae_kit.sparsifiers).

Failures: `agree_failures` makes every rank learn that one rank hit a non-finite loss (and which); `PeerLost` turns a
collective that fails because a rank died (its sockets close) or hung (the timeout) into one line that names the rank.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

from sae_kit.errors import SaeKitError

DEFAULT_TIMEOUT_S = 600.0
"""Collective timeout: how long a rank waits for the others (rank 0 writing a multi-GB checkpoint included)."""
_STORE_PREFIX = "sae_kit/"


class PeerLost(SaeKitError):
    """A collective failed because another rank died, hung past the timeout, or failed on its own."""


class RankFailed(SaeKitError):
    """Another rank raised an error (a non-finite loss, bad data) that stops every rank."""


@dataclass(frozen=True)
class World:
    """Where this process stands in the job: its rank among `world_size` processes and the device its SAEs use."""

    rank: int = 0
    """This process's rank in [0, world_size)."""
    world_size: int = 1
    """Processes in the job (1: no process group, every collective is the identity)."""
    local_rank: int = 0
    """Rank on this machine (the CUDA device index under NCCL)."""
    device: str | None = None
    """The device the SAEs train on (cuda:LOCAL_RANK under NCCL; None: the run's own choice)."""

    @property
    def is_main(self) -> bool:
        """Rank 0: the only rank that writes files (config.json, metrics, checkpoints, summary, SAEs) or logs."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """More than one process."""
        return self.world_size > 1


_world = World()
_run_hint = ""


def world() -> World:
    """The current process's World (the single-process one until `init` joins a group)."""
    return _world


def env_world_size() -> int:
    """WORLD_SIZE from torchrun's environment (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init(device: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> World:
    """Join torchrun's process group if there is one; the World either way (idempotent).

    `device` is the run's SAE device: "cuda..." selects NCCL and cuda:LOCAL_RANK, anything else gloo on CPU.
    """
    global _world
    if _world.distributed or env_world_size() <= 1:
        return _world
    rank, size, local = int(os.environ["RANK"]), env_world_size(), int(os.environ.get("LOCAL_RANK", "0"))
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise SaeKitError(f"WORLD_SIZE={size} but {name} is not set; launch with torchrun --nproc-per-node N")
    cuda = device is not None and device.startswith("cuda")
    if cuda:
        if local >= torch.cuda.device_count():
            raise SaeKitError(
                f"rank {rank} wants cuda:{local}, and this machine has {torch.cuda.device_count()} GPUs; "
                "lower --nproc-per-node"
            )
        torch.cuda.set_device(local)
    if not 0 < timeout_s < 10**7:
        raise SaeKitError(f"--dist-timeout must be a positive number of seconds, got {timeout_s}")
    try:
        dist.init_process_group(
            "nccl" if cuda else "gloo", rank=rank, world_size=size, timeout=timedelta(seconds=timeout_s)
        )
    except (RuntimeError, ValueError) as err:
        raise SaeKitError(
            f"rank {rank} could not join the process group at "
            f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} ({_first_line(err)}); check that every rank "
            "was launched (torchrun --nproc-per-node N) and the port is free"
        ) from None
    _world = World(rank, size, local, f"cuda:{local}" if cuda else device)
    return _world


def shutdown() -> None:
    """Leave the process group (a no-op in one process)."""
    global _world
    if _world.distributed and dist.is_initialized():
        with contextlib.suppress(RuntimeError, ValueError):
            dist.destroy_process_group()
    _world = World()


def set_resume_hint(run_dir: str) -> None:
    """The run directory that the failure messages tell the user to --resume."""
    global _run_hint
    _run_hint = str(run_dir)


# --------------------------------------------------------------------------------------------------- reductions
def all_reduce_sum_(t: Tensor) -> Tensor:
    """Sum `t` over ranks in place (every rank gets the same bits); returns it."""
    if _world.distributed:
        with guard():
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_min_(t: Tensor) -> Tensor:
    """Element-wise minimum of `t` over ranks, in place; returns it."""
    if _world.distributed:
        with guard():
            dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t


def global_sum(t: Tensor) -> Tensor:
    """The sum of `t` over ranks, as a new tensor (t itself in one process)."""
    return all_reduce_sum_(t.clone()) if _world.distributed else t


def all_reduce_grads(params: Sequence[torch.nn.Parameter]) -> None:
    """Replace every gradient by its mean over ranks: one flattened all-reduce per dtype.

    A parameter without a gradient on some ranks takes zeros there; one without a gradient on every rank keeps
    None (Adam then skips it, as in one process).
    """
    if not _world.distributed:
        return
    by_dtype: dict[torch.dtype, list[torch.nn.Parameter]] = {}
    for p in params:
        by_dtype.setdefault(p.dtype, []).append(p)
    for dtype, group in by_dtype.items():
        flat = torch.cat(
            [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in group]
            + [torch.tensor([float(p.grad is not None) for p in group], dtype=dtype, device=group[0].device)]
        )
        all_reduce_sum_(flat)
        flat.div_(_world.world_size)
        offset = 0
        for p in group:
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p)
            offset += n
        for p, has in zip(group, flat[offset:].tolist()):
            if has == 0:
                p.grad = None


def gather_rows(x: Tensor) -> Tensor:
    """The global batch [world_size·b, ...] from every rank's rows x [b, ...], in the single-process order of the
    cache's rank reader (rank r holds global rows r, r + W, r + 2W, ...: the gathered rows are interleaved back)."""
    if not _world.distributed:
        return x
    parts = _all_gather(x.contiguous())
    return torch.stack(parts, 1).reshape(-1, *x.shape[1:])


def gather_candidates(values: Tensor) -> Tensor:
    """[world_size, n] of every rank's `values` [n] (the same n on every rank), in float32 or wider for transport
    (bf16 scores convert exactly)."""
    if not _world.distributed:
        return values.unsqueeze(0)
    wide = values.to(torch.promote_types(values.dtype, torch.float32)).contiguous()
    return torch.stack(_all_gather(wide))


def _all_gather(t: Tensor) -> list[Tensor]:
    parts = [torch.empty_like(t) for _ in range(_world.world_size)]
    with guard():
        dist.all_gather(parts, t)
    return parts


# ----------------------------------------------------------------------------------------------------- failures
def agree_failures(first_bad_step: Tensor) -> None:
    """Every rank learns whether any rank saw a non-finite loss: `first_bad_step` is this rank's first bad step
    (a 0-dim int64 tensor, -1 when none). Raises RankFailed on every rank when another rank went bad first (this
    rank's own failure is raised by the caller, who knows its cause). A host synchronisation: call it on log steps."""
    if not _world.distributed:
        return
    steps = gather_candidates(first_bad_step.to(torch.float64).reshape(1)).reshape(-1).tolist()
    bad = [(s, r) for r, s in enumerate(steps) if s >= 0]
    if not bad:
        return
    step, rank = min(bad)
    if rank != _world.rank:
        raise RankFailed(
            f"rank {rank} hit a non-finite loss or batch at step {int(step) + 1}, and every rank stopped"
            + (f"; see rank {rank}'s error, then resume with --resume {_run_hint}" if _run_hint else "")
        )


def record_failure(message: str) -> None:
    """Tell the other ranks (through torchrun's key-value store) why this rank is stopping, best effort."""
    if not _world.distributed:
        return
    with contextlib.suppress(Exception):
        store = _store()
        store.set(f"{_STORE_PREFIX}failed/{_world.rank}", message)


@contextlib.contextmanager
def guard() -> Iterator[None]:
    """Turn a collective's failure (a dead rank closed its sockets, a hung one hit the timeout) into PeerLost."""
    try:
        yield
    except (RuntimeError, dist.DistError) as err:
        raise PeerLost(_peer_lost_message(err)) from None


def _peer_lost_message(err: BaseException) -> str:
    lost, causes = _census()
    resume = f"; resume with --resume {_run_hint}" if _run_hint else ""
    if causes:
        rank, why = min(causes.items())
        return f"rank {rank} failed ({why}), and every rank stopped{resume}"
    if lost:
        who = ", ".join(map(str, lost))
        return f"rank {who} stopped responding (killed?){resume}"
    return f"a collective failed on rank {_world.rank} ({_first_line(err)}){resume}"


def _census(wait_s: float = 3.0) -> tuple[list[int], dict[int, str]]:
    """(ranks that did not answer, {rank: recorded failure}) after a failed collective: every surviving rank marks
    itself alive in the store and waits up to `wait_s` for the others. With the store gone (rank 0 hosts it outside
    torchrun's agent) rank 0 is the lost one; with two ranks the other one is."""
    me, size = _world.rank, _world.world_size
    others = [r for r in range(size) if r != me]
    try:
        store = _store()
        store.set(f"{_STORE_PREFIX}alive/{me}", "1")
        deadline = time.monotonic() + wait_s
        alive: set[int] = set()
        while time.monotonic() < deadline and len(alive) < len(others):
            alive |= {r for r in others if store.check([f"{_STORE_PREFIX}alive/{r}"])}
            time.sleep(0.1)
        causes = {}
        for r in others:
            if store.check([f"{_STORE_PREFIX}failed/{r}"]):
                causes[r] = store.get(f"{_STORE_PREFIX}failed/{r}").decode()
        return [r for r in others if r not in alive and r not in causes], causes
    except Exception:  # the store is gone: outside torchrun's agent, rank 0 hosted it
        return ([0] if me != 0 else others if size == 2 else []), {}


def _store():
    store = dist.distributed_c10d._get_default_store()
    store.set_timeout(timedelta(seconds=5))
    return store


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else type(err).__name__


@contextlib.contextmanager
def terminated_as_error() -> Iterator[None]:
    """Under torchrun, SIGTERM (the agent stopping the survivors after a rank died) raises PeerLost with the line."""
    if not _world.distributed:
        yield
        return

    def handler(signum, frame):
        resume = f"; resume with --resume {_run_hint}" if _run_hint else ""
        raise PeerLost(f"rank {_world.rank} was stopped by the launcher (another rank failed){resume}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
