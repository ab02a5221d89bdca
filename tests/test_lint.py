"""The tree passes ruff (lint and format, 120 columns) and mypy, with the settings in pyproject.toml.

mypy checks the package as installed: training/, eval/ and dashboards/ ship as sae_kit.training, sae_kit.eval and
sae_kit.dashboards (pyproject's package-dir mapping), a layout mypy cannot follow in the source tree. So the test lays
it out with symlinks in a temporary directory and runs `mypy -p sae_kit` there; error paths read sae_kit/training/...
for training/... and so on.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
MAPPING = {"training": "training", "eval": "eval", "dashboards": "dashboards", "autointerp": "autointerp"}
"""Subpackage of sae_kit -> its directory in the repository (pyproject.toml [tool.setuptools.package-dir])."""


def tool(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=900)


def report(res: subprocess.CompletedProcess, command: str) -> str:
    lines = (res.stdout + res.stderr).strip().splitlines()
    return f"`{command}` exited {res.returncode}; last lines:\n" + "\n".join(lines[-60:])


def installed_layout(tmp: Path) -> Path:
    """A directory holding `sae_kit/` as installed: the package's files, plus training/, eval/, dashboards/ inside it."""
    pkg = tmp / "sae_kit"
    pkg.mkdir()
    for entry in (ROOT / "sae_kit").iterdir():
        if entry.name != "__pycache__" and entry.name not in MAPPING:
            (pkg / entry.name).symlink_to(entry)
    for sub, directory in MAPPING.items():
        (pkg / sub).symlink_to(ROOT / directory)
    return tmp


def test_ruff_check():
    res = tool("ruff", "check", ".")
    assert res.returncode == 0, report(res, "python3 -m ruff check .")


def test_ruff_format():
    res = tool("ruff", "format", "--check", ".")
    assert res.returncode == 0, report(res, "python3 -m ruff format --check .")


def test_mypy(tmp_path):
    root = installed_layout(tmp_path)
    args = (
        "mypy",
        "--config-file",
        str(ROOT / "pyproject.toml"),
        "--cache-dir",
        str(ROOT / "build" / ".mypy_cache"),
        "-p",
        "sae_kit",
    )
    res = tool(*args, cwd=root)
    assert res.returncode == 0, report(res, f"(cd {root} && python3 -m {' '.join(args)})")
