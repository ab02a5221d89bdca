"""Steering on the real SmolLM2: a known answer (a token's unembedding direction raises that token), and the full
measurement on small random SAEs (both signs for abstopk, DiM's planted feature found, steered text)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from sae_kit.eval.inputs import EvalError, prepare
from sae_kit.eval.steering import (
    NEGATIVE,
    POSITIVE,
    SteeringConfig,
    budgeted_best,
    dim_vector,
    measure,
    token_mass_increase,
)
from sae_kit.heldout import logit_lens
from sae_kit.sae import SAE, SAEConfig

HOOK = "blocks.6.hook_resid_post"
SMALL = SteeringConfig(
    n_features=2,
    alphas=(1.0, 8.0),
    contexts=2,
    generate_tokens=8,
    generate_alpha=16.0,
    contrast_positive=POSITIVE[:3],
    contrast_negative=NEGATIVE[:3],
)


def random_sae(architecture: str, seed: int = 0) -> SAE:
    torch.manual_seed(seed)
    return SAE(
        SAEConfig(architecture=architecture, d_in=576, d_sae=64, k=4, metadata={"hook_name": HOOK, "context_size": 32})
    )


@pytest.fixture(scope="module")
def inputs(model):
    return prepare(model, random_sae("topk"), 100, lm_batch_size=4)


@pytest.fixture(scope="module")
def v(model, inputs):
    return dim_vector(model, inputs.data, SMALL.contrast_positive, SMALL.contrast_negative)


def plant(inputs, architecture: str, atom: torch.Tensor, feature: int = 5):
    """`inputs` for a random SAE of `architecture` whose atom `feature` is `atom` (unit norm)."""
    sae = random_sae(architecture, seed=1)
    with torch.no_grad():
        sae.W_dec[feature] = atom / atom.norm()
        sae.W_enc[:, feature] = atom / atom.norm()
    return dataclasses.replace(inputs, sae=sae.eval())


def test_steering_along_a_token_unembedding_raises_its_probability(model, inputs):
    cat = model.tokenizer.encode(" cat", add_special_tokens=False)[0]
    u = model.W_U[:, cat].float().cpu()
    assert logit_lens(model, u[None] / u.norm())[0].argmax() == cat  # the lens reads the direction back as " cat"
    ids = torch.tensor([cat])
    zero = token_mass_increase(model, inputs, u / u.norm(), 0.0, ids, contexts=2)
    assert zero == (0.0, 0.0)
    (m1, kl1), (m2, kl2) = (
        token_mass_increase(model, inputs, u / u.norm(), a, ids, contexts=2) for a in (150.0, 400.0)
    )
    assert 0 < m1 < m2 and m2 > 0.1  # the residual norm is ~100 at layer 6: a few hundred takes the token over
    assert 0 < kl1 < kl2


def test_budgeted_best_keeps_the_largest_gain_within_the_kl_budget():
    assert budgeted_best([0.1, 0.3, 0.9], [0.2, 0.8, 3.0], budget=1.0) == 0.3
    assert budgeted_best([-0.1, 0.5], [0.1, 2.0], budget=1.0) == 0.0  # not steering (α = 0) beats a loss


def test_measure_reports_curves_score_dim_and_text(model, inputs, v):
    section = measure(plant(inputs, "topk", v), SMALL)
    m = section.metrics
    assert len(m["features"]) == 2 and not m["signed"] and "delta_mass_negative" not in m
    for key in ("delta_mass", "kl"):
        assert len(m[key]) == 2 and all(len(row) == 2 and all(math.isfinite(x) for x in row) for row in m[key])
        assert len(m["mean_" + key]) == 2
    assert all(kl > 0 for row in m["kl"] for kl in row) and all(len(t) == 10 for t in m["target_tokens"])
    assert math.isfinite(m["score"]) and m["score"] >= 0 and all(u > 0 for u in m["max_activation"])
    dim = m["dim"]
    assert dim["closest_feature"] == 5 and dim["closest_cosine"] == pytest.approx(1.0, abs=1e-5)
    assert dim["closest_delta_mass"] == pytest.approx(dim["delta_mass"], abs=1e-6)  # same direction, norms and targets
    assert " love" in dim["target_tokens"] and " hate" not in dim["target_tokens"]
    gen = m["generation"]
    assert gen["feature"] in m["features"] and isinstance(gen["clean"], str) and isinstance(gen["steered"], str)
    assert gen["steered"] != gen["clean"]
    assert set(section.figures) == {"steering_delta_mass", "steering_kl", "steering_dim"}
    assert section.lines[0].startswith("steering: score") and json.loads(json.dumps(m)) == m


def test_abstopk_is_steered_both_ways_and_dim_finds_a_flipped_atom(model, inputs, v):
    section = measure(
        plant(inputs, "abstopk", -v), dataclasses.replace(SMALL, generate_feature=5, generate_alpha=-16.0)
    )
    m = section.metrics
    assert m["signed"]
    for key in ("delta_mass_negative", "kl_negative"):
        assert len(m[key]) == 2 and all(math.isfinite(x) for row in m[key] for x in row)
    assert all(len(t) == 10 for t in m["target_tokens_negative"]) and m["target_tokens_negative"] != m["target_tokens"]
    dim = m["dim"]
    assert dim["closest_feature"] == 5 and dim["closest_cosine"] == pytest.approx(-1.0, abs=1e-5)
    assert dim["closest_delta_mass"] == pytest.approx(dim["delta_mass"], abs=1e-6)  # steered along −atom = +v̂
    assert m["generation"]["feature"] == 5 and m["generation"]["alpha"] == -16.0
    assert any(line.startswith("steering −α") for line in section.lines)


def test_bad_settings_give_one_line_errors(inputs):
    with pytest.raises(EvalError, match="positions"):
        SteeringConfig(positions="last")
    with pytest.raises(EvalError, match="generate_feature=999"):
        measure(inputs, dataclasses.replace(SMALL, n_features=1, alphas=(1.0,), generate_feature=999))
