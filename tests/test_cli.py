"""The `interpbook` command: argument errors, export, run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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
    stderr = [o.text for c in code for o in c.outputs if o.get("name") == "stderr"]
    assert not stderr, f"stderr in the executed page (e.g. a missing-glyph warning): {stderr}"


def test_kernel_environment(monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("PYTHONWARNINGS", "ignore::DeprecationWarning")
    cli.kernel_environment()
    cli.kernel_environment()

    assert "MPLBACKEND" not in os.environ
    assert os.environ["PYTHONWARNINGS"] == ",".join(["ignore::DeprecationWarning", *cli.QUIET_WARNINGS])
    assert os.environ["TQDM_DISABLE"] == "1"
    assert Path(os.environ["PYTHONSTARTUP"]) == Path(cli.__file__).with_name("kernel_startup.py")
    monkeypatch.setenv("PYTHONSTARTUP", "/home/reader/.pythonrc")
    cli.kernel_environment()
    assert os.environ["PYTHONSTARTUP"] == "/home/reader/.pythonrc", "a reader's own startup file is kept"


RESIDENT_AFTER_CELL = """
import os, sys
from IPython.core.interactiveshell import InteractiveShell
shell = InteractiveShell.instance()
if sys.argv[1] == "startup":
    shell.safe_execfile(os.environ["PYTHONSTARTUP"], shell.user_ns, raise_exceptions=True)
# 300 MB in blocks small enough for the heap, one kept above them so free() cannot shrink the heap
shell.run_cell("blocks = [bytearray(60_000) for _ in range(5_000)]; keep = bytearray(60_000); del blocks")
print(next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS")) // 1024)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists() or sys.platform != "linux", reason="glibc and /proc")
def test_kernel_startup_returns_freed_memory_after_each_cell(monkeypatch):
    """With the book's startup file a kernel gives a cell's freed memory back to the system
    when the cell ends; without it the process keeps it."""
    monkeypatch.delenv("PYTHONSTARTUP", raising=False)
    cli.kernel_environment()
    resident = {}
    for mode in ("startup", "plain"):
        proc = subprocess.run([sys.executable, "-c", RESIDENT_AFTER_CELL, mode], env=dict(os.environ),
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        resident[mode] = int(proc.stdout.split()[-1])
    assert resident["plain"] - resident["startup"] > 200, resident


def test_kernels_print_no_missing_glyph_warning(monkeypatch):
    """A figure with CJK and Thai text (no glyphs in DejaVu Sans) writes nothing to stderr
    in a process started with the book's kernel environment."""

    monkeypatch.delenv("PYTHONWARNINGS", raising=False)
    cli.kernel_environment()
    code = (
        "import matplotlib\nmatplotlib.use('Agg')\nimport matplotlib.pyplot as plt\n"
        "fig, ax = plt.subplots()\nax.set_xticks([0, 1], ['\u65e5\u672c', '\u0e44\u0e17\u0e22'])\n"
        "fig.savefig(__import__('io').BytesIO(), format='png')\nprint('drawn')\n"
    )

    proc = subprocess.run([sys.executable, "-c", code], env=dict(os.environ), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "drawn" in proc.stdout, proc.stderr
    assert proc.stderr == "", proc.stderr
    unfiltered = dict(os.environ, PYTHONWARNINGS="")
    proc = subprocess.run([sys.executable, "-c", code], env=unfiltered, capture_output=True,
                          text=True, timeout=120)
    assert "missing from font" in proc.stderr, "the check above would pass without the filter"


@pytest.mark.parametrize("kind", ["file", "read-only"])
def test_export_to_an_unwritable_place_is_a_clear_error(kind, tmp_path, capsys):

    if kind == "file":
        target = tmp_path / "not-a-folder"
        target.write_text("a file where the starters should go")
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        target = tmp_path / "read-only"
        target.mkdir()
        target.chmod(0o500)
    assert cli.main(["export", str(PAGE), "-o", str(target)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("interpbook export: error: cannot write the starters into") and "-o" in err
    assert "Traceback" not in err


def test_export_into_a_path_below_a_file(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert cli.main(["export", str(PAGE), "-o", str(blocker / "sub")]) == 2
    assert "cannot write the starters into" in capsys.readouterr().err


def test_models_flags_a_garbage_model_name(monkeypatch, capsys):
    monkeypatch.setenv("INTERPBOOK_MODEL", "no-such-model!!")
    assert cli.main(["models"]) == 2
    captured = capsys.readouterr()
    assert "smollm2-135m" in captured.out, "the registry is still listed"
    assert "INTERPBOOK_MODEL='no-such-model!!' cannot be loaded" in captured.err


@pytest.mark.parametrize("name", ["", "smollm2-135m", "gemma-3-270m"])
def test_models_accepts_registry_names(name, monkeypatch, capsys):
    monkeypatch.setenv("INTERPBOOK_MODEL", name)
    assert cli.main(["models"]) == 0
    assert "default model" in capsys.readouterr().out


def test_models_checks_a_local_folder(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("INTERPBOOK_MODEL", str(tmp_path))
    assert cli.main(["models"]) == 2, "an empty folder holds no model"
    assert "cannot be loaded" in capsys.readouterr().err
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert cli.main(["models"]) == 0


def test_export_setup_cell_installs_from_the_checkout_or_the_published_book(tmp_path, monkeypatch):
    from interpbook import starters

    monkeypatch.delenv("INTERPBOOK_BASEURL", raising=False)
    assert cli.main(["export", str(PAGE), "-o", str(tmp_path / "a")]) == 0
    setup = nbformat.read(tmp_path / "a" / "exercise_page.ipynb", as_version=4).cells[1].source
    assert f"install -q {REPO}" in setup
    monkeypatch.setenv("INTERPBOOK_BASEURL", "https://book.example/ib/")
    assert cli.main(["export", str(PAGE), "-o", str(tmp_path / "b")]) == 0
    setup = nbformat.read(tmp_path / "b" / "exercise_page.ipynb", as_version=4).cells[1].source
    assert f"install -q https://book.example/ib/_static/{starters.wheel_name()}" in setup
    assert cli.main(["export", str(PAGE), "-o", str(tmp_path / "c"), "--install", "interpbook==9"]) == 0
    assert "install -q interpbook==9" in nbformat.read(tmp_path / "c" / "exercise_page.ipynb", as_version=4).cells[1].source


def test_kernel_startup_registers_only_when_asked():
    """Importing the startup module (as the API pages do) registers nothing; called with a
    shell, it registers one post-cell callback where glibc has malloc_trim."""
    from interpbook import kernel_startup

    class Events:
        def __init__(self):
            self.callbacks = []

        def register(self, event, fn):
            self.callbacks.append((event, fn))

    shell = type("Shell", (), {"events": Events()})()
    registered = kernel_startup.release_freed_memory_after_cells(shell)
    assert [e for e, _ in shell.events.callbacks] == (["post_run_cell"] if registered else [])
    if registered:
        shell.events.callbacks[0][1](None)  # runs malloc_trim without error
