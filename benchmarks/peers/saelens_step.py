"""SAELens's TopK training step, run inside the SAELens venv by `benchmarks/train_step.py`.

    <venv>/bin/python benchmarks/peers/saelens_step.py --mode quality --data acts.safetensors --out r.json [--lr-scale 1]
    <venv>/bin/python benchmarks/peers/saelens_step.py --mode serve --data acts.safetensors   # see common.py

What one step is, exactly as SAELens trains it (`sae_lens.training.sae_trainer.SAETrainer.fit`): the trainer's own
`maybe_reset_sparsity()` + `step(batch)`, i.e. `TopKTrainingSAE.training_forward_pass` (x − b_dec, the dense
encoder GEMM, pre-activations rescaled by ||W_dec||, torch.topk, a dense [B, d_sae] code, the dense decoder GEMM,
MSE summed over d_in and averaged over tokens, the AuxK term over dead latents), the dead-latent bookkeeping,
backward, `clip_grad_norm_(1.0)`, Adam, the LR scheduler.

Everything else is a SAELens default (`TopKTrainingSAEConfig`, `SAETrainerConfig`,
`LanguageModelSAERunnerConfig`): lr 3e-4 (lr_end lr/10, unused by the constant schedule), Adam β (0.9, 0.999),
no warm-up or decay, rescale_acts_by_decoder_norm=True, decoder_init_norm=0.1, W_enc = W_decᵀ, b_dec = 0
(SAELens 6 has no geometric-median init), aux_loss_coefficient 1.0, dead_feature_window 1000 steps (so the AuxK
term stays zero in runs shorter than that), use_sparse_activations=False, no autocast, fp32.
"""

from __future__ import annotations

from importlib.metadata import version

import torch
from common import batch_at, heldout_eval, load_data, parse_args, serve, write_result
from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.config import SAETrainerConfig
from sae_lens.training.sae_trainer import SAETrainer

DEFAULT_LR = 3e-4
"""LanguageModelSAERunnerConfig.lr (SAELens does not scale it with the width)."""


def main() -> None:
    args = parse_args(__doc__)
    train, heldout = load_data(args.data, args.steps * args.batch if args.mode == "serve" else None)
    d_in = train.shape[1]
    lr = args.lr or DEFAULT_LR * args.lr_scale
    n_steps = args.steps  # serve mode: the number of steps the driver will ask for
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_in, d_sae=args.d_sae, k=args.k, dtype="float32", device="cpu"))
    trainer = SAETrainer(
        cfg=SAETrainerConfig(
            total_training_samples=n_steps * args.batch,
            train_batch_size_samples=args.batch,
            lr=lr,
            lr_end=lr / 10,
            device="cpu",
        ),
        sae=sae,
        data_provider=iter(()),  # batches are fed to trainer.step directly
    )

    def step(i: int) -> None:
        # The body of SAETrainer.fit's loop, without its wandb logging and checkpointing (both off by default).
        trainer.maybe_reset_sparsity()
        trainer.step(batch_at(train, i, args.batch))
        trainer.n_training_steps += 1

    result = {"library": "sae-lens", "version": version("sae-lens"), "lr": lr}
    if args.mode == "serve":
        serve(step, result)
        return
    for i in range(args.steps):
        step(i)
    sae.eval()

    def encode_decode(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        acts = sae.encode(x)
        return sae.decode(acts), (acts > 0).nonzero()[:, 1]

    result |= heldout_eval(encode_decode, heldout, args.d_sae)
    write_result(args, result)


if __name__ == "__main__":
    main()
