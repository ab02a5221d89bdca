"""A plain (non-editable) `pip install .` into a fresh venv ships training/, eval/ and dashboards/ inside sae_kit."""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_pip_install_into_fresh_venv(tmp_path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    # --no-deps: the dependencies come from the system site; this checks the package layout, not the resolver.
    # Build isolation stays on: a venv's bundled setuptools is too old to build wheels.
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", str(ROOT)], check=True, cwd=tmp_path)
    code = ("import sae_kit, sae_kit.training, sae_kit.eval, sae_kit.dashboards.indexer, sae_kit.dashboards.pages, pathlib; "
            "p = pathlib.Path(sae_kit.__file__).parent; "
            "assert all((p / d / '__init__.py').is_file() for d in ('training', 'eval', 'dashboards')), p; "
            "assert (p / 'dashboards' / 'app.py').is_file(), 'the Streamlit script sae-kit browse runs is missing'; "
            "assert 'site-packages' in str(p), p; print(p)")
    out = subprocess.run([str(py), "-c", code], check=True, cwd=tmp_path, capture_output=True, text=True).stdout
    assert str(env_dir) in out
    assert (env_dir / "bin" / "sae-kit").is_file()
