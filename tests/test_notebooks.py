"""Source notebooks: clean, one typed-literal parameters cell, consistent with the recipes and the TOC."""
import ast
from pathlib import Path

import nbformat
import pytest
import yaml

from helpers import book, config, runner

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks_and_all_are_numbered():
    assert NOTEBOOKS
    assert all(runner.NOTEBOOK_NAME.match(p.name) for p in NOTEBOOKS)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_without_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: clear outputs before committing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_parameters_cell_holds_only_typed_literals_with_comments(path):
    cell = runner.parameters_cell(path)
    tree = ast.parse(cell.source)
    names = []
    for statement in tree.body:
        assert isinstance(statement, ast.AnnAssign), f"{path.name}: `{ast.unparse(statement)}` is not `name: type = literal`"
        ast.literal_eval(statement.value)  # raises on anything but a literal
        names.append(statement.target.id)
    for line in cell.source.splitlines():
        assert "  # " in line, f"{path.name}: parameter line without a trailing comment: {line!r}"
    assert set(config.COMMON_PARAMETERS) <= set(names)
    import papermill

    # papermill's own parser is stricter than Python's (e.g. an '=' inside a comment hides the parameter)
    assert list(papermill.inspect_notebook(str(path))) == names, f"{path.name}: papermill cannot read every parameter"


@pytest.mark.parametrize("profile", config.PROFILES)
def test_every_recipe_matches_the_notebooks(profile):
    recipe = config.load_recipe(profile, REPO)
    stems = {p.stem for p in NOTEBOOKS}
    assert set(recipe.notebooks) <= stems, f"{profile}.yaml configures notebooks that do not exist"
    for path in NOTEBOOKS:
        runner.check_parameters(path, recipe.parameters_for(path.stem, REPO), recipe)


def test_toc_lists_exactly_the_notebooks():
    listed = {p.as_posix() for p in book.toc_files(REPO) if p.parts[0] == "book" and p.name[:2].isdigit()}
    assert listed == {f"book/{p.stem}" for p in NOTEBOOKS}
    assert yaml.safe_load((REPO / "_toc.yml").read_text())["root"] == "book/intro"
