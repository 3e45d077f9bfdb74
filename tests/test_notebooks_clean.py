"""Notebooks are committed clean and follow the house skeleton (STYLE.md habits 2, 3 and 9)."""
import ast
import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


def code_cells(path):
    return [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]


def test_there_are_notebooks():
    assert NOTEBOOKS, "notebooks/ is empty"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_has_no_outputs(path):
    dirty = [i for i, c in enumerate(code_cells(path)) if c.get("outputs") or c.get("execution_count")]
    assert not dirty, f"{path.name}: code cells {dirty} carry outputs; run `make strip` before committing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_first_code_cell_picks_profile_seeds_and_prints_banner(path):
    first = "".join(code_cells(path)[0]["source"])
    for needed in ("profile(", "seed_everything(", "banner("):
        assert needed in first, f"{path.name}: the first code cell must call {needed}...)"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_defines_no_functions_or_classes(path):
    for i, cell in enumerate(code_cells(path)):
        src = "\n".join(line for line in "".join(cell["source"]).splitlines()
                        if not line.lstrip().startswith(("%", "!")))
        tree = ast.parse(src)
        defs = [n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
        assert not defs, f"{path.name} cell {i} defines {defs}: reusable code belongs in rlnlp"


@pytest.mark.parametrize("argv, words", [(["missing.ipynb"], "no such notebook"),
                                         (["notebooks/00_tour.ipynb", "-o", "x.ipynb"], "got -o"),
                                         (["a.ipynb", "b.ipynb", "c.ipynb"], "got c.ipynb"),
                                         (["a.ipynb", "--strip"], "got --strip")])
def test_notebook_runner_rejects_bad_arguments_in_one_line(argv, words, capsys):
    from rlnlp.notebook import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and "\n" not in err
