"""The sparsity promises at a realistic size: 2,304 latents trained on 262k tokens of real SmolLM2 layer-6 residuals,
scored on held-out documents in eval mode.

- Mutual Choice and Feature Choice run at inference with the sparsity they trained at, within 5% (their end-of-training
  threshold calibration; the EMA alone gave an inference L0 25–33% below the training L0), and then reconstruct
  better than TopK at that L0 (Feature Choice with its Zipf capacities).
- JumpReLU reaches its target L0 within 20% (its bandwidth scaled to the input norm, θ learned directly), at an FVU
  comparable to TopK's at that L0.
"""

from __future__ import annotations

import pytest

from sae_kit import HarvestConfig
from sae_kit.build_cache import CacheConfig, build_cache
from sae_kit.training import TrainConfig
from sae_kit.training.run import RuleSettings, TrainRunConfig, train

pytestmark = pytest.mark.slow
K, D_SAE, TOKENS = 32, 2304, 4096 * 64


@pytest.fixture(scope="module")
def sweep(model, tmp_path_factory):
    """One harvest, one sweep: TopK, Mutual Choice, Feature Choice and JumpReLU on the same batches."""
    root = tmp_path_factory.mktemp("scale")
    cache = build_cache(
        CacheConfig(out=root / "cache", harvest=HarvestConfig(), tokens=TOKENS, heldout_tokens=16384, progress=False),
        model=model,
    )
    rules = RuleSettings()
    rules.jumprelu.target_l0 = float(K)
    summary = train(
        TrainRunConfig(
            out=root / "run",
            cache=cache,
            architecture=("topk", "mutual_choice", "feature_choice", "jumprelu"),
            k=(K,),
            d_sae=(D_SAE,),
            eval_tokens=16384,
            progress=False,
            rules=rules,
            train=TrainConfig(tokens=TOKENS),
        )
    )
    return {m["architecture"]: m for m in summary["members"]}


@pytest.mark.parametrize("arch", ["mutual_choice", "feature_choice"])
def test_batch_rules_infer_at_their_training_sparsity(sweep, arch):
    m = sweep[arch]
    assert m["training"]["l0"] == pytest.approx(K, rel=0.01)  # the training allocation's budget
    assert m["heldout"]["l0"] == pytest.approx(m["training"]["l0"], rel=0.05), (
        m
    )  # eval mode, single tokens, held-out documents
    assert m["training"]["inference_l0"] < 0.9 * K  # what the running EMA alone would have given (the old rule)
    # at equal L0 both reconstruct better than TopK, as the paper claims (measured: 0.84x and 0.83x here; Feature
    # Choice with the old uniform capacities was 1.05x TopK in BENCHMARKS.md's run)
    assert m["heldout"]["fvu"] < 0.95 * sweep["topk"]["heldout"]["fvu"], (m["heldout"], sweep["topk"]["heldout"])


def test_jumprelu_reaches_its_target_l0_at_a_topk_like_fvu(sweep):
    jr, topk = sweep["jumprelu"]["heldout"], sweep["topk"]["heldout"]
    assert jr["l0"] == pytest.approx(K, rel=0.20), jr
    assert jr["dead_frac"] < 0.05, jr
    assert jr["fvu"] < 1.15 * topk["fvu"], (jr, topk)
