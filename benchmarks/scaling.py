"""How the train step, the SAE side of eval and the feature index scale with d_sae and d_in, in one run.

    python benchmarks/scaling.py            # full run: d_sae 4k → 131k at d_in 576, d_in 576 → 4096 at d_sae 4k
                                            # (~15 min and under 10 GB on 2 cores; sizes that do not fit are skipped
                                            # with a printed line)
    python benchmarks/scaling.py --smoke    # CI: d_sae 256/512 and d_in 32/64, tiny batches, 1 thread (seconds)
    more: --threads 2  --batch 2048  --tokens 8192  --steps 2  --index-max 65536  --memory-gb 10
          --widths 4096 16384 (the d_sae table's sizes; none: skip it)  --d-ins 576 4096 (the d_in table's)

Three costs, each on synthetic Gaussian rows (none of them depends on what the rows mean):
- step: `Trainer.step` of a TopK SAE (k 32; bf16 autocast, fp32 master weights and Adam state, as training runs),
  the median of `--steps` timed steps after one untimed (initialising) step;
- eval: what `sae-kit eval` does with the SAE besides the LM forwards (those do not depend on the SAE's size): one
  `heldout.encode` pass over `--tokens` rows (x̂, L0, firing counts, max |activation|: core, dead and steering read
  it), the reconstruction metrics, and steering's closest-atom search over the decoder. Dark matter is left out: its
  cost is tokens·d_in² + d_in³ in float64 (its default token budget grows with d_in), whatever d_sae is;
- index: `sae-kit index` without the LM: the codes of `--tokens` rows (the pass), then every feature's artifacts
  (statistics, histograms, contexts, logit effects over a 49,152-token vocabulary, decoder neighbours, co-firing)
  written as the real parquet shards (dashboards.indexer._write_features).
Each table gives seconds, the ratio to the smallest size, and the cost per latent (µs) and per token (µs). An SAE
whose weights and Adam state exceed --memory-gb is skipped with a line saying so, as is the index beyond
--index-max latents (its neighbour and logit passes grow as d_sae²·d_in and d_sae·vocab·d_in).
"""

from __future__ import annotations

import argparse
import gc
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import Tensor

from sae_kit.dashboards import artifacts, indexer
from sae_kit.eval.core import reconstruction
from sae_kit.eval.steering import closest_atom
from sae_kit.heldout import encode, encode_chunks
from sae_kit.sae import SAE, SAEConfig
from sae_kit.training import TrainConfig
from sae_kit.training.trainer import Trainer

K = 32
VOCAB = 49152  # SmolLM2's


def state_gb(d_in: int, d_sae: int) -> float:
    """GB an SAE in training holds: W_enc, W_dec, their gradients and two Adam moments (6 fp32 matrices), plus the
    bf16 autocast copies and the [batch, d_sae] pre-activations (about one matrix more)."""
    return 7 * d_in * d_sae * 4 / 1e9


def make_sae(d_in: int, d_sae: int) -> SAE:
    torch.manual_seed(0)
    return SAE(SAEConfig(d_in=d_in, d_sae=d_sae, k=K))


def time_step(d_in: int, d_sae: int, batch: int, steps: int) -> float:
    """Median seconds of a training step."""
    sae = make_sae(d_in, d_sae)
    trainer = Trainer(sae, TrainConfig(batch_size=batch, tokens=batch * (steps + 2), warmup_steps=1))
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(batch, d_in, generator=g) for _ in range(2)]
    trainer.step(xs[0])  # initialises the scale and b_dec; the return value (device metrics) is not read
    times = []
    for i in range(steps):
        start = time.perf_counter()
        trainer.step(xs[i % 2])
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_eval(sae: SAE, x: Tensor) -> float:
    """Seconds of the SAE side of eval on x."""
    start = time.perf_counter()
    enc = encode(sae, x)
    reconstruction(x, enc.x_hat)
    closest_atom(sae.W_dec, torch.nn.functional.normalize(x.mean(0), dim=0), signed=False)
    return time.perf_counter() - start


def time_index(sae: SAE, x: Tensor, context: int, out: Path) -> tuple[float, float]:
    """(seconds of the pass, seconds of the features stage) of the index of x's rows, as contexts of `context`."""
    start = time.perf_counter()
    feature, position, value = [], [], []
    for rows, codes in encode_chunks(sae.eval(), x):
        tok, lat, val = codes.nonzeros()
        position.append(tok + rows.start)
        feature.append(lat)
        value.append(val.float())
    R = len(x) // context
    g = torch.Generator().manual_seed(2)
    p = artifacts.Pass.from_entries(
        torch.randint(0, VOCAB, (R, context), generator=g),
        torch.ones(R, context, dtype=torch.bool),
        torch.cat(feature),
        torch.cat(position),
        torch.cat(value),
        len(x),
        sae.cfg.d_sae,
    )
    pass_s = time.perf_counter() - start
    d_in = sae.cfg.d_in
    lm = SimpleNamespace(  # what heldout.logit_lens reads of a TransformerBridge
        W_U=torch.randn(d_in, VOCAB, generator=g) / d_in**0.5,
        cfg=SimpleNamespace(normalization_type="RMSPre"),
        ln_final=SimpleNamespace(weight=torch.ones(d_in)),
    )
    cfg = indexer.IndexConfig(sae=out, progress=False)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    indexer._write_features(p, sae, lm, cfg, out, signed=False)
    features_s = time.perf_counter() - start
    shutil.rmtree(out, ignore_errors=True)
    return pass_s, features_s


def _cell(r: dict, base: dict, key: str, per_tokens: int) -> str:
    """seconds, ratio to the first size, µs per latent, µs per token (or 'skipped')."""
    if r.get(key) is None:
        return f"{'skipped':>9} {'':>7} {'':>8} {'':>8}"
    v = r[key]
    ratio = f"{v / base[key]:.2f}x" if base.get(key) else "-"
    return f"{v:9.3f} {ratio:>7} {v / r['d_sae'] * 1e6:8.2f} {v / per_tokens * 1e6:8.2f}"


def table(title: str, axis: str, rows: list[dict], tokens: int, batch: int) -> None:
    """One table: step (per batch row), eval and index (per eval row), with the index split into pass and features."""
    print(f"\n{title}")
    head = f"{'s':>9} {'ratio':>7} {'µs/lat':>8} {'µs/tok':>8}"
    print(f"{axis:>8} {'step':>4}{head[4:]} | eval{head[4:]} | index{head[5:]} {'pass s':>8} {'feat s':>8}")
    base = rows[0]
    for r in rows:
        split = f" {r['pass']:8.2f} {r['features']:8.2f}" if r.get("index") is not None else ""
        print(
            f"{r[axis]:>8} {_cell(r, base, 'step', batch)} | {_cell(r, base, 'eval', tokens)} | "
            f"{_cell(r, base, 'index', tokens)}{split}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CI: tiny sizes, 1 thread, seconds")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default 2; --smoke: 1)")
    ap.add_argument("--batch", type=int, default=None, help="training batch (default 2048; --smoke: 256)")
    ap.add_argument("--tokens", type=int, default=None, help="rows for eval and index (default 8192; --smoke: 1024)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per size (default 2; --smoke: 1)")
    ap.add_argument("--widths", type=int, nargs="*", default=None, help="d_sae sizes (default 4096 16384 65536 131072)")
    ap.add_argument("--d-ins", type=int, nargs="*", default=None, help="d_in sizes (default 576 2304 4096)")
    ap.add_argument("--index-max", type=int, default=65536, help="largest d_sae indexed")
    ap.add_argument("--memory-gb", type=float, default=10.0, help="largest training state (GB) attempted")
    args = ap.parse_args()
    smoke = args.smoke
    torch.set_num_threads(args.threads or (1 if smoke else 2))
    batch = args.batch or (256 if smoke else 2048)
    tokens = args.tokens or (1024 if smoke else 8192)
    steps = args.steps or (1 if smoke else 2)
    context = 64 if smoke else 128
    widths = args.widths if args.widths is not None else (256, 512) if smoke else (4096, 16384, 65536, 131072)
    d_ins = args.d_ins if args.d_ins is not None else (32, 64) if smoke else (576, 2304, 4096)
    base_in, base_sae = (d_ins[0] if d_ins else 576), (512 if smoke else 4096)
    print(
        f"scaling: TopK k {K}, batch {batch}, {tokens:,} eval/index rows (contexts of {context}), "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    tmp = Path(tempfile.mkdtemp(prefix="sae-kit-scaling-"))
    g = torch.Generator().manual_seed(0)
    grids = (
        (f"d_sae (d_in {base_in})", "d_sae", [(base_in, w) for w in widths]),
        (f"d_in (d_sae {base_sae})", "d_in", [(d, base_sae) for d in d_ins]),
    )
    try:
        for title, axis, sizes in grids:
            rows = []
            for d_in, d_sae in sizes:
                r: dict = {"d_in": d_in, "d_sae": d_sae}
                need = state_gb(d_in, d_sae)
                if need > args.memory_gb:
                    print(
                        f"  skip d_sae {d_sae} × d_in {d_in}: its training state is ~{need:.0f} GB "
                        f"(weights, gradients, Adam moments), over --memory-gb {args.memory_gb:g}"
                    )
                    continue
                r["step"] = time_step(d_in, d_sae, batch, steps)
                sae = make_sae(d_in, d_sae).eval()
                x = torch.randn(tokens, d_in, generator=g)
                r["eval"] = time_eval(sae, x)
                if d_sae <= args.index_max:
                    r["pass"], r["features"] = time_index(sae, x, context, tmp / f"index-{d_in}-{d_sae}")
                    r["index"] = r["pass"] + r["features"]
                else:
                    print(
                        f"  skip the index at d_sae {d_sae}: beyond --index-max {args.index_max} "
                        f"(its neighbour and logit passes grow as d_sae²·d_in and d_sae·vocab·d_in)"
                    )
                print(
                    f"  d_sae {d_sae} × d_in {d_in}: step {r['step']:.3f} s, eval {r['eval']:.3f} s"
                    + (f", index {r['index']:.2f} s" if "index" in r else ""),
                    flush=True,
                )
                rows.append(r)
                del sae, x
                gc.collect()
            if rows:
                table(f"cost against {title}", axis, rows, tokens, batch)
        print(
            "\nµs/lat: seconds per latent (flat = linear in d_sae); µs/tok: per batch row (step) or eval row. "
            "Ratios are to the first size of each table, from this one run."
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
