"""Every architecture's training step against TopK's, in one run, in bf16 compute and in fp32.

    python benchmarks/rules.py                  # full run: d_sae 9216, batch 4096, 8 timed steps each (~10 min)
    python benchmarks/rules.py --smoke          # CI: d_sae 1024, batch 512, 2 timed steps, 1 thread (under a minute)
    more: --threads 2  --steps 8  --rules topk mutual_choice ...  --dtypes bfloat16 float32  --json out.json
          --quality-steps N (also train every rule N steps in each dtype and compare held-out FVU and L0; 0: skip)

Setting: d_in 576 (SmolLM2-135M-Instruct, blocks.6.hook_resid_post), d_sae 9216, k 32, batch 4096 tokens of real
activations (the same file as benchmarks/train_step.py, built on first use), 2 threads. Each contender is
`Trainer.step` with every default of its rule (its aux loss, penalties, threshold updates), on a long run so that
no latent is dead yet (no AuxK pass); g-SAE steps with a fixed random stand-in for dCE/dx (the gradient harvest is
timed by benchmarks/harvest.py) and is left out of the quality part. The contenders take turns of 1 untimed + 2 timed steps in a rotating order,
so load from other processes hits them alike; figures are medians. The targets (issue 13): Mutual Choice and Feature
Choice ≤ 2.5x the TopK step, MP-SAE (k 32) ≤ 8x, each in the same compute dtype.

The quality part trains every rule for --quality-steps steps on the same rows in each compute dtype (calibrating the
batch rules' thresholds as `sae-kit train` does) and reports the held-out FVU and L0 of each, evaluated in fp32: what
the bf16 default costs, rule by rule.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file

from sae_kit import SAE, SAEConfig
from sae_kit.training import TrainConfig, Trainer
from sae_kit.training.run import heldout_metrics

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "peers"))
from common import batch_at  # noqa: E402
from train_step import activations_file  # noqa: E402  (the benchmark data, shared with the TopK step benchmark)

RULES = ("topk", "abstopk", "gsae", "mutual_choice", "feature_choice", "mpsae", "relu", "jumprelu", "gated")
TARGETS = {"mutual_choice": 2.5, "feature_choice": 2.5, "mpsae": 8.0}
"""Step time as a multiple of the TopK step (same dtype, same run) that the rule must stay within."""
PER_TURN = 2


def trainer(rule: str, d_in: int, d_sae: int, batch: int, dtype: str, sample: torch.Tensor) -> Trainer:
    torch.manual_seed(0)
    t = Trainer(
        SAE(SAEConfig(architecture=rule, d_in=d_in, d_sae=d_sae, k=32)),
        TrainConfig(batch_size=batch, tokens=10**9, compute_dtype=dtype),  # type: ignore[arg-type]
    )
    t.init_from_sample(sample)
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CI: d_sae 1024, batch 512, 2 timed steps, 1 thread")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default 2; --smoke 1)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per contender (default 8; --smoke 2)")
    ap.add_argument("--rules", nargs="+", default=list(RULES), help="architectures to time (topk is always added)")
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], help="compute dtypes to time")
    ap.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    ap.add_argument(
        "--quality-steps", type=int, default=None, help="steps of the bf16-vs-fp32 quality run (default 0; smoke 3)"
    )
    args = ap.parse_args()
    d_sae, batch = (1024, 512) if args.smoke else (9216, 4096)
    threads = args.threads or (1 if args.smoke else 2)
    steps = args.steps or (2 if args.smoke else 8)
    torch.set_num_threads(threads)
    rules = ["topk"] + [r for r in args.rules if r != "topk"]
    tmp = tempfile.TemporaryDirectory(prefix="sae-kit-rules-smoke-") if args.smoke else None
    tokens = batch * (steps + 4) if args.smoke else 200 * 4096  # the full run shares train_step.py's default file
    data, _, _ = activations_file(
        tokens, 1024 if args.smoke else 28672, 0, threads, Path(tmp.name) if tmp else None, 64 if args.smoke else 128
    )
    tensors = load_file(str(data))
    train, heldout = tensors["train"], tensors["heldout"]
    d_in = train.shape[1]
    noise = torch.randn(batch, d_in, generator=torch.Generator().manual_seed(0))  # g-SAE's dCE/dx stand-in (timing)
    contenders: dict[str, Callable[[int], None]] = {}
    for dtype in args.dtypes:
        for rule in rules:
            t = trainer(rule, d_in, d_sae, batch, dtype, train[:batch])
            g = noise if t.rule.uses_grad else None
            contenders[f"{rule}:{dtype}"] = lambda i, t=t, g=g: t.step(batch_at(train, i, batch), g)  # type: ignore[misc]
    print(
        f"timing {len(contenders)} contenders x {steps} steps (turns of 1 untimed + {PER_TURN}), d_in {d_in}, "
        f"d_sae {d_sae}, k 32, batch {batch}, {threads} threads",
        flush=True,
    )
    times: dict[str, list[float]] = {key: [] for key in contenders}
    done = dict.fromkeys(contenders, 0)
    for turn in range(math.ceil(steps / PER_TURN)):
        names = list(contenders)
        for key in names[turn % len(names) :] + names[: turn % len(names)]:
            for j in range(1 + min(PER_TURN, steps - len(times[key]))):
                start = time.perf_counter()
                contenders[key](done[key])
                done[key] += 1
                if j:
                    times[key].append(time.perf_counter() - start)
    median = {key: statistics.median(v) for key, v in times.items()}
    print(f"\n{'rule':<16}" + "".join(f"{d + ' s/step':>18}{'x topk':>8}" for d in args.dtypes) + "  target")
    checks = []
    for rule in rules:
        row = f"{rule:<16}"
        for dtype in args.dtypes:
            ratio = median[f"{rule}:{dtype}"] / median[f"topk:{dtype}"]
            row += f"{median[f'{rule}:{dtype}']:>18.3f}{ratio:>7.2f}x"
            if rule in TARGETS:
                checks.append((f"{rule} step / topk step ({dtype})", ratio, TARGETS[rule]))
        print(row + (f"  <= {TARGETS[rule]}x topk" if rule in TARGETS else ""))
    if len(args.dtypes) > 1:
        base = args.dtypes[-1]
        for dtype in args.dtypes[:-1]:
            speedup = median[f"topk:{base}"] / median[f"topk:{dtype}"]
            print(f"topk step in {dtype}: {speedup:.2f}x faster than in {base}")
    print("\ntargets:")
    for what, ratio, target in checks:
        print(f"  {what:<44}{ratio:>7.2f}x  (target <= {target}x)  {'met' if ratio <= target else 'SHORT'}")
    quality_steps = args.quality_steps if args.quality_steps is not None else (3 if args.smoke else 0)
    quality = {}
    if quality_steps:
        print(f"\n[quality] {quality_steps} steps x {batch} rows per rule and dtype; held-out FVU / L0 in fp32 eval")
        print(f"{'rule':<16}" + "".join(f"{d + ' FVU':>16}{'L0':>7}" for d in args.dtypes) + f"{'FVU diff':>10}")
        for rule in (r for r in rules if not SAEConfig(architecture=r, d_in=1, d_sae=1, k=1).rule.uses_grad):
            row, fvus = f"{rule:<16}", []
            for dtype in args.dtypes:
                t = trainer(rule, d_in, d_sae, batch, dtype, train[:batch])
                t = Trainer(t.sae, dataclasses.replace(t.cfg, tokens=quality_steps * batch))
                t.init_from_sample(train[:batch])
                for i in range(quality_steps):
                    t.step(batch_at(train, i, batch))
                t.calibrate([batch_at(train, quality_steps + i, batch) for i in range(t.rule.calibration_batches())])
                m = quality[f"{rule}:{dtype}"] = heldout_metrics(t.export(), heldout)
                fvus.append(m["fvu"])
                row += f"{m['fvu']:>16.4f}{m['l0']:>7.1f}"
            print(row + (f"{fvus[0] - fvus[-1]:>+10.4f}" if len(fvus) > 1 else ""), flush=True)
    if args.json:
        args.json.write_text(
            json.dumps({"median_s": median, "times": times, "threads": threads, "quality": quality}, indent=1)
        )
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
