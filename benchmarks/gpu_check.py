"""The prepared GPU check (issue 14): run it once on a lent CUDA machine; `--smoke` runs the same code on the CPU at
toy sizes, in CI, so it cannot rot while no GPU is lent.

    python benchmarks/gpu_check.py --out gpu.json            # on the GPU machine, under ~8 minutes on one H200
    python benchmarks/gpu_check.py --smoke                   # anywhere, seconds

It needs torch, safetensors and sae-kit's training core only (no LM, no hub: synthetic activations), so it runs on a
bare GPU image; part 3 also needs the CLI's dependencies (tyro, rich, ...) and says so when they are missing.
1. **sync**: every rule's training step on the device under `torch.cuda.set_sync_debug_mode("error")` between the
   trainer's syncs (every `sync_every` steps); a rule that synchronises the host fails with the op that did.
2. **step**: tokens/s and peak device memory of our TopK step (bf16 autocast, fp32 master weights and Adam state) at
   d_in 2304, k 64, batch 4096 for 16k and 131k latents; EleutherAI sparsify's step on the same card where it imports.
3. **ddp**: two gloo ranks sharing the one GPU (`torchrun --nproc-per-node 2 -m sae_kit train --dist-backend gloo`)
   against one process on the same cache: the SAEs' weights must agree to float rounding.
4. **eval**: a 131k-latent SAE's held-out pass (chunked encode, FVU, dead fraction) over 65k rows, peak memory.
Prints one line per figure and writes them to --out (JSON) for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from sae_kit.sae import SAE, SAEConfig
from sae_kit.sparsifiers import REGISTRY, canonical_name
from sae_kit.training import TrainConfig, Trainer


def _sync(device: str, d_in: int, d_sae: int, batch: int) -> dict[str, str]:
    """Each rule: 'ok', or the first line of the error CUDA's sync debug mode raised in a step between syncs."""
    out = {}
    g = torch.Generator(device=device).manual_seed(0)
    xs = [torch.randn(batch, d_in, device=device, generator=g) for _ in range(6)]
    for arch in sorted({canonical_name(a) for a in REGISTRY}):
        torch.manual_seed(0)
        sae = SAE(SAEConfig(architecture=arch, d_in=d_in, d_sae=d_sae, k=16, device=device))
        t = Trainer(sae, TrainConfig(batch_size=batch, tokens=batch * 100, sync_every=1000, dead_tokens=batch * 2))
        for x in xs[:3]:
            t.step(x, x)
        t.tokens_since_fired[: d_sae // 8] = 10**9  # dead latents: the aux loss runs
        t.sync()
        try:
            if device.startswith("cuda"):
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")
            for x in xs[3:]:
                t.step(x, x)
            out[arch] = "ok"
        except RuntimeError as err:
            out[arch] = str(err).splitlines()[0][:200]
        finally:
            if device.startswith("cuda"):
                torch.cuda.set_sync_debug_mode(0)
    return out


def _timed(step, device: str, steps: int) -> tuple[float, float]:
    """(seconds per step, peak device memory in GiB) of `step(i)` after two warm-up steps."""
    for i in range(2):
        step(i)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for i in range(steps):
        step(i)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else float("nan")
    return (time.perf_counter() - t0) / steps, peak


def _step(device: str, d_in: int, widths: list[int], batch: int, k: int, steps: int) -> dict[str, dict]:
    out: dict[str, dict] = {}
    x = torch.randn(batch * 4, d_in, device=device)
    for d_sae in widths:
        torch.manual_seed(0)
        trainer = Trainer(
            SAE(SAEConfig(architecture="topk", d_in=d_in, d_sae=d_sae, k=k, device=device)),
            TrainConfig(batch_size=batch, tokens=batch * 1000, compute_dtype="auto"),
        )
        per_step, peak = _timed(lambda i, t=trainer: t.step(x[(i % 4) * batch : (i % 4 + 1) * batch]), device, steps)
        out[f"ours:{d_sae}"] = {"tok_per_s": batch / per_step, "peak_gib": peak}
        del trainer
        try:
            from sparsify import SparseCoder, SparseCoderConfig  # type: ignore[import-not-found]
        except ImportError:
            out[f"sparsify:{d_sae}"] = {"skipped": "sparsify is not installed here (carry its wheel)"}
            continue
        sae = SparseCoder(d_in, SparseCoderConfig(num_latents=d_sae, k=k), device, dtype=torch.float32)
        opt = torch.optim.Adam(sae.parameters(), lr=1e-4)

        def peer(i: int, sae=sae, opt=opt) -> None:
            xb = x[(i % 4) * batch : (i % 4 + 1) * batch]
            with torch.autocast(device.split(":")[0], dtype=torch.bfloat16):
                fvu = sae(xb, y=xb).fvu
            fvu.backward()
            sae.remove_gradient_parallel_to_decoder_directions()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sae.set_decoder_norm_to_unit_norm()

        per_step, peak = _timed(peer, device, steps)
        out[f"sparsify:{d_sae}"] = {"tok_per_s": batch / per_step, "peak_gib": peak}
        del sae, opt
    return out


def _ddp(device: str, rows: int, d_in: int) -> dict:
    """One process against two gloo ranks sharing the device, from the same synthetic cache."""
    from sae_kit.cache import CacheWriter
    from sae_kit.rows import ActivationRows
    from sae_kit.sae_io import load_sae

    root = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, d_in, generator=g) @ torch.randn(d_in, d_in, generator=g) / d_in**0.5
    order = torch.arange(rows)
    writer = CacheWriter(root / "cache", settings={"model_name": "synthetic"}, hooks=["h"], d_in=d_in)
    meta = {k: order for k in ("token", "doc", "row", "pos")}
    writer.add("train", ActivationRows(acts={"h": x}, **meta), position=1)
    writer.add("heldout", ActivationRows(acts={"h": x[:1024]}, **{k: v[:1024] for k, v in meta.items()}), position=1)
    writer.close()
    common = ["train", "--cache", str(root / "cache"), "--device", device, "--k", "16", "--expansion-factor", "4"]
    common += ["--batch-size", "1024", "--tokens", str(rows // 2), "--eval-tokens", "1024", "--no-progress"]
    common += ["--compute-dtype", "float32"]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "sae_kit"]
    runs = {
        "one": [sys.executable, "-m", "sae_kit", *common, "--out", str(root / "one")],
        "two": [*launch, *common, "--dist-backend", "gloo", "--out", str(root / "two")],
    }
    took = {}
    for name, cmd in runs.items():
        t0 = time.perf_counter()
        res = subprocess.run(
            cmd, capture_output=True, text=True, timeout=300, env=os.environ | {"OMP_NUM_THREADS": "2"}
        )
        took[name] = time.perf_counter() - t0
        if res.returncode:
            return {"error": f"{name}: " + (res.stderr.strip().splitlines() or ["?"])[-1][:300]}
    a, b = (load_sae(root / n / "sae", device="cpu") for n in ("one", "two"))
    diff = max(float((p - q).detach().abs().max()) for p, q in zip(a.parameters(), b.parameters()))
    return {"max_weight_diff": diff, "seconds_one": took["one"], "seconds_two_ranks": took["two"]}


def _eval(device: str, d_in: int, d_sae: int, rows: int) -> dict:
    from sae_kit.heldout import encode, fvu

    torch.manual_seed(0)
    sae = SAE(SAEConfig(architecture="topk", d_in=d_in, d_sae=d_sae, k=64, device=device)).eval()
    x = torch.randn(rows, d_in)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with torch.no_grad():
        enc = encode(sae, x)
    result = {"fvu": fvu(x, enc.x_hat), "dead_frac": float((enc.counts == 0).double().mean())}
    result["seconds"] = time.perf_counter() - t0
    if device.startswith("cuda"):
        result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="toy sizes on whatever device there is (CI)")
    parser.add_argument("--out", type=Path, default=None, help="write the figures here as JSON")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        raise SystemExit("gpu_check: no CUDA device here; run it on the GPU machine, or with --smoke")
    device = "cuda" if cuda else "cpu"
    smoke = args.smoke
    report: dict = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__}
    report["sync"] = _sync(device, 32 if smoke else 2304, 256 if smoke else 16384, 256 if smoke else 4096)
    widths = [512] if smoke else [16384, 131072]
    report["step"] = _step(
        device, 32 if smoke else 2304, widths, 256 if smoke else 4096, 8 if smoke else 64, 3 if smoke else 30
    )
    report["ddp"] = _ddp(device, 4096 if smoke else 262144, 16 if smoke else 2304)
    report["eval"] = _eval(device, 32 if smoke else 2304, 1024 if smoke else 131072, 2048 if smoke else 65536)
    for part in ("sync", "step", "ddp", "eval"):
        for name, value in report[part].items():
            print(f"{part:5s} {name:28s} {value}")
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    bad = [arch for arch, verdict in report["sync"].items() if verdict != "ok"]
    if bad or "error" in report["ddp"]:
        raise SystemExit(f"gpu_check: host syncs in {bad or 'no rule'}; ddp: {report['ddp'].get('error', 'ok')}")


if __name__ == "__main__":
    main()
