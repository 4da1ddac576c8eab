"""Test, lint, type check and benchmark sessions: ``nox -s tests``, ``nox -s lint``, ...

Sessions install from PyPI with pip into venvs under ``.nox/``. ``tests`` pins the
newest ``distributed`` we support, ``tests_oldest`` the oldest (see DESIGN.md);
``compat`` runs the whole suite once per release in ``RELEASES`` (one of each line,
and 2025.3.0, the first to require cancel-keys' reason), so that a release that
changes a message is caught by us first; ``compat_ci`` is its subset sized for
``.ci/run``: the tests that drive the scheduler's client and cluster protocol, on the
releases most likely to differ from the newest. ``lint`` and ``typecheck`` run the
same commands as ``.ci/run``, with the tools at the versions pinned in
``.ci/tools.txt``. Arguments after ``--`` go to pytest (or, for ``bench``, to every
script).
"""

from __future__ import annotations

from pathlib import Path

import nox

nox.options.default_venv_backend = "venv"
nox.options.sessions = ["lint", "typecheck", "tests"]
nox.options.reuse_existing_virtualenvs = True

ROOT = Path(__file__).resolve().parent
NEWEST = ["distributed==2026.8.0", "dask==2026.8.0"]
# bokeh 3.9 renamed the templates that distributed 2025.1's performance_report extends.
OLDEST = ["distributed==2025.1.0", "dask==2025.1.0", "bokeh<3.9"]
#: Supported distributed releases, the newest patch of each (distributed pins its dask).
RELEASES = [
    "2025.1.0",
    "2025.2.0",
    "2025.3.0",
    "2025.4.1",
    "2025.5.1",
    "2025.7.0",
    "2025.9.3",
    "2025.10.0",
    "2025.11.0",
    "2025.12.0",
    "2026.1.3",
    "2026.3.0",
    "2026.6.0",
    "2026.7.1",
    "2026.8.0",
]
#: The oldest, and the first to require cancel-keys' reason (the client gates on it).
CI_RELEASES = ["2025.1.0", "2025.3.0"]
CI_TESTS = ["tests/test_client.py", "tests/test_cluster.py"]
TOOLS = ".ci/tools.txt"  # ruff and mypy, pinned


def _install(session: nox.Session, pins: list[str]) -> None:
    # One resolve, so the pins hold against the package's own lower bounds.
    session.install("-e", ".[test]", *pins)


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite against the newest supported distributed."""
    _install(session, NEWEST)
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session
def tests_oldest(session: nox.Session) -> None:
    """The test suite against the oldest supported distributed."""
    _install(session, OLDEST)
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session
@nox.parametrize("release", RELEASES)
def compat(session: nox.Session, release: str) -> None:
    """The test suite against one supported distributed release (all of them: ``nox -s compat``)."""
    _install(session, [f"distributed=={release}"])
    session.run("python", "-m", "pytest", "-q", "-m", "not install", *session.posargs)


@nox.session
def compat_ci(session: nox.Session) -> None:
    """The client and cluster tests against each of ``CI_RELEASES``, in one venv
    (installed once; only distributed and its dask change between runs)."""
    _install(session, NEWEST)
    for release in CI_RELEASES:
        session.install(f"distributed=={release}")
        session.run("python", "-m", "pytest", "-q", *CI_TESTS, *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check over the repository."""
    session.install("-r", TOOLS)
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy over clusterlaunch/ (settings in pyproject.toml), with the newest distributed."""
    _install(session, NEWEST)
    session.install("-r", TOOLS)
    session.run("mypy")


@nox.session
def bench(session: nox.Session) -> None:
    """Every benchmarks/bench_*.py script, against the newest distributed, then the
    summary table and chart (benchmarks/report.py)."""
    _install(session, NEWEST)
    session.install("matplotlib")
    scripts = sorted((ROOT / "benchmarks").glob("bench_*.py"))
    if not scripts:
        session.error("no benchmarks/bench_*.py scripts found")
    for script in scripts:
        session.run("python", str(script.relative_to(ROOT)), *session.posargs)
    session.run("python", "benchmarks/report.py")
