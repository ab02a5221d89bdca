"""The tutorials under docs/tutorials run end to end on the embedded model, and are committed without outputs.

Each notebook is executed with nbclient in a fresh temporary working directory by a kernel that runs *this*
interpreter (a kernelspec written for sys.executable, so a venv's tests never run a notebook in another Python).
A failing cell fails the test with that cell's source and error.
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TUTORIALS = ROOT / "docs" / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("*.ipynb"))
KERNEL = "sae-kit-tests"
CELL_TIMEOUT_S = 600
"""Per-cell limit: a hung cell fails instead of stalling CI (the slowest cell, a training run, takes well under it)."""
NOTEBOOK_TIMEOUT_S = 900
"""Per-notebook wall-clock limit (each runs in about a minute on a quiet 2-core machine)."""


@pytest.fixture(scope="module")
def kernel_manager_factory(tmp_path_factory):
    """Make KernelManagers whose kernelspec runs ipykernel under sys.executable (not whatever `python` is on PATH,
    which the installed `python3` kernelspec names)."""
    pytest.importorskip("nbclient", reason="`python3 bootstrap.py test` installs the test extras (nbclient)")
    pytest.importorskip("ipykernel", reason="`python3 bootstrap.py test` installs the test extras (ipykernel)")
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    spec_dir = tmp_path_factory.mktemp("kernels") / KERNEL
    spec_dir.mkdir()
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "sae-kit tests",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))

    def make() -> KernelManager:
        specs = KernelSpecManager(kernel_dirs=[str(spec_dir.parent)], ensure_native_kernel=False)
        return KernelManager(kernel_name=KERNEL, kernel_spec_manager=specs)

    return make


def execute(path: Path, cwd: Path, make_km, cell_timeout: int = CELL_TIMEOUT_S, timeout: int = NOTEBOOK_TIMEOUT_S):
    """Run notebook `path` in `cwd`; returns the executed notebook, or fails with the failing cell's source and error.

    A notebook still running after `timeout` seconds is interrupted (KeyboardInterrupt in the running cell)."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

    nb = nbformat.read(path, as_version=4)
    km = make_km()
    client = NotebookClient(
        nb, km=km, timeout=cell_timeout, kernel_name=KERNEL, resources={"metadata": {"path": str(cwd)}}
    )
    expired = threading.Event()

    def interrupt() -> None:
        expired.set()
        if km.has_kernel:
            km.interrupt_kernel()

    watchdog = threading.Timer(timeout, interrupt)
    watchdog.start()
    try:
        client.execute()
    except (CellExecutionError, CellTimeoutError, DeadKernelError) as err:
        why = f"ran past its {timeout} s limit" if expired.is_set() else "failed"
        pytest.fail(f"{path.relative_to(ROOT)} {why}:\n{err}", pytrace=False)
    finally:
        watchdog.cancel()
    return nb


def test_there_are_three_tutorials():
    assert [p.name for p in NOTEBOOKS] == [
        "01_quickstart.ipynb",
        "02_analysis.ipynb",
        "03_bring_your_own_architecture.ipynb",
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_tutorials_are_stripped(path):
    """Committed notebooks carry no outputs and no execution counts (outputs belong to whoever runs them)."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, f"{path.name} has no code cells"
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not dirty, f"{path.name}: cells {dirty} carry outputs or execution counts; clear them before committing"
    assert all(c.cell_type != "markdown" or c.source.strip() for c in nb.cells)


def test_the_kernel_is_this_interpreter(kernel_manager_factory, tmp_path):
    """The notebooks run in the Python that runs the tests (a venv's, or the system python3)."""
    import nbformat
    from nbformat.v4 import new_code_cell, new_notebook

    probe = tmp_path / "probe.ipynb"
    nb = new_notebook(
        cells=[new_code_cell("import os, sys\nprint(sys.executable)\nprint(sys.prefix)\nprint(os.getcwd())")]
    )
    nbformat.write(nb, probe)
    ran = execute(probe, tmp_path, kernel_manager_factory, cell_timeout=120, timeout=300)
    lines = ran.cells[0].outputs[0]["text"].splitlines()
    # unresolved: a venv's python is a symlink to the base interpreter; sys.prefix tells the two environments apart
    assert lines[:2] == [sys.executable, sys.prefix]
    assert Path(lines[2]).resolve() == tmp_path.resolve()


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_tutorial_runs(path, kernel_manager_factory, tmp_path):
    """Every cell of the tutorial runs without an error on the embedded model, in a fresh working directory."""
    nb = execute(path, tmp_path, kernel_manager_factory)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.get("output_type") == "error"]
    assert not errors
    assert all(c.execution_count for c in nb.cells if c.cell_type == "code")
