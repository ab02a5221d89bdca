"""Training losses shared by every architecture: reconstruction and AuxK / aux_zipf (dead and dying latents).

A rule's own penalties (ReLU's L1, JumpReLU's L0, Gated's auxiliary reconstruction, Matryoshka's nested losses) live
in its file under sae_kit/sparsifiers/.

Dead-latent tracking belongs to the trainer: the aux losses take a dead mask or a density vector. They read what
they need from the `Codes` of `SAE.forward_codes` (pre-activations, a differentiable `preact`, and `signed` for
rules such as AbsTopK that keep negative codes), so no loss branches on the architecture name.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sae_kit import distributed
from sae_kit.kernels import sparse_decode
from sae_kit.sparsifiers import Codes

AUXK_COEF = 1 / 32
"""α of Gao et al.: total loss = reconstruction + α·AuxK."""
DENSE_AUX_FACTOR = 4
"""AuxK takes the dense path when the candidates number at most this multiple of the latents kept per token: a dense
product over c columns costs about as much as the sparse kernels over ~c/8 pairs per token on a CPU."""


def mse(x_hat: Tensor, x: Tensor) -> Tensor:
    """||x − x̂||² summed over d, averaged over tokens."""
    return (x_hat - x).square().sum(-1).mean()


def normalized_mse(x_hat: Tensor, x: Tensor, baseline: float | Tensor | None = None) -> Tensor:
    """`mse` divided by the variance of x about its mean (the batch FVU), or by a fixed `baseline` =
    mean_t ||x_t − μ||² measured once on a stats sample (the OpenAI reference's mse_scale)."""
    x = x.reshape(-1, x.shape[-1])
    denom = (x - x.mean(0)).square().sum(-1).mean() if baseline is None else baseline
    return mse(x_hat.reshape(x.shape), x) / denom


def auxk_loss(
    codes: Codes,
    residual: Tensor,
    W_dec: Tensor,
    candidates: Tensor,
    k_aux: int | None = None,
    coef: float = AUXK_COEF,
    weights: Tensor | None = None,
    dense: bool | None = None,
) -> Tensor:
    """AuxK (Gao et al. 2024): reconstruct the detached residual e = x − x̂ from the top-k_aux candidate latents.

    `candidates` are the latents it may use: a mask [d_sae] (bool; turning it into indices is a host
    synchronisation) or their indices (int64, as the trainer keeps them between syncs). Each token ranks them by z (by |z| keeping the sign when
    `codes.signed`), keeps min(k_aux, #candidates) (k_aux default d_in/2), applies ReLU (not when signed), scales
    them by `weights[i]` if given, and decodes without bias. Returns coef·||e − ê||²/||e − mean_batch(e)||²
    (the OpenAI normalisation), or 0 when there is no candidate. Gradients reach the candidates' encoder columns
    and decoder atoms. Two exact paths, the same loss and gradients: with few candidates (at most DENSE_AUX_FACTOR·k,
    typically tens of dead latents) dense products over the candidate columns (`codes.column_preacts`); else the
    sparse kernels over the N·k kept pairs. `dense` forces one (None: that rule).
    """
    if codes.z is None or codes.preact is None:
        raise ValueError("aux losses rank latents by encoder pre-activations; this rule (MP-SAE) has none")
    if candidates.dtype == torch.bool:
        candidates = candidates.nonzero().squeeze(1)
    if candidates.numel() == 0:
        return residual.new_zeros(())
    e = residual.detach().reshape(-1, W_dec.shape[1])
    k = min(k_aux or e.shape[1] // 2, candidates.numel())
    score = codes.z.index_select(1, candidates)
    if codes.signed:
        score = score.abs_()
    if dense is None:
        dense = codes.column_preacts is not None and candidates.numel() <= DENSE_AUX_FACTOR * k
    if dense:  # every token's pre-activations at the few candidates, one dense product each way
        assert codes.column_preacts is not None
        values = codes.column_preacts(candidates)
        with torch.autocast(values.device.type, enabled=False):
            if not codes.signed:
                values = values.relu()
            if k < candidates.numel():
                keep = torch.zeros_like(values, dtype=torch.bool).scatter_(1, score.topk(k, dim=-1).indices, True)
                values = values * keep
            if weights is not None:
                values = values * weights.to(values.dtype)[candidates]
            e_hat = values @ W_dec.index_select(0, candidates)
    else:
        indices = candidates[score.topk(k, dim=-1, sorted=False).indices]
        values = codes.preact(indices)
        if not codes.signed:
            values = values.relu()
        if weights is not None:
            values = values * weights.to(values.dtype)[indices]
        e_hat = sparse_decode(values, indices, W_dec)
    # the normaliser is the global batch's under data parallelism (batch_mean: e.mean(0) in one process)
    spread = distributed.batch_mean((e - distributed.batch_mean(e)).square().sum(-1))
    return coef * (e_hat - e).square().sum(-1).mean() / spread.clamp_min(1e-12)


@torch.no_grad()
def zipf_underuse_weights(density: Tensor) -> Tensor:
    """w_i = max(0, 1 − p_i/p̂_i), where p̂ is a Zipf line fitted to log density against log rank.

    `density` [d_sae] is the trainer's running per-latent firing frequency. The line is a least-squares fit over
    the latents that fired (p > 0); dead latents get w = 1. With fewer than two live latents there is no line,
    and w marks the dead ones only.
    """
    p = density.double()
    alive = p > 0
    if int(alive.sum()) < 2:
        return (~alive).to(density.dtype)
    order = p.argsort(descending=True)
    log_rank = torch.empty_like(p)
    log_rank[order] = torch.arange(1, p.numel() + 1, device=p.device, dtype=p.dtype).log()
    xs, ys = log_rank[alive], p[alive].log()
    slope = ((xs - xs.mean()) * (ys - ys.mean())).sum() / (xs - xs.mean()).square().sum().clamp_min(1e-12)
    expected = (ys.mean() + slope * (log_rank - xs.mean())).exp()
    return (1 - p / expected).clamp(0, 1).to(density.dtype)


def aux_zipf_loss(
    codes: Codes, residual: Tensor, W_dec: Tensor, density: Tensor, k_aux: int | None = None, coef: float = AUXK_COEF
) -> Tensor:
    """aux_zipf_loss (Ayonrinde 2024, as decided in algorithms.md): AuxK over the latents that fire less than the
    Zipf line predicts, each scaled by its underuse weight; equals `auxk_loss` when every underused latent is dead."""
    weights = zipf_underuse_weights(density)
    return auxk_loss(codes, residual, W_dec, weights > 0, k_aux, coef, weights)
