"""`Trainer`: one SAE's optimiser, schedule, losses, decoder constraint and dead-latent statistics, step by step.

A step: scale the batch (optional input normalisation), encode and decode, add the rule's reconstruction loss (MSE
over the data variance), the aux loss on dead or underused latents and the rule's own penalties, backpropagate, remove
the gradient component parallel to each atom, clip, take an Adam step on fp32 master weights, renormalise the atoms,
and let the rule tidy its state. Everything architecture-specific is a hook on the rule (sae_kit.sparsifiers.base).

No host synchronisation per step: on a GPU the host queues step after step while the device works, and any read of
a device value (`.item()`, `float(t)`, `bool(t)`, `nonzero`, a boolean mask) would stall that queue. So a step's
metrics stay on the device (`StepMetrics` reads them all at once when someone looks), and the trainer reads device
state on the host only every `TrainConfig.sync_every` steps (`Trainer.sync`): the non-finite check and the aux
loss's candidate latents. A step whose loss is NaN/inf has its gradients zeroed (the weights stay finite), and so do
the steps after it, until the next sync raises `NonFiniteError` naming the step it happened at. The rules themselves
may sync where their maths needs it (tests/test_step_sync.py lists which do).

Under data parallelism (torchrun; sae_kit.distributed) each rank steps on its own rows of the global batch, and the
trainer reduces what must be global, through functions that are no-ops in one process: the initialisation sample and
the calibration batches are the gathered global batches, the gradients are averaged over ranks in one flattened
all-reduce (carrying the ranks' non-finite flags), the feature counts behind the dead-latent statistics are summed,
and a sync agrees on the first rank and step that went non-finite. Every rank then holds the same weights.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from sae_kit import distributed
from sae_kit.errors import SaeKitError
from sae_kit.models import resolve_dtype
from sae_kit.sae import SAE, dtype_name
from sae_kit.sparsifiers import StepContext
from sae_kit.training import losses


class NonFiniteError(SaeKitError):
    """NaN or inf in a batch or a loss: training stops, and the last good SAE stays saved."""


@dataclass
class TrainConfig:
    """Optimisation settings shared by every architecture."""

    lr: float | None = None
    """Adam learning rate (None: 2e-4 / sqrt(d_sae / 2^14), the BatchTopK paper's width rule)."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """Adam (beta1, beta2)."""
    adam_eps: float = 6.25e-10
    """Adam epsilon (Gao et al.'s value: the normalised loss has small gradients)."""
    batch_size: int = 4096
    """Tokens per optimiser step."""
    tokens: int = 400_000
    """Training tokens; sets the number of steps and the LR schedule."""
    warmup_steps: int = 50
    """Linear LR warm-up steps."""
    decay: Literal["linear", "cosine", "none"] = "linear"
    """LR decay to zero over the last `decay_fraction` of the steps."""
    decay_fraction: float = 0.2
    """Fraction of the run, at its end, over which the LR decays."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0: off)."""
    b_dec_init: Literal["geometric_median", "mean", "zeros"] = "geometric_median"
    """How b_dec starts, from the first batch."""
    normalize_activations: bool = True
    """Train on x·s with s = sqrt(d_in)/E||x|| (from the first batch); s is folded into the saved weights."""
    aux: Literal["auto", "auxk", "zipf", "none"] = "auto"
    """Aux loss for dead/underused latents: auto = the rule's default (auxk for the encoder top-k and batch rules,
    none for relu, jumprelu and mpsae); zipf = aux_zipf_loss on a windowed density."""
    aux_coef: float = 1 / 32
    """Coefficient α of the aux loss."""
    k_aux: int | None = None
    """Latents the aux loss may use per token (None: d_in / 2)."""
    compute_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Precision of the SAE's forward pass. bfloat16: the forward runs under bf16 autocast (the encoder GEMM, and the
    dense rules' codes and decoder) while master weights, gradients and Adam state stay float32; the sparse rules
    choose their support from the bf16 pre-activations and compute the kept values exactly in float32. auto:
    bfloat16 where the device has fast bf16 (a CUDA GPU with bf16, a CPU with AVX-512 BF16 or AMX), else float32.
    Recorded in the SAE's metadata as training_compute_dtype."""
    dead_tokens: int | None = None
    """A latent is dead after this many tokens without firing (None: min(10M, tokens / 10)); also the window of the
    density that aux_zipf reads and its grace period."""
    sync_every: int = 10
    """Steps between the trainer's host reads of device state: the non-finite check (a NaN/inf is reported at the
    next such step, its gradients and those of the steps between zeroed) and the aux loss's candidate set (the dead
    latents for auxk, the underused ones and their weights for zipf), which is refreshed then. Every other step
    queues its work on the device without waiting for it."""

    def check(self) -> None:
        """One-line errors for settings that cannot work, before any work starts."""
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise SaeKitError(f"--lr must be positive, got {self.lr}")
        if self.batch_size < 1 or self.tokens < self.batch_size:
            raise SaeKitError(f"need --tokens ({self.tokens}) >= --batch-size ({self.batch_size}) >= 1")
        if not 0 <= self.decay_fraction <= 1 or self.warmup_steps < 0 or self.grad_clip < 0:
            raise SaeKitError("decay_fraction must be in [0, 1], warmup_steps and grad_clip non-negative")
        if self.sync_every < 1:
            raise SaeKitError(f"--sync-every must be positive, got {self.sync_every}")


class StepMetrics(Mapping[str, float]):
    """One step's metrics. The values stay on the device until the first lookup, which reads them all to the host
    in one transfer (one synchronisation), so a training loop that logs every n steps waits for the device only then."""

    def __init__(self, device_values: dict[str, Tensor], host_values: dict[str, float]) -> None:
        self._device, self._host = device_values, dict(host_values)

    def mean_over_ranks(self) -> StepMetrics:
        """The metrics averaged over the ranks of a data-parallel run (each rank's are means over its own rows of
        the global batch): one all-reduce of the device values. A collective: every rank calls it at the same step."""
        if not distributed.world().distributed or not self._device:
            return self
        names = list(self._device)
        stacked = torch.stack([self._device[n].detach().reshape(()).to(torch.float64) for n in names])
        stacked = distributed.all_reduce_sum_(stacked) / distributed.world().world_size
        return StepMetrics(dict(zip(names, stacked.unbind())), self._host)

    def _read(self) -> dict[str, float]:
        if self._device:
            names = list(self._device)
            values = torch.stack([self._device[n].detach().reshape(()).to(torch.float64) for n in names]).tolist()
            self._host |= dict(zip(names, values))
            self._device = {}
        return self._host

    def __getitem__(self, name: str) -> float:
        return self._read()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._read())

    def __len__(self) -> int:
        return len(self._read())


class Trainer:
    """Trains one SAE with `step(x)`; holds everything a resumed run needs besides the data position."""

    def __init__(self, sae: SAE, cfg: TrainConfig) -> None:
        cfg.check()
        self.sae, self.cfg = sae, cfg
        self.rule = sae.sparsifier
        self.total_steps = cfg.tokens // cfg.batch_size
        self.lr = cfg.lr or 2e-4 / math.sqrt(sae.cfg.d_sae / 2**14)
        self.aux = cfg.aux if cfg.aux != "auto" else self.rule.default_aux
        if self.aux != "none" and not sae.cfg.rule.uses_encoder:
            raise SaeKitError(
                f"--aux {self.aux} ranks latents by encoder pre-activations, and {sae.cfg.architecture} has no encoder; use --aux none"
            )
        self.dead_tokens = cfg.dead_tokens or min(10_000_000, max(cfg.tokens // 10, cfg.batch_size))
        self.opt = torch.optim.Adam(self._param_groups(), lr=self.lr, betas=cfg.adam_betas, eps=cfg.adam_eps)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, self.lr_factor)
        device = sae.W_dec.device
        if device.type == "cuda":  # TF32 tensor cores for the fp32 products (the bf16 autocast ones are unaffected)
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.step_count = 0
        self.tokens_seen = 0
        self.tokens_since_fired = torch.zeros(sae.cfg.d_sae, dtype=torch.int64, device=device)
        self.fired_count = torch.zeros(sae.cfg.d_sae, dtype=torch.int64, device=device)
        self.density_ema = torch.zeros(sae.cfg.d_sae, dtype=torch.float64, device=device)
        """Firing frequency over about the last `dead_tokens` tokens (an EMA, bias-corrected in `recent_density`)."""
        self.scale = 1.0
        self.data_var = 1.0
        self.initialised = False
        self.first_bad_step = torch.full((), -1, dtype=torch.int64, device=device)
        """The first step whose loss was NaN/inf (-1: none yet), read on the host by `sync`."""
        self.aux_candidates = torch.zeros(0, dtype=torch.int64, device=device)
        """The latents the aux loss may use (dead for auxk, underused for zipf), as of the last `sync`."""
        self.aux_weights: Tensor | None = None
        """aux_zipf's underuse weights [d_sae] as of the last `sync` (None for auxk)."""
        self.compute_dtype = (
            resolve_compute_dtype(cfg.compute_dtype, device) if sae.W_dec.dtype == torch.float32 else sae.W_dec.dtype
        )
        """The forward's precision: cfg.compute_dtype resolved (bfloat16: under autocast) for an fp32 SAE; the
        parameters' own dtype for any other (a float64 SAE trains exactly in float64)."""
        sae.cfg.metadata["training_compute_dtype"] = dtype_name(self.compute_dtype)

    def _param_groups(self) -> list[dict[str, Any]]:
        """One Adam group for the shared weights, one per rule parameter with its own LR multiplier (rule.lr_scales)."""
        scales = self.rule.lr_scales()
        own = {id(p): name for name, p in self.rule.named_parameters() if name in scales}
        groups: list[dict[str, Any]] = [{"params": [p for p in self.sae.parameters() if id(p) not in own]}]
        groups += [{"params": [p], "lr": self.lr * scales[own[id(p)]]} for p in self.rule.parameters() if id(p) in own]
        return groups

    def lr_factor(self, step: int) -> float:
        """LR multiplier at `step`: linear warm-up, flat, then decay to zero over the last decay_fraction."""
        cfg = self.cfg
        warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
        decay_start = self.total_steps * (1 - cfg.decay_fraction)
        if cfg.decay == "none" or step < decay_start or cfg.decay_fraction == 0:
            return warm
        progress = min(1.0, (step - decay_start) / max(1.0, self.total_steps - decay_start))
        return warm * ((1 - progress) if cfg.decay == "linear" else 0.5 * (1 + math.cos(math.pi * progress)))

    @torch.no_grad()
    def init_from_sample(self, x: Tensor) -> None:
        """Set the input scale, the data variance (loss normaliser) and b_dec from a sample [N, d_in]."""
        x = x.to(self.sae.W_dec.device, torch.float32)
        _check_finite(x, "the initialisation sample")
        if self.cfg.normalize_activations:
            self.scale = float(math.sqrt(x.shape[-1]) / x.norm(dim=-1).mean().clamp_min(1e-12))
        x = x * self.scale
        self.data_var = float((x - x.mean(0)).square().sum(-1).mean().clamp_min(1e-12))
        if self.cfg.b_dec_init != "zeros":
            self.sae.init_b_dec(x, self.cfg.b_dec_init)
        self.rule.init_from_sample(self.sae, x)
        self.initialised = True

    @property
    def dead_mask(self) -> Tensor:
        """Latents that have not fired for `dead_tokens` tokens."""
        return self.tokens_since_fired >= self.dead_tokens

    def recent_density(self) -> Tensor:
        """Per-latent firing frequency over about the last `dead_tokens` tokens (bias-corrected EMA)."""
        decay = 1 - self.cfg.batch_size / self.dead_tokens
        return (
            (self.density_ema / (1 - decay**self.step_count)).float() if self.step_count else self.density_ema.float()
        )

    def step(self, x: Tensor, grad: Tensor | None = None) -> StepMetrics:
        """One optimiser step on x [B, d_in] (and dCE/dx for g-SAE); returns the step's metrics (read lazily)."""
        if not self.initialised:
            self.init_from_sample(distributed.gather_rows(x.to(self.sae.W_dec.device, torch.float32)))  # global batch
        sae, cfg = self.sae, self.cfg
        sae.train()
        x = x.to(sae.W_dec.device, torch.float32) * self.scale
        if grad is not None:
            grad = grad.to(x.device, torch.float32)
        low = self.compute_dtype != sae.W_dec.dtype
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=low):
            out = sae(x, grad=grad)
            codes = out.codes
            ctx = StepContext(x=x, out=out, data_var=self.data_var, step=self.step_count, total_steps=self.total_steps)
            rec = self.rule.reconstruction_loss(sae, ctx).float()
            loss = rec
            aux = torch.zeros((), device=x.device)
            # aux_zipf waits one dead window, as AuxK does by construction (no latent is dead sooner): before it the
            # windowed density is not measured yet, and a density from step 0 would call every latent dead.
            residual = x - out.x_hat.float()
            if self.aux != "none" and self.aux_candidates.numel():
                aux = losses.auxk_loss(
                    codes, residual, sae.W_dec, self.aux_candidates, cfg.k_aux, cfg.aux_coef, self.aux_weights
                )
            loss = loss + aux.float()
            penalties = self.rule.penalties(sae, ctx)
            for term in penalties.values():
                loss = loss + term.float()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        # A NaN/inf loss (a bad batch, a diverging run) must not reach the weights, and checking it on the host would
        # stall the device every step: from the first bad step on, the gradients are zeroed; `sync` raises.
        fine = torch.isfinite(loss) & (self.first_bad_step < 0)
        self.first_bad_step = torch.where(fine | (self.first_bad_step >= 0), self.first_bad_step, self.step_count)
        fine = distributed.all_reduce_grads(list(sae.parameters()), fine)  # mean gradients; fine on every rank
        for p in sae.parameters():
            if p.grad is not None:
                p.grad.masked_fill_(~fine, 0.0)
        sae.remove_gradient_parallel_to_decoder_directions()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
        self.opt.step()
        self.sched.step()
        sae.set_decoder_norm_to_unit_norm()
        self.rule.after_step(sae)
        with torch.no_grad():
            counts = distributed.all_reduce_sum_(codes.feature_counts())  # over the global batch
            rows = x.shape[0] * distributed.world().world_size
            self.fired_count += counts
            decay = 1 - cfg.batch_size / self.dead_tokens
            self.density_ema.mul_(decay).add_(counts.double() / rows, alpha=1 - decay)
            self.tokens_since_fired = torch.where(counts > 0, 0, self.tokens_since_fired + rows)
            self.tokens_seen += rows
            self.step_count += 1
            err = (out.x_hat.float() - x).square().sum()
            on_device = {
                "loss": loss.detach(),
                "mse_norm": rec.detach(),
                "aux": aux.detach(),
                "fvu": err / (x - x.mean(0)).square().sum().clamp_min(1e-12),
                "l0": codes.l0().float().mean(),
                "dead_frac": self.dead_mask.float().mean(),
            }
            on_device |= {name: term.detach() for name, term in penalties.items()}
            if codes.inference_l0 is not None:
                on_device["inference_l0"] = torch.as_tensor(codes.inference_l0)
            host = {"step": self.step_count, "tokens": self.tokens_seen, "lr": float(self.sched.get_last_lr()[0])}
        if self.step_count % cfg.sync_every == 0:
            self.sync()
        return StepMetrics(on_device, host)

    @torch.no_grad()
    def sync(self) -> None:
        """Read the device state the host needs: raise NonFiniteError for a NaN/inf loss since the last sync, and
        refresh the aux loss's candidates. Runs every `sync_every` steps, and before a checkpoint or an export."""
        self.sync_finite()
        if self.aux == "zipf" and self.tokens_seen >= self.dead_tokens:
            self.aux_weights = losses.zipf_underuse_weights(self.recent_density())
            self.aux_candidates = (self.aux_weights > 0).nonzero().squeeze(1)
        elif self.aux == "auxk":
            self.aux_candidates = self.dead_mask.nonzero().squeeze(1)

    def state(self) -> tuple[dict[str, Tensor], dict]:
        """Everything `load_state` needs to continue bit for bit: (tensors, JSON-able counters). A NaN/inf since the
        last sync raises NonFiniteError here, so no checkpoint holds a failed state."""
        self.sync_finite()
        tensors = {f"sae/{k}": v for k, v in self.sae.state_dict().items()}
        for name, p in self.sae.named_parameters():
            tensors |= {f"adam/{name}/{k}": v for k, v in self.opt.state.get(p, {}).items()}
        tensors |= {
            "tokens_since_fired": self.tokens_since_fired,
            "fired_count": self.fired_count,
            "density_ema": self.density_ema,
            "aux/candidates": self.aux_candidates,
        }
        if self.aux_weights is not None:
            tensors["aux/weights"] = self.aux_weights
        meta = {
            "step_count": self.step_count,
            "tokens_seen": self.tokens_seen,
            "scale": self.scale,
            "data_var": self.data_var,
            "initialised": self.initialised,
            "lr": [g["lr"] for g in self.opt.param_groups],
            "scheduler": self.sched.state_dict(),
        }
        return tensors, meta

    @torch.no_grad()
    def load_state(self, tensors: dict[str, Tensor], meta: dict) -> None:
        """Continue from `state()` output, taken from a trainer built with the same SAE and TrainConfig."""
        device = self.sae.W_dec.device
        self.sae.load_state_dict({k.removeprefix("sae/"): v for k, v in tensors.items() if k.startswith("sae/")})
        for name, p in self.sae.named_parameters():
            moments = {k.removeprefix(f"adam/{name}/"): v for k, v in tensors.items() if k.startswith(f"adam/{name}/")}
            if moments:
                self.opt.state[p] = {k: v.to(device) if k != "step" else v.clone() for k, v in moments.items()}
        self.tokens_since_fired = tensors["tokens_since_fired"].to(device)
        self.fired_count = tensors["fired_count"].to(device)
        self.density_ema = tensors["density_ema"].to(device)
        if "aux/candidates" in tensors:
            self.aux_candidates = tensors["aux/candidates"].to(device)
            weights = tensors.get("aux/weights")
            self.aux_weights = None if weights is None else weights.to(device)
        else:  # a checkpoint from before the candidates were state: they are what a sync would find now
            self.sync()
        self.step_count, self.tokens_seen = meta["step_count"], meta["tokens_seen"]
        self.scale, self.data_var, self.initialised = meta["scale"], meta["data_var"], meta["initialised"]
        for group, lr in zip(self.opt.param_groups, meta["lr"]):
            group["lr"] = lr
        self.sched.load_state_dict(meta["scheduler"])

    def density(self) -> Tensor:
        """Training-time firing frequency of every latent [d_sae]."""
        return self.fired_count.float() / max(1, self.tokens_seen)

    @torch.no_grad()
    def calibrate(self, batches: list[Tensor]) -> None:
        """End of training: let the rule fit its inference state on raw training batches (scaled here as in training)."""
        device = self.sae.W_dec.device
        self.sae.eval()
        # the global batches under data parallelism: the thresholds come out as in one process
        self.rule.calibrate(
            self.sae, [distributed.gather_rows(b.to(device, torch.float32)) * self.scale for b in batches]
        )

    def sync_finite(self) -> None:
        """Raise NonFiniteError if a step since the last sync had a NaN/inf loss (one host read). Under data
        parallelism a collective: every rank raises, naming the rank (and step) that went bad first."""
        bad, rank = (int(v) for v in distributed.first_failure(self.first_bad_step))  # the host read
        if bad >= 0:
            where = f"rank {rank}: " if distributed.world().distributed else ""
            raise NonFiniteError(
                f"{where}the loss became NaN/inf at step {bad} (a NaN/inf in that batch, or a diverging run); "
                "lower --lr or check the activation source (a corrupt cache shard, a broken model dtype)"
            )

    def export(self) -> SAE:
        """A copy of the SAE that takes raw activations: the input scale folded in, eval mode, densities attached."""
        import copy

        sae = copy.deepcopy(self.sae)
        if self.scale != 1.0:
            sae.fold_activation_scale(self.scale)
        sae.sparsity = self.density().clamp_min(1e-10).log10().cpu()
        sae.cfg.metadata["training_dead_latents"] = int(self.dead_mask.sum())
        sae.cfg.metadata["training_tokens"] = self.tokens_seen
        return sae.eval()


def resolve_compute_dtype(setting: str, device: torch.device | str) -> torch.dtype:
    """The autocast dtype of `TrainConfig.compute_dtype` on `device` ("auto": bfloat16 where it is fast there)."""
    return resolve_dtype(setting, device, "--compute-dtype", ("float32", "bfloat16"))


def _check_finite(x: Tensor, what: str) -> None:
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).any(-1).sum())
        raise NonFiniteError(
            f"{what} holds NaN/inf in {bad} rows; check the activation source (a corrupt cache shard, a broken model dtype)"
        )
