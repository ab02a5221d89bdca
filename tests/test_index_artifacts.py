"""The indexer's vectorised per-feature artifacts against plain-loop references on a small random pass."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from sae_kit.dashboards import artifacts


@pytest.fixture
def p() -> artifacts.Pass:
    """6 contexts of 10 tokens (the last two of row 5 are padding), 7 features, signed values, ~40% fill."""
    g = torch.Generator().manual_seed(0)
    R, T, F = 6, 10, 7
    tokens = torch.randint(0, 50, (R, T), generator=g)
    valid = torch.ones(R, T, dtype=torch.bool)
    valid[5, 8:] = False
    dense = torch.randn(R * T, F, generator=g) * (torch.rand(R * T, F, generator=g) < 0.4)
    dense[~valid.flatten()] = 0
    dense[:, 6] = 0  # a dead feature
    pos, feat = dense.nonzero(as_tuple=True)
    return artifacts.Pass.from_entries(tokens, valid, feat, pos, dense[pos, feat], int(valid.sum()), F)


def dense_of(p: artifacts.Pass) -> torch.Tensor:
    out = torch.zeros(p.tokens.numel(), p.d_sae)
    out[p.position, p.feature] = p.value
    return out


def test_entries_are_sorted_by_feature_then_position(p):
    keys = p.keys
    assert bool((keys[1:] > keys[:-1]).all())


def test_stats_and_histograms_match_a_loop(p):
    d = dense_of(p)
    st = artifacts.stats(p)
    hist = artifacts.histograms(p, st, bins=4)
    for f in range(p.d_sae):
        nz = d[:, f][d[:, f] != 0]
        assert int(st.count[f]) == len(nz)
        assert hist[f].sum() == len(nz)
        if len(nz):
            assert float(st.max_act[f]) == pytest.approx(max(float(nz.max()), 0.0))
            assert float(st.min_act[f]) == pytest.approx(min(float(nz.min()), 0.0))
            assert float(st.mean_abs[f]) == pytest.approx(float(nz.abs().mean()), rel=1e-6)
            assert (float(st.lo[f]), float(st.hi[f])) == pytest.approx((float(nz.min()), float(nz.max())))
    assert int(st.count[6]) == 0 and hist[6].sum() == 0


@pytest.mark.parametrize("sign", [1, -1])
def test_top_entries_take_the_strongest_per_row_then_the_strongest_rows(p, sign):
    d = dense_of(p).view(*p.tokens.shape, p.d_sae) * sign
    idx = artifacts.top_entries(p, n=3, sign=sign)
    for f in range(p.d_sae):
        per_row = d[:, :, f].amax(1)
        want = sorted([float(v) for v in per_row if v > 0], reverse=True)[:3]
        got = [float(v) * sign for v, ff in zip(p.value[idx], p.feature[idx]) if ff == f]
        assert got == pytest.approx(want)
        rows = [int(q) // p.tokens.shape[1] for q, ff in zip(p.position[idx], p.feature[idx]) if ff == f]
        assert len(set(rows)) == len(rows)


def test_quantile_bands_split_each_feature_by_magnitude(p):
    exclude = artifacts.top_entries(p, n=1)
    idx, band, ranges = artifacts.quantile_entries(p, bands=2, per_band=2, exclude=exclude, seed=0)
    assert not set(idx.tolist()) & set(exclude.tolist())
    for i, b in zip(idx.tolist(), band.tolist()):
        f, mag = int(p.feature[i]), abs(float(p.value[i]))
        assert float(ranges[f, b, 0]) <= mag <= float(ranges[f, b, 1])
    for f in range(p.d_sae - 1):  # the bands split each live feature's |activations| at a quantile
        mags = sorted(abs(float(v)) for v, ff in zip(p.value, p.feature) if ff == f)
        assert float(ranges[f, 0, 0]) == pytest.approx(mags[0]) and float(ranges[f, 1, 1]) == pytest.approx(mags[-1])
        half = -(-len(mags) // 2)  # band 0 holds ranks r with 2r < n
        assert (float(ranges[f, 0, 1]), float(ranges[f, 1, 0])) == pytest.approx((mags[half - 1], mags[half]))
    counts = torch.bincount(p.feature[idx] * 2 + band, minlength=p.d_sae * 2)
    assert int(counts.max()) <= 2
    again, _, _ = artifacts.quantile_entries(p, bands=2, per_band=2, exclude=exclude, seed=0)
    assert torch.equal(idx, again)


def test_context_windows_carry_the_features_activation_on_every_token(p):
    d = dense_of(p)
    idx = artifacts.top_entries(p, n=2)
    lists = artifacts.contexts(p, idx, None, before=3, after=2, start=0, stop=p.d_sae).to_pylist()
    T = p.tokens.shape[1]
    for f, ctxs in enumerate(lists):
        for c in ctxs:
            positions = [
                c["row"] * T + t for t in range(max(0, c["pos"] - 3), min(T, c["pos"] + 3)) if p.valid[c["row"], t]
            ]
            assert c["tokens"] == [int(p.tokens.flatten()[q]) for q in positions]
            assert c["acts"] == pytest.approx([float(d[q, f]) for q in positions])
            assert c["acts"][c["peak"]] == pytest.approx(c["act"])
            assert c["band"] == -1


def test_cofiring_is_the_jaccard_index_of_firing_positions(p):
    fired = dense_of(p) != 0
    ids, jac, frac = artifacts.CoFiring(p).top(0, p.d_sae, n=3)
    for f in range(p.d_sae):
        want = []
        for g in range(p.d_sae):
            both = int((fired[:, f] & fired[:, g]).sum())
            if g != f and both:
                want.append((both / int((fired[:, f] | fired[:, g]).sum()), g, both / int(fired[:, f].sum())))
        want = sorted(want, reverse=True)[:3]
        assert jac[f].as_py() == pytest.approx([w[0] for w in want])
        assert frac[f].as_py() == pytest.approx([w[2] for w in want])


def test_neighbours_and_logit_effects_rank_like_a_dense_computation():
    W = torch.randn(9, 5, generator=torch.Generator().manual_seed(1))
    ids, cos = artifacts.neighbours(W, 2, 7, n=3)
    unit = torch.nn.functional.normalize(W, dim=1)
    for row, f in enumerate(range(2, 7)):
        sims = unit @ unit[f]
        sims[f] = -2
        assert ids[row].as_py() == sims.topk(3).indices.tolist()
        assert cos[row].as_py() == pytest.approx(sims.topk(3).values.tolist(), abs=1e-6)
    U = torch.randn(5, 11)
    pos_ids, pos_vals, neg_ids, neg_vals = artifacts.logit_effects(lambda d: d @ U, W, 0, 9, n=4)
    effect = W @ U
    assert pos_ids[3].as_py() == effect[3].topk(4).indices.tolist()
    assert neg_ids[3].as_py() == (-effect[3]).topk(4).indices.tolist()
    assert neg_vals[3].as_py() == pytest.approx((-(-effect[3]).topk(4).values).tolist(), abs=1e-5)


def test_picks_keep_the_negative_side_only_for_signed_rules(p):
    cfg = SimpleNamespace(top=2, bands=2, per_band=1, seed=0)
    assert len(artifacts.Picks.choose(p, cfg, signed=False).top_negative) == 0
    signed = artifacts.Picks.choose(p, cfg, signed=True)
    assert len(signed.top_negative) > 0 and bool((p.value[signed.top_negative] < 0).all())
    peaks = signed.peak_tokens(p)
    assert len(peaks) == p.d_sae and peaks[6] == []
