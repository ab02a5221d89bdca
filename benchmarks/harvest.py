"""Harvest throughput (early stop vs a full forward, fp32 vs bf16 LM), the g-SAE gradient harvest (the old
full-logits path vs the chunked-CE path), bf16-vs-fp32 agreement, and ActivationCache write / shuffled-read throughput.

    python benchmarks/harvest.py [--tokens 16384] [--threads 2] [--fvu-tokens 200000] [--no-fvu]
    python benchmarks/harvest.py --smoke    # CI: 256 tokens in contexts of 64, 8k cache rows, 1 thread, no FVU run

Everything is measured in this one run on the same contexts, so the ratios hold even on a noisy shared machine.
The FVU check trains one TopK SAE (d_sae 4608, k 32, Trainer defaults) on fp32-LM activations and one on bf16-LM
activations of the same tokens, and evaluates both on fp32-LM held-out activations.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
import torch.nn.functional as F

from sae_kit import HarvestConfig, contexts, harvester_for, load_model
from sae_kit.activations import Harvester
from sae_kit.cache import ActivationCache, CacheWriter
from sae_kit.models import fast_bf16


def timed(fn, repeats: int = 2) -> float:
    """Best wall time of `repeats` calls (after one warm-up call)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def agreement(a: torch.Tensor, ref: torch.Tensor) -> str:
    """Mean / median / 10th-percentile cosine (over rows where ref is non-zero) and relative error ||a - ref|| / ||ref||
    of rows [N, d]."""
    nonzero = ref.norm(dim=-1) > 0  # e.g. a context's last position: no target, zero gradient
    cos = F.cosine_similarity(a[nonzero].double(), ref[nonzero].double(), dim=-1)
    rel = float((a.double() - ref.double()).norm() / ref.double().norm())
    return (
        f"cosine mean {cos.mean():.5f}, median {cos.median():.5f}, p10 {cos.quantile(0.1):.5f}; "
        f"relative error {rel:.4f}"
    )


def harvest_rows(model, cfg: HarvestConfig, split: str, n: int) -> torch.Tensor:
    """The first n kept activations of a split, [n, d] float32."""
    harvester, parts, got = harvester_for(model, cfg), [], 0
    for ctx in contexts(model, cfg, split):  # type: ignore[arg-type]
        parts.append(harvester.rows(ctx).acts[cfg.hook[0]])
        got += len(parts[-1])
        if got >= n:
            break
    return torch.cat(parts)[:n]


def sae_fvu(train: torch.Tensor, heldout: torch.Tensor, seed: int = 0) -> float:
    """Held-out FVU of a TopK SAE (d_sae 4608, k 32, Trainer defaults) trained on `train` once through."""
    from sae_kit.heldout import encode, fvu
    from sae_kit.sae import SAE, SAEConfig
    from sae_kit.training import TrainConfig, Trainer

    torch.manual_seed(seed)
    sae = SAE(SAEConfig(architecture="topk", d_in=train.shape[1], d_sae=4608, k=32))
    cfg = TrainConfig(tokens=len(train) // 4096 * 4096)
    trainer = Trainer(sae, cfg)
    trainer.init_from_sample(train[:8192])
    for i in range(0, cfg.tokens, cfg.batch_size):
        trainer.step(train[i : i + cfg.batch_size])
    return fvu(heldout, encode(trainer.export(), heldout).x_hat)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, default=16384, help="tokens per timed pass")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default 2; --smoke: 1)")
    ap.add_argument("--cache-rows", type=int, default=200_000, help="rows for the cache write/read test")
    ap.add_argument("--grad-contexts", type=int, default=1, help="LM batches timed for the gradient harvests")
    ap.add_argument("--grad-repeats", type=int, default=2, help="interleaved timed rounds of the gradient harvests")
    ap.add_argument("--fvu", action=argparse.BooleanOptionalAction, default=None, help="run the SAE FVU check")
    ap.add_argument("--fvu-tokens", type=int, default=200_000, help="training tokens per SAE in the FVU check")
    ap.add_argument("--smoke", action="store_true", help="CI smoke run: 256 tokens in contexts of 64, 8k cache rows")
    args = ap.parse_args()
    if args.smoke:  # one thread: a CI machine is often shared, and oversubscribed torch threads spin (10x slower)
        args.tokens, args.cache_rows, args.grad_contexts = min(args.tokens, 256), min(args.cache_rows, 8192), 1
        args.grad_repeats = 1
    args.fvu = (not args.smoke) if args.fvu is None else args.fvu
    args.threads = args.threads or (1 if args.smoke else 2)
    torch.set_num_threads(args.threads)
    model = load_model(device="cpu", dtype="float32")
    model16 = load_model(device="cpu", dtype="bfloat16")
    cfg = (
        HarvestConfig(context_size=64, lm_batch_size=4)
        if args.smoke
        else HarvestConfig(context_size=128, lm_batch_size=16)
    )
    hook = cfg.hook[0]
    batches = []
    for ctx in contexts(model, cfg):
        batches.append(ctx)
        if sum(c.tokens.numel() for c in batches) >= args.tokens:
            break
    n_tok = sum(c.tokens.numel() for c in batches)
    harvester, harvester16 = harvester_for(model, cfg), harvester_for(model16, cfg)

    def early(h: Harvester):
        return lambda: [h.run(c.tokens) for c in batches]

    def full(m):
        def run() -> None:
            with torch.inference_mode():
                for c in batches:
                    m(c.tokens)

        return run

    t_early, t_early16 = timed(early(harvester)), timed(early(harvester16))
    t_full, t_full16 = timed(full(model)), timed(full(model16))
    print(
        f"machine: {torch.get_num_threads()} threads, torch {torch.__version__}, fast_bf16(cpu)={fast_bf16('cpu')}; "
        f"{n_tok} tokens, hook {hook}"
    )
    print(f"harvest, early stop (stop_at_layer):      {n_tok / t_early:9.0f} tok/s  (fp32 LM)")
    print(
        f"harvest, early stop, bf16 LM:             {n_tok / t_early16:9.0f} tok/s  ({t_early / t_early16:.2f}x fp32)"
    )
    print(f"full forward to logits:                   {n_tok / t_full:9.0f} tok/s  (fp32 LM)")
    print(f"full forward to logits, bf16 LM:          {n_tok / t_full16:9.0f} tok/s  ({t_full / t_full16:.2f}x fp32)")
    print(f"early-stop speed-up: {t_full / t_early:.2f}x (fp32 LM; target >= 4x)")

    # bf16 vs fp32 activations on the same contexts, kept positions only
    a32 = torch.cat([harvester.rows(c).acts[hook] for c in batches])
    a16 = torch.cat([harvester16.rows(c).acts[hook] for c in batches])
    print(f"bf16 vs fp32 activations ({len(a32)} kept positions): {agreement(a16, a32)}")

    # the gradient harvest: the old path (full fp32 logits), the chunked-CE path in fp32 and with a bf16 LM
    grad_batches = batches[: args.grad_contexts]
    g_tok = sum(c.tokens.numel() for c in grad_batches)
    old = harvester_for(model, cfg, with_grads=True)
    new, new16 = harvester_for(model, cfg, with_grads=True), harvester_for(model16, cfg, with_grads=True)
    old._chunked = False  # the straightforward path, as before the chunked CE
    # interleaved (old, new, new16, old, ...) and best-of, so a neighbour's burst of load hits all three alike
    paths = {"old": old, "new": new, "new16": new16}
    best = dict.fromkeys(paths, float("inf"))
    grads: dict[str, torch.Tensor] = {}
    for _ in range(args.grad_repeats):
        for name, h in paths.items():
            t = time.perf_counter()
            harvested = [h.rows(c) for c in grad_batches]
            best[name] = min(best[name], time.perf_counter() - t)
            grads[name] = torch.cat([r.grads[hook] for r in harvested])  # type: ignore[index]
    rates = {name: g_tok / t for name, t in best.items()}
    g_old, g_new, g_new16 = grads["old"], grads["new"], grads["new16"]
    print(f"gradient harvest, old path (full fp32 logits, {g_tok} tokens): {rates['old']:7.0f} tok/s")
    print(
        f"harvest with CE gradients (g-SAE):        {rates['new']:9.0f} tok/s  (chunked CE, fp32 LM; "
        f"{rates['new'] / rates['old']:.2f}x the old path, {rates['new'] * t_full / n_tok:.2f}x the full forward)"
    )
    print(
        f"harvest with CE gradients, bf16 LM:       {rates['new16']:9.0f} tok/s  (chunked CE; "
        f"{rates['new16'] / rates['old']:.2f}x the old path, target >= 5x; {rates['new16'] * t_full / n_tok:.2f}x "
        "the fp32 full forward)"
    )
    print(f"chunked vs old gradient, fp32 LM: {agreement(g_new, g_old)}")
    print(f"bf16-LM vs fp32-LM gradient:      {agreement(g_new16, g_old)}")

    if args.fvu:
        n = args.fvu_tokens
        t = time.perf_counter()
        train32, train16 = harvest_rows(model, cfg, "train", n), harvest_rows(model16, cfg, "train", n)
        held = harvest_rows(model, cfg, "heldout", 16384)
        print(f"FVU check: harvested {2 * n} training + {len(held)} held-out rows in {time.perf_counter() - t:.0f} s")
        print(f"FVU check: bf16 vs fp32 training activations: {agreement(train16, train32)}")
        f32, f16 = sae_fvu(train32, held), sae_fvu(train16, held)
        print(
            f"held-out FVU (fp32 held-out activations), TopK 4608/k32 on {n} tokens: trained on fp32 {f32:.4f}, "
            f"on bf16 {f16:.4f} (difference {f16 - f32:+.4f})"
        )

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
