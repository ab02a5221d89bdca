"""Training from the model: the prefetch overlap, and a sweep's cost against separate runs (one LM harvest shared).

    python benchmarks/pipeline.py [--tokens 98304] [--members 3] [--threads 2]
    python benchmarks/pipeline.py --smoke   # CI: batch 256, 4 steps a run, 2 members, contexts of 64, 1 thread

In one run, on the same contexts and settings (TopK, k 32, 8x expansion, batch 4096, layer-6 residuals of SmolLM2):
  harvest   the data work of a run alone: the same batches through the shuffle buffer, plus the held-out harvest
  serial    `train --prefetch off` (harvest, then step, in turn)
  prefetch  `train --prefetch on` (the harvest runs in a background thread while the SAE steps)
  sweep     one `train` of N members (seeds 0..N-1), against N separate runs measured one after another (prefetch auto)
With --threads 1 on a 2-core machine a core is free for the harvest thread (what a GPU run has); with --threads 2
the SAE step and the harvest compete for the same two cores.
The model is loaded once, outside the timings. Ratios are what matter: this machine's speed drifts between runs.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from sae_kit import HarvestConfig, load_model
from sae_kit.training import TrainConfig
from sae_kit.training.run import TrainRunConfig, train, use_prefetch
from sae_kit.training.sources import ModelSource


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=98304, help="training tokens per run (a multiple of the batch size)")
    ap.add_argument("--members", type=int, default=3, help="sweep members (and separate runs); 0 skips the sweep part")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default 2; --smoke: 1)")
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument(
        "--smoke", action="store_true", help="CI smoke run: batch 256, 4 steps a run, 2 members, contexts of 64"
    )
    args = ap.parse_args()
    batch, buffer, expansion = 4096, 65536, 8
    harvest = HarvestConfig()
    if args.smoke:  # one thread: a CI machine is often shared, and oversubscribed torch threads spin
        batch, buffer, expansion = 256, 1024, 2
        args.tokens, args.members, args.eval_tokens = 4 * batch, min(args.members, 2), min(args.eval_tokens, 256)
        harvest = HarvestConfig(context_size=64)
    args.threads = args.threads or (1 if args.smoke else 2)
    torch.set_num_threads(args.threads)
    model = load_model(device="cpu")
    tmp = Path(tempfile.mkdtemp(prefix="sae-kit-bench-"))
    runs = itertools.count()

    def run(tokens: int = args.tokens, **kw) -> float:
        cfg = TrainRunConfig(
            out=tmp / f"run{next(runs)}",
            harvest=harvest,
            k=32,
            expansion_factor=expansion,
            eval_tokens=args.eval_tokens,
            buffer_tokens=buffer,
            progress=False,
            train=TrainConfig(batch_size=batch, tokens=tokens),
            **kw,
        )
        t = time.perf_counter()
        train(cfg, model=model)
        return time.perf_counter() - t

    def harvest_alone() -> float:
        t = time.perf_counter()
        source = ModelSource(harvest, batch, buffer, 0, False, args.eval_tokens, model)
        for _ in itertools.islice(source.batches(), args.tokens // batch):
            pass
        source.heldout()
        return time.perf_counter() - t

    run(4 * batch, prefetch="on")  # warm-up: tokenizer caches, allocator, the prefetch thread
    t_harvest = harvest_alone()
    t_serial = run(prefetch="off")
    t_prefetch = run(prefetch="on")
    t_sweep = run(seed=tuple(range(args.members))) if args.members else 0.0
    t_separate = [run(seed=(s,)) for s in range(args.members)]
    auto = "on" if use_prefetch("auto", "cpu") else "off"

    shutil.rmtree(tmp, ignore_errors=True)
    n = args.tokens
    print(
        f"machine: {torch.get_num_threads()} threads, torch {torch.__version__}; {n} training tokens per run, "
        f"TopK k 32, d_sae {expansion * model.cfg.d_model}, batch {batch}, + {args.eval_tokens} held-out tokens"
    )
    print(f"harvest alone            {t_harvest:7.1f} s  {n / t_harvest:7.0f} tok/s")
    print(
        f"train, no prefetch       {t_serial:7.1f} s  {n / t_serial:7.0f} tok/s  {t_serial / t_harvest:5.2f}x the harvest alone"
    )
    print(
        f"train, prefetch          {t_prefetch:7.1f} s  {n / t_prefetch:7.0f} tok/s  {t_prefetch / t_harvest:5.2f}x the harvest alone "
        f"({t_serial / t_prefetch:.2f}x faster than no prefetch)"
    )
    print(
        f"prefetch=auto chooses {auto} here ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads); the sweep and separate runs use it"
    )
    if not args.members:
        return
    print(
        f"sweep of {args.members}               {t_sweep:7.1f} s  {t_sweep / (t_prefetch if auto == 'on' else t_serial):5.2f}x one run"
    )
    print(
        f"{args.members} separate runs          {sum(t_separate):7.1f} s  ({', '.join(f'{t:.1f}' for t in t_separate)})  "
        f"sweep costs {t_sweep / sum(t_separate):.2f}x of them ({sum(t_separate) / t_sweep:.2f}x faster)"
    )


if __name__ == "__main__":
    main()
