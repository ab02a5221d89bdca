"""What the peer step scripts share: the command line, the data file, the step server and the held-out FVU.

Imported by `saelens_step.py` and `sparsify_step.py`, which run inside the peers' own venvs (see
`benchmarks/train_step.py`), so it needs only torch and safetensors, never sae_kit.

The data file is a plain safetensors file with `train` [N, d_in] and `heldout` [M, d_in] fp32 tensors, the rows of
`train` already in the order every library reads them (batch i is rows [i·B, (i+1)·B), wrapping around).

Two modes. `serve`: build the SAE and optimiser, print `@@ {json}` (version, lr, ...), then for every stdin line
`step I` run training step I on batch I and print `@@ {"s": seconds}`, until stdin closes; `train_step.py` drives
all libraries this way, one step each in turn, so that load from other processes hits them alike. `quality`: train
--steps steps, write the held-out FVU to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor


def parse_args(description: str) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument(
        "--mode",
        choices=("serve", "quality"),
        required=True,
        help="serve: time steps on request (see above); quality: train --steps steps, report held-out FVU",
    )
    ap.add_argument("--data", type=Path, required=True, help="safetensors file with `train` and `heldout` tensors")
    ap.add_argument("--out", type=Path, default=None, help="quality mode: the JSON result file to write")
    ap.add_argument("--d-sae", type=int, default=9216)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--steps", type=int, default=200, help="training steps (serve mode: how many will be asked for; sets schedules)"
    )
    ap.add_argument("--lr", type=float, default=None, help="learning rate (default: the library's own default)")
    ap.add_argument("--lr-scale", type=float, default=1.0, help="multiply the library's default learning rate by this")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variant", default="default", help="a library-specific variant (see the script)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    return args


def load_data(path: Path, rows: int | None = None) -> tuple[Tensor, Tensor]:
    """(train, heldout) from the data file; only the first `rows` train rows when given (serve mode's steps)."""
    with safe_open(str(path), "pt") as f:
        train = f.get_slice("train")[:rows] if rows is not None else f.get_tensor("train")
        heldout = f.get_tensor("heldout")
    return train.float().contiguous(), heldout.float().contiguous()


def batch_at(train: Tensor, step: int, batch: int) -> Tensor:
    """Batch number `step`: rows [step·B, (step+1)·B) of `train`, wrapping around at the end."""
    start = (step * batch) % train.shape[0]
    rows = train[start : start + batch]
    if rows.shape[0] < batch:
        rows = torch.cat([rows, train[: batch - rows.shape[0]]])
    return rows


def reply(obj: dict[str, Any]) -> None:
    print("@@ " + json.dumps(obj), flush=True)


def serve(step: Callable[[int], Any], info: dict[str, Any]) -> None:
    """Announce `info`, then time step(I) for every `step I` line on stdin, until stdin closes."""
    reply({"torch": torch.__version__, "threads": torch.get_num_threads(), **info})
    for line in sys.stdin:
        i = int(line.split()[1])
        t = time.perf_counter()
        step(i)
        reply({"s": time.perf_counter() - t})


@torch.no_grad()
def heldout_eval(
    encode_decode: Callable[[Tensor], tuple[Tensor, Tensor]], heldout: Tensor, d_sae: int, chunk: int = 4096
) -> dict[str, float]:
    """Held-out FVU = Σ||x − x̂||² / Σ||x − mean(x)||² over all held-out rows (not a mean of batch FVUs), and the
    fraction of latents that never fire on them. `encode_decode(x)` returns (x̂ [n, d_in], active indices [n, k])."""
    err, fired = 0.0, torch.zeros(d_sae, dtype=torch.bool)
    for i in range(0, heldout.shape[0], chunk):
        x = heldout[i : i + chunk]
        x_hat, active = encode_decode(x)
        err += float((x_hat.float() - x).double().square().sum())
        fired[active.flatten()] = True
    total = float((heldout.double() - heldout.double().mean(0)).square().sum())
    return {"fvu": err / total, "dead_frac": 1 - float(fired.float().mean())}


def write_result(args: argparse.Namespace, result: dict[str, Any]) -> None:
    result = {
        "mode": args.mode,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "steps": args.steps,
        "d_sae": args.d_sae,
        "k": args.k,
        "batch": args.batch,
        "variant": args.variant,
        **result,
    }
    args.out.write_text(json.dumps(result, indent=1))
