"""Sparse kernels: the encoder and decoder of every rule that selects a sparse set of (token, latent) pairs.

Plain torch (CPU or CUDA, no compiled extension). A code is a set of pairs held as a CSR pattern over the
[N, F] code matrix: `crow` [N + 1] (token n owns pairs crow[n]:crow[n + 1]) and `cols` [P] (their latents). The
fixed-k rules have crow = 0, k, 2k, … (`fixed_crow`); the batch rules (Mutual and Feature Choice) have ragged rows.
With P pairs, every kernel costs O(P·d) instead of the O(N·F·d) of a dense GEMM, and none builds an [N, F]
gradient.

- `encode_preacts(xc, W_enc, b_enc)`: the dense pre-activations z = xc·W_enc + b_enc [N, F] outside autograd, the
  rules' selection score. Under bf16 autocast z comes out in bf16 (the fast GEMM).
- `pair_preacts(xc, W_enc, b_enc, z, crow, cols)` / `gather_preacts(..., indices)`: z at the pairs, differentiable.
  When z holds them in the weights' dtype they are gathered from it; when z is lower precision (autocast) they are
  recomputed exactly in the weights' dtype by a sampled dense-dense product (SDDMM: xc[n]·W_enc[:, f] + b_enc[f]
  at the pairs only), so a code is exact given its support. The backward, with S the [N, F] CSR matrix of the
  upstream gradient: grad xc = S·W_encᵀ, grad W_enc = (Sᵀ·xc)ᵀ, grad b_enc = column sums of S.
- `pair_decode(values, crow, cols, W_dec)` / `sparse_decode(values, indices, W_dec)`: x̂ = V·W_dec (no bias),
  V the CSR code; forward by embedding_bag, backward grad values = grad x̂[n]·W_dec[f] at the pairs (embedding_bag's
  fused per-sample-weights kernel) and
  grad W_dec = Vᵀ·grad x̂. A latent may repeat within a token (MP-SAE): the values add up.

Every product is one sparse BLAS call (MKL on CPU, cuSPARSE on CUDA), so a step runs a handful of large kernels,
which keeps it fast when other processes share the cores (the per-slot loops these replace ran k small parallel
regions each, and slowed 3–17x next to a second job). The kernels run outside autocast in the weights' dtype.
BENCHMARKS.md has the measurements.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor


def fixed_crow(n: int, k: int, device: torch.device | str) -> Tensor:
    """The CSR row offsets of a code with exactly k pairs per token: 0, k, 2k, …, n·k."""
    return torch.arange(0, n * k + 1, k, device=device)


def rows_of(crow: Tensor, n_pairs: int | None = None) -> Tensor:
    """The token of every pair [P] (non-decreasing) from the row offsets. Pass P (the pairs' length, known on the
    host) when you have it: without it the output size is read from the device, a host synchronisation on a GPU."""
    return torch.repeat_interleave(torch.arange(len(crow) - 1, device=crow.device), crow.diff(), output_size=n_pairs)


def _csr(crow: Tensor, cols: Tensor, values: Tensor, n_cols: int) -> Tensor:
    with warnings.catch_warnings():  # torch warns once that CSR support is "in beta"; it is what we rely on
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, cols, values, (len(crow) - 1, n_cols), check_invariants=False)


def _csr_t(crow: Tensor, cols: Tensor, values: Tensor, n_cols: int) -> Tensor:
    """Sᵀ [F, N] of the CSR matrix S [N, F] as a CSR matrix of its own: one stable sort of the pairs by latent.
    (torch's `S.t()` is a CSC view that products convert back through a COO round trip, which stalled for up to a
    second when another job shared the cores.)"""
    order = cols.argsort(stable=True)
    crow_t = torch.zeros(n_cols + 1, dtype=crow.dtype, device=crow.device)
    crow_t[1:] = torch.bincount(cols, minlength=n_cols).cumsum(0)
    return _csr(crow_t, rows_of(crow, len(values))[order], values[order], len(crow) - 1)


def _sddmm(crow: Tensor, cols: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """(a·b)[n, f] at the pairs [P]: a [N, d], b [d, F]."""
    pattern = _csr(crow, cols, a.new_zeros(cols.shape), b.shape[1])
    return torch.sparse.sampled_addmm(pattern, a, b).values()


def _no_autocast(t: Tensor):
    return torch.autocast(t.device.type, enabled=False)


@torch.no_grad()
def encode_preacts(xc: Tensor, W_enc: Tensor, b_enc: Tensor) -> Tensor:
    """Pre-activations z = xc·W_enc + b_enc [N, F], without an autograd graph (bf16 under bf16 autocast)."""
    return torch.addmm(b_enc, xc, W_enc)


def column_preacts(xc: Tensor, W_enc: Tensor, b_enc: Tensor, latents: Tensor) -> Tensor:
    """xc·W_enc[:, latents] + b_enc[latents] [N, j]: every token's pre-activations at a few latents, as one dense
    product in the weights' dtype outside autocast (exact), differentiable by ordinary autograd. Cheaper than
    `pair_preacts` over the same N·j pairs whenever j is small (the aux losses' dead latents)."""
    with _no_autocast(xc):
        return torch.addmm(b_enc[latents], xc.to(W_enc.dtype), W_enc[:, latents])


class _PairPreacts(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, xc: Tensor, W_enc: Tensor, b_enc: Tensor, crow: Tensor, cols: Tensor, known: Tensor | None
    ) -> Tensor:
        with _no_autocast(xc):
            xc = xc.to(W_enc.dtype)
            if known is None:
                known = _sddmm(crow, cols, xc, W_enc) + b_enc[cols]
        ctx.save_for_backward(xc, W_enc, crow, cols)
        return known

    @staticmethod
    def backward(ctx, grad: Tensor):
        xc, W_enc, crow, cols = ctx.saved_tensors
        grad = grad.contiguous().to(W_enc.dtype)
        grad_xc = grad_W = grad_b = None
        with _no_autocast(grad):  # a backward called inside autocast would cast these products to bf16
            S = _csr(crow, cols, grad, W_enc.shape[1])
            if ctx.needs_input_grad[0]:
                grad_xc = S @ W_enc.t()
            if ctx.needs_input_grad[1]:
                grad_W = (_csr_t(crow, cols, grad, W_enc.shape[1]) @ xc).t()
            if ctx.needs_input_grad[2]:
                grad_b = grad.new_zeros(W_enc.shape[1]).index_add_(0, cols, grad)
        return grad_xc, grad_W, grad_b, None, None, None


def pair_preacts(xc: Tensor, W_enc: Tensor, b_enc: Tensor, z: Tensor | None, crow: Tensor, cols: Tensor) -> Tensor:
    """z at the pairs [P] (CSR pattern crow, cols), differentiable; the backward touches only those latents.

    `z` = encode_preacts(xc, W_enc, b_enc): the values are gathered from it when it is in the weights' dtype, and
    recomputed exactly otherwise (a bf16 z from autocast only chose the pairs), or when z is None. Latents must not
    repeat within a token for grad W_enc / b_enc to match the dense reference (they then do, up to summation order).
    """
    known = None
    if z is not None and z.dtype == W_enc.dtype:
        known = z.detach()[rows_of(crow, len(cols)), cols]
    return _PairPreacts.apply(xc, W_enc, b_enc, crow, cols, known)


def gather_preacts(xc: Tensor, W_enc: Tensor, b_enc: Tensor, z: Tensor | None, indices: Tensor) -> Tensor:
    """z[n, indices[n, j]] [N, k] (z = encode_preacts(xc, W_enc, b_enc)), differentiable with a sparse backward;
    exact in the weights' dtype even when z is a bf16 selection score (see `pair_preacts`)."""
    n, k = indices.shape
    known = None
    if z is not None and z.dtype == W_enc.dtype:
        known = z.detach().gather(1, indices).flatten()
    crow = fixed_crow(n, k, indices.device)
    return _PairPreacts.apply(xc, W_enc, b_enc, crow, indices.flatten(), known).view(n, k)


class _PairDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values: Tensor, crow: Tensor, cols: Tensor, W_dec: Tensor) -> Tensor:
        with _no_autocast(W_dec):
            values = values.to(W_dec.dtype)
            out = F.embedding_bag(cols, W_dec, crow[:-1], mode="sum", per_sample_weights=values)
        ctx.save_for_backward(values, crow, cols, W_dec)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        values, crow, cols, W_dec = ctx.saved_tensors
        grad = grad.contiguous().to(W_dec.dtype)
        grad_values = grad_W = None
        with _no_autocast(grad):
            if ctx.needs_input_grad[0]:  # grad[n]·W_dec[col] per pair: embedding_bag's fused kernel (repeats allowed)
                grad_values = torch.ops.aten._embedding_bag_per_sample_weights_backward(
                    grad, W_dec, cols, crow[:-1], rows_of(crow, len(cols)), 0, -1
                )
            if ctx.needs_input_grad[3]:
                grad_W = _csr_t(crow, cols, values, W_dec.shape[0]) @ grad
        return grad_values, None, None, grad_W


def pair_decode(values: Tensor, crow: Tensor, cols: Tensor, W_dec: Tensor) -> Tensor:
    """Σ over token n's pairs of values·W_dec[col] [N, d] (no bias), N = len(crow) − 1; exact against the dense
    code times W_dec, in W_dec's dtype."""
    return _PairDecode.apply(values.contiguous(), crow, cols.contiguous(), W_dec)


def sparse_decode(values: Tensor, indices: Tensor, W_dec: Tensor) -> Tensor:
    """Σ_j values[n, j]·W_dec[indices[n, j]] [N, d] (no bias); exact against scatter-to-dense then `@ W_dec`."""
    n, k = indices.shape
    return pair_decode(values.reshape(-1), fixed_crow(n, k, indices.device), indices.reshape(-1), W_dec)
