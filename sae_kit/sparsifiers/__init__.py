"""The sparsity rules, keyed by `SAEConfig.architecture`: the plug-in point of sae-kit.

Every SAE shares the decoder x̂ = f·W_dec + b_dec, the losses, the checkpoint format and the evaluation; a rule only
decides the code f. A rule is a `Sparsifier` subclass in one small file; adding an architecture is that file plus
one line in `REGISTRY` (and the SAEConfig fields it reads, listed in its `config_fields`).

Dictionary sharding: every rule chooses its support from the pre-activations z (g-SAE: from z and W_dec·g,
MP-SAE: from the correlations r·W_decᵀ), column by column. With the latents split across ranks, each rank can
therefore select locally and the global choice is a merge: per-token top-k of the ranks' top-k candidates
(TopK, AbsTopK, g-SAE), top-(k·B) of the ranks' top-(k·B) (Mutual Choice), nothing at all (Feature Choice and the
threshold rules are per latent), or an argmax of the ranks' argmaxes per step (MP-SAE).
"""

from __future__ import annotations

from sae_kit.errors import SaeKitError
from sae_kit.sparsifiers.abstopk import AbsTopK
from sae_kit.sparsifiers.base import Codes, Sparsifier
from sae_kit.sparsifiers.feature_choice import FeatureChoice
from sae_kit.sparsifiers.gsae import GSAE
from sae_kit.sparsifiers.jumprelu import JumpReLU
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
}
"""Architecture name -> rule class."""

ALIASES: dict[str, str] = {"batchtopk": "mutual_choice", "standard": "relu"}
"""Other names for registered rules (BatchTopK is Mutual Choice; "standard" is SAELens's name for ReLU)."""

ARCHITECTURES: tuple[str, ...] = tuple(sorted([*REGISTRY, *ALIASES]))
"""Every accepted `architecture` string."""


def get_sparsifier(architecture: str) -> type[Sparsifier]:
    """The rule class for an architecture name or alias."""
    name = ALIASES.get(architecture, architecture)
    if name not in REGISTRY:
        raise SaeKitError(f"unknown architecture {architecture!r}; use one of: {', '.join(ARCHITECTURES)}")
    return REGISTRY[name]


__all__ = ["ALIASES", "ARCHITECTURES", "REGISTRY", "Codes", "Sparsifier", "get_sparsifier"]
