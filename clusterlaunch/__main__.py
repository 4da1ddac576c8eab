"""``python -m clusterlaunch``: the ``clusterlaunch`` command."""

from clusterlaunch.cli import main

main()
