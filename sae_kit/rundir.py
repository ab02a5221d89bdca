"""The run-directory layout: what training writes and where eval, the index and the browser find it.

    runs/<architecture>-k<k>[-sweep]-<date-time>/      a run (`default_run_dir`)
        config.json  summary.json  checkpoints/         the run's settings, results and resume state
        metrics.jsonl  sae/                             one SAE: its log and its SAE directory
        <member>/metrics.jsonl  <member>/sae/           a sweep: the same per member instead
        eval/report.json  index/                        what `sae-kit eval` and `sae-kit index` add (per run or member)
    runs/eval-<date-time>/report.json                   an evaluation of several SAEs (`default_eval_dir`)

An SAE directory holds cfg.json and the weights. A path given to eval, index or browse stands for the SAEs it holds
(`find`): itself when it is an SAE directory, its sae/ when it is a run, every <member>/sae/ when it is a sweep.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sae_kit.errors import SaeKitError

SAE_DIR = "sae"
CONFIG = "config.json"
SUMMARY = "summary.json"
METRICS = "metrics.jsonl"
EVAL_DIR = "eval"
INDEX_DIR = "index"
REPORT = "report.json"
REPORT_SCHEMA = "sae-kit/eval-report"
REPORT_SCHEMA_VERSION = 1


class RunDirError(SaeKitError):
    """A path that holds no SAE."""


@dataclass(frozen=True)
class Located:
    """One SAE found under a path."""

    name: str
    """Display name: the run's name, or <sweep>/<member> for a sweep member."""
    sae_dir: Path
    """The SAE directory (cfg.json + weights)."""
    run_dir: Path
    """Its run directory (config.json, metrics.jsonl, eval/, index/): the parent of <run>/sae, else the SAE directory."""

    @property
    def index_dir(self) -> Path:
        return self.run_dir / INDEX_DIR


# ------------------------------------------------------------------------------------------------ writing (training)
def default_run_dir(architecture: str, k: int, sweep: bool) -> Path:
    """Where a run goes without --out."""
    return Path(f"runs/{architecture}-k{k}{'-sweep' if sweep else ''}-{time.strftime('%Y%m%d-%H%M%S')}")


def default_eval_dir() -> Path:
    """Where an evaluation of several SAEs goes without --out (beside the training runs)."""
    return Path(f"runs/eval-{time.strftime('%Y%m%d-%H%M%S')}")


def holds_run(run_dir: Path) -> bool:
    """Whether a run was already started in `run_dir`."""
    return (run_dir / CONFIG).exists() or (run_dir / SAE_DIR).exists()


def member_dirs(run_dir: Path, names: list[str]) -> dict[str, Path]:
    """Each member's folder (metrics.jsonl, sae/): the run directory itself for a one-member run."""
    return {name: run_dir if len(names) == 1 else run_dir / name for name in names}


def sae_dir(member_dir: Path) -> Path:
    """The SAE directory of a run or member folder."""
    return member_dir / SAE_DIR


# ------------------------------------------------------------------------------------------------ reading
def is_sae_dir(path: Path) -> bool:
    return (path / "cfg.json").is_file()


def run_dir_of(sae_dir: Path) -> Path:
    """The run directory an SAE directory belongs to (its parent for <run>/sae, else itself)."""
    return sae_dir.parent if sae_dir.name == SAE_DIR else sae_dir


def find(path: Path) -> list[Located]:
    """The SAEs `path` stands for (an SAE directory, a run, or every member of a sweep, sorted); [] when none."""
    path = Path(path)
    if is_sae_dir(path):
        return [Located(path.parent.name if path.name == SAE_DIR else path.name, path, run_dir_of(path))]
    if is_sae_dir(path / SAE_DIR):
        return [Located(path.name, path / SAE_DIR, path)]
    members = sorted(d for d in path.iterdir() if d.is_dir() and is_sae_dir(d / SAE_DIR)) if path.is_dir() else []
    return [Located(f"{path.name}/{m.name}", m / SAE_DIR, m) for m in members]


def resolve(paths: tuple[Path, ...] | list[Path]) -> list[Located]:
    """Every SAE the paths stand for, with unique names (name#i for repeats); a one-line error for a path with none."""
    found: list[Located] = []
    for path in paths:
        here = find(Path(path))
        if not here:
            raise RunDirError(
                f"{path} holds no SAE (no cfg.json, sae/cfg.json or <member>/sae/cfg.json); pass an SAE or run directory"
            )
        found += here
    names = [f.name for f in found]
    return [
        f if names.count(f.name) == 1 else Located(f"{f.name}#{i}", f.sae_dir, f.run_dir) for i, f in enumerate(found)
    ]


def load_report(path: str | Path) -> dict[str, Any]:
    """Read an eval report.json, checking its schema and version (ValueError naming the problem)."""
    path = Path(path)
    data = json.loads(path.read_text())
    if data.get("schema") != REPORT_SCHEMA:
        raise ValueError(f"{path} is not an sae-kit eval report (schema {data.get('schema')!r})")
    if data.get("schema_version", 0) > REPORT_SCHEMA_VERSION:
        raise ValueError(
            f"{path} has report schema {data['schema_version']}; this sae-kit reads up to {REPORT_SCHEMA_VERSION}: upgrade sae-kit"
        )
    return data
