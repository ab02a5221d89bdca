"""Throughput and token cost of `sae-kit explain` and `sae-kit score` on the local backend (SmolLM2-135M-Instruct).

    python benchmarks/autointerp.py [--features 16] [--run RUN] [--threads 2] [--price-prompt 0.15 --price-completion 0.60]
    python benchmarks/autointerp.py --smoke   # CI: 2 features, 4 random negatives, 1 test context per band,
                                              # 2 intervention prompts of 2 tokens, an SAE trained for 8 steps, 1 thread

Without --run it first trains a small TopK SAE (k 16, 4x expansion, contexts of 64) briefly on SmolLM2 layer-6
residuals and indexes it on 5,000 held-out tokens (how well it is trained does not change what a feature costs).
With --run it benchmarks a copy of that indexed run (its sae/ and index/, in a temporary directory, so the run's
own autointerp results are never touched). In one run, on --features live features (drawn at random among those
firing --min-count+ times on the indexed tokens), it measures:
  explain       `explain`: one explainer request per feature (the top contexts, up to 80 completion tokens);
  detection     `score --scorers detection --force`: one judge request per test excerpt (activating + random);
  fuzz          `score --scorers fuzz --force`: one judge request per excerpt (correct, misplaced, random marks);
  intervention  `score --scorers intervention --force`: the steering-strength search, clean and steered greedy
                continuations of the prompts, and one A/B judge request per prompt.
For each: wall seconds of the call (SAE load, negatives pool and steering setup included), features per minute,
judge requests, prompt and completion tokens per feature (as explain.json / score.json count them: SmolLM2's
tokenizer and chat template; an API model's tokenizer counts somewhat differently), and what 1000 features would
cost at an example API price (--price-prompt / --price-completion, $ per 1M tokens; not any provider's actual
price). Where the time goes is measured by wrapping the judge client and the library's pool and steering methods.
The response cache is off, so every request is generated; both models load once, outside the timings.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from sae_kit import HarvestConfig, load_model, rundir
from sae_kit.autointerp import run as ai_run
from sae_kit.autointerp import scorers, store
from sae_kit.autointerp.clients import LocalClient
from sae_kit.autointerp.examples import ExampleConfig
from sae_kit.autointerp.run import ExplainConfig, ScoreConfig, explain, score
from sae_kit.autointerp.types import Request
from sae_kit.dashboards.indexer import IndexConfig, build_index
from sae_kit.sae_io import load_sae
from sae_kit.training import TrainConfig
from sae_kit.training.run import TrainRunConfig, train

SCORERS = ("detection", "fuzz", "intervention")


class Timed:
    """Seconds spent in named callables, summed over calls, while `wrap`ped (restored by `restore`)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._undo: list[tuple[object, str, object]] = []

    def wrap(self, owner: object, attr: str, label: str) -> None:
        inner = getattr(owner, attr)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds[label] += time.perf_counter() - start

        self._undo.append((owner, attr, inner))
        setattr(owner, attr, timed)

    def restore(self) -> None:
        for owner, attr, inner in reversed(self._undo):
            setattr(owner, attr, inner)
        self._undo.clear()


class TimedClient:
    """The judge, with its wall time and request count (what `explain` / `score` see of it is unchanged)."""

    def __init__(self, inner: LocalClient) -> None:
        self.inner, self.model_name, self.batch_size = inner, inner.model_name, inner.batch_size
        self.seconds, self.requests = 0.0, 0

    @property
    def usage(self) -> dict[str, int]:
        return self.inner.usage

    def complete(self, requests: Sequence[Request]):
        start = time.perf_counter()
        try:
            return self.inner.complete(requests)
        finally:
            self.seconds += time.perf_counter() - start
            self.requests += len(requests)


@contextmanager
def instrumented():
    """Time the negatives pool (re-encoding held-out rows) and the intervention's steering work while inside."""
    t = Timed()
    t.wrap(ai_run, "build_pool", "negatives pool")
    t.wrap(scorers.Steerer, "__init__", "clean continuations")
    t.wrap(scorers.Steerer, "strength", "strength search")
    t.wrap(scorers.Steerer, "steered", "steered continuations")
    try:
        yield t.seconds
    finally:
        t.restore()


def prepare(args, tmp: Path, model) -> Path:
    """A trained and indexed run under `tmp` (or a copy of --run's SAE and index)."""
    out = tmp / "run"
    if args.run is not None:
        found = rundir.resolve((args.run,))
        if len(found) != 1:
            raise SystemExit(f"--run {args.run} holds {len(found)} SAEs; pass one member's run directory")
        loc = found[0]
        if not (loc.index_dir / "index.json").is_file():
            raise SystemExit(f"{loc.run_dir} has no index; run first: sae-kit index {loc.run_dir}")
        shutil.copytree(loc.sae_dir, out / "sae")
        shutil.copytree(loc.index_dir, out / "index", ignore=shutil.ignore_patterns(store.DIR))
        return out
    smoke = args.smoke
    train(
        TrainRunConfig(
            out=out,
            harvest=HarvestConfig(context_size=64),
            k=16,
            expansion_factor=2 if smoke else 4,
            eval_tokens=256 if smoke else 512,
            buffer_tokens=1024 if smoke else 4096,
            progress=False,
            train=TrainConfig(
                batch_size=256 if smoke else 512, tokens=256 * 8 if smoke else 512 * 16, lr=2e-3, warmup_steps=2
            ),
        ),
        model=model,
    )
    build_index(IndexConfig(sae=out, tokens=args.index_tokens, progress=False), model=model)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--features", type=int, default=16, help="live features to explain and score")
    ap.add_argument("--min-count", type=int, default=None, help="features must fire this often (default 10; smoke 4)")
    ap.add_argument(
        "--run", type=Path, default=None, help="benchmark a copy of this indexed run instead of training one"
    )
    ap.add_argument("--index-tokens", type=int, default=None, help="held-out tokens indexed (default 5000; smoke 1500)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default 2; --smoke: 1)")
    ap.add_argument("--batch-size", type=int, default=8, help="local backend: prompts per batched forward")
    ap.add_argument("--price-prompt", type=float, default=0.15, help="example price, $ per 1M prompt tokens")
    ap.add_argument("--price-completion", type=float, default=0.60, help="example price, $ per 1M completion tokens")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="CI smoke run: 2 features, 4 random negatives, 1 context per band, 2 intervention prompts of 2 tokens",
    )
    args = ap.parse_args()
    args.threads = args.threads or (1 if args.smoke else 2)  # --smoke: a shared CI machine, where spinning threads cost
    args.min_count = args.min_count if args.min_count is not None else (4 if args.smoke else 10)
    args.index_tokens = args.index_tokens or (1500 if args.smoke else 5000)
    if args.smoke:
        args.features = min(args.features, 2)
    torch.set_num_threads(args.threads)
    examples = ExampleConfig(seed=args.seed)
    prompts, gen_tokens = scorers.PROMPTS, 8
    if args.smoke:
        examples = ExampleConfig(n_random=4, test_per_band=1, seed=args.seed)
        prompts, gen_tokens = scorers.PROMPTS[:2], 2

    tmp = Path(tempfile.mkdtemp(prefix="sae-kit-autointerp-bench-"))
    try:
        if args.run is not None:
            name = load_sae(rundir.resolve((args.run,))[0].sae_dir).cfg.metadata.get("model_name")
            model = load_model(name, device="cpu")
        else:
            model = load_model(device="cpu")
        t = time.perf_counter()
        run = prepare(args, tmp, model)
        setup_s = time.perf_counter() - t
        local = LocalClient(device="cpu", batch_size=args.batch_size, cache=None)  # no cache: nothing is free
        local.complete([Request((("user", "Say hi."),), max_tokens=2)])  # warm-up, outside the timings
        stages: list[dict] = []
        out = store.folder(run / "index")

        with instrumented() as where:
            judge = TimedClient(local)
            t = time.perf_counter()
            explain(
                ExplainConfig(
                    run=run, n=args.features, min_count=args.min_count, examples=examples, force=True, progress=False
                ),
                client=judge,
            )
            meta = json.loads((out / store.EXPLAIN_META).read_text())
            n = meta["explained"] + meta["failures"]
            stages.append(
                stage("explain", n, time.perf_counter() - t, judge, meta["tokens"], dict(where), ok=meta["explained"])
            )
            for name in SCORERS:
                where.clear()
                judge = TimedClient(local)
                t = time.perf_counter()
                score(
                    ScoreConfig(
                        run=run,
                        scorers=(name,),
                        examples=examples,
                        intervention_prompts=prompts,
                        intervention_tokens=gen_tokens,
                        device="cpu",
                        force=True,
                        progress=False,
                    ),
                    model=model,
                    client=judge,
                )
                meta = json.loads((out / store.SCORE_META).read_text())
                n = len(meta["identity"]["features"])
                stages.append(stage(name, n, time.perf_counter() - t, judge, meta["tokens"], dict(where)))
        report(args, run, stages, setup_s, examples, prompts, gen_tokens)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def stage(name: str, n: int, seconds: float, judge: TimedClient, tokens: dict, where: dict, ok: int | None = None):
    return {
        "stage": name,
        "features": n,
        "ok": ok,
        "seconds": seconds,
        "judge_s": judge.seconds,
        "requests": judge.requests,
        "prompt": tokens["prompt"],
        "completion": tokens["completion"],
        "where": where,
    }


def report(args, run: Path, stages: list[dict], setup_s: float, examples, prompts, gen_tokens) -> None:
    cfg = load_sae(run / "sae").cfg
    index = json.loads((run / "index" / "index.json").read_text())
    print(
        f"\nmachine: {torch.get_num_threads()} threads, torch {torch.__version__}; SAE d_sae {cfg.d_sae} k {cfg.k} at "
        f"{cfg.metadata.get('model_name')} {cfg.metadata.get('hook_name')}, indexed on {index['tokens']:,} "
        f"tokens ({'--run copy' if args.run else f'trained and indexed in {setup_s:.0f} s'}); judge and explainer "
        f"SmolLM2-135M-Instruct (local backend, batch {args.batch_size}, no response cache)"
    )
    print(
        f"examples: explain_top {examples.explain_top}, test_per_band {examples.test_per_band}, n_random "
        f"{examples.n_random}, n_hard {examples.n_hard}; intervention: {len(prompts)} prompts x {gen_tokens} tokens"
    )
    pin, pout = args.price_prompt, args.price_completion
    print(f"example price (not a quote): ${pin:g} / 1M prompt tokens, ${pout:g} / 1M completion tokens\n")
    head = (
        f"{'stage':<14}{'features':>9}{'seconds':>10}{'features/min':>14}{'requests/feature':>18}"
        f"{'prompt tok/feature':>20}{'completion tok/feature':>24}{'$ per 1000 features':>21}"
    )
    print(head)
    print("-" * len(head))
    total = {"seconds_per_feature": 0.0, "prompt": 0.0, "completion": 0.0, "requests": 0.0}
    for s in stages:
        n = max(s["features"], 1)
        p, c, r = s["prompt"] / n, s["completion"] / n, s["requests"] / n
        price = 1000 * (p * pin + c * pout) / 1e6
        print(
            f"{s['stage']:<14}{s['features']:>9}{s['seconds']:>10.1f}{60 * s['features'] / s['seconds']:>14.2f}"
            f"{r:>18.1f}{p:>20.1f}{c:>24.1f}{price:>21.3f}"
        )
        total["seconds_per_feature"] += s["seconds"] / n
        total["prompt"] += p
        total["completion"] += c
        total["requests"] += r
    price = 1000 * (total["prompt"] * pin + total["completion"] * pout) / 1e6
    print(
        f"{'all four':<14}{'':>9}{'':>10}{60 / total['seconds_per_feature']:>14.2f}{total['requests']:>18.1f}"
        f"{total['prompt']:>20.1f}{total['completion']:>24.1f}{price:>21.3f}"
    )
    print("\nwhere the time goes (seconds of the stage):")
    for s in stages:
        parts = [f"judge {s['judge_s']:.1f} s ({100 * s['judge_s'] / s['seconds']:.0f}%)"]
        parts += [f"{k} {v:.1f} s ({100 * v / s['seconds']:.0f}%)" for k, v in s["where"].items() if v > 0]
        rest = s["seconds"] - s["judge_s"] - sum(s["where"].values())
        parts.append(f"other {rest:.1f} s")
        print(f"  {s['stage']:<13} " + ", ".join(parts))
    ex = stages[0]
    if ex["ok"] is not None and ex["ok"] < ex["features"]:
        print(f"note: {ex['features'] - ex['ok']} explanations could not be parsed and were not scored")


if __name__ == "__main__":
    main()
