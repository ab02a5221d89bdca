"""Sweep members: the grid architectures × k × d_sae × seeds that one run trains on the same batches, and their table."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from sae_kit.errors import SaeKitError
from sae_kit.sparsifiers import get_sparsifier


@dataclass(frozen=True)
class Member:
    """One SAE of a run."""

    name: str
    """Directory name under the run dir (when the run has several members): `<arch>[-k<k>]-<d_sae>-s<seed>`."""
    architecture: str
    k: int
    d_sae: int
    seed: int
    """Seed of the SAE's initialisation (the data order is the run's --data-seed, shared by every member)."""


def expand(
    architectures: tuple[str, ...], ks: tuple[int, ...], d_saes: tuple[int, ...], seeds: tuple[int, ...]
) -> list[Member]:
    """The grid, in the given orders; the k axis collapses for rules that have no k (relu, jumprelu)."""
    for name, values in (
        ("--architecture", architectures),
        ("--k", ks),
        ("--seed", seeds),
        ("--d-sae/--expansion-factor", d_saes),
    ):
        if not values:
            raise SaeKitError(f"{name} needs at least one value")
        if len(set(values)) != len(values):
            raise SaeKitError(f"{name} lists a value twice: {' '.join(map(str, values))}")
    if any(d < 1 for d in d_saes):
        raise SaeKitError(
            f"--d-sae/--expansion-factor must be positive (d_sae {' '.join(map(str, d_saes))}); "
            "pass --expansion-factor 8 or --d-sae 4608"
        )
    members: dict[str, Member] = {}
    for arch, k, d_sae, seed in itertools.product(architectures, ks, d_saes, seeds):
        uses_k = get_sparsifier(arch).uses_k
        if uses_k and not 1 <= k <= d_sae:
            raise SaeKitError(f"--k {k} must be between 1 and d_sae ({d_sae}); lower --k or widen the SAE")
        name = f"{arch}{f'-k{k}' if uses_k else ''}-{d_sae}-s{seed}"
        members.setdefault(name, Member(name, arch, k, d_sae, seed))
    return list(members.values())


def table(rows: list[dict]) -> str:
    """A plain-text comparison of the members' held-out results (rows as in summary.json's "members")."""
    head = f"{'member':<32} {'FVU':>8} {'L0':>8} {'dead %':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        if "failed" in r:
            lines.append(f"{r['name']:<32} failed: {r['failed']}")
        else:
            h = r["heldout"]
            lines.append(f"{r['name']:<32} {h['fvu']:>8.4f} {h['l0']:>8.1f} {100 * h['dead_frac']:>7.1f}")
    return "\n".join(lines)
