"""EleutherAI sparsify's TopK training step, run inside the sparsify venv by `benchmarks/train_step.py`.

    <venv>/bin/python benchmarks/peers/sparsify_step.py --mode quality --data acts.safetensors --out r.json [--variant adam]
    <venv>/bin/python benchmarks/peers/sparsify_step.py --mode serve --data acts.safetensors   # see common.py

sparsify's `Trainer` only trains from a live HF model through forward hooks, so this script builds its pieces
itself and runs the body of `Trainer.fit` for `loss_fn="fvu"` on a batch of activations, in the same order:
b_dec = batch mean on the first step; `set_decoder_norm_to_unit_norm()`; `SparseCoder.forward(x, y=x,
dead_mask, total_variance)` (x − b_dec, `fused_encoder`: the dense encoder GEMM + ReLU + torch.topk with an
index_add backward, then the embedding_bag decoder `decoder_impl` (the eager one: Triton is CPU-less), FVU
against the batch variance); the did-fire update; `loss = fvu + auxk_alpha·auxk + multi_topk_fvu/8`, backward;
`remove_gradient_parallel_to_decoder_directions()`; optimiser step, zero_grad, scheduler; the dead-latent counters.

Everything else is a sparsify 1.3 default (`SparseCoderConfig`, `TrainConfig`): `--variant default` is the
`signum` optimiser (SignSGD in schedulefree's ScheduleFreeWrapper, momentum 0.95) at lr 5e-3/sqrt(d_sae/2^14),
auxk_alpha 0 (so no AuxK pass), normalize_decoder=True, encoder = nn.Linear init, W_dec = unit-norm copy of the
encoder weight, torch.manual_seed(0) before the init (init_seeds=[0]), `torch.set_float32_matmul_precision("high")`
as `fit` sets it (no effect on CPU: the fp32 GEMM is bit-identical). `--variant adam` uses sparsify's `adam` branch instead: torch.optim.Adam (bitsandbytes is not
installed) at lr 2e-4/sqrt(d_sae/2^14) with a linear schedule over 1000 warm-up steps.
"""

from __future__ import annotations

import os
from importlib.metadata import version

os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")

import torch
from common import batch_at, heldout_eval, load_data, parse_args, serve, write_result
from schedulefree import ScheduleFreeWrapper
from sparsify import SparseCoder, SparseCoderConfig
from sparsify.sign_sgd import SignSGD
from transformers import get_linear_schedule_with_warmup

AUXK_ALPHA = 0.0
"""TrainConfig.auxk_alpha (off by default in sparsify 1.x)."""
DEAD_FEATURE_THRESHOLD = 10_000_000
"""TrainConfig.dead_feature_threshold, in tokens."""


def main() -> None:
    args = parse_args(__doc__)
    torch.set_float32_matmul_precision("high")
    train, heldout = load_data(args.data, args.steps * args.batch if args.mode == "serve" else None)
    d_in = train.shape[1]
    n_steps = args.steps  # serve mode: the number of steps the driver will ask for
    sae = SparseCoder(d_in, SparseCoderConfig(num_latents=args.d_sae, k=args.k), "cpu", dtype=torch.float32)
    width_scale = (sae.num_latents / 2**14) ** 0.5
    schedulers = []
    if args.variant == "default":
        lr = args.lr or 5e-3 / width_scale * args.lr_scale
        optimizer = ScheduleFreeWrapper(SignSGD([dict(params=sae.parameters(), lr=lr)]), momentum=0.95)
        optimizer.train()
    elif args.variant == "adam":
        lr = args.lr or 2e-4 / width_scale * args.lr_scale
        optimizer = torch.optim.Adam([dict(params=sae.parameters(), lr=lr)])
        schedulers.append(get_linear_schedule_with_warmup(optimizer, 1000, n_steps))
    else:
        raise SystemExit(f"unknown --variant {args.variant!r}; use default or adam")
    tokens_since_fired = torch.zeros(sae.num_latents, dtype=torch.long)
    did_fire = torch.zeros(sae.num_latents, dtype=torch.bool)
    fvu_log = []

    def step(i: int) -> None:
        x = batch_at(train, i, args.batch)
        if i == 0:
            sae.b_dec.data = x.mean(0)
        sae.set_decoder_norm_to_unit_norm()
        dead_mask = tokens_since_fired > DEAD_FEATURE_THRESHOLD if AUXK_ALPHA > 0 else None
        total_variance = (x - x.mean(0)).pow(2).sum()
        out = sae(x=x, y=x, dead_mask=dead_mask, total_variance=total_variance)
        did_fire[out.latent_indices.flatten()] = True
        fvu_log.append(float(out.fvu.detach()))
        loss = out.fvu + AUXK_ALPHA * out.auxk_loss + out.multi_topk_fvu / 8
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        optimizer.zero_grad()
        for scheduler in schedulers:
            scheduler.step()
        with torch.no_grad():
            tokens_since_fired.add_(x.shape[0])
            tokens_since_fired[did_fire] = 0
            did_fire.zero_()

    result = {"library": "eai-sparsify", "version": version("eai-sparsify"), "lr": lr}
    if args.mode == "serve":
        serve(step, result)
        return
    for i in range(args.steps):
        step(i)
    if isinstance(optimizer, ScheduleFreeWrapper):
        optimizer.eval()  # schedule-free evaluates at its averaged iterate, as sparsify's checkpoints do

    def encode_decode(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        acts, indices, _ = sae.encode(x)
        return sae.decode(acts, indices), indices[acts > 0]

    result |= heldout_eval(encode_decode, heldout, args.d_sae)
    result["train_fvu_curve"] = fvu_log[::10] + fvu_log[-1:]
    write_result(args, result)


if __name__ == "__main__":
    main()
