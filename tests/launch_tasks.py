"""Functions the launcher tests run on workers.

Tests pickle these by reference, so workers import this module: it must not import
distributed (that would defeat the check that workers never do).
"""

from __future__ import annotations

import os
import sys


def add(a: int, b: int) -> int:
    return a + b


def worker_facts() -> dict:
    return {
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "sys_path": list(sys.path),
        "cwd": os.getcwd(),
        "distributed": "distributed" in sys.modules,
        "tornado": "tornado" in sys.modules,
    }
