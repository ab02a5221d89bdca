"""The sparse decode and the sparse-backward encoder are exact against dense references: values and every gradient."""

from __future__ import annotations

import pytest
import torch

from sae_kit.kernels import encode_preacts, gather_preacts, sparse_decode
from sae_kit.sae import SAE, SAEConfig

SHAPES = [(7, 5, 11, 3), (32, 16, 64, 8), (3, 8, 20, 1), (16, 4, 9, 9)]  # (N, d, F, k)
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-11, atol=1e-11)}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _leaf(*shape, dtype, device):
    return torch.randn(*shape, dtype=dtype, device=device).requires_grad_()


def _unique_indices(N, F, k, device):
    return torch.rand(N, F, device=device).argsort(-1)[:, :k]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("N,d,F,k", SHAPES)
def test_encoder_and_decoder_exact_against_dense(N, d, F, k, dtype, device):
    torch.manual_seed(N + F + k)
    xc, W_enc, b_enc, W_dec = (
        _leaf(N, d, dtype=dtype, device=device),
        _leaf(d, F, dtype=dtype, device=device),
        _leaf(F, dtype=dtype, device=device),
        _leaf(F, d, dtype=dtype, device=device),
    )
    idx = _unique_indices(N, F, k, device)
    g_out = torch.randn(N, d, dtype=dtype, device=device)
    g_val = torch.randn(N, k, dtype=dtype, device=device)

    def run(sparse: bool):
        if sparse:
            vals = gather_preacts(xc, W_enc, b_enc, encode_preacts(xc, W_enc, b_enc), idx)
            out = sparse_decode(vals.relu(), idx, W_dec)
        else:
            vals = (xc @ W_enc + b_enc).gather(1, idx)
            out = torch.zeros(N, F, dtype=dtype, device=device).scatter(1, idx, vals.relu()) @ W_dec
        loss = (out * g_out).sum() + (vals * g_val).sum()
        grads = torch.autograd.grad(loss, (xc, W_enc, b_enc, W_dec))
        return (vals, out, *grads)

    for name, got, want in zip(
        ["values", "x_hat", "grad_x", "grad_W_enc", "grad_b_enc", "grad_W_dec"], run(True), run(False)
    ):
        torch.testing.assert_close(got, want, **TOL[dtype], msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sparse_decode_with_repeated_indices(dtype):
    """MP-SAE may select an atom twice in a row of codes: the values then add up."""
    torch.manual_seed(1)
    N, d, F, k = 10, 6, 5, 7  # k > F forces repeats
    values, W_dec = _leaf(N, k, dtype=dtype, device="cpu"), _leaf(F, d, dtype=dtype, device="cpu")
    idx = torch.randint(0, F, (N, k))
    g = torch.randn(N, d, dtype=dtype)
    got = sparse_decode(values, idx, W_dec)
    want = torch.zeros(N, F, dtype=dtype).scatter_add(1, idx, values) @ W_dec
    torch.testing.assert_close(got, want, **TOL[dtype])
    for a, b in zip(
        torch.autograd.grad((got * g).sum(), (values, W_dec)), torch.autograd.grad((want * g).sum(), (values, W_dec))
    ):
        torch.testing.assert_close(a, b, **TOL[dtype])


def test_gradcheck_float64():
    torch.manual_seed(2)
    N, d, F, k = 4, 3, 6, 2
    xc, W_enc, b_enc = (
        _leaf(N, d, dtype=torch.float64, device="cpu"),
        _leaf(d, F, dtype=torch.float64, device="cpu"),
        _leaf(F, dtype=torch.float64, device="cpu"),
    )
    idx = _unique_indices(N, F, k, "cpu")
    assert torch.autograd.gradcheck(
        lambda a, b, c: gather_preacts(a, b, c, encode_preacts(a, b, c), idx), (xc, W_enc, b_enc)
    )
    vals, W_dec = _leaf(N, k, dtype=torch.float64, device="cpu"), _leaf(F, d, dtype=torch.float64, device="cpu")
    assert torch.autograd.gradcheck(lambda v, w: sparse_decode(v, idx, w), (vals, W_dec))


def test_inputs_without_grad_and_no_grad_mode():
    torch.manual_seed(3)
    xc, W_enc, b_enc, W_dec = (
        torch.randn(5, 4),
        torch.randn(4, 8),
        torch.randn(8),
        torch.randn(8, 4, requires_grad=True),
    )
    idx = _unique_indices(5, 8, 3, "cpu")
    vals = gather_preacts(xc, W_enc, b_enc, encode_preacts(xc, W_enc, b_enc), idx)
    assert not vals.requires_grad
    sparse_decode(vals, idx, W_dec).sum().backward()  # only W_dec needs a gradient
    torch.testing.assert_close(W_dec.grad, torch.zeros(5, 8).scatter(1, idx, vals).sum(0)[:, None].expand(8, 4))
    with torch.no_grad():
        assert not sparse_decode(vals, idx, W_dec).requires_grad


@pytest.mark.parametrize("architecture", ["topk", "abstopk", "gsae"])
def test_fixed_k_sae_step_matches_dense_reference(architecture):
    """A whole SAE forward + backward through the sparse kernels equals the dense formula on the same weights."""
    torch.manual_seed(4)
    sae = SAE(SAEConfig(architecture=architecture, d_in=12, d_sae=40, k=5, dtype="float64"))
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x, g = torch.randn(9, 12, dtype=torch.float64), torch.randn(9, 12, dtype=torch.float64)
    out = sae(x, grad=g)
    loss = (out.x_hat - x).square().sum()
    params = [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec]
    got = torch.autograd.grad(loss, params)

    z = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    idx = out.codes.indices
    kept = z.gather(1, idx)
    f = torch.zeros_like(z).scatter(1, idx, kept if architecture == "abstopk" else kept.relu())
    want_loss = (f @ sae.W_dec + sae.b_dec - x).square().sum()
    want = torch.autograd.grad(want_loss, params)
    torch.testing.assert_close(loss, want_loss)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
