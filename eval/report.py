"""The evaluation report: a versioned `report.json` plus plotly figures, and the plain-text summary for stdout.

Layout of an eval directory:
  report.json                   schema "sae-kit/eval-report", `schema_version`; settings; per SAE its sections'
                                metrics and the paths of its figures; the comparison across SAEs
  figures/<sae>/<section>-<name>.html   self-contained offline (plotly.js written once, as figures/plotly.min.js)
  figures/<sae>/<section>-<name>.json   the figure as plotly JSON (the browser renders these natively)
  figures/<sae>/<section>-<name>.png    when a static renderer (kaleido + Chrome) works here
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from sae_kit.atomic import finite, write_bytes, write_json
from sae_kit.rundir import REPORT, REPORT_SCHEMA, REPORT_SCHEMA_VERSION, load_report  # noqa: F401 (load_report: the reader)


def write_figures(out: Path, group: str, figures: dict[str, Any], png: bool) -> tuple[dict[str, str], bool]:
    """Write each figure as HTML + JSON (+ PNG when asked and possible); ({name: html path relative to out}, png written)."""
    folder = out / "figures" / group
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, fig in figures.items():
        stem = name.replace("/", "-")
        html = fig.to_html(include_plotlyjs="../plotly.min.js", full_html=True)
        write_bytes(folder / f"{stem}.html", html.encode())
        write_bytes(folder / f"{stem}.json", fig.to_json().encode())
        if png:
            try:
                fig.write_image(folder / f"{stem}.png")
            except Exception:  # no kaleido, or no Chrome for it: PNGs are optional
                png = False
        paths[name] = str((folder / f"{stem}.html").relative_to(out))
    return paths, png


def write_plotly_js(out: Path) -> None:
    """The one copy of plotly.js the HTML figures load (so they open offline)."""
    from plotly.offline import get_plotlyjs

    target = out / "figures" / "plotly.min.js"
    if not target.exists():
        write_bytes(target, get_plotlyjs().encode())


def build_report(
    settings: dict[str, Any], saes: list[dict[str, Any]], comparison: dict[str, Any] | None
) -> dict[str, Any]:
    """The report.json content."""
    from sae_kit.sae import package_version

    return finite(
        {
            "schema": REPORT_SCHEMA,
            "schema_version": REPORT_SCHEMA_VERSION,
            "sae_kit_version": package_version(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "settings": settings,
            "saes": saes,
            "comparison": comparison,
        }
    )


def save_report(out: Path, report: dict[str, Any]) -> Path:
    write_json(out / REPORT, report)
    return out / REPORT
