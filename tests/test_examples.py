"""Every example runs, so that none of them rots."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

pytestmark = pytest.mark.timeout(150)


@pytest.mark.parametrize(
    ("script", "expected"),
    [
        ("quickstart.py", "sum of squares 0..9 = 285"),
        ("dask_array.py", "16 chunks"),
        ("addprocs.py", "all workers shut down"),
    ],
)
def test_example_script(script, expected, tmp_path):
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert expected in result.stdout
    assert "Traceback" not in result.stderr


def test_example_test_file_with_fixtures(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            str(EXAMPLES / "test_with_fixtures.py"),
            "-q",
            "-p",
            "no:cacheprovider",
            "--rootdir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=140,
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "4 passed" in result.stdout
