"""The notebook splice API (sae_kit.splice) and the feature edit under it (sae_kit.heldout.feature_edit)."""

from __future__ import annotations

import pytest
import torch

from sae_kit.heldout import HeldoutError, feature_edit
from sae_kit.sae import SAE, SAEConfig


def small_sae(d_in: int = 8, d_sae: int = 16, k: int = 4, seed: int = 0) -> SAE:
    torch.manual_seed(seed)
    sae = SAE(SAEConfig(d_in=d_in, d_sae=d_sae, k=k, dtype="float64"))
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(0, 0.1)
    return sae.eval()


def test_feature_edit_changes_exactly_the_decoder_contribution():
    sae = small_sae()
    acts = torch.randn(2, 5, 8, dtype=torch.float64) * 3
    keep = torch.ones(2, 5, dtype=torch.bool)
    keep[:, 0] = False
    f = sae.encode(acts)  # [2, 5, 16]
    live = int((f[keep] != 0).sum(0).argmax())  # the feature active on most kept positions
    d = sae.W_dec[live].detach()

    out = feature_edit(sae, {live: 0.0})(acts, keep)
    expected = acts - keep[..., None] * f[..., live : live + 1] * d
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    assert torch.equal(out[:, 0], acts[:, 0])  # unkept positions untouched, bit for bit
    assert (out - acts)[keep].abs().sum() > 0  # the feature really fired somewhere

    # clamp / scale / add, restricted to the last position, error term kept
    for mode, v, new in (
        ("clamp", 2.5, lambda x: torch.full_like(x, 2.5)),
        ("scale", 3.0, lambda x: 3 * x),
        ("add", -1.0, lambda x: x - 1),
    ):
        out = feature_edit(sae, {live: v}, mode=mode, positions=[-1])(acts, keep)
        delta = (new(f[..., live]) - f[..., live])[..., None] * d
        torch.testing.assert_close(out[:, -1], acts[:, -1] + delta[:, -1], rtol=0, atol=1e-12)
        assert torch.equal(out[:, :-1], acts[:, :-1])  # other positions bit for bit

    # without the error term: every kept position is the reconstruction of the edited codes
    g = f.clone()
    g[..., live] = 0
    out = feature_edit(sae, {live: 0.0}, use_error_term=False)(acts, keep)
    torch.testing.assert_close(out[keep], sae.decode(g)[keep], rtol=0, atol=1e-12)
    assert torch.equal(out[~keep], acts[~keep])
    # an empty edit without the error term is the plain splice x̂
    torch.testing.assert_close(feature_edit(sae, {}, use_error_term=False)(acts, keep)[keep], sae.decode(f)[keep])


def test_feature_edit_refuses_bad_ids_and_modes():
    sae = small_sae()
    with pytest.raises(
        HeldoutError, match=r"^feature 16 is out of range: this SAE has d_sae=16 latents \(ids 0..15\)$"
    ):
        feature_edit(sae, {16: 0.0})
    with pytest.raises(HeldoutError, match="feature -1 is out of range"):
        feature_edit(sae, {-1: 0.0})
    with pytest.raises(HeldoutError, match=r"^mode='zero'; use one of: clamp, scale, add$"):
        feature_edit(sae, {1: 0.0}, mode="zero")  # type: ignore[arg-type]
