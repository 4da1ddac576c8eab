"""What a worker is started with, shared by the worker CLI, the launcher and ``Worker``.

Parsing of user text (``--resources "GPU=2,FOO=1"``, ``--memory-limit 4GiB``) lives
here so each entry point rejects bad input with the same one-line message.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, field, replace
from typing import Any

import psutil

from clusterlaunch.comm.tls import TLSConfig


def cli_flag(
    default: Any = MISSING,
    help: str = "",
    *,
    default_factory: Callable[[], Any] | Any = MISSING,
    parse: Callable[[str], Any] | None = None,
) -> Any:
    """A field that is also a ``clusterlaunch worker`` flag (``--field-name``) with this
    help: the command's flags are built from these fields, so a new option is one edit.
    ``parse`` turns the flag's text into the field's value (default: the field's type)."""
    metadata = {"help": help, "parse": parse}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class WorkerOptions:
    """Settings of one worker process; flags are named as ``dask worker`` names them."""

    scheduler_address: str
    nthreads: int = cli_flag(1, "Threads running tasks.")
    resources: dict[str, float] = cli_flag(
        help='Abstract resources, e.g. "GPU=2,FOO=1".',
        default_factory=dict,
        parse=lambda text: parse_resources(text),
    )
    name: str | None = cli_flag(None, "Worker name (default: its address).")
    host: str | None = cli_flag(None, "Interface to listen on.")
    port: int = cli_flag(0, "Port to listen on (0: any free).")
    contact_address: str | None = cli_flag(None, "Address peers should use.")
    death_timeout: float | None = cli_flag(None, "Seconds to wait for the scheduler.")
    memory_limit: int = cli_flag(
        0, "Bytes (4GiB), a fraction, 'auto'; 0: none.", parse=lambda text: parse_memory_limit(text)
    )
    local_directory: str | None = cli_flag(None, "Directory for worker files.")
    lifetime: float | None = cli_flag(None, "Seconds before retiring.")
    heartbeat_interval: float = 1.0
    #: TLS as ``dask worker`` takes it; unset ones come from dask's configuration.
    tls_ca_file: str | None = cli_flag(None, "CA certificate(s) file for TLS (PEM).")
    tls_cert: str | None = cli_flag(None, "Certificate file for TLS (PEM).")
    tls_key: str | None = cli_flag(None, "Private key file for TLS (PEM).")

    def __post_init__(self) -> None:
        if self.nthreads < 1:
            raise ValueError(f"--nthreads must be >= 1, not {self.nthreads}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be 0-65535, not {self.port}")
        for limit, flag in ((self.death_timeout, "--death-timeout"), (self.lifetime, "--lifetime")):
            if limit is not None and not limit > 0:
                raise ValueError(f"{flag} must be a positive number of seconds, not {limit}")
        if self.memory_limit < 0:
            raise ValueError(f"--memory-limit must be >= 0, not {self.memory_limit}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def tls_config(self) -> TLSConfig:
        """The worker's TLS settings: the flags over dask's configuration."""
        config = TLSConfig.from_dask_config("worker")
        return replace(
            config,
            ca_file=self.tls_ca_file or config.ca_file,
            cert=self.tls_cert or config.cert,
            key=self.tls_key or config.key,
        )


def check_local_directory(path: str | None) -> None:
    """Raise ``ValueError`` with one line if the worker can't keep files in ``path``."""
    if path is None:
        return
    if not os.path.isdir(path):
        raise ValueError(f"--local-directory {path!r} is not a directory")
    if not os.access(path, os.W_OK | os.X_OK):
        reason = "read-only file system" if _read_only(path) else "no write permission"
        raise ValueError(f"--local-directory {path!r} is not writable: {reason}")


def _read_only(path: str) -> bool:
    return bool(os.statvfs(path).f_flag & os.ST_RDONLY)


def parse_resources(text: str | dict | None) -> dict[str, float]:
    """``"GPU=2,FOO=1"`` -> ``{"GPU": 2.0, "FOO": 1.0}``; dicts are checked the same way."""
    if not text:
        return {}
    items = text.items() if isinstance(text, dict) else _split_pairs(text)
    resources: dict[str, float] = {}
    for name, amount in items:
        try:
            value = float(amount)
        except (TypeError, ValueError):
            raise ValueError(
                f"resource {name!r} needs a number, not {amount!r} (e.g. --resources 'GPU=2')"
            ) from None
        if not name or not math.isfinite(value) or value < 0:
            raise ValueError(f"invalid resource {name!r}={amount!r}: need NAME=non-negative number")
        resources[str(name)] = value
    return resources


def _split_pairs(text: str) -> list[tuple[str, str]]:
    pairs = []
    for part in text.replace(" ", ",").split(","):
        if not part:
            continue
        name, sep, amount = part.partition("=")
        if not sep:
            raise ValueError(f"invalid resource {part!r}: expected NAME=AMOUNT, e.g. 'GPU=2'")
        pairs.append((name.strip(), amount.strip()))
    return pairs


def parse_memory_limit(value: str | float | None, nworkers: int = 1) -> int:
    """Bytes of memory a worker may use, as ``dask worker --memory-limit`` reads it.

    ``"auto"`` shares this machine's memory between ``nworkers``; a number <= 1 is a
    fraction of it; ``0``/``None`` means no limit; strings like ``"4GiB"`` are sizes.
    """
    total = psutil.virtual_memory().total
    if value is None:
        return 0
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "auto":
            return total // max(nworkers, 1)
        try:
            value = float(text)
        except ValueError:
            from dask.utils import parse_bytes

            try:
                return int(parse_bytes(text))
            except ValueError:
                raise ValueError(
                    f"invalid --memory-limit {value!r}: use e.g. '4GiB', 0.5 or 'auto'"
                ) from None
    if value < 0 or not math.isfinite(value):
        raise ValueError(f"invalid --memory-limit {value!r}: must be >= 0")
    if 0 < value <= 1:
        return int(total * value)
    return int(value)
