"""Wall time of `sae-kit reproduce`, stage by stage: where the hour of the full run goes.

    python benchmarks/reproduce.py [--out DIR] [--quick]   # the full run (about an hour on 2 cores), or --quick
    python benchmarks/reproduce.py --smoke [--out DIR]     # CI: the --quick size on 1 thread (a few minutes)

It calls sae_kit.eval.reproduce (the command's own code) and prints each stage's seconds and its share of the run,
grouped as harvest / train / eval / auto-interp, from the stages.json the run writes; a rerun on the same --out
resumes and prints the recorded times (CI's smoke test points --out at the quick run tests/test_reproduce.py made,
so the quick run happens once per CI run). The full run's figures are in docs/reproduce.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch

from sae_kit import load_model
from sae_kit.eval.reproduce import ReproduceConfig, reproduce


def table(stages: dict) -> str:
    total = sum(v["seconds"] for v in stages.values()) or 1.0
    groups: dict[str, float] = {}
    lines = [f"{'stage':<44} {'seconds':>9} {'share':>7}"]
    for name, v in stages.items():
        kind = name.split("/")[0].replace("cache-grads", "cache")
        groups[kind] = groups.get(kind, 0.0) + v["seconds"]
        lines.append(f"{name:<44} {v['seconds']:>9.1f} {100 * v['seconds'] / total:>6.1f}%")
    lines.append("")
    for kind, seconds in groups.items():
        lines.append(f"{kind:<44} {seconds:>9.1f} {100 * seconds / total:>6.1f}%")
    lines.append(f"{'total':<44} {total:>9.1f} ({total / 60:.1f} min)")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help="reproduce directory (default: a temporary one)")
    ap.add_argument("--quick", action="store_true", help="the command's --quick size")
    ap.add_argument("--smoke", action="store_true", help="CI: the --quick size on 1 thread")
    args = ap.parse_args()
    if args.smoke:
        torch.set_num_threads(1)  # a shared CI machine
    tmp = None
    out = args.out
    if out is None:
        tmp = Path(tempfile.mkdtemp(prefix="sae-kit-reproduce-bench-"))
        out = tmp / "run"
    try:
        cfg = ReproduceConfig(out=out, quick=args.quick or args.smoke, progress=False)
        report = reproduce(cfg, model=load_model(device="cpu"))
        stages = json.loads((out / "stages.json").read_text())
        print(table(stages))
        verdicts = [c["verdict"] for p in report["papers"].values() for c in p["claims"]]
        print(f"\n{len(report['papers'])} papers, {len(verdicts)} claims; report: {out / 'report.md'}")
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
