"""What a process reports about its environment when it registers with a scheduler.

dask's scheduler compares these reports from the scheduler, clients and workers and
warns about mismatched packages.
"""

from __future__ import annotations

import functools
import os
import platform
import struct
import sys
from typing import Any

#: Packages whose versions dask's scheduler compares across the cluster.
DASK_CHECKED_PACKAGES = (
    "dask",
    "distributed",
    "msgpack",
    "cloudpickle",
    "tornado",
    "toolz",
    "numpy",
    "pandas",
    "lz4",
)


@functools.cache
def versions_info() -> dict[str, Any]:
    """This host and the installed versions of the packages dask's version check compares.

    dask compares the environments of scheduler, clients and workers; distributed and
    tornado are installed alongside us (the launcher uses them) even though a worker
    never imports them, so their installed versions are the honest answer.
    """
    uname = platform.uname()
    python = "%d.%d.%d.%s.%s" % sys.version_info  # noqa: UP031 - dask's format
    # Only packages every dask process reports: an extra name reads as "MISSING" on
    # stock clients and schedulers and makes them warn. Workers say they are ours in
    # register-worker's ``extra`` instead.
    packages: dict[str, str | None] = {"python": python}
    for name in DASK_CHECKED_PACKAGES:
        packages[name] = _installed_version(name)
    return {
        "host": {
            "python": python,
            "python-bits": struct.calcsize("P") * 8,
            "OS": uname.system,
            "OS-release": uname.release,
            "machine": uname.machine,
            "processor": uname.processor,
            "byteorder": sys.byteorder,
            "LC_ALL": os.environ.get("LC_ALL", "None"),
            "LANG": os.environ.get("LANG", "None"),
        },
        "packages": packages,
    }


def _installed_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None
