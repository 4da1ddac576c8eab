"""``python -m clusterlaunch.worker SCHEDULER_ADDRESS [flags]``: ``clusterlaunch worker``.

An entry point, like ``cli.py`` above it: the one worker command, its flags built
from ``WorkerOptions``, its errors in the CLI's one-line style.
"""

import sys

from clusterlaunch.cli import app

app(["worker", *sys.argv[1:]])
