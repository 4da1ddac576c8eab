"""Helper processes: the one way we start a process of our own (fork server, scheduler).

``start_helper("module:function", *args)`` runs ``function(parent_pid, *args)`` in a
fresh interpreter that

* starts from a fixed entry point (``python -c ...``), never by re-importing the
  user's ``__main__``, so scripts need no ``if __name__ == "__main__":`` guard;
* sees the parent's ``sys.path`` before it imports anything of ours, so it finds
  the modules (ours and the user's) where the parent found them;
* runs in a session of its own: a Ctrl-C at the terminal reaches only the parent,
  which then tears its helpers down in order;
* dies with the parent: it asks Linux for ``PARENT_DEATH_SIGNAL`` when the parent
  goes (``PR_SET_PDEATHSIG``), and exits at once if the parent is already gone.

The kernel sends that signal when the *thread* that spawned the helper exits, which
is not the parent exiting, so on it a helper checks ``orphaned(parent_pid)``; until
the helper installs a handler of its own, the one installed here does that check.
Helpers whose loop may miss the signal also poll ``orphaned``, or watch a pipe from
the parent for EOF.

This module is imported by every worker (through the fork server): standard
library only.
"""

from __future__ import annotations

import ctypes
import importlib
import json
import os
import signal
import subprocess
import sys
from typing import Any

#: The signal the kernel sends a helper when the thread that spawned it exits.
PARENT_DEATH_SIGNAL = signal.SIGUSR2
_PR_SET_PDEATHSIG = 1

# Takes the parent's sys.path first, so that even clusterlaunch is found where the
# parent found it; argv: target, parent pid, sys.path as JSON, the target's args.
_ENTRY = (
    "import json, sys; sys.path[:] = json.loads(sys.argv[3]); "
    "from clusterlaunch.spawn import _helper_main; _helper_main()"
)


class LaunchError(RuntimeError):
    """Something we start (a helper process, workers) did not come up."""


def set_parent_death_signal(sig: int) -> bool:
    """Ask Linux to send ``sig`` to this process when its parent dies (no-op elsewhere)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def orphaned(parent_pid: int) -> bool:
    """The process that started this one is gone (we were re-parented)."""
    return os.getppid() != parent_pid


def start_helper(target: str, *args: str, **popen: Any) -> subprocess.Popen[bytes]:
    """Start ``target`` ("module:function") in a helper process; see the module docstring.

    ``popen`` goes to ``subprocess.Popen`` (``pass_fds``, ``stdin``, ``stdout``...);
    stdin is ``/dev/null`` unless given.
    """
    popen.setdefault("stdin", subprocess.DEVNULL)
    return subprocess.Popen(
        [sys.executable, "-c", _ENTRY, target, str(os.getpid()), json.dumps(sys.path), *args],
        start_new_session=True,
        **popen,
    )


def _helper_main() -> None:
    """What ``python -c`` runs in a helper: die with the parent, then call the target."""
    target, parent_pid, args = sys.argv[1], int(sys.argv[2]), sys.argv[4:]
    set_parent_death_signal(PARENT_DEATH_SIGNAL)
    if orphaned(parent_pid):  # the parent died before we could ask for the signal
        sys.exit(0)

    def exit_if_orphaned(*_: Any) -> None:
        if orphaned(parent_pid):
            sys.exit(0)

    signal.signal(PARENT_DEATH_SIGNAL, exit_if_orphaned)
    module_name, _, function_name = target.partition(":")
    getattr(importlib.import_module(module_name), function_name)(parent_pid, *args)
