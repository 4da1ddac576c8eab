"""README's main job, every README snippet and every example run in a venv made by
README's own install command, so that none of them rots and the install is enough.

The venv is made once per module from a copy of the repository (pip's cache is
reused, so it takes a minute, not a download); ``-m "not install"`` skips these.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"

pytestmark = [pytest.mark.install, pytest.mark.timeout(600)]


def install_command() -> str:
    """The command of README's "Set up on a fresh machine" block."""
    section = README.read_text().split("## Set up on a fresh machine", 1)[1]
    return re.search(r"```\n(.+?)\n```", section, re.S).group(1).strip()


def python_snippets() -> list[str]:
    return re.findall(r"```python\n(.+?)```", README.read_text(), re.S)


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = os.pathsep.join(
        p for p in env.get("PATH", "").split(os.pathsep) if not p.startswith(sys.prefix)
    )
    env.pop("DASK_SCHEDULER_ADDRESS", None)
    return env


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """(a copy of the repository, its venv's python) after README's own command."""
    copy = tmp_path_factory.mktemp("fresh") / "clusterlaunch"
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for name in files:
        if (REPO / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, copy / name)
    result = subprocess.run(
        ["bash", "-c", install_command()],
        cwd=copy,
        capture_output=True,
        text=True,
        timeout=540,
        env=clean_env(),
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "mean of x + x.T = 1.000" in result.stdout  # the main job ran
    assert "dashboard: http://127.0.0.1:" in result.stdout
    return copy, str(copy / ".venv" / "bin" / "python")


def run_in(fresh: tuple[Path, str], *args: str) -> subprocess.CompletedProcess:
    copy, python = fresh
    return subprocess.run(
        [python, *args],
        cwd=copy,
        capture_output=True,
        text=True,
        timeout=180,
        env=clean_env(),
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize(
    ("script", "expected"),
    [("dask_array.py", "16 chunks"), ("addprocs.py", "all workers shut down")],
)
def test_example_script(fresh, script, expected):
    result = run_in(fresh, str(fresh[0] / "examples" / script))
    assert result.returncode == 0, result.stderr[-3000:]
    assert expected in result.stdout
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("index", range(len(python_snippets())))
def test_readme_snippet(fresh, index, tmp_path):
    snippet = python_snippets()[index]
    if "import pytest" in snippet:  # a test file: run by pytest, which testing brings
        pip = run_in(fresh, "-m", "pip", "install", "-q", "pytest")
        assert pip.returncode == 0, pip.stderr[-2000:]
        path = tmp_path / "test_snippet.py"
        path.write_text(snippet)
        result = run_in(fresh, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(path))
        assert result.returncode == 0, result.stdout[-3000:]
        return
    result = run_in(fresh, "-c", snippet)
    assert result.returncode == 0, snippet + result.stderr[-3000:]
    assert "Traceback" not in result.stderr


def test_example_test_file_with_fixtures(fresh, tmp_path):
    pip = run_in(fresh, "-m", "pip", "install", "-q", "pytest")
    assert pip.returncode == 0, pip.stderr[-2000:]
    result = run_in(
        fresh,
        "-m",
        "pytest",
        str(fresh[0] / "examples" / "test_with_fixtures.py"),
        "-q",
        "-p",
        "no:cacheprovider",
        "--rootdir",
        str(tmp_path),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "4 passed" in result.stdout
