"""The sparsity rules, keyed by `SAEConfig.architecture`: the plug-in point of sae-kit.

Every SAE shares the decoder x̂ = f·W_dec + b_dec, the optimiser, the checkpoint format and the evaluation. Everything
else about an architecture belongs to its rule, a `Sparsifier` subclass in one small file: the code f, its settings
(`Config`, a dataclass written flat into cfg.json and generated into `sae-kit train` flags and sweep YAML), its
capabilities (uses k, signed, default aux loss, SAELens export name), its training hooks (penalties, initialisation,
calibration), its own tensors and its extra eval metrics. Adding an architecture is that file plus one line in
`REGISTRY`; nothing outside this package (and the peer-format mapping in sae_kit.formats) compares names.

Dictionary sharding: every rule chooses its support from the pre-activations z (g-SAE: from z and W_dec·g,
MP-SAE: from the correlations r·W_decᵀ), column by column. With the latents split across ranks, each rank can
therefore select locally and the global choice is a merge: per-token top-k of the ranks' top-k candidates
(TopK, AbsTopK, g-SAE), top-(k·B) of the ranks' top-(k·B) (Mutual Choice), nothing at all (Feature Choice and the
threshold rules are per latent), or an argmax of the ranks' argmaxes per step (MP-SAE).
"""

from __future__ import annotations

import copy
from dataclasses import field, fields, make_dataclass
from typing import Any

from sae_kit.errors import SaeKitError
from sae_kit.sparsifiers.abstopk import AbsTopK
from sae_kit.sparsifiers.base import Codes, RuleConfig, Sparsifier, StepContext
from sae_kit.sparsifiers.feature_choice import FeatureChoice
from sae_kit.sparsifiers.gated import Gated
from sae_kit.sparsifiers.gsae import GSAE
from sae_kit.sparsifiers.jumprelu import JumpReLU
from sae_kit.sparsifiers.matryoshka import MatryoshkaBatchTopK
from sae_kit.sparsifiers.mpsae import MatchingPursuit
from sae_kit.sparsifiers.mutual_choice import MutualChoice
from sae_kit.sparsifiers.relu import ReLU
from sae_kit.sparsifiers.topk import TopK

REGISTRY: dict[str, type[Sparsifier]] = {
    "topk": TopK,
    "abstopk": AbsTopK,
    "gsae": GSAE,
    "mpsae": MatchingPursuit,
    "mutual_choice": MutualChoice,
    "feature_choice": FeatureChoice,
    "relu": ReLU,
    "jumprelu": JumpReLU,
    "gated": Gated,
    "matryoshka_batchtopk": MatryoshkaBatchTopK,
}
"""Architecture name -> rule class."""

DEFAULT_ARCHITECTURE = "topk"
"""What `sae-kit train` and `SAEConfig` use when no architecture is named."""

ALIASES: dict[str, str] = {"batchtopk": "mutual_choice", "standard": "relu"}
"""Other names for registered rules (BatchTopK is Mutual Choice; "standard" is SAELens's name for ReLU)."""

ARCHITECTURES: tuple[str, ...] = tuple(sorted([*REGISTRY, *ALIASES]))
"""Every built-in `architecture` string (a rule registered later is looked up in REGISTRY itself)."""


def get_sparsifier(architecture: str) -> type[Sparsifier]:
    """The rule class for an architecture name or alias."""
    name = ALIASES.get(architecture, architecture)
    if name not in REGISTRY:
        names = ", ".join(sorted([*REGISTRY, *ALIASES]))
        raise SaeKitError(f"unknown architecture {architecture!r}; use one of: {names}")
    return REGISTRY[name]


def rule_settings_class() -> type:
    """A dataclass with one field per registered rule that has settings (named after the rule, holding its `Config`):
    the `rules` section of `sae-kit train` (flags `--<rule>.<field>`) and of sweep YAML (`rules: {<rule>: {...}}`)."""
    sections = [
        (name, rule.Config, field(default_factory=rule.Config))
        for name, rule in REGISTRY.items()
        if fields(rule.Config)
    ]
    return make_dataclass("RuleSettings", sections)


def rule_config_of(settings: Any, architecture: str) -> RuleConfig:
    """A copy of the rule's section of a `rule_settings_class()` instance (its defaults when it has no section)."""
    name = canonical_name(architecture)
    section = getattr(settings, name, None)
    return copy.deepcopy(section) if section is not None else REGISTRY[name].Config()


def canonical_name(architecture: str) -> str:
    """The registry name of an architecture name or alias."""
    get_sparsifier(architecture)
    return ALIASES.get(architecture, architecture)


__all__ = [
    "ALIASES",
    "ARCHITECTURES",
    "DEFAULT_ARCHITECTURE",
    "REGISTRY",
    "Codes",
    "RuleConfig",
    "Sparsifier",
    "StepContext",
    "canonical_name",
    "get_sparsifier",
    "rule_config_of",
    "rule_settings_class",
]
