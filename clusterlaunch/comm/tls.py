"""TLS settings as dask users write them, and the ``ssl`` contexts made from them.

The keys are dask's: ``distributed.comm.tls.{ca-file,ciphers,min-version,max-version}``,
``distributed.comm.tls.<role>.{cert,key}`` and ``distributed.comm.require-encryption``,
read through ``dask.config`` (so the ``DASK_DISTRIBUTED__COMM__TLS__...`` variables and
dask's YAML files count) without importing ``distributed``. Like dask: both ends
present a certificate signed by the cluster's CA (mutual authentication), and host
names are not checked, since clusters are reached by IP address.
"""

from __future__ import annotations

import os
import ssl
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

TLS_VERSIONS = {
    1.2: ssl.TLSVersion.TLSv1_2,
    1.3: ssl.TLSVersion.TLSv1_3,
}


class TLSConfigError(ValueError):
    """The TLS settings can't make a context: a missing file, a key that doesn't match."""


@dataclass(frozen=True)
class TLSConfig:
    """One role's TLS settings. ``ca_file``, ``cert`` and ``key`` are paths, or PEM
    text (anything with a newline), as ``distributed.security.Security`` takes them."""

    ca_file: str | None = None
    cert: str | None = None
    key: str | None = None
    ciphers: str | None = None
    min_version: float = 1.2
    max_version: float | None = None
    require_encryption: bool = False

    @property
    def enabled(self) -> bool:
        return bool(self.ca_file and self.cert)

    @classmethod
    def from_dask_config(cls, role: str = "worker") -> TLSConfig:
        """The settings dask's configuration gives ``role`` (worker, client, scheduler)."""
        import dask.config

        def get(key: str) -> Any:
            return dask.config.get(f"distributed.comm.{key}", None)

        return cls(
            ca_file=get("tls.ca-file"),
            cert=get(f"tls.{role}.cert"),
            key=get(f"tls.{role}.key"),
            ciphers=get("tls.ciphers"),
            min_version=float(get("tls.min-version") or 1.2),
            max_version=None if get("tls.max-version") is None else float(get("tls.max-version")),
            require_encryption=bool(get("require-encryption")),
        )

    def context(self, *, server: bool) -> ssl.SSLContext:
        """The context that listens (``server``) or connects with these settings; made
        once per settings, since loading the certificate chain reads files."""
        return _context(self, server)

    def make_context(self, server: bool) -> ssl.SSLContext:
        if not self.enabled:
            raise TLSConfigError(
                "tls:// needs a CA file and a certificate: set --tls-ca-file and --tls-cert "
                "(or distributed.comm.tls.ca-file and distributed.comm.tls.<role>.cert)"
            )
        purpose = ssl.Purpose.CLIENT_AUTH if server else ssl.Purpose.SERVER_AUTH
        ca = self.ca_file or ""
        try:
            if "\n" in ca:
                context = ssl.create_default_context(purpose, cadata=ca)
            else:
                context = ssl.create_default_context(purpose, cafile=ca)
        except (OSError, ssl.SSLError) as e:
            raise TLSConfigError(f"cannot read the TLS CA file {_name(ca)}: {e}") from None
        for version, attribute in (
            (self.min_version, "minimum_version"),
            (self.max_version, "maximum_version"),
        ):
            if version is None:
                continue
            if version not in TLS_VERSIONS:
                raise TLSConfigError(f"TLS version {version} is not supported: use 1.2 or 1.3")
            setattr(context, attribute, TLS_VERSIONS[version])
        self._load_cert_chain(context)
        context.verify_mode = ssl.CERT_REQUIRED
        context.check_hostname = False
        context.verify_flags &= ~getattr(ssl, "VERIFY_X509_STRICT", 0)
        if self.ciphers:
            try:
                context.set_ciphers(self.ciphers)
            except ssl.SSLError as e:
                raise TLSConfigError(f"invalid TLS ciphers {self.ciphers!r}: {e}") from None
        return context

    def _load_cert_chain(self, context: ssl.SSLContext) -> None:
        cert, key = self.cert or "", self.key
        try:
            if "\n" in cert or (key is not None and "\n" in key):
                with tempfile.TemporaryDirectory() as tmp:
                    cert_path = _write_if_text(cert, os.path.join(tmp, "cert.pem"))
                    key_path = (
                        None if key is None else _write_if_text(key, os.path.join(tmp, "key.pem"))
                    )
                    context.load_cert_chain(cert_path, key_path)
            else:
                context.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as e:
            raise TLSConfigError(
                f"cannot load the TLS certificate {_name(cert)} with key {_name(key)}: {e}"
            ) from None


@lru_cache(maxsize=32)
def _context(config: TLSConfig, server: bool) -> ssl.SSLContext:
    return config.make_context(server)


def _write_if_text(value: str, path: str) -> str:
    if "\n" not in value:
        return value
    with open(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
        f.write(value)
    return path


def _name(value: str | None) -> str:
    if value is None:
        return "(none)"
    return "(PEM text)" if "\n" in value else repr(value)
