"""The directory the browser was given, and what it holds: SAEs (one run, a sweep's members, or a bare SAE
directory), their training logs, eval reports, feature indexes and autointerp results.

Every read of the browser goes through `Workspace.file`, which refuses any path that resolves outside the directory
(a symlink out of it included), so the app reads only inside the directory it was given.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sae_kit import rundir
from sae_kit.errors import SaeKitError

if TYPE_CHECKING:
    from sae_kit.autointerp.store import Results

ROOT_ENV = "SAE_KIT_BROWSE_DIR"
"""The environment variable that tells the app which directory to browse (set by `sae-kit browse`)."""

AUTOINTERP_TABLES = ("explanations.parquet", "scores.parquet", "predictions.parquet")
"""The tables of <index>/autointerp (sae_kit.autointerp.store) the browser reads."""


class BrowseError(SaeKitError):
    """The browser cannot show what was asked (not a run, a path outside it, a damaged file)."""


Entry = rundir.Located
"""One SAE of the workspace (name: its run's or member's directory name; run_dir: the SAE directory itself for a bare
SAE or when the browser was given the SAE directory of a run)."""


@dataclass(frozen=True)
class Evaluated:
    """One SAE's entry in one eval report of the workspace."""

    label: str
    report_dir: Path
    report: dict[str, Any]
    sae: dict[str, Any]
    """The report's per-SAE record (name, sections, figures, ...)."""


class Workspace:
    """A run, sweep or SAE directory opened read-only."""

    def __init__(self, root: str | Path | None) -> None:
        if not root:
            raise BrowseError("no directory to browse; start the app with: sae-kit browse RUN_OR_SAE_DIR")
        self.root = Path(root).expanduser().resolve()
        if not self.root.is_dir():
            raise BrowseError(f"{root} is not a directory; pass a run directory written by sae-kit train")
        self.entries = self._find_saes()

    def file(self, path: str | Path) -> Path:
        """`path` (absolute or relative to the root) resolved, or a one-line error when it lies outside the root."""
        resolved = (self.root / path).resolve()
        if not resolved.is_relative_to(self.root):
            raise BrowseError(
                f"{path} resolves to {resolved}, outside {self.root}; the browser reads only inside the directory it was given"
            )
        return resolved

    def json(self, path: str | Path) -> Any:
        file = self.file(path)
        try:
            return json.loads(file.read_text())
        except (OSError, ValueError) as err:
            raise BrowseError(
                f"{file.relative_to(self.root)} is unreadable ({type(err).__name__}: {str(err)[:80]})"
            ) from None

    def _find_saes(self) -> list[Entry]:
        found = rundir.find(self.root)
        if not found:
            raise BrowseError(
                f"{self.root} is not a run: it holds no sae/cfg.json, cfg.json or <member>/sae/cfg.json; "
                "pass a directory written by sae-kit train"
            )
        inside = lambda d: d.resolve().is_relative_to(self.root)  # noqa: E731 (the run of a given <run>/sae is outside)
        return [
            Entry(f.name.split("/")[-1], self.file(f.sae_dir), self.file(f.run_dir) if inside(f.run_dir) else self.root)
            for f in found
        ]

    def metrics(self, entry: Entry) -> list[dict[str, Any]]:
        """The training log (metrics.jsonl) of an SAE: its run's, or the sweep's shared one; [] when absent."""
        for folder in (entry.run_dir, self.root):
            file = self.file(folder / rundir.METRICS)
            if file.is_file():
                rows = []
                for line in file.read_text().splitlines():
                    try:
                        rows.append(json.loads(line))
                    except ValueError:
                        continue  # a line cut short by a killed run
                return rows
        return []

    def config(self, entry: Entry) -> dict[str, Any]:
        """The SAE's cfg.json, and the run's config.json when there is one."""
        out = {"sae": self.json(entry.sae_dir / "cfg.json")}
        for folder in (entry.run_dir, self.root):
            if self.file(folder / rundir.CONFIG).is_file():
                out["run"] = self.json(folder / rundir.CONFIG)
                break
        return out

    def evaluations(self) -> list[Evaluated]:
        """Every SAE record of every eval report inside the workspace (report.json at most three levels down)."""
        found = []
        files = sorted({f for depth in ("*/", "*/*/", "*/*/*/", "") for f in self.root.glob(f"{depth}{rundir.REPORT}")})
        for file in files:
            try:
                report = rundir.load_report(self.file(file))
            except (ValueError, OSError, BrowseError):
                continue
            rel = file.parent.relative_to(self.root)
            for sae in report.get("saes", []):
                found.append(Evaluated(f"{sae['name']} ({rel})", file.parent, report, sae))
        return found

    def evaluation_of(self, entry: Entry) -> Evaluated | None:
        """The newest report record describing this SAE (matched by its directory, else by name)."""
        matches = []
        for ev in self.evaluations():
            path = ev.sae.get("path")
            same_dir = path is not None and Path(path).resolve() == entry.sae_dir
            if same_dir or ev.sae["name"].split("/")[-1] == entry.name:
                matches.append(ev)
        return max(matches, key=lambda ev: ev.report.get("created", "")) if matches else None

    def figure(self, ev: Evaluated, name: str):
        """A plotly figure of a report, read from its JSON copy; None when missing."""
        import plotly.io as pio

        rel = ev.sae.get("figures", {}).get(name) or (ev.report.get("comparison") or {}).get("figures", {}).get(name)
        if rel is None:
            return None
        file = self.file(ev.report_dir / Path(rel).with_suffix(".json"))
        return pio.from_json(file.read_text()) if file.is_file() else None

    def autointerp(self, entry: Entry) -> Results:
        """The SAE's autointerp results (<index>/autointerp), opened read-only. Every file they may be read from is
        checked to lie inside the root first (a symlink out of it is refused in one line); missing files are fine."""
        from sae_kit.autointerp import store

        index_dir = self.file(entry.index_dir)
        folder = self.file(store.folder(index_dir))
        for name in (store.EXPLAIN_META, store.SCORE_META, *AUTOINTERP_TABLES):
            self.file(folder / name)
        return store.Results(index_dir)
