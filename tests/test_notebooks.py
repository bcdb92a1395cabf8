"""The notebooks in notebooks/ run top to bottom, and are stored without outputs."""

from __future__ import annotations

import argparse
import base64
import re
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ("quickstart.ipynb", "tuning.ipynb")
#: Each notebook has to stay quick enough for CI on 2 cores (they use 1 x 0.6 mm slides); generous
#: because a shared 2-core CI machine may be busy with other jobs.
MAX_SECONDS = 300
#: Figures each notebook draws (overview and gallery; histograms and sweeps).
MIN_FIGURES = {"quickstart.ipynb": 2, "tuning.ipynb": 4}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _figures(notebook: nbformat.NotebookNode) -> list[bytes]:
    return [
        base64.b64decode(output["data"]["image/png"])
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
        if "image/png" in output.get("data", {})
    ]


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_top_to_bottom(name: str, tmp_path: Path) -> None:
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = NotebookClient(
        notebook,
        timeout=300,
        kernel_name="python3",
        # The notebooks write their slides and galleries next to themselves: run them in a scratch folder.
        resources={"metadata": {"path": str(tmp_path)}},
        # A headless kernel: figures become PNG outputs, no window opens.
        extra_arguments=["--matplotlib=inline"],
    )
    started = time.perf_counter()
    client.execute()  # raises CellExecutionError, with the cell and traceback, if any cell fails
    seconds = time.perf_counter() - started
    assert seconds < MAX_SECONDS, f"{name} took {seconds:.0f} s"
    errors = [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if output.output_type == "error" or (output.get("name") == "stderr" and "Traceback" in output.text)
    ]
    assert not errors
    figures = _figures(notebook)
    assert len(figures) >= MIN_FIGURES[name]
    assert all(figure.startswith(PNG_MAGIC) and len(figure) > 5_000 for figure in figures)  # not blank


def test_commands_named_in_the_notebooks_exist() -> None:
    """The markdown gives the command line of each step: those commands and options must exist."""
    from pipeline.cli import build_parser

    parser = build_parser()
    subcommands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    named = set()
    for name in NAMES:
        text = (NOTEBOOKS / name).read_text()
        for command, options in re.findall(r"python -m pipeline (\w+)([^`]*)`", text.replace("\\n", " ")):
            named.add(command)
            assert command in subcommands, f"{name}: no subcommand {command!r}"
            known = {o for a in subcommands[command]._actions for o in a.option_strings}
            for option in re.findall(r"(--[a-z0-9-]+)", options):
                assert option in known, f"{name}: {command} has no option {option}"
    assert {"simulate", "run", "evaluate", "export"} <= named


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_stored_without_outputs(name: str) -> None:
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code, "a notebook without code"
    for cell in code:
        assert cell.outputs == [], f"{name}: outputs committed; clear them before committing"
        assert cell.execution_count is None, f"{name}: execution counts committed"


def _imported_top_modules(name: str) -> set[str]:
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    found = set()
    for cell in notebook.cells:
        if cell.cell_type == "code":
            found |= set(re.findall(r"^\s*(?:from|import)\s+([A-Za-z_]\w*)", cell.source, flags=re.M))
    return found


def test_the_notebooks_extra_installs_what_the_notebooks_import() -> None:
    """``pip install -e ".[notebooks]"`` is enough to run them (the note beside them says so)."""
    import importlib.metadata
    import sys
    import tomllib

    project = tomllib.loads((NOTEBOOKS.parent / "pyproject.toml").read_text())["project"]

    def names(requirements: list[str]) -> set[str]:
        return {re.split(r"[<>=!~\[ ;]", r, maxsplit=1)[0].lower() for r in requirements}

    installed = names(project["dependencies"]) | names(project["optional-dependencies"]["notebooks"])
    distributions = importlib.metadata.packages_distributions()
    imported = set().union(*(_imported_top_modules(name) for name in NAMES))
    assert "matplotlib" in imported  # what the extra is for
    for module in sorted(imported - set(sys.stdlib_module_names) - {"pipeline"}):
        provided_by = {d.lower() for d in distributions.get(module, [module])}
        assert provided_by & installed, f"{module} is imported by a notebook but not installed by the extra"
    assert 'pip install -e ".[notebooks]"' in (NOTEBOOKS / "README.md").read_text()
