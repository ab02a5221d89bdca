"""MP-SAE's fast pursuit (running correlations updated by Gram rows, hand-written backward) against the textbook loop."""

from __future__ import annotations

import pytest
import torch

from sae_kit.errors import SaeKitError
from sae_kit.sae import SAE, SAEConfig


def make(d_in: int, d_sae: int, k: int, dtype: torch.dtype = torch.float32, seed: int = 0, **kw) -> SAE:
    torch.manual_seed(seed)
    sae = SAE(SAEConfig.from_dict({"architecture": "mpsae", "d_in": d_in, "d_sae": d_sae, "k": k, **kw})).to(dtype)
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.3)
    return sae


def data(n: int, d: int, dtype: torch.dtype = torch.float32, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g) + torch.randn(d, generator=g)).to(dtype)


def reference(W_dec, b_dec, x, steps, signed=False, indices=None, mask=None):
    """The textbook loop: one correlation GEMM per step, autograd through the chain. With `indices`, replay that
    support instead of selecting (the exact values and gradient of a given support)."""
    r = x - b_dec
    values, picked, corrs = [], [], []
    for t in range(steps):
        with torch.no_grad():
            corr = r.detach() @ W_dec.detach().t()
            corrs.append(corr)
            j = (corr.abs() if signed else corr).argmax(-1) if indices is None else indices[:, t]
        atom = W_dec[j]
        a = (r * atom).sum(-1)
        if not signed:
            a = a.relu()
        if mask is not None:
            a = a * mask[:, t]
        r = r - a[:, None] * atom
        values.append(a)
        picked.append(j)
    return torch.stack(values, 1), torch.stack(picked, 1), corrs


def grads(loss_of, *params):
    for p in params:
        p.grad = None
    loss_of().backward()
    return [p.grad.clone() for p in params]


def loss_from(values, indices, W_dec, b_dec, x):
    """A loss that reads the values directly (weighted) and through the decode, as the trainer's losses do."""
    x_hat = (
        torch.zeros_like(x).index_add_(
            0,
            torch.arange(len(x)).repeat_interleave(indices.shape[1]),
            (values.reshape(-1, 1) * W_dec[indices.reshape(-1)]),
        )
        + b_dec
    )
    w = torch.linspace(0.5, 1.5, values.shape[1], dtype=values.dtype)
    return (x - x_hat).square().sum(-1).mean() + 0.1 * (values * w).sum(-1).mean()


def compare_to_reference(sae: SAE, x: torch.Tensor, steps: int, method: str = "auto") -> tuple[bool, str]:
    """(True, "") when the fast training forward picks the reference's atoms, with the same values and gradients."""
    rule = sae.sparsifier
    rule.method = method
    codes = sae.train().forward_codes(x, max_steps=steps)
    fast = grads(lambda: loss_from(*codes.sparse(), sae.W_dec, sae.b_dec, x), sae.W_dec, sae.b_dec)
    values, indices, _ = reference(sae.W_dec, sae.b_dec, x, steps, rule.signed)
    if not torch.equal(codes.indices, indices):
        return False, f"support differs on {(codes.indices != indices).any(1).sum()} of {len(x)} tokens"
    ref = grads(lambda: loss_from(values, indices, sae.W_dec, sae.b_dec, x), sae.W_dec, sae.b_dec)
    tol = dict(rtol=1e-10, atol=1e-10) if x.dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    for name, got, want in (("values", codes.values, values), ("dW_dec", fast[0], ref[0]), ("db_dec", fast[1], ref[1])):
        if not torch.allclose(got.detach(), want.detach(), **tol):
            return False, f"{name} differs by {(got - want).abs().max():.3g}"
    return True, ""


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("method", ["gram", "gemm"])
def test_same_atoms_codes_and_gradients_as_the_textbook_loop_in_float64(signed, method):
    sae = make(16, 96, 6, torch.float64, mp_signed=signed)
    ok, why = compare_to_reference(sae, data(40, 16, torch.float64), steps=12, method=method)  # atoms repeat
    assert ok, why


def test_a_forgotten_correlation_update_is_caught():
    """The comparison can fail: with a zero Gram matrix c is never updated, and the same atom wins every step."""
    sae = make(16, 96, 6, torch.float64)
    x = data(40, 16, torch.float64)
    sae.sparsifier.gram = lambda W_dec: torch.zeros(W_dec.shape[0], W_dec.shape[0], dtype=W_dec.dtype)
    ok, why = compare_to_reference(sae, x, steps=8, method="gram")
    assert not ok and "support differs" in why


def test_a_wrong_backward_is_caught(monkeypatch):
    """The gradient comparison can fail too: drop the λ_{t+1}·d_t term of the hand-written backward."""
    from sae_kit.sparsifiers import mpsae

    real = mpsae._dot
    sae = make(16, 96, 6, torch.float64)
    x = data(40, 16, torch.float64)
    assert compare_to_reference(sae, x, steps=8)[0]
    original_backward = mpsae._PursuitChain.backward

    def broken(ctx, *g):
        monkeypatch.setattr(mpsae, "_dot", lambda u, v, buffer: 0 * real(u, v, buffer))
        try:
            return original_backward(ctx, *g)
        finally:
            monkeypatch.setattr(mpsae, "_dot", real)

    monkeypatch.setattr(mpsae._PursuitChain, "backward", staticmethod(broken))
    ok, why = compare_to_reference(sae, x, steps=8)
    assert not ok and "dW_dec" in why


@pytest.mark.parametrize("signed", [False, True])
def test_gradcheck_of_the_hand_written_backward(signed):
    from sae_kit.sparsifiers.mpsae import _PursuitChain

    sae = make(8, 40, 4, torch.float64, mp_signed=signed).train()
    xc = (data(12, 8, torch.float64) - sae.b_dec).detach().requires_grad_()
    W = sae.W_dec.detach().clone().requires_grad_()
    chain = lambda xc, W: _PursuitChain.apply(xc, W, sae.sparsifier, 7, (0.0, False))[0]  # noqa: E731
    torch.autograd.gradcheck(chain, (xc, W), fast_mode=True)


def test_float32_realistic_size_same_support_up_to_near_ties():
    """F = 4096 latents, 1024 tokens, 32 steps in fp32: the running correlations drift by float rounding only, so the
    support equals the textbook loop's on at least 99% of tokens, and every token that differs first differs at a
    near-tie of the reference correlations (gap < 1e-4·max|c|); values and gradients are exact given the support."""
    d, F, n, k = 64, 4096, 1024, 32
    sae = make(d, F, k).train()
    x = data(n, d)
    codes = sae.forward_codes(x)
    assert sae.sparsifier.use_gram(n, F, k)  # the fast path ran
    values, indices, corrs = reference(sae.W_dec, sae.b_dec, x, k)
    differ = (codes.indices != indices).any(1)
    assert differ.float().mean() <= 0.01, f"{int(differ.sum())} of {n} tokens"
    for row in differ.nonzero().flatten().tolist():
        t = int((codes.indices[row] != indices[row]).nonzero()[0])
        c = corrs[t][row]
        gap = (c[indices[row, t]] - c[codes.indices[row, t]]).abs()
        assert gap <= 1e-4 * c.abs().max(), (row, t, float(gap))
    # exact given the support: replay the fast support through the textbook chain
    given, _, _ = reference(sae.W_dec, sae.b_dec, x, k, indices=codes.indices)
    torch.testing.assert_close(codes.values, given, rtol=1e-4, atol=1e-5)
    fast = grads(lambda: loss_from(*codes.sparse(), sae.W_dec, sae.b_dec, x), sae.W_dec, sae.b_dec)
    ref = grads(lambda: loss_from(given, codes.indices, sae.W_dec, sae.b_dec, x), sae.W_dec, sae.b_dec)
    torch.testing.assert_close(fast[0], ref[0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(fast[1], ref[1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["gram", "gemm"])
def test_bf16_autocast_selects_in_bf16_but_values_and_gradients_are_fp32_and_exact_given_the_support(method):
    d, F, n, k = 64, 1024, 256, 16
    sae = make(d, F, k).train()
    x = data(n, d)
    sae.sparsifier.method = method
    with torch.autocast("cpu", dtype=torch.bfloat16):
        codes = sae.forward_codes(x)
        fast = grads(lambda: loss_from(*codes.sparse(), sae.W_dec, sae.b_dec, x), sae.W_dec, sae.b_dec)
    assert codes.values.dtype == torch.float32 and fast[0].dtype == torch.float32
    given, _, _ = reference(sae.W_dec, sae.b_dec, x, k, indices=codes.indices)  # fp32, no autocast
    torch.testing.assert_close(codes.values, given, rtol=1e-5, atol=1e-6)
    ref = grads(lambda: loss_from(given, codes.indices, sae.W_dec, sae.b_dec, x), sae.W_dec, sae.b_dec)
    torch.testing.assert_close(fast[0], ref[0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(fast[1], ref[1], rtol=1e-4, atol=1e-6)
    # bf16 selection is a good pursuit, not a random one: most first picks agree with fp32
    _, fp32_indices, _ = reference(sae.W_dec, sae.b_dec, x, 1)
    assert (codes.indices[:, 0] == fp32_indices[:, 0]).float().mean() > 0.9


def test_eval_options_and_curve_agree_between_gram_and_gemm():
    sae = make(16, 128, 6).eval()
    x = data(64, 16)
    rule = sae.sparsifier
    runs = {}
    for cap in (1 << 28, 0):  # 0: every call falls back to the per-step GEMM
        rule.gram_max_entries = cap
        runs[cap] = [
            sae.forward_codes(x, **kw)
            for kw in (
                {},
                {"max_steps": 3},
                {"max_steps": 20, "stop_residual": 0.5},
                {"max_steps": 30, "stop_on_same_support": True},
            )
        ]
        runs[cap].append(rule.eval_metrics(sae, x, curve_steps=10, curve_tokens=64, max_cells=128 * 10))
    for fast, slow in zip(runs[1 << 28][:-1], runs[0][:-1], strict=True):
        assert torch.equal(fast.indices, slow.indices)
        torch.testing.assert_close(fast.values, slow.values)
    assert runs[1 << 28][2].values.shape[1] < 20 and runs[1 << 28][3].values.shape[1] < 30  # they did stop early
    curve_fast, curve_slow = runs[1 << 28][-1], runs[0][-1]
    assert curve_fast["mp_curve_l0"] == curve_slow["mp_curve_l0"]
    torch.testing.assert_close(torch.tensor(curve_fast["mp_curve_fvu"]), torch.tensor(curve_slow["mp_curve_fvu"]))


def test_gram_rule_cache_and_errors():
    sae = make(16, 128, 4)
    rule = sae.sparsifier
    assert rule.use_gram(64, 128, 4)
    assert not rule.use_gram(16, 128, 4)  # F > (T − 1)·N: the Gram GEMM would cost more than the steps it saves
    assert not rule.use_gram(10**6, 1 << 15, 64)  # F² > 2^28: over the memory cap
    sae.eval()
    G = rule.gram(sae.W_dec)
    torch.testing.assert_close(G, sae.W_dec @ sae.W_dec.t())
    assert rule.gram(sae.W_dec) is G  # eval: cached while W_dec is unchanged
    with torch.no_grad():
        sae.W_dec.mul_(2)
    assert rule.gram(sae.W_dec) is not G  # an in-place change invalidates it
    sae.train()
    assert rule._gram_cache is None and rule.gram(sae.W_dec) is not rule.gram(sae.W_dec)  # training: never held
    x = data(8, 16)
    with pytest.raises(SaeKitError, match="use 'auto', 'gram' or 'gemm'"):
        next(rule.pursue(sae.W_dec, x, 3, method="fast"))
    with pytest.raises(SaeKitError, match="max_steps >= 1"):
        sae.forward_codes(x, max_steps=0)
    rule.method = "fast"
    with pytest.raises(SaeKitError, match="use 'auto', 'gram' or 'gemm'"):
        sae.forward_codes(x)


@pytest.mark.parametrize("stop", [{"stop_on_same_support": True}, {"stop_residual": 0.6}])
def test_gradients_with_a_stopping_rule(stop):
    """Forward keywords can ask for a stopping rule in training mode too: stopped tokens get zero values and no
    gradient."""
    sae = make(16, 96, 6, torch.float64).train()
    x = data(40, 16, torch.float64)
    codes = sae.forward_codes(x, max_steps=25, **stop)
    assert codes.values.shape[1] < 25
    fast = grads(lambda: loss_from(*codes.sparse(), sae.W_dec, sae.b_dec, x), sae.W_dec, sae.b_dec)
    A, J, M, _ = sae.sparsifier.select(sae.W_dec, x - sae.b_dec, 25, **stop)
    assert M is not None and torch.equal(J, codes.indices) and not M.all()
    given, _, _ = reference(sae.W_dec, sae.b_dec, x, J.shape[1], indices=J, mask=M)
    torch.testing.assert_close(codes.values, given, rtol=1e-10, atol=1e-12)
    ref = grads(lambda: loss_from(given, J, sae.W_dec, sae.b_dec, x), sae.W_dec, sae.b_dec)
    torch.testing.assert_close(fast[0], ref[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fast[1], ref[1], rtol=1e-10, atol=1e-12)
