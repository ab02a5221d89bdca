"""TopK SAE training step: sae-kit against SAELens and EleutherAI sparsify, and the dense floors, in one run.

    python benchmarks/train_step.py                 # full run: ~15 min on 2 free cores (+ one-off setup, below)
    python benchmarks/train_step.py --quick         # 3 timed steps, 20 quality steps (~3 min)
    python benchmarks/train_step.py --smoke         # CI: tiny sizes (d_sae 1024, batch 512), 2 timed and 3 quality steps,
                                                    # 1 thread, no peers, data in a temporary directory (under a minute)
    python benchmarks/train_step.py --skip-peers    # ours and the floors only
    more: --threads 2  --steps 20  --quality-steps 200  --tokens N  --seed 0  --json out.json  --profile
          --lr-scale S (quality run at S x every library's default lr)
          --contend (time alone, then next to a rival job: each contender's slowdown)

The setting is fixed: TopK, d_in 576 (SmolLM2-135M-Instruct, blocks.6.hook_resid_post), d_sae 9216, k 32,
batch 4096 tokens, fp32, 2 threads.

1. Setup, once (reused by later runs). Each peer gets its own venv under `$SAE_KIT_CACHE/bench-venvs/` (default
   ~/.cache/sae-kit): torch==2.13.0 first, then the pinned peer release under a constraints file that pins torch,
   so pip never pulls another torch (SAELens also needs transformer-lens < 4, which our environment cannot share).
   A venv is rebuilt when its pinned version changes. A peer that fails to install is reported and skipped.
2. Data, once: `sae-kit cache` harvests real activations (the embedded model and corpus, offline) under
   `bench-data/`, exported to a plain safetensors file (`train` rows in a seeded random order, `heldout` rows from
   held-out documents) that every library reads in the same order.
3. Timing. The contenders take turns of a few steps each (rotating, each turn led by an untimed step), `--steps`
   timed steps in all after a warm-up, and each figure is the median of its timed steps, so that load from other
   processes hits every library alike. Contenders: the floors (the dense encoder GEMM and torch.topk over the
   [4096, 9216] pre-activations), our `Trainer.step` in this process (also with the AuxK pass forced on), and each
   peer's step in a server process of its own venv (`benchmarks/peers/*_step.py`: the peer's own TopK SAE and
   optimiser step as its trainer runs them; their docstrings say exactly what a step includes).
4. Quality at equal budget: each library trains `--quality-steps` steps of 4096 rows, the same rows in the same
   order, with its own defaults (learning rate, losses, initialisation), then reports the FVU on the held-out rows.

Absolute times on a shared machine move by 20% or more from run to run; compare the ratios of one run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import venv
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import sae_kit
from sae_kit import SAE, SAEConfig
from sae_kit.cache import ActivationCache
from sae_kit.paths import cache_root
from sae_kit.training import TrainConfig, Trainer

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "peers"))
from common import batch_at, heldout_eval  # noqa: E402  (shared with the peer scripts, torch + safetensors only)

D_SAE, K, BATCH = 9216, 32, 4096
HOOK = "blocks.6.hook_resid_post"
TORCH_PIN = "torch==2.13.0"
PER_TURN = 4
"""Timed steps per turn. Each turn starts with an untimed step: this VM hands memory that a process left idle
for a few seconds back to the host, and the first touch after that costs ~4x, which a library that allocates
~1 GB per step (SAELens) would pay on every step if the turns were single steps."""
TARGET_VS_SAELENS = 5.0
"""Our steps/s must be at least this multiple of SAELens's."""
TARGET_VS_SPARSIFY = 1.8
"""... and of sparsify's (its fastest variant)."""
TARGET_VS_GEMM = 1.6
"""Our step may take at most this multiple of the dense encoder GEMM alone, in bf16 (the fastest it runs here)."""
TARGET_AUX = 1.2
"""Our step with the AuxK pass may take at most this multiple of the step without it."""


# ----------------------------------------------------------------------------------------------------- peer venvs
@dataclass(frozen=True)
class Peer:
    name: str
    """Short name: the venv's directory under bench-venvs/."""
    package: str
    """The PyPI distribution installed into the venv."""
    version: str
    """Pinned: the newest release that installed next to torch 2.13.0 when this benchmark was last updated."""
    script: str
    """Step script under benchmarks/peers/, run with the venv's python."""
    variants: tuple[str, ...] = ("default",)
    """--variant values timed (the first one also trains in the quality run)."""


PEERS = (
    Peer("saelens", "sae-lens", "6.54.12", "saelens_step.py"),
    Peer("sparsify", "eai-sparsify", "1.3.3", "sparsify_step.py", ("default", "adam")),
)


def ensure_venv(peer: Peer) -> Path:
    """The python of the peer's venv, built on first use; RuntimeError (with pip's last lines) if pip fails."""
    root = cache_root() / "bench-venvs" / peer.name
    python, marker = root / "bin" / "python", root / "sae-kit-bench.json"
    want = {"package": peer.package, "version": peer.version, "torch": TORCH_PIN}
    if python.exists() and marker.exists() and json.loads(marker.read_text()) == want:
        return python
    print(f"[setup] building {root} with {peer.package}=={peer.version} (one-off, a few minutes)", flush=True)
    venv.EnvBuilder(clear=True, with_pip=True).create(root)
    (root / "constraints.txt").write_text(TORCH_PIN + "\n")
    log = root / "install.log"
    for args in ([TORCH_PIN], ["-c", str(root / "constraints.txt"), f"{peer.package}=={peer.version}"]):
        cmd = [str(python), "-m", "pip", "install", "--quiet", *args]
        with open(log, "a") as fh:
            done = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT)
        if done.returncode != 0:
            tail = "".join(log.read_text().splitlines(keepends=True)[-8:])
            raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {done.returncode}); end of {log}:\n{tail}")
    marker.write_text(json.dumps(want))
    return python


def peer_command(python: Path, peer: Peer, mode: str, data: Path, threads: int, **options: Any) -> list[str]:
    cmd = [
        str(python),
        str(HERE / "peers" / peer.script),
        "--mode",
        mode,
        "--data",
        str(data),
        "--threads",
        str(threads),
        "--d-sae",
        str(D_SAE),
        "--k",
        str(K),
        "--batch",
        str(BATCH),
    ]
    for key, value in options.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    return cmd


def peer_env(threads: int) -> dict[str, str]:
    return os.environ | {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}


class PeerServer:
    """A peer's step script in `serve` mode: `step(i)` runs its training step i and returns the seconds it took."""

    def __init__(self, python: Path, peer: Peer, data: Path, threads: int, **options: Any) -> None:
        self.script = peer.script
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            peer_command(python, peer, "serve", data, threads, **options),
            text=True,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            env=peer_env(threads),
        )
        self.info = self._reply()

    def _reply(self) -> dict[str, Any]:
        for line in self.proc.stdout:
            if line.startswith("@@ "):
                return json.loads(line[3:])
        self.stderr.seek(0)
        tail = " | ".join(self.stderr.read().strip().splitlines()[-4:])
        raise RuntimeError(f"{self.script} exited {self.proc.wait()}: {tail}")

    def step(self, i: int) -> float:
        self.proc.stdin.write(f"step {i}\n")
        self.proc.stdin.flush()
        return self._reply()["s"]

    def close(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
        self.stderr.close()


def peer_quality(python: Path, peer: Peer, data: Path, threads: int, **options: Any) -> dict[str, Any]:
    """Train the peer for --steps steps in its venv; its JSON result, or {"error": ...} if it failed."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = peer_command(python, peer, "quality", data, threads, out=out, **options)
        done = subprocess.run(cmd, capture_output=True, text=True, env=peer_env(threads))
        if done.returncode != 0 or not out.exists():
            tail = (done.stderr or done.stdout).strip().splitlines()[-4:]
            return {"error": f"{peer.script} exited {done.returncode}: " + " | ".join(tail)}
        return json.loads(out.read_text())


# ----------------------------------------------------------------------------------------------------------- data
def activations_file(
    tokens: int, heldout_tokens: int, seed: int, threads: int, data_dir: Path | None = None, context_size: int = 128
) -> tuple[Path, int, int]:
    """A safetensors file of real layer-6 activations (`train` shuffled with `seed`, `heldout`), built once in `data_dir`."""
    data_dir = data_dir or cache_root() / "bench-data"
    cache_dir = data_dir / f"smollm2-l6-{tokens}-{heldout_tokens}"
    file = data_dir / f"acts-{tokens}-{heldout_tokens}-seed{seed}.safetensors"
    if not file.exists():
        cmd = [
            sys.executable,
            "-c",
            "import sys; from sae_kit.cli import main; sys.exit(main())",
            "cache",
            "--out",
            str(cache_dir),
            "--tokens",
            str(tokens),
            "--heldout-tokens",
            str(heldout_tokens),
            "--hook",
            HOOK,
            "--context-size",
            str(context_size),
            "--no-progress",
        ]
        print(f"[data] harvesting {tokens:,} + {heldout_tokens:,} tokens: sae-kit {' '.join(cmd[3:])}", flush=True)
        env = os.environ | {"OMP_NUM_THREADS": str(threads)}
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
        cache = ActivationCache(cache_dir)
        train = cache.read("train").acts[HOOK].float()
        order = torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(seed))
        tmp = file.with_suffix(".tmp")
        save_file(
            {"train": train[order].contiguous(), "heldout": cache.read("heldout").acts[HOOK].float().contiguous()},
            str(tmp),
            metadata={"hook": HOOK, "seed": str(seed), "source": str(cache_dir)},
        )
        tmp.rename(file)
    with safe_open(str(file), "pt") as f:
        n_train, n_heldout = f.get_slice("train").get_shape()[0], f.get_slice("heldout").get_shape()[0]
    return file, n_train, n_heldout


# ------------------------------------------------------------------------------------------- ours, in this process
def our_trainer(
    d_in: int, tokens: int, seed: int, sample: torch.Tensor, lr_scale: float = 1.0, **train_options: Any
) -> Trainer:
    """Our TopK SAE and Trainer with every default (lr 2e-4/sqrt(d_sae/2^14), AuxK, geometric-median b_dec, ...)."""
    torch.manual_seed(seed)
    sae = SAE(SAEConfig(architecture="topk", d_in=d_in, d_sae=D_SAE, k=K))
    cfg = TrainConfig(batch_size=BATCH, tokens=tokens, **train_options)
    trainer = Trainer(sae, cfg)
    if lr_scale != 1.0:
        trainer = Trainer(sae, dataclasses.replace(cfg, lr=trainer.lr * lr_scale))
    trainer.init_from_sample(sample)
    return trainer


def busy_cores(seconds: float = 1.0) -> float:
    """How many cores other processes kept busy over `seconds` while this one slept (from /proc/stat; 0 if unknown)."""

    def sample() -> tuple[int, int]:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        idle = values[3] + values[4]
        return sum(values) - idle, sum(values)

    try:
        busy0, total0 = sample()
        time.sleep(seconds)
        busy1, total1 = sample()
    except (OSError, IndexError, ValueError):
        return 0.0
    return (os.cpu_count() or 1) * (busy1 - busy0) / max(1, total1 - total0)


def timed(fn: Callable[[int], Any]) -> Callable[[int], float]:
    """fn(i) turned into a function that returns the seconds it took."""

    def run(i: int) -> float:
        t = time.perf_counter()
        fn(i)
        return time.perf_counter() - t

    return run


def profile_our_step(trainer: Trainer, train: torch.Tensor, steps: int = 3) -> None:
    """Print where our step's time goes (torch.profiler, self CPU time per op)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(steps):
            trainer.step(batch_at(train, i, BATCH))
    print(f"\nprofile of {steps} of our steps (self CPU time):")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=48))


# ----------------------------------------------------------------------------------------------------------- main
def main() -> None:
    global D_SAE, BATCH
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None, help="torch threads for everyone (default 2; --smoke: 1)")
    ap.add_argument("--quick", action="store_true", help="3 timed steps, 20 quality steps, fewer tokens")
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="CI smoke run of the real code path: d_sae 1024, batch 512, 2 timed and 3 quality steps, no peers, "
        "data harvested into a temporary directory",
    )
    ap.add_argument("--skip-peers", action="store_true", help="time ours and the floors only")
    ap.add_argument(
        "--quality-steps", type=int, default=None, help="training steps of the quality run (default 200; 0: skip)"
    )
    ap.add_argument(
        "--tokens",
        type=int,
        default=None,
        help="training tokens to harvest (default quality steps x 4096; the built-in corpus holds ~650k)",
    )
    ap.add_argument(
        "--heldout-tokens",
        type=int,
        default=28672,
        help="held-out tokens (the built-in corpus's held-out documents hold ~31k)",
    )
    ap.add_argument(
        "--steps", type=int, default=None, help="timed steps per library (default 20, quick 3; 0: no timing)"
    )
    ap.add_argument(
        "--lr-scale",
        type=float,
        default=1.0,
        help="quality run: multiply every library's default learning rate by this (default 1)",
    )
    ap.add_argument(
        "--contend",
        action="store_true",
        help="time twice: alone, then next to a competing 2-thread torch process (a loop of small elementwise "
        "ops, as when two jobs share the cores); reports each contender's slowdown",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="also write every result to this JSON file")
    ap.add_argument("--profile", action="store_true", help="print a torch.profiler table of our step")
    args = ap.parse_args()
    smoke_dir = None
    args.threads = args.threads or (
        1 if args.smoke else 2
    )  # --smoke: a shared CI machine, where spinning threads cost 10x
    if args.smoke:
        D_SAE, BATCH = 1024, 512
        args.skip_peers = True
        args.heldout_tokens = min(args.heldout_tokens, 1024)
        smoke_dir = tempfile.TemporaryDirectory(prefix="sae-kit-train-step-smoke-")
    quality_steps = (
        args.quality_steps if args.quality_steps is not None else (3 if args.smoke else 20 if args.quick else 200)
    )
    tokens = args.tokens or max(quality_steps, 3 if args.smoke else 20) * BATCH
    steps = args.steps if args.steps is not None else (2 if args.smoke else 3 if args.quick else 20)
    warmup = 1 if args.quick or args.smoke else 3
    torch.set_num_threads(args.threads)
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "threads": args.threads,
        "torch": torch.__version__,
        "sae_kit": sae_kit.__version__,
        "setting": {"d_sae": D_SAE, "k": K, "batch": BATCH},
    }

    # Setup: the peer venvs (a peer that fails to install is skipped), then the activations.
    pythons: dict[str, Path] = {}
    for peer in () if args.skip_peers else PEERS:
        try:
            pythons[peer.name] = ensure_venv(peer)
        except Exception as err:  # noqa: BLE001  (whatever breaks a peer's install skips that peer only)
            print(f"[setup] {peer.package} skipped: {err}")
            results.setdefault("errors", {})[peer.package] = str(err)
    data, n_train, n_heldout = activations_file(
        tokens,
        args.heldout_tokens,
        args.seed,
        args.threads,
        None if smoke_dir is None else Path(smoke_dir.name),
        64 if args.smoke else 128,
    )
    tensors = load_file(str(data))
    train, heldout = tensors["train"], tensors["heldout"]
    d_in = train.shape[1]
    print(f"data: {n_train:,} train + {n_heldout:,} held-out rows of {HOOK} (d_in {d_in}), {data}")

    median = time_steps(train, data, pythons, args, steps, warmup, results) if steps > 0 else {}
    fvu = quality(train, heldout, data, pythons, args, quality_steps, results) if quality_steps > 0 else {}
    report(results, median, fvu, d_in, steps, quality_steps, args.threads)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
        print(f"\nresults written to {args.json}")
    if smoke_dir is not None:
        smoke_dir.cleanup()


CONTENDER = """
import torch
torch.set_num_threads({threads})
a = torch.randn(4096, 576)
while True:
    a.mul_(1.0001)
"""
"""--contend: another 2-thread torch job sharing the cores (many small parallel regions, like a training loop)."""


def time_steps(
    train: torch.Tensor,
    data: Path,
    pythons: dict[str, Path],
    args: argparse.Namespace,
    steps: int,
    warmup: int,
    results: dict[str, Any],
) -> dict[str, float]:
    """Median seconds per step of every contender; they take turns (rotating), each turn 1 untimed + PER_TURN timed."""
    d_in = train.shape[1]
    x, w_enc = train[:BATCH].contiguous(), torch.randn(d_in, D_SAE) / d_in**0.5
    xb, wb = x.bfloat16(), w_enc.bfloat16()
    z = x @ w_enc
    # a long run: no latent is dead yet, so no AuxK pass; compute_dtype auto = bf16 on a CPU with AVX-512 BF16
    ours = our_trainer(d_in, 10**9, args.seed, train[:BATCH])
    ours_fp32 = our_trainer(d_in, 10**9, args.seed, train[:BATCH], compute_dtype="float32")
    ours_aux = our_trainer(d_in, 10**9, args.seed, train[:BATCH], dead_tokens=1)  # latents idle for one batch are dead
    results["compute_dtype"] = str(ours.compute_dtype).removeprefix("torch.")
    contenders: dict[str, Callable[[int], float]] = {
        "gemm": timed(lambda i: x @ w_enc),
        "gemm_bf16": timed(lambda i: xb @ wb),
        "topk": timed(lambda i: z.topk(K, dim=-1, sorted=False)),
        "ours": timed(lambda i: ours.step(batch_at(train, i, BATCH))),
        "ours_fp32": timed(lambda i: ours_fp32.step(batch_at(train, i, BATCH))),
        "ours_aux": timed(lambda i: ours_aux.step(batch_at(train, i, BATCH))),
    }
    servers: dict[str, PeerServer] = {}
    for peer in PEERS:
        for variant in peer.variants if peer.name in pythons else ():
            key = f"{peer.name}:{variant}"
            try:
                servers[key] = PeerServer(
                    pythons[peer.name],
                    peer,
                    data,
                    args.threads,
                    variant=variant,
                    steps=2 * (warmup + 2 * steps),
                    seed=args.seed,
                )
                contenders[key] = servers[key].step
            except (RuntimeError, OSError) as err:
                print(f"[time] {key} failed to start: {err}")
                results.setdefault("errors", {})[key] = str(err)
    busy = busy_cores()
    results["busy_cores_before"] = busy
    print(
        f"timing: {len(contenders)} contenders x {steps} steps, in turns of {PER_TURN} after an untimed one; "
        f"{args.threads} threads, torch {torch.__version__}; cores busy with other work: {busy:.1f} of {os.cpu_count()}",
        flush=True,
    )
    if busy > 0.3:
        print(
            "  note: other processes hold CPU, so absolute times are inflated; code that synchronises its threads "
            "often (many small parallel regions) suffers most, so ratios shift too"
        )
    times: dict[str, list[float]] = {}
    contended: dict[str, list[float]] = {}
    done = dict.fromkeys(contenders, 0)
    try:
        times = take_turns(contenders, steps, warmup, done, results)
        if args.contend:
            print(
                f"  --contend: again, next to a {args.threads}-thread torch loop of small elementwise ops", flush=True
            )
            rival = subprocess.Popen(
                [sys.executable, "-c", CONTENDER.format(threads=args.threads)], env=peer_env(args.threads)
            )
            try:
                contended = take_turns(contenders, steps, warmup, done, results)
            finally:
                rival.kill()
                rival.wait()
    finally:
        for server in servers.values():
            server.close()
    results["busy_cores_after"] = busy_cores()
    median = {key: statistics.median(v) for key, v in times.items() if v}
    slowdown = {key: statistics.median(v) / median[key] for key, v in contended.items() if v and key in median}
    results |= {
        "contend": args.contend,
        "step_s": median,
        "step_times": times,
        "contended_step_times": contended,
        "slowdown": slowdown,
        "peers": {key: server.info for key, server in servers.items()},
    }
    if args.profile:
        profile_our_step(ours, train)
    return median


def take_turns(
    contenders: dict[str, Callable[[int], float]],
    steps: int,
    warmup: int,
    done: dict[str, int],
    results: dict[str, Any],
) -> dict[str, list[float]]:
    """Seconds of `steps` timed steps per contender, in rotating turns of 1 untimed + PER_TURN timed steps (the first
    turn starts with `warmup` untimed ones); a contender that fails is reported and dropped."""
    times: dict[str, list[float]] = {key: [] for key in contenders}
    for turn in range(math.ceil(steps / PER_TURN)):
        names = list(contenders)
        for key in names[turn % len(names) :] + names[: turn % len(names)]:
            untimed = warmup if turn == 0 else 1
            try:
                for _ in range(untimed + min(PER_TURN, steps - len(times[key]))):
                    seconds = contenders[key](done[key])
                    done[key] += 1
                    if untimed:
                        untimed -= 1
                    else:
                        times[key].append(seconds)
            except (RuntimeError, OSError) as err:
                print(f"[time] {key} failed at step {done[key]}: {err}")
                results.setdefault("errors", {})[key] = str(err)
                del contenders[key], times[key]
    return times


def quality(
    train: torch.Tensor,
    heldout: torch.Tensor,
    data: Path,
    pythons: dict[str, Path],
    args: argparse.Namespace,
    quality_steps: int,
    results: dict[str, Any],
) -> dict[str, dict[str, Any]]:
    """Held-out FVU of each library after `quality_steps` steps on the same rows, in the same order, one after another."""
    epochs = quality_steps * BATCH / train.shape[0]
    scale = f" (learning rates x{args.lr_scale:g})" if args.lr_scale != 1 else ""
    print(
        f"[quality] {quality_steps} steps x {BATCH} ({epochs:.2f} epochs of the same rows), each library's "
        f"defaults{scale}",
        flush=True,
    )
    t = time.perf_counter()
    fvu: dict[str, dict[str, Any]] = {}
    finals = {}
    for key, dtype in (("ours", "auto"), ("ours_fp32", "float32")):
        t = time.perf_counter()
        trainer = our_trainer(
            train.shape[1],
            quality_steps * BATCH,
            args.seed,
            batch_at(train, 0, BATCH),
            args.lr_scale,
            compute_dtype=dtype,
        )
        for i in range(quality_steps):
            trainer.step(batch_at(train, i, BATCH))
        final = finals[key] = trainer.export()

        def encode_decode(x: torch.Tensor, final: SAE = final) -> tuple[torch.Tensor, torch.Tensor]:
            out = final(x)
            return out.x_hat, out.codes.indices[out.codes.values > 0]

        fvu[key] = {
            "lr": trainer.lr,
            "compute_dtype": str(trainer.compute_dtype),
            **heldout_eval(encode_decode, heldout, D_SAE),
        }
        print(
            f"[quality] sae-kit ({trainer.compute_dtype}): FVU {fvu[key]['fvu']:.4f} ({time.perf_counter() - t:.0f}s)",
            flush=True,
        )
    results["bf16_agreement"] = bf16_agreement(finals["ours_fp32"], heldout)
    agree = results["bf16_agreement"]
    print(
        f"[quality] the fp32-trained SAE encoding held-out rows under bf16 autocast: support agreement "
        f"{100 * agree['support_agreement']:.2f}%, FVU {agree['fvu_bf16']:.4f} vs {agree['fvu_fp32']:.4f} in fp32",
        flush=True,
    )
    for peer in PEERS:
        if peer.name in pythons:
            t = time.perf_counter()
            res = peer_quality(
                pythons[peer.name],
                peer,
                data,
                args.threads,
                steps=quality_steps,
                variant=peer.variants[0],
                seed=args.seed,
                lr_scale=args.lr_scale,
            )
            fvu[peer.name] = res
            shown = res.get("error") or f"FVU {res['fvu']:.4f}"
            print(f"[quality] {peer.package}: {shown} ({time.perf_counter() - t:.0f}s)", flush=True)
    results["quality"] = {
        "steps": quality_steps,
        "batch": BATCH,
        "lr_scale": args.lr_scale,
        "train_rows": train.shape[0],
        "heldout_rows": heldout.shape[0],
        **fvu,
    }
    return fvu


@torch.no_grad()
def bf16_agreement(sae: SAE, heldout: torch.Tensor, rows: int = 8192) -> dict[str, float]:
    """The same SAE (train mode: the training rule) on held-out rows in fp32 and under bf16 autocast: the fraction of
    (token, latent) support pairs both choose, and the FVU of each."""
    x = heldout[:rows]
    sae.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = sae(x)
    ref = sae(x)
    sae.eval()

    def support(out: Any) -> torch.Tensor:
        return torch.zeros(len(x), sae.cfg.d_sae, dtype=torch.bool).scatter(1, out.codes.indices, True)

    both = (support(low) & support(ref)).sum()
    denom = (x - x.mean(0)).double().square().sum()
    return {
        "rows": len(x),
        "support_agreement": float(both / (len(x) * sae.cfg.k)),
        "fvu_bf16": float((low.x_hat.double() - x).square().sum() / denom),
        "fvu_fp32": float((ref.x_hat.double() - x).square().sum() / denom),
    }


STEP_NOTES = {
    "ours": "Adam; AuxK armed, no latent dead yet (as early in a run); compute_dtype auto",
    "ours_fp32": "the same in fp32 (compute_dtype float32)",
    "ours_aux": "the default with the AuxK pass on every step",
    "saelens:default": "Adam + grad clip; dense [B, d_sae] code and decoder GEMM",
    "sparsify:default": "its default optimiser: signum (SignSGD + schedule-free); no AuxK",
    "sparsify:adam": "its `adam` optimiser instead",
}


def report(
    results: dict[str, Any],
    median: dict[str, float],
    fvu: dict[str, dict[str, Any]],
    d_in: int,
    steps: int,
    quality_steps: int,
    threads: int,
) -> None:
    """The table, then each target marked met or SHORT."""
    ours_s = median.get("ours")
    rows = [
        ("sae-kit", sae_kit.__version__, "ours", fvu.get("ours")),
        ("sae-kit", sae_kit.__version__, "ours_fp32", fvu.get("ours_fp32")),
        ("sae-kit", sae_kit.__version__, "ours_aux", None),
    ]
    for peer in PEERS:
        for variant in peer.variants:
            key = f"{peer.name}:{variant}"
            q = fvu.get(peer.name) if variant == peer.variants[0] else None
            version = results.get("peers", {}).get(key, {}).get("version") or (q or {}).get("version", peer.version)
            rows.append((peer.package, version, key, q))
    timing = f"median of {steps} steps taken in turns" + (
        " (alone; then next to a competing job)" if results.get("contend") else ""
    )
    scale = (
        f" at x{results['quality']['lr_scale']:g} the default lr" if fvu and results["quality"]["lr_scale"] != 1 else ""
    )
    quality_text = f"held-out FVU after {quality_steps} steps on the same rows{scale}"
    print(
        f"\nTopK training step, d_in {d_in}, d_sae {D_SAE}, k {K}, batch {BATCH}, our compute dtype "
        f"{results.get('compute_dtype', '-')} (peers fp32), {threads} threads: "
        + "; ".join(text for text, on in ((timing, median), (quality_text, fvu)) if on)
    )
    slow = results.get("slowdown", {})
    print(
        f"{'library':<14}{'version':<10}{'s/step':>8}{'ours is':>9}{'held-out FVU':>14}{'dead':>7}{'lr':>10}"
        f"{'contended':>11}  step"
    )
    errors = results.get("errors", {})
    for name, version, key, q in rows:
        note = STEP_NOTES.get(key, key)
        error = errors.get(key) or errors.get(name) or (q or {}).get("error")
        if error:
            note += f": FAILED ({error[:100]})"
        elif key not in median and not q:
            continue
        step_s = f"{median[key]:.3f}" if key in median else "-"
        speed = f"{median[key] / ours_s:.2f}x" if key in median and ours_s else ""
        q_fvu = f"{q['fvu']:.4f}" if q and "fvu" in q else "-"
        q_dead = f"{100 * q['dead_frac']:.1f}%" if q and "dead_frac" in q else ""
        q_lr = f"{q['lr']:.2e}" if q and "lr" in q else ""
        contended = f"{slow[key]:.2f}x" if key in slow else ""
        print(f"{name:<14}{version:<10}{step_s:>8}{speed:>9}{q_fvu:>14}{q_dead:>7}{q_lr:>10}{contended:>11}  {note}")
    for key, note in (
        ("gemm", f"the dense encoder GEMM [{BATCH}, {d_in}] x [{d_in}, {D_SAE}] alone, fp32"),
        ("gemm_bf16", "the same GEMM in bf16"),
        ("topk", f"torch.topk(k={K}) over [{BATCH}, {D_SAE}] alone"),
    ):
        if key in median and ours_s:
            contended = f"{slow[key]:.2f}x" if key in slow else ""
            print(
                f"{'(floor)':<14}{key:<10}{median[key]:>8.3f}{median[key] / ours_s:>8.2f}x{'':>31}{contended:>11}  {note}"
            )
    if slow:
        print("(contended: median step next to the competing job / median step alone, from the same run)")

    print("\ntargets:")
    checks: list[tuple[str, str, str, bool]] = []
    if ours_s and "saelens:default" in median:
        ratio = median["saelens:default"] / ours_s
        checks.append(("steps/s vs SAELens", f"{ratio:.2f}x", f">= {TARGET_VS_SAELENS}x", ratio >= TARGET_VS_SAELENS))
    sparsify = [key for key in median if key.startswith("sparsify:")]
    if ours_s and sparsify:
        fastest = min(sparsify, key=median.get)
        ratio = median[fastest] / ours_s
        checks.append(
            (
                f"steps/s vs sparsify ({fastest.split(':')[1]}, its fastest)",
                f"{ratio:.2f}x",
                f">= {TARGET_VS_SPARSIFY}x",
                ratio >= TARGET_VS_SPARSIFY,
            )
        )
    if ours_s and "gemm_bf16" in median:
        ratio = ours_s / median["gemm_bf16"]
        checks.append(
            ("our step / bf16 encoder GEMM", f"{ratio:.2f}x", f"<= {TARGET_VS_GEMM}x", ratio <= TARGET_VS_GEMM)
        )
    if ours_s and "ours_aux" in median:
        ratio = median["ours_aux"] / ours_s
        checks.append(("our step with AuxK / without", f"{ratio:.2f}x", f"<= {TARGET_AUX}x", ratio <= TARGET_AUX))
    if "ours" in slow and sparsify:
        rival = min((key for key in sparsify if key in slow), key=slow.get, default=None)
        if rival:
            checks.append(
                (
                    f"contended slowdown vs sparsify ({rival.split(':')[1]})",
                    f"{slow['ours']:.2f}x vs {slow[rival]:.2f}x",
                    "no more",
                    slow["ours"] <= slow[rival],
                )
            )
    if "ours" in fvu and "ours_fp32" in fvu:
        diff = fvu["ours"]["fvu"] - fvu["ours_fp32"]["fvu"]
        checks.append(("held-out FVU, bf16 - fp32 training", f"{diff:+.4f}", "<= +0.005", diff <= 0.005))
    for peer in PEERS:
        q = fvu.get(peer.name, {})
        if "fvu" in q and "ours" in fvu:
            checks.append(
                (
                    f"held-out FVU vs {peer.package}",
                    f"{fvu['ours']['fvu']:.4f} vs {q['fvu']:.4f}",
                    "no worse",
                    fvu["ours"]["fvu"] <= q["fvu"],
                )
            )
    for what, value, target, met in checks:
        print(f"  {what:<42}{value:>17}  (target {target})  {'met' if met else 'SHORT'}")
    results["targets"] = [{"what": w, "value": v, "target": t, "met": m} for w, v, t, m in checks]


if __name__ == "__main__":
    main()
