"""Harvest throughput with early stop vs a full forward, and ActivationCache write / shuffled-read throughput.

    python benchmarks/harvest.py [--tokens 16384] [--threads 2]
    python benchmarks/harvest.py --smoke    # CI: 256 tokens in contexts of 64, 8k cache rows, 1 thread (the same code path)

Everything is measured in this one run on the same contexts, so the ratios hold even on a noisy shared machine.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from sae_kit import HarvestConfig, contexts, harvester_for, load_model
from sae_kit.cache import ActivationCache, CacheWriter


def timed(fn, repeats: int = 2) -> float:
    """Best wall time of `repeats` calls (after one warm-up call)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, default=16384, help="tokens per timed pass")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default 2; --smoke: 1)")
    ap.add_argument("--cache-rows", type=int, default=200_000, help="rows for the cache write/read test")
    ap.add_argument("--smoke", action="store_true", help="CI smoke run: 256 tokens in contexts of 64, 8k cache rows")
    args = ap.parse_args()
    if args.smoke:  # one thread: a CI machine is often shared, and oversubscribed torch threads spin (10x slower)
        args.tokens, args.cache_rows = min(args.tokens, 256), min(args.cache_rows, 8192)
    args.threads = args.threads or (1 if args.smoke else 2)
    torch.set_num_threads(args.threads)
    model = load_model(device="cpu")
    cfg = (
        HarvestConfig(context_size=64, lm_batch_size=4)
        if args.smoke
        else HarvestConfig(context_size=128, lm_batch_size=16)
    )
    batches = []
    for ctx in contexts(model, cfg):
        batches.append(ctx)
        if sum(c.tokens.numel() for c in batches) >= args.tokens:
            break
    n_tok = sum(c.tokens.numel() for c in batches)
    harvester = harvester_for(model, cfg)

    def early() -> None:
        for c in batches:
            harvester.run(c.tokens)

    def full() -> None:
        with torch.inference_mode():
            for c in batches:
                model(c.tokens)

    t_early, t_full = timed(early), timed(full)
    grad_harvester = harvester_for(model, cfg, with_grads=True)
    t_grad = timed(lambda: grad_harvester.run(batches[0].tokens), repeats=1) * len(batches)
    print(f"machine: {torch.get_num_threads()} threads, torch {torch.__version__}; {n_tok} tokens, hook {cfg.hook[0]}")
    print(f"harvest, early stop (stop_at_layer): {n_tok / t_early:9.0f} tok/s")
    print(f"full forward to logits:             {n_tok / t_full:9.0f} tok/s")
    print(f"harvest with CE gradients (g-SAE):  {n_tok / t_grad:9.0f} tok/s")
    print(f"early-stop speed-up: {t_full / t_early:.2f}x (target >= 4x)")

    d = model.cfg.d_model
    rows = torch.randn(args.cache_rows, d)
    meta = {k: torch.arange(args.cache_rows) for k in ("token", "doc", "row", "pos")}
    from sae_kit.rows import ActivationRows

    chunk = 16384
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        writer = CacheWriter(tmp + "/c", settings={"bench": True}, hooks=["h"], d_in=d, dtype="float32")
        for i in range(0, args.cache_rows, chunk):
            sl = slice(i, i + chunk)
            writer.add(
                "train",
                ActivationRows(acts={"h": rows[sl]}, **{k: v[sl] for k, v in meta.items()}),
                position=i // chunk + 1,
            )
        writer.close()
        t_write = time.perf_counter() - t
        cache = ActivationCache(tmp + "/c")
        t = time.perf_counter()
        n = sum(len(b) for b in cache.batches(4096, seed=0))
        t_read = time.perf_counter() - t
    mb = args.cache_rows * d * 4 / 2**20
    print(f"cache write: {args.cache_rows / t_write:9.0f} rows/s ({mb / t_write:6.0f} MB/s, fp32, d={d})")
    print(f"cache shuffled read (batch 4096, global shuffle): {n / t_read:9.0f} rows/s ({mb / t_read:6.0f} MB/s)")
    print(f"shuffled read vs early-stop harvest: {(n / t_read) / (n_tok / t_early):.0f}x")


if __name__ == "__main__":
    main()
