"""Indexing throughput and feature-switch latency of the browser on a 16k-feature SAE, plus opening a 49k-feature index.

    python benchmarks/browse.py [--sae DIR] [--tokens 100000] [--switches 30] [--screenshot PNG --feature N]
    python benchmarks/browse.py --smoke   # CI: a 1024-feature SAE trained for 4 steps, 2k tokens, 3 switches, a 2k-feature
                                          # wide index, 1 thread; the browser part runs where Chromium and playwright are

Without --sae it first trains a TopK SAE (k 32, d_sae 16384) briefly on SmolLM2 layer-6 residuals with a quarter
of the documents held out (the index's cost does not depend on how well it is trained). It then measures, in one run:
  1. `sae-kit index`: the pass (tokens/s) against the bare LM harvest of the same contexts, and the feature phase;
  2. switching features: reading one feature from the index (FeatureIndex.feature), the app's rerun (AppTest), and
     the real server in headless Chromium (type an id, wait until the new page's contexts are drawn);
  3. opening an index of 49,152 features (an untrained SAE, 4k tokens): the app's first read of it.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from sae_kit import HarvestConfig, load_model, load_sae
from sae_kit.dashboards.indexer import IndexConfig, build_index
from sae_kit.dashboards.store import FeatureIndex
from sae_kit.dashboards.workspace import ROOT_ENV
from sae_kit.heldout import activations, harvest_config_for, heldout_contexts
from sae_kit.sae import SAE, SAEConfig
from sae_kit.training import TrainConfig
from sae_kit.training.run import TrainRunConfig, train

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-proxy-server",
]


def quantiles(seconds: list[float]) -> str:
    s = sorted(seconds)
    return f"median {1000 * statistics.median(s):6.1f} ms, p95 {1000 * s[int(0.95 * (len(s) - 1))]:6.1f} ms, max {1000 * s[-1]:6.1f} ms (n={len(s)})"


def bench_index(model, run: Path, tokens: int, harvest_tokens: int = 16384) -> dict:
    """Index the SAE and time the bare harvest of the same held-out contexts (LM to the hook, nothing else)."""
    meta = build_index(IndexConfig(sae=run, tokens=tokens, force=True, progress=False), model=model)[0]
    sae = load_sae(run / "sae" if (run / "sae").is_dir() else run)
    hcfg = harvest_config_for(sae)
    ctxs = heldout_contexts(model, hcfg, harvest_tokens)
    start = time.perf_counter()
    activations(model, hcfg, ctxs)
    harvest = ctxs.n_kept / (time.perf_counter() - start)
    print(
        f"index: {meta['sae']['d_sae']:,} features on {meta['tokens']:,} held-out tokens ({meta['contexts']} contexts of {meta['context_size']})"
    )
    print(
        f"  pass      {meta['seconds']['pass']:7.1f} s  {meta['throughput']['tokens_per_s']:7,} tok/s  "
        f"= {meta['throughput']['tokens_per_s'] / harvest:.2f}x the bare harvest ({harvest:,.0f} tok/s on {ctxs.n_kept:,} of the same tokens)"
    )
    print(f"  features  {meta['seconds']['features']:7.1f} s  {meta['throughput']['features_per_s']:7,} features/s")
    size = sum(f.stat().st_size for f in (run / "index").rglob("*") if f.is_file())
    print(f"  on disk   {size / 2**20:7.1f} MiB ({size / meta['sae']['d_sae'] / 1024:.1f} KiB per feature)")
    return meta


def bench_reads(index_dir: Path, switches: int) -> None:
    ix = FeatureIndex(index_dir)
    start = time.perf_counter()
    _ = ix.summary
    opened = time.perf_counter() - start
    rng = random.Random(0)
    times = []
    for f in rng.sample(range(ix.d_sae), switches):
        start = time.perf_counter()
        ix.feature(f)
        times.append(time.perf_counter() - start)
    print(
        f"switch, index read (FeatureIndex.feature):  {quantiles(times)}; summary of all features read in {1000 * opened:.0f} ms"
    )


def bench_app(run: Path, switches: int) -> None:
    from streamlit.testing.v1 import AppTest

    os.environ[ROOT_ENV] = str(run)
    app = Path(__file__).resolve().parents[1] / "dashboards" / "app.py"
    at = AppTest.from_file(str(app), default_timeout=120)
    at.query_params["page"] = "Feature"
    start = time.perf_counter()
    at.run()
    first = time.perf_counter() - start
    d_sae = FeatureIndex(run / "index").d_sae
    times = []
    for f in random.Random(1).sample(range(d_sae), switches):
        at.number_input(key="feature_page_id").set_value(f)
        start = time.perf_counter()
        at.run()
        times.append(time.perf_counter() - start)
        assert at.title[0].value == f"Feature {f}" and not at.exception, at.exception
    print(f"switch, app rerun (AppTest, no browser):     {quantiles(times)}; first page {1000 * first:.0f} ms")


def bench_browser(run: Path, switches: int, screenshot: Path | None, feature: int | None) -> None:
    from playwright.sync_api import expect, sync_playwright

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "sae_kit.cli", "browse", str(run), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    d_sae = FeatureIndex(run / "index").d_sae
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.set_default_timeout(120_000)
            expect.set_options(timeout=120_000)
            for _ in range(240):
                try:
                    page.goto(f"http://127.0.0.1:{port}/?page=Feature&feature={feature or 0}")
                    break
                except Exception:  # the server is still starting
                    time.sleep(0.5)
            expect(page.locator("h1")).to_have_text(f"Feature {feature or 0}")
            expect(page.get_by_text("Co-firing features")).to_be_visible()
            if screenshot is not None:
                time.sleep(2)  # let the histogram draw
                page.screenshot(path=screenshot)
                print(f"screenshot of feature {feature or 0}: {screenshot}")
            box = page.get_by_label(f"Feature id (0–{d_sae - 1})")
            times = []
            for f in random.Random(2).sample(range(d_sae), switches):
                start = time.perf_counter()
                box.fill(str(f))
                box.press("Enter")
                expect(page.locator("h1")).to_have_text(f"Feature {f}")
                expect(page.get_by_test_id("stStatusWidget")).to_have_count(0)  # the rerun has finished drawing
                times.append(time.perf_counter() - start)
            browser.close()
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(20)
    slowest = max(range(len(times)), key=times.__getitem__)
    print(f"switch, real browser (type id -> drawn):     {quantiles(times)}; the slowest was switch {slowest + 1}")


def bench_open_wide(model, tmp: Path, d_sae: int, tokens: int = 4096) -> None:
    """An untrained TopK SAE of `d_sae` features indexed on `tokens` tokens, then opened as the app opens it."""
    sae = SAE(
        SAEConfig(
            architecture="topk",
            d_in=model.cfg.d_model,
            d_sae=d_sae,
            k=32,
            metadata={"model_name": None, "hook_name": "blocks.6.hook_resid_post", "holdout_fraction": 0.25},
        )
    )
    sae.set_decoder_norm_to_unit_norm()
    sae.save(tmp / "wide" / "sae")
    start = time.perf_counter()
    build_index(IndexConfig(sae=tmp / "wide", tokens=tokens, progress=False), model=model)
    built = time.perf_counter() - start
    start = time.perf_counter()
    ix = FeatureIndex(tmp / "wide" / "index")
    _ = ix.summary
    opened = time.perf_counter() - start
    start = time.perf_counter()
    ix.feature(d_sae // 2)
    one = time.perf_counter() - start
    print(
        f"open a {d_sae:,}-feature index: meta + vocab + summary {1000 * opened:.0f} ms, then one feature {1000 * one:.1f} ms "
        f"(built in {built:.0f} s on {tokens:,} tokens)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sae", type=Path, default=None, help="index this run/SAE dir instead of training a 16k SAE")
    ap.add_argument("--tokens", type=int, default=100_000)
    ap.add_argument("--switches", type=int, default=30)
    ap.add_argument(
        "--wide", type=int, default=49152, help="features of the untrained SAE whose index is opened (0: skip)"
    )
    ap.add_argument("--screenshot", type=Path, default=None, help="save the feature page as this PNG")
    ap.add_argument("--feature", type=int, default=None, help="the feature shown first (and in the screenshot)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default 2; --smoke: 1)")
    ap.add_argument("--no-browser", action="store_true", help="skip the real-browser part (headless Chromium)")
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="CI smoke run: a 1024-feature SAE trained for 4 steps, 2k tokens, 3 switches, a 2k-feature wide index",
    )
    args = ap.parse_args()
    harvest = HarvestConfig(holdout_fraction=0.25)
    if args.smoke:  # one thread: a CI machine is often shared, and oversubscribed torch threads spin
        args.tokens, args.switches, args.wide = min(args.tokens, 2048), min(args.switches, 3), min(args.wide, 2048)
        harvest = HarvestConfig(holdout_fraction=0.25, context_size=64)
    args.threads = args.threads or (1 if args.smoke else 2)
    torch.set_num_threads(args.threads)
    model = load_model(device="cpu")
    tmp = Path(tempfile.mkdtemp(prefix="sae-kit-browse-bench-"))
    run = args.sae
    if run is None:
        run = tmp / "sae"
        if args.smoke:
            cfg = TrainRunConfig(
                out=run,
                d_sae=1024,
                k=32,
                eval_tokens=256,
                buffer_tokens=1024,
                progress=False,
                harvest=harvest,
                train=TrainConfig(batch_size=256, tokens=1024, warmup_steps=2),
            )
        else:
            cfg = TrainRunConfig(
                out=run,
                d_sae=16384,
                k=32,
                eval_tokens=4096,
                progress=False,
                harvest=harvest,
                train=TrainConfig(tokens=40960, warmup_steps=2),
            )
        train(cfg, model=model)
    print(f"machine: {torch.get_num_threads()} torch threads, {os.cpu_count()} cores, torch {torch.__version__}")
    bench_index(model, run, args.tokens, 2048 if args.smoke else 16384)
    bench_reads(run / "index", 20 if args.smoke else 200)
    bench_app(run, args.switches)
    browser = not args.no_browser and os.path.exists(CHROMIUM) and importlib.util.find_spec("playwright") is not None
    if browser:
        bench_browser(run, args.switches, args.screenshot, args.feature)
    else:
        print(
            f"switch, real browser: skipped ({'--no-browser' if args.no_browser else f'needs {CHROMIUM} and playwright'})"
        )
    if args.wide:
        bench_open_wide(model, tmp, args.wide, 1024 if args.smoke else 4096)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
