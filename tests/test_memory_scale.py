"""Memory cliffs of eval and the index at the sizes where they hit: CE/KL over a 256k vocabulary, dark matter at
d_in 2304/4096, steering's decoder reads and the feature-max pass on a 2^18-latent SAE, the indexer's blockwise
decoder-neighbour and co-firing passes.

Peak memory is measured for real: a subprocess allocates its inputs, reads its peak RSS (VmHWM: getrusage's ru_maxrss would carry the parent's
peak over the exec, and a CI parent holds gigabytes), runs the code and
reads the peak again; the growth is what the code itself needed. glibc's allocator runs with a fixed mmap threshold
(MALLOC_MMAP_THRESHOLD_), so every large tensor is its own mapping, returned when freed, and the figure is the tensors'
footprint rather than heap fragmentation (with glibc's adaptive default a loop of 16 MiB chunks can hold ~2x). Each bound is checked against a control run of the
unbounded formula in the same harness, which must exceed it (so the bound is one the old code would fail).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from sae_kit.activations import HarvestConfig
from sae_kit.dashboards import artifacts
from sae_kit.eval import dark_matter
from sae_kit.eval.evaluate import DEFAULT_TOKENS, EvalConfig, eval_tokens
from sae_kit.eval.inputs import EvalError, EvalInputs
from sae_kit.eval.steering import atoms, closest_atom
from sae_kit.heldout import HeldoutContexts, encode, kl_from, next_token_ce
from sae_kit.sae import SAE, SAEConfig

MiB = 1 << 20


def peak_growth(setup: str, work: str) -> int:
    """Bytes by which the peak RSS of a fresh interpreter grows while it runs `work` (after `setup` has run)."""
    code = textwrap.dedent(
        """
        import json, torch
        torch.set_num_threads(1)
        def hwm():  # this process's own peak RSS in kB (ru_maxrss would include the parent's: it survives exec)
            return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
        {setup}
        before = hwm()
        {work}
        after = hwm()
        print(json.dumps({{"growth": (after - before) * 1024}}))
        """
    ).format(setup=textwrap.indent(textwrap.dedent(setup), ""), work=textwrap.dedent(work))
    env = os.environ | {"MALLOC_MMAP_THRESHOLD_": "65536"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])["growth"]


# ------------------------------------------------------------------------------------------------ CE and KL
def test_chunked_ce_and_kl_equal_the_unchunked_formula():
    g = torch.Generator().manual_seed(0)
    R, T, V = 3, 11, 997
    clean, other = torch.randn(R, T, V, generator=g) * 4, torch.randn(R, T, V, generator=g) * 4
    tokens = torch.randint(0, V, (R, T), generator=g)
    pad = torch.zeros(R, T, dtype=torch.bool)
    pad[2, 7:] = True
    ce_ref = F.cross_entropy(clean[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(), reduction="none").view(R, -1)
    p = clean.log_softmax(-1)
    kl_ref = (p.exp() * (p - other.log_softmax(-1))).sum(-1)
    for cells in (1, V, 3 * V + 5, 1 << 30):  # one position per chunk, ragged chunks, everything at once
        ce, mask = next_token_ce(clean, tokens, pad, max_cells=cells)
        assert (ce - ce_ref).abs().max() < 1e-6 and torch.equal(mask, ~pad[:, 1:])
        assert (kl_from(clean, other, max_cells=cells) - kl_ref).abs().max() < 1e-6
    kept = clean[~pad]  # [n, V] rows, as steering passes them
    assert (kl_from(kept, other[~pad], max_cells=V) - kl_ref[~pad]).abs().max() < 1e-6
    # bf16 logits are scored in fp32 chunk by chunk, like an fp32 copy of them
    ce16, _ = next_token_ce(clean.bfloat16(), tokens, pad, max_cells=V)
    ref16 = F.cross_entropy(clean.bfloat16().float()[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(), reduction="none")
    assert (ce16 - ref16.view(R, -1)).abs().max() < 1e-5


def test_ce_and_kl_over_a_256k_vocabulary_need_a_bounded_scratch():
    """Gemma's 262,144-token vocabulary, 2 × 64 positions (two 128 MiB fp32 logits tensors): CE and KL need at most
    a few chunks of scratch (4M logits, 16 MiB each), where the unchunked formulas hold several full copies."""
    setup = """
        g = torch.Generator().manual_seed(0)
        clean = torch.randn(2, 64, 262144, generator=g)
        other = torch.randn(2, 64, 262144, generator=g)
        tokens = torch.randint(0, 262144, (2, 64), generator=g)
        pad = torch.zeros(2, 64, dtype=torch.bool)
    """
    chunked = peak_growth(
        "from sae_kit.heldout import kl_from, next_token_ce\n" + textwrap.dedent(setup),
        """
        ce, _ = next_token_ce(clean, tokens, pad, max_cells=1 << 22)
        kl = kl_from(clean, other, max_cells=1 << 22)
        """,
    )
    unchunked = peak_growth(
        "import torch.nn.functional as F\n" + textwrap.dedent(setup),
        """
        ce = F.cross_entropy(clean[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(), reduction="none")
        p = clean.log_softmax(-1)
        kl = (p.exp() * (p - other.log_softmax(-1))).sum(-1)
        """,
    )
    assert chunked < 64 * MiB, f"chunked CE/KL grew the peak by {chunked / MiB:.0f} MiB"
    assert unchunked > 3 * 128 * MiB, f"control: the unchunked formula grew it by only {unchunked / MiB:.0f} MiB"


# ------------------------------------------------------------------------------------------------ steering
def test_steering_reads_of_the_decoder_match_the_full_copy_formula():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(300, 24, generator=g) * torch.rand(300, 1, generator=g)
    v = F.normalize(torch.randn(24, generator=g), dim=0)
    full = W.float().cpu()
    cos = (full @ v) / full.norm(dim=-1)
    for signed in (False, True):
        want = int((cos.abs() if signed else cos).argmax())
        got, cosine = closest_atom(W, v, signed, max_cells=24 * 7)  # blocks of 7 rows
        assert got == want and abs(cosine - float(cos[want])) < 1e-6
    features = torch.tensor([3, 17, 299])
    directions, norms = atoms(W, features)
    assert torch.allclose(directions, full[features] / full[features].norm(dim=-1, keepdim=True), atol=1e-7)
    assert torch.allclose(norms, full[features].norm(dim=-1))


def test_steering_on_a_2_18_latent_bf16_decoder_copies_no_full_decoder():
    """2^18 latents × d_in 256 in bf16 (128 MiB): the closest-atom search and the atoms of 16 features stay within a
    few blocks; the old `W_dec.float().cpu()` made a 256 MiB fp32 copy (on a GPU: the whole decoder to the host)."""
    setup = """
        from sae_kit.eval.steering import atoms, closest_atom
        g = torch.Generator().manual_seed(0)
        W = torch.empty(1 << 18, 256, dtype=torch.bfloat16).normal_(generator=g)  # no fp32 temporary
        v = torch.nn.functional.normalize(torch.randn(256, generator=g), dim=0)
    """
    bounded = peak_growth(
        setup,
        """
        best, cos = closest_atom(W, v, signed=True, max_cells=1 << 20)
        d, n = atoms(W, torch.arange(0, 1 << 18, 1 << 14))
        """,
    )
    copied = peak_growth(
        setup,
        """
        full = W.detach().float().cpu()
        cos = (full @ v) / full.norm(dim=-1)
        """,
    )
    assert bounded < 48 * MiB, f"steering's decoder reads grew the peak by {bounded / MiB:.0f} MiB"
    assert copied > 200 * MiB, f"control: the full copy grew it by only {copied / MiB:.0f} MiB"


def test_feature_max_pass_on_a_2_18_latent_sae_stays_within_its_cell_budget():
    """The encoding pass steering reads max |activation| from (EvalInputs.encoded) on 2048 rows of a 2^18-latent
    TopK SAE: chunks of 16 rows (4M code cells) keep the growth far below one dense [2048, 2^18] code (2 GiB)."""
    growth = peak_growth(
        """
        from sae_kit.heldout import encode
        from sae_kit.sae import SAE, SAEConfig
        torch.manual_seed(0)
        sae = SAE(SAEConfig(d_in=32, d_sae=1 << 18, k=8))
        x = torch.randn(2048, 32)
        """,
        """
        enc = encode(sae, x, max_cells=1 << 22)
        assert enc.counts.sum() == 8 * 2048 and len(enc.max_abs) == 1 << 18
        """,
    )
    assert growth < 256 * MiB, f"the feature-max pass grew the peak by {growth / MiB:.0f} MiB"


def test_feature_max_pass_in_chunks_equals_one_pass():
    torch.manual_seed(2)
    sae = SAE(
        SAEConfig(d_in=16, d_sae=512, k=4, dtype="float64")
    )  # float64: no near-ties for a GEMM's blocking to flip
    x = torch.randn(300, 16, dtype=torch.float64)
    one, many = encode(sae, x, max_cells=1 << 30), encode(sae, x, max_cells=512 * 7)  # one chunk; chunks of 7 rows
    assert torch.equal(one.counts, many.counts) and torch.allclose(one.max_abs, many.max_abs, rtol=1e-6)
    assert torch.equal(one.l0, many.l0) and torch.allclose(one.x_hat, many.x_hat, atol=1e-6)
    assert int((one.max_abs > 0).sum()) > 100


# ------------------------------------------------------------------------------------------------ dark matter
class _StubLM:
    """A deterministic stand-in LM: embedding → the hook → a linear unembedding (what dark matter's CE passes need)."""

    def __init__(self, d_in: int, vocab: int = 64) -> None:
        g = torch.Generator().manual_seed(0)
        self.embed = torch.randn(vocab, d_in, generator=g)
        self.unembed = torch.randn(d_in, vocab, generator=g) / d_in**0.5
        self.cfg = SimpleNamespace(d_vocab=vocab)
        self._fn = None

    def parameters(self):
        return iter([self.embed])

    def hooks(self, fwd_hooks):
        import contextlib

        @contextlib.contextmanager
        def ctx():
            self._fn = fwd_hooks[0][1]
            yield
            self._fn = None

        return ctx()

    def __call__(self, tokens):
        acts = self.embed[tokens]
        if self._fn is not None:
            acts = self._fn(acts, None)
        return acts @ self.unembed


def _stub_inputs(
    d_in: int, n_tokens: int, context_size: int = 128, materialise: bool = True, lm_batch_size: int = 16
) -> EvalInputs:
    rows = -(-n_tokens // (context_size - 1))
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 64, (rows, context_size), generator=g)
    keep = torch.ones_like(tokens, dtype=torch.bool)
    keep[:, 0] = False
    ctxs = HeldoutContexts(tokens, keep, torch.zeros_like(keep)).first(n_tokens)
    model = _StubLM(d_in)
    sae = SAE(SAEConfig(d_in=d_in, d_sae=128, k=8, metadata={"hook_name": "hook", "context_size": context_size}))
    # x is only read for its shape by `check`: an untouched torch.empty costs no memory at d_in 4096
    x = model.embed[ctxs.tokens][ctxs.keep] if materialise else torch.empty(ctxs.n_kept, d_in)
    data = HarvestConfig(hook=("hook",), context_size=context_size, lm_batch_size=lm_batch_size)
    return EvalInputs(model, sae.eval(), "hook", ctxs, x, None, data)


@pytest.mark.parametrize("d_in", [2304, 4096])
def test_default_eval_tokens_scale_with_d_in_so_dark_matter_runs(d_in):
    sae = SAE(SAEConfig(d_in=d_in, d_sae=8, k=2, metadata={"hook_name": "hook", "context_size": 128}))
    n = eval_tokens(EvalConfig(), [sae])
    assert n > DEFAULT_TOKENS and n == dark_matter.DarkMatterConfig().tokens_needed(d_in, 128, 16)
    cfg = dark_matter.DarkMatterConfig()
    dark_matter.check(_stub_inputs(d_in, n, materialise=False), cfg)  # the default is enough ...
    with pytest.raises(EvalError, match="raise --tokens"):  # ... where the old fixed default was refused
        dark_matter.check(_stub_inputs(d_in, DEFAULT_TOKENS, materialise=False), cfg)
    small = SAE(SAEConfig(d_in=576, d_sae=8, k=2, metadata={"hook_name": "hook"}))
    assert eval_tokens(EvalConfig(), [small]) == DEFAULT_TOKENS  # SmolLM2's width keeps today's default
    assert eval_tokens(EvalConfig(), [small, sae]) == n  # the widest SAE decides
    assert eval_tokens(EvalConfig(sections=("core",)), [sae]) == DEFAULT_TOKENS
    assert eval_tokens(EvalConfig(tokens=5000), [sae]) == 5000  # an explicit --tokens is kept


def test_eval_lm_batches_split_for_a_large_vocabulary_give_the_same_ce_and_kl(monkeypatch):
    """core's CE/KL passes and dark matter's CE with the LM batches split into sub-batches of 1-3 rows (as a 256k
    vocabulary splits them: at most LOGIT_CELLS fp32 logits per forward) give the numbers of whole batches."""
    from sae_kit import heldout
    from sae_kit.eval.core import CoreConfig, downstream

    inputs = _stub_inputs(16, 700, context_size=32, lm_batch_size=8)
    torch.manual_seed(0)
    x_hat = inputs.x + 0.3 * torch.randn_like(inputs.x)
    cfg = CoreConfig(ce_tokens=500)
    whole = downstream(inputs, x_hat, cfg)
    ce_whole = dark_matter.ce_with(inputs, x_hat, 400)
    ctxs = inputs.contexts.rows(0, 8)
    for cells in (1, 3 * 32 * 64):  # one row per forward; three rows per forward (ragged last sub-batch)
        monkeypatch.setattr(heldout, "LOGIT_CELLS", cells)
        parts = list(ctxs.logit_batches(64))
        assert [before for before, _ in parts] == torch.cat(
            [torch.zeros(1, dtype=torch.int64), torch.tensor([sub.n_kept for _, sub in parts]).cumsum(0)[:-1]]
        ).tolist()
        assert torch.equal(torch.cat([sub.tokens for _, sub in parts]), ctxs.tokens)
        assert max(len(sub.tokens) for _, sub in parts) == max(1, cells // (32 * 64))
        split = downstream(inputs, x_hat, cfg)
        for key, value in whole.items():
            if isinstance(value, float):  # float32 sums in another order
                assert split[key] == pytest.approx(value, rel=1e-5, abs=1e-5), key
            else:  # counts, settings (ablation_positions), None where a pass did not run
                assert split[key] == value, key
        assert dark_matter.ce_with(inputs, x_hat, 400) == pytest.approx(ce_whole, rel=1e-9)
    assert (
        whole["ce_spliced"] > whole["ce_clean"] and whole["kl_spliced"] > 0
    )  # the splice changes the stub LM's output


# ------------------------------------------------------------------------------------------------ the index
def _old_neighbours(W_dec, start, stop, n):
    """The indexer's decoder-neighbour pass before issue 14 (CPU, fp32 normalised copy), for equality checks."""
    unit = F.normalize(W_dec.float(), dim=1)
    ids, cos = [], []
    for a, b in artifacts._blocks(start, stop, len(unit)):
        sims = unit[a:b] @ unit.T
        sims[torch.arange(b - a), torch.arange(a, b)] = -torch.inf
        vals, idx = sims.topk(min(n, len(unit) - 1), dim=1)
        ids.append(idx)
        cos.append(vals)
    return torch.cat(ids), torch.cat(cos)


def _old_cofire(p, start, stop, n):
    """The co-firing pass before issue 14: dense [features × features] Jaccard, top n per row."""
    fired = torch.zeros(p.tokens.numel(), p.d_sae)
    fired[p.position, p.feature] = 1
    both = fired.T[start:stop] @ fired
    count = fired.sum(0)
    both[torch.arange(stop - start), torch.arange(start, stop)] = 0
    jac = both / (count[start:stop, None] + count[None] - both).clamp(min=1)
    vals, idx = jac.topk(min(n, p.d_sae), dim=1)
    return idx, vals, both.gather(1, idx) / count[start:stop, None].clamp(min=1)


def test_blockwise_neighbours_and_cofiring_equal_the_previous_passes(monkeypatch):
    g = torch.Generator().manual_seed(3)
    F_, d_in, R, T = 96, 12, 20, 16
    W = torch.randn(F_, d_in, generator=g) * (0.5 + torch.rand(F_, 1, generator=g))
    want_ids, want_cos = _old_neighbours(W, 10, 70, 5)
    dense = torch.rand(R * T, F_, generator=g) * (torch.rand(R * T, F_, generator=g) < 0.15)
    pos, feat = dense.nonzero(as_tuple=True)
    tokens = torch.randint(0, 50, (R, T), generator=g)
    p = artifacts.Pass.from_entries(tokens, torch.ones(R, T, dtype=torch.bool), feat, pos, dense[pos, feat], R * T, F_)
    c_ids, c_jac, c_frac = _old_cofire(p, 10, 70, 5)
    monkeypatch.setattr(artifacts, "MAX_CELLS", 7 * F_)  # blocks of 7 features: many blocks, a ragged last one
    ids, cos = artifacts.neighbours(W, 10, 70, 5)
    assert [r.as_py() for r in ids] == want_ids.tolist()
    assert torch.allclose(torch.tensor([r.as_py() for r in cos]), want_cos, atol=1e-6)
    got_ids, got_jac, got_frac = artifacts.CoFiring(p, device=W.device).top(10, 70, 5)
    for row in range(60):
        ok = c_jac[row] > 0
        assert got_ids[row].as_py() == c_ids[row][ok].tolist()
        assert got_jac[row].as_py() == pytest.approx(c_jac[row][ok].tolist(), abs=1e-7)
        assert got_frac[row].as_py() == pytest.approx(c_frac[row][ok].tolist(), abs=1e-7)
    assert sum(len(r) for r in got_ids.to_pylist()) > 0
