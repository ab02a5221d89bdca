"""The sparse decode and the sparse-backward encoder are exact against dense references: values and every gradient."""

from __future__ import annotations

import pytest
import torch

from sae_kit.kernels import encode_preacts, gather_preacts, pair_decode, pair_preacts, rows_of, sparse_decode
from sae_kit.sae import SAE, SAEConfig
from sae_kit.sparsifiers import Codes

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


def _ragged(N, F, device, seed=0):
    """A random CSR pattern: each token keeps 0..F latents, distinct and sorted within the token."""
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(N, F, generator=g) < torch.rand(N, 1, generator=g)
    keep[0] = False  # an empty row
    token, cols = keep.nonzero(as_tuple=True)
    crow = torch.zeros(N + 1, dtype=torch.int64)
    crow[1:] = torch.bincount(token, minlength=N).cumsum(0)
    return crow.to(device), cols.to(device), keep.to(device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("N,d,F,k", SHAPES)
def test_ragged_pairs_exact_against_dense(N, d, F, k, dtype):
    """pair_preacts / pair_decode on a ragged CSR pattern (the batch rules' codes) equal the dense masked formula."""
    torch.manual_seed(N * F)
    xc, W_enc, b_enc, W_dec = (
        _leaf(N, d, dtype=dtype, device="cpu"),
        _leaf(d, F, dtype=dtype, device="cpu"),
        _leaf(F, dtype=dtype, device="cpu"),
        _leaf(F, d, dtype=dtype, device="cpu"),
    )
    crow, cols, keep = _ragged(N, F, "cpu", seed=k)
    g_out = torch.randn(N, d, dtype=dtype)
    rows = rows_of(crow)
    g_val = torch.randn(len(cols), dtype=dtype)

    def run(sparse: bool, with_z: bool = True):
        if sparse:
            z = encode_preacts(xc, W_enc, b_enc) if with_z else None
            vals = pair_preacts(xc, W_enc, b_enc, z, crow, cols)
            out = pair_decode(vals.relu(), crow, cols, W_dec)
        else:
            dense = xc @ W_enc + b_enc
            vals = dense[rows, cols]
            out = (dense.relu() * keep) @ W_dec
        loss = (out * g_out).sum() + (vals * g_val).sum()
        return (vals, out, *torch.autograd.grad(loss, (xc, W_enc, b_enc, W_dec)))

    want = run(False)
    for with_z in (True, False):  # gathered from z, or recomputed by the sampled product
        for name, a, b in zip(
            ["values", "x_hat", "grad_x", "grad_W_enc", "grad_b_enc", "grad_W_dec"], run(True, with_z), want
        ):
            torch.testing.assert_close(
                a, b, **TOL[dtype], msg=lambda m, name=name, z=with_z: f"{name} (z given: {z}): {m}"
            )


def test_ragged_codes_methods_match_dense():
    """The Codes contract hides the layout: to_dense, nonzeros, l0 and feature_counts of ragged pairs."""
    crow, cols, keep = _ragged(9, 13, "cpu", seed=5)
    values = torch.randn(len(cols))
    values[::4] = 0  # explicit zeros do not count as firing
    codes = Codes(d_sae=13, values=values, indices=cols, crow=crow)
    dense = torch.zeros(9, 13)
    dense[rows_of(crow), cols] = values
    torch.testing.assert_close(codes.to_dense(), dense)
    assert torch.equal(codes.l0(), (dense != 0).sum(-1))
    assert torch.equal(codes.feature_counts(), (dense != 0).sum(0))
    token, latent, value = codes.nonzeros()
    t2, l2 = dense.nonzero(as_tuple=True)
    assert torch.equal(token, t2) and torch.equal(latent, l2) and torch.equal(value, dense[t2, l2])
    assert codes.num_tokens == 9


def test_bf16_autocast_support_with_exact_fp32_values():
    """Under bf16 autocast the encoder GEMM runs in bf16 and only chooses the support; the kept values are the fp32
    pre-activations at that support exactly (not bf16-rounded), and the gradients are the fp32 ones given the support."""
    torch.manual_seed(6)
    N, d, F, k = 256, 64, 1024, 16
    sae = SAE(SAEConfig(architecture="topk", d_in=d, d_sae=F, k=k))
    x = torch.randn(N, d)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sae(x)
    assert out.codes.z is not None and out.codes.z.dtype == torch.bfloat16
    values, idx = out.codes.sparse()
    assert values.dtype == torch.float32 and out.x_hat.dtype == torch.float32
    z32 = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    torch.testing.assert_close(values, z32.gather(1, idx).relu(), rtol=1e-6, atol=1e-6)
    # the bf16 support is the fp32 top-k up to near-ties: most tokens agree fully, and what differs is tiny
    ref = z32.topk(k, dim=-1).indices
    agree = (torch.zeros(N, F).scatter(1, idx, 1.0) * torch.zeros(N, F).scatter(1, ref, 1.0)).sum() / (N * k)
    assert agree > 0.97, agree
    # gradients given the support equal the fp32 dense formula on that support
    loss = (out.x_hat - x).square().sum()
    params = [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec]
    got = torch.autograd.grad(loss, params)
    z = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    f = torch.zeros_like(z).scatter(1, idx, z.gather(1, idx).relu())
    want = torch.autograd.grad((f @ sae.W_dec + sae.b_dec - x).square().sum(), params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_backward_inside_autocast_matches_outside():
    """The sparse products have no bf16 kernels: a backward called inside autocast must still run them in fp32."""
    torch.manual_seed(7)
    sae = SAE(SAEConfig(architecture="topk", d_in=16, d_sae=64, k=4))
    x = torch.randn(8, 16)
    params = [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sae(x)
        inside = torch.autograd.grad((out.x_hat - x).square().sum(), params)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sae(x)
    outside = torch.autograd.grad((out.x_hat - x).square().sum(), params)
    for a, b in zip(inside, outside):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b)
