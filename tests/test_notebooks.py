"""Every notebooks/*.ipynb runs top to bottom (nbclient) and is stored without outputs.

The kernel is this interpreter (a kernelspec written to a temporary JUPYTER_PATH entry), so a
fresh CI venv needs no registered kernel. R1ZERO_NOTEBOOK_FAST=1 makes the notebooks run their
shortened versions (fewer steps and seeds); offline, with ../shared/data when present.
"""

import json
import sys
from pathlib import Path

import pytest

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
KERNEL = "r1zero-jax-test"
CELL_TIMEOUT_S = 600


def test_notebooks_exist():
    names = {p.name for p in NOTEBOOKS}
    assert {"quickstart.ipynb", "length_bias.ipynb", "grader_and_templates.ipynb"} <= names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stripped(path):
    """Outputs stay out of git: no outputs, no execution counts."""
    nb = json.loads(path.read_text())
    dirty = [i for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code"
             and (c.get("outputs") or c.get("execution_count") is not None)]
    assert not dirty, f"{path.name}: cells {dirty} hold outputs; clear them before committing"


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory, monkeypatch_module):
    """A kernelspec for this interpreter, and the environment the notebooks see."""
    root = tmp_path_factory.mktemp("jupyter")
    spec_dir = root / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "r1zero-jax (test)", "language": "python"}))
    monkeypatch_module.setenv("JUPYTER_PATH", str(root))
    monkeypatch_module.setenv("R1ZERO_NOTEBOOK_FAST", "1")
    monkeypatch_module.setenv("TMPDIR", str(root))  # the notebooks' run directories go here
    # Each notebook chooses its own device count before importing JAX.
    monkeypatch_module.delenv("XLA_FLAGS", raising=False)
    monkeypatch_module.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend draws
    return root


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


# The length-bias notebook (about a minute) runs with the slow extras: the suite's time budget.
@pytest.mark.parametrize("path", [pytest.param(p, marks=pytest.mark.slow)
                                  if p.stem == "length_bias" else p for p in NOTEBOOKS],
                         ids=lambda p: p.stem)
def test_notebook_runs(path, kernel_env, tmp_path):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name=KERNEL,
                            resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    client.execute()  # raises CellExecutionError naming the failing cell
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if o.output_type == "error"]
    assert not errors
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if "image/png" in o.get("data", {})]
    assert images, f"{path.name} drew no figure"
    # Every code cell ran, in order.
    counts = [c.execution_count for c in nb.cells if c.cell_type == "code"]
    assert counts == list(range(1, len(counts) + 1))
    nbformat.write(nb, tmp_path / path.name)  # executed copy, for a look when debugging
