"""Wall time of `sae-kit eval` for a 16k-latent SAE on 100k held-out tokens, section by section.

    python benchmarks/eval.py [--tokens 100000] [--d-sae 16384] [--sae DIR] [--threads 2]
    python benchmarks/eval.py --smoke   # CI: a 1024-latent SAE trained for 4 steps, every section on 10k tokens (dark matter needs them), 1 thread

Without --sae it first trains a TopK SAE (k 32, d_sae 16384) briefly on layer-6 residuals of SmolLM2, with a quarter
of the documents held out (the default 5% of the default corpus holds ~31k evaluation tokens); the timing does not
depend on how well it is trained. The evaluation runs with the default settings of every section; the
model is loaded once, outside the timing.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from sae_kit import HarvestConfig, load_model
from sae_kit.eval.core import CoreConfig
from sae_kit.eval.dark_matter import DarkMatterConfig
from sae_kit.eval.evaluate import EvalConfig, evaluate
from sae_kit.eval.steering import SteeringConfig
from sae_kit.training import TrainConfig
from sae_kit.training.run import TrainRunConfig, train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=100_000)
    ap.add_argument("--d-sae", type=int, default=16384)
    ap.add_argument("--sae", type=Path, default=None, help="evaluate this SAE/run dir instead of training one")
    ap.add_argument("--train-tokens", type=int, default=40960)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default 2; --smoke: 1)")
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="CI smoke run: a 1024-latent SAE trained for 4 steps, every section with tiny settings on 10k tokens",
    )
    args = ap.parse_args()
    args.threads = args.threads or (
        1 if args.smoke else 2
    )  # --smoke: a shared CI machine, where spinning threads cost 10x
    torch.set_num_threads(args.threads)
    model = load_model(device="cpu")
    tmp = Path(tempfile.mkdtemp(prefix="sae-kit-eval-bench-"))
    sae_dir = args.sae
    # A quarter of the documents held out, so the held-out split has well over 100k tokens to evaluate on.
    harvest = HarvestConfig(holdout_fraction=0.25, context_size=64 if args.smoke else 128)
    if sae_dir is None:
        sae_dir = tmp / "sae"
        if args.smoke:
            run = TrainRunConfig(
                out=sae_dir,
                d_sae=1024,
                k=32,
                eval_tokens=256,
                buffer_tokens=1024,
                progress=False,
                harvest=harvest,
                train=TrainConfig(batch_size=256, tokens=1024, warmup_steps=2),
            )
        else:
            run = TrainRunConfig(
                out=sae_dir,
                d_sae=args.d_sae,
                k=32,
                eval_tokens=4096,
                progress=False,
                harvest=harvest,
                train=TrainConfig(tokens=args.train_tokens, warmup_steps=2),
            )
        train(run, model=model)
    settings = EvalConfig(saes=(sae_dir,), out=tmp / "eval", tokens=args.tokens)
    if args.smoke:
        settings = EvalConfig(
            saes=(sae_dir,),
            out=tmp / "eval",
            tokens=10000,
            png=False,
            core=CoreConfig(ce_tokens=256),
            dark_matter=DarkMatterConfig(ce_tokens=256),
            steering=SteeringConfig(n_features=2, alphas=(1.0, 4.0), contexts=2, generate_tokens=4),
        )
    start = time.perf_counter()
    report = evaluate(settings, model=model)
    total = time.perf_counter() - start
    sae = report["saes"][0]
    print(
        f"machine: {torch.get_num_threads()} threads, torch {torch.__version__}; SAE {sae['architecture']} d_sae {sae['d_sae']} "
        f"k {sae['k']} at {sae['hook']}; {report['settings']['tokens']:,} held-out tokens"
    )
    for name, seconds in sae["seconds"].items():
        print(f"  {name:<12} {seconds:7.1f} s")
    print(f"  {'total':<12} {total:7.1f} s ({total / 60:.1f} min, report and figures included)")
    print("\n".join(sae["summary"]))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
