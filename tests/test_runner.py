"""The papermill runner on small throw-away notebooks (real kernels, real papermill)."""
import json
from pathlib import Path

import nbformat
import pytest

from helpers import config, runner


def _notebook(path, body, parameters='profile: str = "tiny"  # profile\nseed: int = 0  # seed\nrecipe: str = ""  # recipe'):
    cells = [nbformat.v4.new_code_cell(parameters), nbformat.v4.new_code_cell(body)]
    cells[0].metadata["tags"] = ["parameters"]
    notebook = nbformat.v4.new_notebook(cells=cells)
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(notebook, path)


WRITE_STAGE = '''from helpers import config
ctx = config.setup(profile, seed, recipe)
ctx.stage("{stem}", params={{"text": "{text}"}}).run(lambda folder: (folder / "out.txt").write_text("{text}") and {{"n": 1}})
'''


@pytest.fixture
def two_notebooks(book_root):
    _notebook(book_root / "notebooks" / "00_first.ipynb", WRITE_STAGE.format(stem="00_first", text="a"))
    _notebook(book_root / "notebooks" / "01_second.ipynb", WRITE_STAGE.format(stem="01_second", text="b"))
    return book_root


def _run(root, **kwargs):
    return [r.status for r in runner.run_notebooks(config.load_recipe("tiny", root), root=root, progress=False,
                                                   **kwargs)]


def test_discover_orders_and_bounds(two_notebooks):
    assert [p.name for p in runner.discover(two_notebooks)] == ["00_first.ipynb", "01_second.ipynb"]
    assert [p.name for p in runner.discover(two_notebooks, first="1")] == ["01_second.ipynb"]
    with pytest.raises(ValueError, match="no notebook numbered '07'"):
        runner.discover(two_notebooks, last="07")


def test_rerun_skips_and_changes_rerun_what_depends_on_them(two_notebooks, capsys):
    assert _run(two_notebooks) == ["ran", "ran"]
    assert (two_notebooks / "book" / "00_first.ipynb").is_file()
    assert _run(two_notebooks) == ["skipped", "skipped"]
    assert "00_first: up to date, skipped" in capsys.readouterr().out
    # editing the first notebook changes its output, so the second one (downstream) runs again too
    _notebook(two_notebooks / "notebooks" / "00_first.ipynb", WRITE_STAGE.format(stem="00_first", text="c"))
    assert _run(two_notebooks) == ["ran", "ran"]
    # deleting a stage's artifacts reruns that notebook; its output is unchanged, so downstream stays skipped
    (two_notebooks / "data" / "runs" / "tiny" / "00_first" / "manifest.json").unlink()
    assert _run(two_notebooks) == ["ran", "skipped"]
    assert _run(two_notebooks, force=True) == ["ran", "ran"]


def test_injected_parameters_are_hidden_and_paths_relative(two_notebooks):
    _run(two_notebooks, last="0")
    executed = nbformat.read(two_notebooks / "book" / "00_first.ipynb", as_version=4)
    injected = [c for c in executed.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(injected) == 1 and "remove-cell" in injected[0].metadata["tags"]
    assert executed.metadata["papermill"]["input_path"] == "notebooks/00_first.ipynb"


def test_undeclared_parameter_is_an_error(two_notebooks):
    (two_notebooks / "configs" / "tiny.yaml").write_text("profile: tiny\nnotebooks:\n  01_second:\n    steps: 3\n")
    with pytest.raises(ValueError, match=r"passes \['steps'\] to 01_second.ipynb.*declares only"):
        _run(two_notebooks)
    assert not (two_notebooks / "book" / "00_first.ipynb").exists()  # validated before anything ran


def test_failure_names_the_notebook_the_cell_and_the_executed_copy(book_root):
    _notebook(book_root / "notebooks" / "00_ok.ipynb", "x = 1")
    _notebook(book_root / "notebooks" / "01_broken.ipynb", "raise ValueError('bad sampler Euler z')")
    _notebook(book_root / "notebooks" / "02_never.ipynb", "x = 2")
    with pytest.raises(runner.NotebookFailed) as failure:
        _run(book_root)
    message = str(failure.value)
    assert "01_broken.ipynb failed in cell [3]" in message  # In [3] of the executed copy: parameters, injected, this
    assert "ValueError: bad sampler Euler z" in message and "book/01_broken.ipynb" in message
    saved = nbformat.read(book_root / "book" / "01_broken.ipynb", as_version=4)
    assert any(o.get("output_type") == "error" for c in saved.cells for o in c.get("outputs", []))
    assert not (book_root / "book" / "02_never.ipynb").exists()


def test_failure_outside_the_book_names_the_full_path(tmp_path):
    class Failed(Exception):
        exec_count, source, ename, evalue = 4, "train()\nmore", "FileNotFoundError", "no model"

    scratch = tmp_path / "t2ibook-rank1-x" / "06_sft.ipynb"  # a non-main process's executed copy
    message = runner._failure_message(Path("notebooks/06_sft.ipynb"), scratch, Failed(), tmp_path / "book_root")
    assert "06_sft.ipynb failed in cell [4] ('train()'): FileNotFoundError: no model" in message
    assert message.endswith(str(scratch))


def test_exactly_one_parameters_cell(book_root):
    path = book_root / "notebooks" / "00_none.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1")]), path)
    with pytest.raises(ValueError, match="has 0 cells tagged 'parameters'"):
        runner.parameters_cell(path)


def test_state_file_records_key_and_owned_manifests(two_notebooks):
    _run(two_notebooks)
    state = json.loads((two_notebooks / "data" / "runs" / "tiny" / "_runner" / "01_second.json").read_text())
    assert list(state["manifests"]) == ["01_second/manifest.json"]
    assert len(state["key"]) == 64


def test_kernels_talk_over_private_unix_sockets(book_root, capfd):
    body = ("from ipykernel.kernelapp import IPKernelApp\n"
            "app = IPKernelApp.instance()\n"
            "print(app.transport, app.ip)")
    _notebook(book_root / "notebooks" / "00_kernel.ipynb", body)
    assert _run(book_root) == ["ran"]
    executed = nbformat.read(book_root / "book" / "00_kernel.ipynb", as_version=4)
    transport, ip = executed.cells[-1].outputs[0]["text"].split()
    assert transport == "ipc" and Path(ip).name == "kernel" and Path(ip).parent.name.startswith("t2ibook-kernel-")
    assert not Path(ip).parent.exists()  # the socket folder went with the kernel
    assert "without encryption" not in capfd.readouterr().err
