"""The `interpbook` command: argument errors, export, run."""

from __future__ import annotations

import nbformat
import pytest
from conftest import FIXTURES, REPO
from interpbook import cli

PAGE = FIXTURES / "exercise_page.md"


def test_no_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([])
    assert exc.value.code == 2
    assert "COMMAND" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["run", "export"])
def test_unknown_chapter_lists_the_chapters(command, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert cli.main([command, "99-nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown chapter '99-nope'" in err and "01-introduction" in err


def test_build_unknown_chapter(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert cli.main(["build", "--chapter", "99-nope"]) == 2
    assert "unknown chapter" in capsys.readouterr().err


def test_missing_page(capsys, tmp_path):
    assert cli.main(["export", str(tmp_path / "missing.md")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_export_page(tmp_path, capsys):
    assert cli.main(["export", str(PAGE), "-o", str(tmp_path)]) == 0
    nb = nbformat.read(tmp_path / "exercise_page.ipynb", as_version=4)
    nbformat.validate(nb)
    assert "squares = ...  # your code here" in "\n".join(c.source for c in nb.cells)
    assert "wrote" in capsys.readouterr().out


def test_run_executes_like_the_book(tmp_path, monkeypatch):
    """The fixture page runs with outputs; its starter cell (which would raise) is skipped."""
    for name in ("MPLBACKEND", "PYTHONWARNINGS", "TQDM_DISABLE"):  # restored afterwards
        monkeypatch.delenv(name, raising=False)
    page = FIXTURES / "pipeline-chapter" / "demo.md"
    out = tmp_path / "demo.ipynb"
    assert cli.main(["run", str(page), "-o", str(out)]) == 0
    nb = nbformat.read(out, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert any(o.get("output_type") == "display_data" and "image/png" in o.get("data", {})
               for c in code for o in c.outputs), "the figure is missing"
    starter = next(c for c in code if "starter" in c.metadata.get("tags", []))
    assert starter.outputs == [] and "skip-execution" in starter.metadata["tags"]
    solution = next(c for c in code if "solution" in c.metadata.get("tags", []))
    assert "matches the reference" in str(solution.outputs)


def test_kernel_environment(monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("PYTHONWARNINGS", "ignore::DeprecationWarning")
    cli.kernel_environment()
    cli.kernel_environment()
    import os

    assert "MPLBACKEND" not in os.environ
    assert os.environ["PYTHONWARNINGS"] == "ignore::DeprecationWarning,ignore:IProgress not found:Warning"
    assert os.environ["TQDM_DISABLE"] == "1"
