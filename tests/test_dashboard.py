"""The embedded scheduler's dashboard, looked at as a user would: the link answers,
and its pages, rendered in headless Chromium, show our workers.

Chromium is the system's (Debian's ``chromium``; ``.ci/run`` installs it in CI) driven
by playwright; without it the browser test is skipped, except in CI, where it fails.
"""

from __future__ import annotations

import os
import shutil
import urllib.request
from pathlib import Path

import pytest
from procs import no_processes_left

from clusterlaunch import LocalCluster

pytestmark = pytest.mark.timeout(120)

#: Where the README's screenshot comes from: CLUSTERLAUNCH_SCREENSHOT=path writes it.
SCREENSHOT = os.environ.get("CLUSTERLAUNCH_SCREENSHOT")


@pytest.fixture(autouse=True)
def no_processes_left_behind():
    with no_processes_left("the test's processes"):
        yield


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("CI needs Chromium for the dashboard test (.ci/run installs it)")
        pytest.skip("no chromium on PATH")
    return path


def fetch(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.status, response.read().decode()


def test_dashboard_link_serves_and_shows_our_workers():
    import dask.array as da

    pytest.importorskip("bokeh")
    browser_path = chromium()
    from playwright.sync_api import sync_playwright

    with LocalCluster(n=2, dashboard_address=":0") as cluster, cluster.get_client() as client:
        link = cluster.dashboard_link
        assert link.startswith("http://127.0.0.1:") and link.endswith("/status")
        assert repr(link) in repr(cluster)
        status, page = fetch(link)
        assert status == 200 and "bokeh" in page.lower()
        x = da.random.random((2_000, 2_000), chunks=250)
        assert float((x @ x.T).mean().compute()) > 0  # the task stream has something
        root = link.rsplit("/", 1)[0]
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=browser_path, args=["--no-sandbox"]
            )
            try:
                view = browser.new_page(viewport={"width": 1400, "height": 900})
                view.goto(f"{root}/workers")
                for worker in cluster.workers:  # the Workers tab's table, in its shadow DOM
                    view.get_by_text(worker, exact=True).first.wait_for(timeout=30_000)
                view.goto(link)
                view.locator("canvas").first.wait_for(timeout=30_000)  # plots drawn
                if SCREENSHOT:
                    view.wait_for_timeout(2_000)  # let the plots draw for the picture
                    view.screenshot(path=str(Path(SCREENSHOT)))
            finally:
                browser.close()
        client.close()


def test_no_dashboard_when_asked():
    with LocalCluster(n=0, dashboard_address=None) as cluster:
        assert cluster.dashboard_link == ""
