"""A plain (non-editable) `pip install .` into a fresh venv ships training/, eval/, dashboards/ and autointerp/ inside sae_kit."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def see_our_site_packages(py: Path) -> None:
    """Let the venv of interpreter `py` import what the running interpreter can, when that is itself a venv.

    A venv made with --system-site-packages from inside another venv sees the BASE interpreter's site-packages, not
    the outer venv's, where the dependencies are (`bootstrap.py` installs into the interpreter that runs it, and the
    README invites a venv). A .pth file adds the outer venv's site directories (with their own .pth files) after the
    new venv's own, so the new venv's install of sae-kit still comes first.
    """
    if sys.prefix == sys.base_prefix:  # not in a venv: the system site is ours
        return
    ours = list(dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib")))
    theirs = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    (Path(theirs) / "_outer_venv_site.pth").write_text("".join(f"import site; site.addsitedir({d!r})\n" for d in ours))


@pytest.mark.slow
def test_pip_install_into_fresh_venv(tmp_path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    see_our_site_packages(py)
    # --no-deps: the dependencies come from the system site; this checks the package layout, not the resolver.
    # Build isolation stays on: a venv's bundled setuptools is too old to build wheels.
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", str(ROOT)], check=True, cwd=tmp_path)
    code = (
        "import sae_kit, sae_kit.training, sae_kit.eval, sae_kit.dashboards.indexer, sae_kit.dashboards.pages, sae_kit.autointerp.store, pathlib; "
        "p = pathlib.Path(sae_kit.__file__).parent; "
        "assert all((p / d / '__init__.py').is_file() for d in ('training', 'eval', 'dashboards', 'autointerp')), p; "
        "assert (p / 'dashboards' / 'app.py').is_file(), 'the Streamlit script sae-kit browse runs is missing'; "
        "assert 'site-packages' in str(p), p; print(p)"
    )
    out = subprocess.run([str(py), "-c", code], check=True, cwd=tmp_path, capture_output=True, text=True).stdout
    assert str(env_dir) in out
    assert (env_dir / "bin" / "sae-kit").is_file()
