"""The launcher side's TLS: ``security=`` as dask users pass it, turned into the
``comm.tls.TLSConfig`` of one role (client, worker, scheduler).

``security`` may be a ``distributed.security.Security``, a ``TLSConfig``, None (dask's
configuration for the role), or True (temporary certificates, as
``distributed.LocalCluster(security=True)`` makes them: ``Security.temporary()``).
"""

from __future__ import annotations

import ssl
from typing import Any

from clusterlaunch.comm.tls import TLSConfig

#: dask's Security holds ssl.TLSVersion values; our TLSConfig the numbers of the config.
_VERSION_NUMBERS = {ssl.TLSVersion.TLSv1_2: 1.2, ssl.TLSVersion.TLSv1_3: 1.3}


def resolve_security(security: Any) -> Any:
    """``security`` as given, with True made into temporary certificates."""
    if security is True:
        from distributed.security import Security

        return Security.temporary()
    return security


def tls_config(security: Any, role: str) -> TLSConfig:
    """The TLS settings of ``role`` that ``security`` describes."""
    security = resolve_security(security)
    if security is None or security is False:
        return TLSConfig.from_dask_config(role)
    if isinstance(security, TLSConfig):
        return security
    if not hasattr(security, "tls_ca_file"):
        raise TypeError(
            f"security= takes a distributed.security.Security, a TLSConfig or True, "
            f"not {type(security).__name__}"
        )
    cert = getattr(security, f"tls_{role}_cert", None)
    key = getattr(security, f"tls_{role}_key", None)
    return TLSConfig(
        ca_file=security.tls_ca_file,
        cert=cert,
        key=key,
        ciphers=getattr(security, "tls_ciphers", None),
        min_version=_version(getattr(security, "tls_min_version", None)) or 1.2,
        max_version=_version(getattr(security, "tls_max_version", None)),
        require_encryption=bool(getattr(security, "require_encryption", False)),
    )


def _version(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, ssl.TLSVersion):
        return _VERSION_NUMBERS.get(value)
    return float(value)
