"""MP-SAE (Costa et al. 2025): no encoder matrix; greedy matching pursuit over the tied, unit-norm dictionary W_dec."""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from sae_kit.errors import SaeKitError
from sae_kit.sparsifiers.base import Codes, RuleConfig, Sparsifier

if TYPE_CHECKING:
    from sae_kit.sae import SAE, SAEConfig


@dataclass
class MPConfig(RuleConfig):
    """MP-SAE settings (cfg.json keys mp_<field>). By default inference runs exactly the training rule (k steps)."""

    flat_prefix = "mp_"

    max_steps: int | None = None
    """Pursuit steps at inference (None = k); training always runs k steps."""
    stop_residual: float = 0.0
    """Inference: stop a token once ||r||/||x − b_dec|| falls below this (0 = off: adaptive stopping is opt-in)."""
    stop_on_same_support: bool = False
    """Inference: stop a token when a step adds no new atom (adaptive L0; off by default, so inference = training)."""
    signed: bool = False
    """Select by |r·W_decᵀ| with signed coefficients instead of the authors' ReLU rule."""

    def check(self) -> None:
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or self.max_steps < 1):
            self.fail("max_steps", self.max_steps, "use None (= k) or an integer >= 1")
        if not 0 <= self.stop_residual < 1:
            self.fail("stop_residual", self.stop_residual, "use a relative residual norm in [0, 1)")


class MatchingPursuit(Sparsifier):
    r"""Matching pursuit over the tied, unit-norm dictionary (Costa et al. 2025, arXiv 2506.03093).

    With d_i the rows of W_dec (||d_i|| = 1), r⁰ = x − b_dec and f = 0, each of T steps does

        c = r·W_decᵀ,   j = argmax_i ReLU(c_i)   (argmax_i |c_i| with cfg.mp_signed; chosen without gradient),
        a = ReLU(d_j·r)   (signed: d_j·r),   f_j += a,   r ← r − a·d_j,

    and x̂ = f·W_dec + b_dec. The coefficient a and the residual chain are differentiable into W_dec and b_dec.
    Training mode runs exactly k steps. Eval mode runs `max_steps` (default k) and, only when asked, stops a token
    early once ||r||/||x − b_dec|| < `stop_residual` or (`stop_on_same_support`) a step adds no new atom; the
    keyword arguments of `forward` override these per call. With the defaults, inference is the training rule.
    Codes are one (value, index) slot per step: an atom can repeat and stopped tokens carry zeros. With unit-norm
    atoms ||r_{t+1}||² = ||r_t||² − a², so ||r|| never increases and each new residual is orthogonal to the atom just
    used (the trainer re-normalises atoms after every optimiser step).

    **Gram update (the fast selection).** Recomputing c = r·W_decᵀ at every step costs T GEMMs of N·d·F. Since
    r_{t+1} = r_t − a·d_j, the correlations follow the Gram matrix G = W_dec·W_decᵀ [F, F]:

        c_{t+1} = r_{t+1}·W_decᵀ = c_t − a·G[j],

    so one GEMM c⁰ = r⁰·W_decᵀ (N·d·F) plus one Gram GEMM (F·d·F, recomputed every call since W_dec changes every
    optimiser step) replace the T correlation GEMMs; each step is then a row gather, an in-place axpy and an argmax
    over [N, F] (memory traffic, no GEMM). Only the *selection* reads the running c: a is recomputed from the true
    residual (a = d_j·r), and c is updated with that same a, so the code is exact given its support and the
    gradient is the gradient of the reference rule; float drift in c can only change which atom wins a near-tie.

    When (`method` "auto", the default): the Gram update runs when G fits the cap, F² ≤ `gram_max_entries` (2^28 entries = 1 GiB in
    fp32; F ≤ 16384), and it is cheaper in GEMM flops, F ≤ (T − 1)·N (the Gram GEMM F²d against the T − 1 saved
    correlation GEMMs (T − 1)·N·F·d). Otherwise (very wide dictionaries, few tokens: small eval batches) it
    falls back to one correlation GEMM per step. In eval mode the Gram matrix is cached on the rule until W_dec
    changes (its version counter or identity), so eval and index batches reuse it.

    **Two phases.** `select` runs the whole pursuit without an autograd graph (the running c, the picks, and the
    coefficients and residuals from the true residual chain); in training, `_PursuitChain` wraps it as one autograd
    Function whose backward is the adjoint of the residual chain written out (see there), so the gradient into W_dec
    and b_dec is the one autograd takes through the textbook loop, without T gathers whose backward each scatter
    into a full [F, d] gradient. Without a gradient (eval, no_grad) the selected values are the codes.

    **Precision.** Without autocast everything runs in W_dec's dtype (fp32; float64 in tests). Under autocast
    (bf16 or fp16) only the selection is low precision: c⁰ and G come from GEMMs in the autocast dtype, then are
    held and updated in W_dec's dtype (fp32), so the T − 1 updates do not accumulate bf16 rounding (the fallback's
    per-step correlations are in the autocast dtype). The coefficients, the residual chain, the gathered atoms and
    the backward run with autocast disabled in W_dec's dtype, so the values are exact given the support (and
    linalg.vecdot, which CPU autocast would run in bf16, is not used).

    **Cost** per call (N tokens, T steps): GEMMs N·d·F + F·d·F (Gram) against T·N·d·F (per-step); then T passes of
    gather + axpy + argmax over [N, F]; memory F² for G plus 2·N·F for c and the gathered rows, and T·N·d for the
    residuals kept for backward (as autograd kept before).
    """

    Config = MPConfig
    uses_encoder = False
    default_aux = "none"
    saelens_name = "matching_pursuit"
    gram_max_entries: int = 1 << 28
    """Largest F² for which `pursue` builds the Gram matrix; wider dictionaries use the per-step GEMM."""
    method: str = "auto"
    """How `select` (the forward) finds atoms: "auto" (the rule above), "gram" or "gemm" (set it on an instance)."""

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        self._gram_cache: tuple[weakref.ref[Tensor], tuple[int, int, torch.dtype], Tensor] | None = None

    @property
    def signed(self) -> bool:
        return bool(self.config.signed)

    def use_gram(self, n_tokens: int, d_sae: int, steps: int) -> bool:
        """The rule above: the Gram update when F² ≤ gram_max_entries and F ≤ (steps − 1)·N."""
        return d_sae * d_sae <= self.gram_max_entries and d_sae <= (steps - 1) * n_tokens

    @staticmethod
    def selection_dtype(W_dec: Tensor) -> torch.dtype:
        """The dtype of the selection GEMMs: the autocast dtype when autocast is on for W_dec's device, else W_dec's."""
        device = W_dec.device.type
        if torch.is_autocast_enabled(device):
            return torch.get_autocast_dtype(device)
        return W_dec.dtype

    @torch.no_grad()
    def gram(self, W_dec: Tensor) -> Tensor:
        """G = W_dec·W_decᵀ [F, F], computed in `selection_dtype` and returned in W_dec's dtype (no gradient).

        In eval mode the result is cached until W_dec is modified or replaced; training recomputes it every call."""
        W = W_dec.detach()
        dtype = self.selection_dtype(W_dec)
        key = (W_dec._version, W.data_ptr(), dtype)
        cached = self._gram_cache
        if cached is not None and cached[0]() is W_dec and cached[1] == key and cached[2].device == W.device:
            return cached[2]
        self._gram_cache = None  # free the old matrix before building the new one
        with torch.autocast(W.device.type, enabled=False):
            Wl = W.to(dtype)
            G = (Wl @ Wl.t()).to(W.dtype)
        if not self.training:
            self._gram_cache = (weakref.ref(W_dec), key, G)
        return G

    def train(self, mode: bool = True) -> MatchingPursuit:
        self._gram_cache = None  # training changes W_dec every step: do not hold the matrix
        return super().train(mode)

    def pursue(
        self,
        W_dec: Tensor,
        xc: Tensor,
        steps: int,
        stop_residual: float = 0.0,
        stop_on_same_support: bool = False,
        *,
        method: str = "auto",
        gram: Tensor | None = None,
    ) -> Iterator[tuple[Tensor, Tensor, Tensor, Tensor]]:
        """Yield (coefficient [N], atom index [N], residual [N, d], support mask [N, F]) after each step, without
        gradient (`coefficients` gives the differentiable values of a support).

        `method`: "gram" (running correlations updated by Gram rows), "gemm" (one correlation GEMM per step, the
        textbook loop) or "auto" (the rule in the class docstring). `gram`: a precomputed `self.gram(W_dec)` to
        reuse across chunks (implies "gram")."""
        for a, j, r, support, _ in self._pursue(W_dec, xc, steps, stop_residual, stop_on_same_support, method, gram):
            assert support is not None
            yield a, j, r, support

    @torch.no_grad()
    def _pursue(
        self,
        W_dec: Tensor,
        xc: Tensor,
        steps: int,
        stop_residual: float = 0.0,
        stop_on_same_support: bool = False,
        method: str = "auto",
        gram: Tensor | None = None,
        track_support: bool = True,
    ) -> Iterator[tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]]:
        """`pursue`, also yielding which tokens were still running at the step (None: all of them, no stopping
        rule); the support mask is None unless `track_support` or `stop_on_same_support`."""
        if method not in ("auto", "gram", "gemm"):
            raise SaeKitError(f"mpsae: method={method!r}; use 'auto', 'gram' or 'gemm'")
        if steps < 1:
            raise SaeKitError(f"mpsae: max_steps={steps}; use max_steps >= 1")
        if gram is not None and method == "gemm":
            raise SaeKitError("mpsae: a precomputed gram was passed with method='gemm'; use method='gram' or 'auto'")
        n, n_atoms = xc.shape[0], W_dec.shape[0]
        if gram is not None:
            method = "gram"
        elif method == "auto":
            method = "gram" if self.use_gram(n, n_atoms, steps) else "gemm"
        stopping = stop_residual > 0 or stop_on_same_support
        sel_dtype = self.selection_dtype(W_dec)
        with torch.autocast(xc.device.type, enabled=False):
            W, r = W_dec.detach(), xc.detach()
            W_sel = W.to(sel_dtype)
            if method == "gram":
                G = gram if gram is not None else self.gram(W_dec)
                corr = (r.to(sel_dtype) @ W_sel.t()).to(W.dtype)  # the running c [N, F]
                rows = torch.empty_like(corr)  # reused for the gathered Gram rows (and |c|)
            start_norm = r.norm(dim=-1) if stop_residual > 0 else None
            running = torch.ones(n, dtype=torch.bool, device=xc.device) if stopping else None
            support = None
            if track_support or stop_on_same_support:
                support = torch.zeros(n, n_atoms, dtype=torch.bool, device=xc.device)
            tokens = torch.arange(n, device=xc.device)
            atom, prod = torch.empty_like(r), torch.empty_like(r)
            for step in range(steps):
                if method == "gemm":
                    corr = r.to(sel_dtype) @ W_sel.t()
                    score = corr.abs_() if self.signed else corr
                else:
                    score = torch.abs(corr, out=rows) if self.signed else corr
                # argmax of the raw correlations: it differs from argmax ReLU(·) only when every correlation is
                # <= 0, and then the ReLU'd coefficient below is 0 either way.
                j = score.argmax(-1)
                torch.index_select(W, 0, j, out=atom)
                a = _dot(r, atom, prod)  # from the true residual, not from the running c
                if not self.signed:
                    a.relu_()
                was_running = None if running is None else running.clone()  # before this step's updates
                if running is not None:
                    a *= running
                r = torch.addcmul(r, atom, a[:, None], value=-1)  # r ← r − a·d_j
                if method == "gram" and step + 1 < steps:
                    torch.index_select(G, 0, j, out=rows)
                    corr.addcmul_(rows, a[:, None], value=-1)  # c ← c − a·G[j]
                if support is not None:
                    picked = a != 0
                    seen = support[tokens, j]
                    if running is not None and stop_on_same_support:
                        running &= picked & ~seen
                    support[tokens, j] = seen | picked
                if running is not None and start_norm is not None:
                    running &= r.norm(dim=-1) >= stop_residual * start_norm
                yield a, j, r, support, was_running
                if running is not None and not running.any():
                    return

    @torch.no_grad()
    def select(
        self,
        W_dec: Tensor,
        xc: Tensor,
        steps: int,
        stop_residual: float = 0.0,
        stop_on_same_support: bool = False,
        keep_residuals: bool = False,
    ) -> tuple[Tensor, Tensor, Tensor | None, list[Tensor] | None]:
        """The whole pursuit at once, without gradient: (values A [N, T], indices J [N, T], the still-running mask
        M [N, T] (None without a stopping rule), the residuals r_0 … r_{T−1} [N, d] before each step (when
        `keep_residuals`)),
        by the Gram update or the per-step GEMM as `method` says. T < steps when every token stopped early."""
        values, indices, masks, residuals = [], [], [], [xc.detach()]
        trace = self._pursue(W_dec, xc, steps, stop_residual, stop_on_same_support, self.method, None, False)
        for a, j, r, _, was_running in trace:
            values.append(a)
            indices.append(j)
            if was_running is not None:
                masks.append(was_running)
            if keep_residuals:
                residuals.append(r)
        A, J = torch.stack(values, 1), torch.stack(indices, 1)
        M = torch.stack(masks, 1) if masks else None
        return A, J, M, residuals[: A.shape[1]] if keep_residuals else None

    def forward(
        self,
        sae: SAE,
        xc: Tensor,
        grad: Tensor | None = None,
        *,
        max_steps: int | None = None,
        stop_residual: float | None = None,
        stop_on_same_support: bool | None = None,
    ) -> Codes:
        cfg, rule = self.cfg, self.config
        if self.training:
            defaults = (cfg.k, 0.0, False)
        else:
            defaults = (rule.max_steps or cfg.k, rule.stop_residual, rule.stop_on_same_support)
        steps = max_steps if max_steps is not None else defaults[0]
        stop_residual = stop_residual if stop_residual is not None else defaults[1]
        stop_on_same_support = stop_on_same_support if stop_on_same_support is not None else defaults[2]
        if steps < 1:
            raise SaeKitError(f"mpsae: max_steps={steps}; use max_steps >= 1")
        stop = (stop_residual, stop_on_same_support)
        if torch.is_grad_enabled() and (sae.W_dec.requires_grad or xc.requires_grad):
            A, J = _PursuitChain.apply(xc, sae.W_dec, self, steps, stop)
        else:
            A, J, _, _ = self.select(sae.W_dec, xc, steps, *stop)
        return Codes(
            d_sae=cfg.d_sae,
            values=A,
            indices=J,
            unique_indices=False,
            signed=self.signed,
        )

    @torch.no_grad()
    def eval_metrics(
        self,
        sae: SAE,
        x: Tensor,
        grad: Tensor | None = None,
        *,
        curve_steps: int | None = None,
        curve_tokens: int = 4096,
        seed: int = 0,
        max_cells: int = 1 << 25,
        **settings: Any,
    ) -> dict[str, Any]:
        """The adaptive-inference curve: mean L0 and FVU after each of `curve_steps` (default 2k) pursuit steps, without
        early stopping, on a seeded sample of `curve_tokens` rows (in chunks of at most `max_cells` correlations):
        mp_curve_l0 / mp_curve_fvu, and mp_fvu_at_k, the curve at the trained k. When the Gram update applies (see
        the class docstring) one Gram matrix (at most `gram_max_entries` entries) serves every chunk."""
        steps = curve_steps or 2 * self.cfg.k  # None from eval's settings: twice the trained k
        generator = torch.Generator().manual_seed(seed)
        sample = x[torch.randperm(len(x), generator=generator)[:curve_tokens]].to(sae.W_dec.device, sae.W_dec.dtype)
        xc = sample - sae.b_dec
        total = (xc - xc.mean(0)).double().square().sum()
        chunk = max(1, max_cells // self.cfg.d_sae)
        use_gram = self.use_gram(min(chunk, len(xc)), self.cfg.d_sae, steps)
        gram = self.gram(sae.W_dec) if use_gram else None  # one Gram matrix for every chunk
        method = "gram" if use_gram else "gemm"
        l0 = torch.zeros(steps, dtype=torch.float64)
        err = torch.zeros(steps, dtype=torch.float64)
        for i in range(0, len(xc), chunk):  # no stopping rule: every chunk runs all `steps`
            trace = self.pursue(sae.W_dec, xc[i : i + chunk], steps, method=method, gram=gram)
            for step, (_, _, r, support) in enumerate(trace):
                l0[step] += support.sum(dtype=torch.float64).cpu()
                err[step] += r.double().square().sum().cpu()
        fvu = (err / total.cpu()).tolist()
        l0_mean = (l0 / len(xc)).tolist()
        k = self.cfg.k
        return {
            "mp_curve_tokens": len(xc),
            "mp_curve_l0": l0_mean,
            "mp_curve_fvu": fvu,
            "mp_fvu_at_k": fvu[k - 1] if len(fvu) >= k else None,
        }


def _dot(u: Tensor, v: Tensor, buffer: Tensor) -> Tensor:
    """Row-wise dot products [N] of u, v [N, d], through a reused [N, d] buffer (linalg.vecdot allocates one per call,
    and under CPU autocast it would run in bf16)."""
    return torch.mul(u, v, out=buffer).sum(-1)


class _PursuitChain(torch.autograd.Function):
    r"""The coefficients of a pursuit, differentiable into r⁰ = x − b_dec and W_dec, with the support held fixed.

    Forward (no graph): the pursuit itself, A [N, T] (a_t = ReLU(d_t·r_t)·m_t, d_t = W_dec[j_t], r_{t+1} = r_t − a_t·d_t,
    m_t the still-running mask) and J [N, T]; it keeps the residuals r_0 … r_{T−1}. Backward, by hand, with λ_t =
    ∂L/∂r_t (λ_T = 0, since only A leaves the function) from t = T − 1 down to 0:

        h_t = (∂L/∂a_t − λ_{t+1}·d_t)·ReLU'(d_t·r_t)·m_t,   ∂L/∂d_t = h_t·r_t − a_t·λ_{t+1},   λ_t = λ_{t+1} + h_t·d_t,

    then ∂L/∂r⁰ = λ_0 and ∂L/∂W_dec = Σ_t scatter of ∂L/∂d_t onto rows j_t (one index_add). This is exactly the
    gradient autograd takes through the textbook chain, in a few in-place [N, d] passes per step instead of a graph of
    T gathers (each a [F, d] scatter in backward) and their intermediates. Runs outside autocast in W_dec's dtype.
    """

    @staticmethod
    def forward(ctx: Any, xc: Tensor, W_dec: Tensor, rule: MatchingPursuit, steps: int, stop: tuple[float, bool]):
        A, J, M, R = rule.select(W_dec, xc, steps, *stop, keep_residuals=True)
        ctx.signed = rule.signed
        ctx.has_mask = M is not None
        assert R is not None
        ctx.save_for_backward(W_dec, A, J, *([] if M is None else [M]), *R)
        ctx.mark_non_differentiable(J)
        return A, J

    @staticmethod
    def backward(ctx: Any, grad_A: Tensor, _grad_J: Tensor | None):
        W_dec, A, J, *rest = ctx.saved_tensors
        M = rest[0] if ctx.has_mask else None
        residuals = rest[1:] if ctx.has_mask else rest  # r_t before step t
        with torch.autocast(W_dec.device.type, enabled=False):
            grad_A = grad_A.to(W_dec.dtype)
            lam = torch.zeros_like(residuals[0])  # λ_T = 0
            grad_D = torch.empty(*J.shape, W_dec.shape[1], dtype=W_dec.dtype, device=W_dec.device)
            atom, prod = torch.empty_like(lam), torch.empty_like(lam)
            for t in range(J.shape[1] - 1, -1, -1):
                a = A[:, t]
                torch.index_select(W_dec, 0, J[:, t], out=atom)
                h = grad_A[:, t] - _dot(lam, atom, prod)
                if ctx.signed:
                    h = h if M is None else h * M[:, t]
                else:
                    h = h * (a > 0)  # a > 0 iff the pre-ReLU dot was > 0 and the token was running
                torch.mul(residuals[t], h[:, None], out=grad_D[:, t])
                grad_D[:, t].addcmul_(lam, a[:, None], value=-1)  # ∂L/∂d_t = h·r_t − a·λ_{t+1}
                lam.addcmul_(atom, h[:, None])  # λ_t = λ_{t+1} + h·d_t
            grad_W = torch.zeros_like(W_dec).index_add_(0, J.reshape(-1), grad_D.reshape(-1, W_dec.shape[1]))
        return lam, grad_W, None, None, None
