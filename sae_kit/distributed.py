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

Failures: `first_failure` makes every rank learn that one rank hit a non-finite loss (and which, and when);
`PeerLost` turns a collective that fails because a rank died (its sockets close) or hung (the timeout) into one line
that names the rank; `record_failure` leaves a rank's own error in torchrun's store for the others to report; `quiet`
says which rank prints a failure, so the user reads one line.
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
_data: World | None = None
_run_hint = ""


def world() -> World:
    """The data-parallel World the trainers, the rules and the data sources reduce over: the process group's
    (`job()`), or a single-process one on every rank once `split_members` gave each rank whole members."""
    return _data or _world


def job() -> World:
    """The process group's World (the single-process one until `init` joins a group): who writes the run directory,
    whose clock paces checkpoints, and who exchanges metrics and checkpoint states in members mode."""
    return _world


def split_members() -> None:
    """Members mode (`--distribute members`): every rank reads whole global batches and trains its own sweep members,
    so the data-parallel reductions (gradients, statistics, batch-level merges) become identities; the job's own
    collectives (barrier, rank0_flag, gather_bytes) still span every rank."""
    global _data
    _data = World(device=_world.device)


def splits_members() -> bool:
    """Whether this job runs in members mode (more than one process, each training whole members)."""
    return _data is not None and _world.distributed


def env_world_size() -> int:
    """WORLD_SIZE from torchrun's environment (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init(device: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S, backend: str = "auto") -> World:
    """Join torchrun's process group if there is one; the World either way (idempotent).

    `device` is the run's SAE device: "cuda..." puts rank r on cuda:LOCAL_RANK; `backend` auto is NCCL there and
    gloo on CPU (gloo on CUDA lets several ranks share one GPU: rank r on cuda:LOCAL_RANK mod the GPU count).
    """
    global _world
    if _world.distributed or env_world_size() <= 1:
        return _world
    rank, size, local = int(os.environ["RANK"]), env_world_size(), int(os.environ.get("LOCAL_RANK", "0"))
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise SaeKitError(f"WORLD_SIZE={size} but {name} is not set; launch with torchrun --nproc-per-node N")
    if backend not in ("auto", "nccl", "gloo"):
        raise SaeKitError(f"--dist-backend {backend!r}; use auto, nccl or gloo")
    cuda = device is not None and device.startswith("cuda")
    if backend == "auto":
        backend = "nccl" if cuda else "gloo"
    if backend == "nccl" and not cuda:
        raise SaeKitError("--dist-backend nccl needs the SAEs on CUDA (--device cuda); use gloo on CPU")
    if cuda:
        count = torch.cuda.device_count()
        if count == 0 or (backend == "nccl" and local >= count):
            raise SaeKitError(
                f"rank {rank} wants cuda:{local}, and this machine has {count} GPUs; lower --nproc-per-node "
                "(or --dist-backend gloo to share a GPU between ranks)"
            )
        local_device = local % count
        torch.cuda.set_device(local_device)
    if not 0 < timeout_s < 10**7:
        raise SaeKitError(f"--dist-timeout must be a positive number of seconds, got {timeout_s}")
    try:
        dist.init_process_group(backend, rank=rank, world_size=size, timeout=timedelta(seconds=timeout_s))
    except (RuntimeError, ValueError) as err:
        raise SaeKitError(
            f"rank {rank} could not join the process group at "
            f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} ({_first_line(err)}); check that every rank "
            "was launched (torchrun --nproc-per-node N) and the port is free"
        ) from None
    _world = World(rank, size, local, f"cuda:{local_device}" if cuda else device)
    return _world


def shutdown() -> None:
    """Leave the process group (a no-op in one process)."""
    global _world, _data
    if _world.distributed and dist.is_initialized():
        with contextlib.suppress(RuntimeError, ValueError):
            dist.destroy_process_group()
    _world, _data = World(), None


def set_resume_hint(run_dir: str) -> None:
    """The run directory that the failure messages tell the user to --resume."""
    global _run_hint
    _run_hint = str(run_dir)


# --------------------------------------------------------------------------------------------------- reductions
def all_reduce_sum_(t: Tensor) -> Tensor:
    """Sum `t` over ranks in place (every rank gets the same bits); returns it."""
    if world().distributed:
        with guard():
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_min_(t: Tensor) -> Tensor:
    """Element-wise minimum of `t` over ranks, in place; returns it."""
    if world().distributed:
        with guard():
            dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t


def global_sum(t: Tensor) -> Tensor:
    """The sum of `t` over ranks, as a new tensor (t itself in one process)."""
    return all_reduce_sum_(t.clone()) if world().distributed else t


def batch_mean(t: Tensor) -> Tensor:
    """The mean over the global batch of per-row values t [b, ...] (dim 0): t.mean(0) in one process, the summed
    rows over the summed row count under data parallelism (every rank gets the same value). Not differentiable
    through the reduction: for normalisers of detached values (AuxK's)."""
    if not world().distributed:
        return t.mean(0)
    return all_reduce_sum_(t.detach().sum(0)) / (t.shape[0] * world().world_size)


def all_reduce_grads(params: Sequence[torch.nn.Parameter], ok: Tensor) -> Tensor:
    """Replace every gradient by its mean over ranks (one flattened all-reduce per dtype); returns `ok` (a 0-dim bool
    tensor: this rank's step is fine) and-ed over the ranks, carried in the same all-reduce (no host read).

    Parameters without a gradient are left out: every rank runs the same graph (the same rule, the same global dead
    latents), so the same ones have gradients everywhere. The single-process call returns `ok` and changes nothing.
    """
    if not world().distributed:
        return ok
    by_dtype: dict[torch.dtype, list[torch.nn.Parameter]] = {}
    for p in params:
        if p.grad is not None:
            by_dtype.setdefault(p.dtype, []).append(p)
    bad = (~ok).to(torch.float32).reshape(1)
    if not by_dtype:
        return all_reduce_sum_(bad)[0] == 0
    for i, group in enumerate(by_dtype.values()):
        extra = [bad.to(group[0].dtype)] if i == 0 else []
        flat = torch.cat([p.grad.reshape(-1) for p in group if p.grad is not None] + extra)
        all_reduce_sum_(flat)
        offset = 0
        for p in group:
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p).div_(world().world_size)
            offset += n
        if i == 0:
            bad = flat[offset:]
    return bad[0] == 0


def barrier() -> None:
    """Wait until every rank gets here (a no-op in one process)."""
    if _world.distributed:
        with guard():
            dist.barrier()


def rank0_flag(flag: bool) -> bool:
    """Rank 0's `flag`, on every rank (a decision that must be common, such as a checkpoint by rank 0's clock)."""
    if not _world.distributed:
        return flag
    device = _world.device if _world.device and _world.device.startswith("cuda") else "cpu"
    t = torch.tensor([float(flag)], device=device)
    with guard():
        dist.broadcast(t, src=0)
    return bool(t.item())


def gather_rows(x: Tensor) -> Tensor:
    """The global batch [world_size·b, ...] from every rank's rows x [b, ...], in the single-process order of the
    cache's rank reader (rank r holds global rows r, r + W, r + 2W, ...: the gathered rows are interleaved back)."""
    if not world().distributed:
        return x
    parts = _all_gather(x.contiguous())
    return torch.stack(parts, 1).reshape(-1, *x.shape[1:])


def gather_candidates(values: Tensor) -> Tensor:
    """[world_size, n] of every rank's `values` [n] (the same n on every rank), in float32 or wider for transport
    (bf16 scores convert exactly)."""
    if not world().distributed:
        return values.unsqueeze(0)
    wide = values.to(torch.promote_types(values.dtype, torch.float32)).contiguous()
    return torch.stack(_all_gather(wide))


def gather_bytes(data: bytes) -> list[bytes]:
    """Every rank's `data`, by rank, on every rank (e.g. each rank's data-source position for rank 0's checkpoint)."""
    if not _world.distributed:
        return [data]
    device = _world.device if _world.device and _world.device.startswith("cuda") else "cpu"
    sizes = _all_gather(torch.tensor([len(data)], dtype=torch.int64, device=device))
    longest = int(max(int(n) for n in sizes))
    buf = torch.zeros(max(1, longest), dtype=torch.uint8, device=device)
    if data:
        buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)
    return [bytes(part[: int(n)].cpu().numpy().tobytes()) for part, n in zip(_all_gather(buf), sizes)]


def _all_gather(t: Tensor) -> list[Tensor]:
    parts = [torch.empty_like(t) for _ in range(_world.world_size)]
    with guard():
        dist.all_gather(parts, t)
    return parts


# ----------------------------------------------------------------------------------------------------- failures
def first_failure(first_bad_step: Tensor) -> Tensor:
    """[step, rank] (int64, on the device) of the earliest non-finite step over every rank (ties: the lowest rank), or
    [-1, -1]; the same on every rank. `first_bad_step` is this rank's (0-dim int64, -1 for none). No host read (the
    caller reads the two values); under data parallelism one all-gather."""
    step = first_bad_step.reshape(1).to(torch.int64)
    if not world().distributed:
        return torch.cat([step, torch.zeros_like(step)])
    size = world().world_size
    steps = torch.cat(_all_gather(step))  # [W]
    none = torch.iinfo(torch.int64).max
    key = torch.where(steps >= 0, steps * size + torch.arange(size, device=steps.device), none).min()
    found = torch.stack([key // size, key % size])
    return torch.where(key < none, found, torch.full_like(found, -1))


def check_same(tensors: Sequence[Tensor], what: str) -> None:
    """Raise SaeKitError when the ranks' copies of `tensors` differ (a float64 checksum of each, gathered)."""
    if not world().distributed:
        return
    sums = torch.stack(
        [t.detach().double().sum() for t in tensors] + [t.detach().double().square().sum() for t in tensors]
    )
    gathered = gather_candidates(sums)
    if not bool((gathered == gathered[0]).all()):
        diverged = [r for r in range(world().world_size) if not bool((gathered[r] == gathered[0]).all())]
        raise SaeKitError(
            f"rank(s) {diverged} hold a different {what} from rank 0; the ranks diverged (a bug: report it)"
        )


def quiet(err: BaseException) -> bool:
    """Whether this rank should not print `err` because another rank prints the line (training.run marks them)."""
    return bool(getattr(err, "quiet", False))


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
        raise peer_lost(err) from None


def _message(err: BaseException, lost: list[int], causes: dict[int, str]) -> str:
    resume = f"; resume with --resume {_run_hint}" if _run_hint else ""
    if causes:
        rank, why = min(causes.items())
        return f"rank {rank} failed ({why}), and every rank stopped{resume}"
    if lost:
        who = ", ".join(map(str, lost))
        return f"rank {who} stopped responding (killed?){resume}"
    return f"a collective failed on rank {_world.rank} ({_first_line(err)}){resume}"


def peer_lost(err: BaseException) -> PeerLost:
    """The PeerLost for a failed collective; quiet (not printed) on every rank but the lowest surviving one, and on
    all of them when the failed rank recorded (and printed) its own cause."""
    lost, causes = _census()
    out = PeerLost(_message(err, lost, causes))
    survivors = [r for r in range(_world.world_size) if r not in lost and r not in causes]
    out.quiet = bool(causes) or _world.rank != min(survivors, default=_world.rank)  # type: ignore[attr-defined]
    return out


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
