"""TLS with mutual authentication against a real ``dask scheduler --tls-...``: our
workers and stock TLS workers in one cluster, transfers both ways, the stock Client
over TLS, and the refusals (a certificate the CA did not sign, plaintext against a
TLS port, an expired certificate) each a line and an exit, never a hang."""

from __future__ import annotations

import operator
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("cryptography")

from certs import CertAuthority, CertFiles  # noqa: E402
from distributed import Client  # noqa: E402
from distributed.security import Security  # noqa: E402
from procs import LocalProcesses, run_async, worker_address  # noqa: E402

from clusterlaunch.comm.tcp import CommClosedError, connect, listen  # noqa: E402
from clusterlaunch.comm.tls import TLSConfig, TLSConfigError  # noqa: E402

DEATH_TIMEOUT = "3"


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertAuthority:
    return CertAuthority(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def tls_processes(ca: CertAuthority) -> Iterator[LocalProcesses]:
    """A stock scheduler that speaks only TLS and requires each peer's certificate."""
    with LocalProcesses() as local:
        local.start_scheduler(args=ca.issue("scheduler").flags())
        assert local.address.startswith("tls://"), local.address
        yield local


def security(files: CertFiles) -> Security:
    return Security(
        tls_ca_file=files.ca_file,
        tls_client_cert=files.cert,
        tls_client_key=files.key,
        require_encryption=True,
    )


def test_ours_and_stock_tls_workers_compute_with_transfers_both_ways(
    ca: CertAuthority, tls_processes: LocalProcesses
) -> None:
    worker_files = ca.issue("worker")
    ours = tls_processes.start_worker(*worker_files.flags())
    stock = tls_processes.start_worker(*worker_files.flags(), stock=True)
    with Client(tls_processes.address, security=security(ca.issue("client")), timeout=30) as c:
        our_address = worker_address(c, ours)
        stock_address = worker_address(c, stock)
        assert our_address.startswith("tls://") and stock_address.startswith("tls://")
        for source, target in ((our_address, stock_address), (stock_address, our_address)):
            data = c.submit(bytes, 3_000_000, workers=[source], pure=False)
            length = c.submit(len, data, workers=[target])
            assert length.result(timeout=60) == 3_000_000
            assert c.submit(operator.add, 1, 2, workers=[target]).result(timeout=60) == 3
        # The scheduler itself gathers from our worker over TLS.
        assert c.gather(c.submit(bytes, 10, workers=[our_address], pure=False)) == bytes(10)


def refused_worker(tls_processes: LocalProcesses, *args: str) -> str:
    """Start our worker with ``args``; it must exit non-zero; returns its log."""
    proc = tls_processes.start_worker(*args, "--death-timeout", DEATH_TIMEOUT)
    assert proc.wait(timeout=60) != 0, proc.log()
    return proc.log()


def test_worker_with_certificate_of_another_ca_is_refused(
    ca: CertAuthority, tls_processes: LocalProcesses, tmp_path: Path
) -> None:
    stranger = CertAuthority(tmp_path, "stranger").issue("worker")
    files = CertFiles(ca.ca_file, stranger.cert, stranger.key)
    log = refused_worker(tls_processes, *files.flags())
    assert "could not register" in log and "TLS handshake" in log, log
    assert "our certificate, refused by its CA" in log, log
    assert "Traceback" not in log


def test_worker_that_does_not_trust_the_schedulers_ca_says_so(
    ca: CertAuthority, tls_processes: LocalProcesses, tmp_path: Path
) -> None:
    stranger = CertAuthority(tmp_path, "stranger").issue("worker")
    log = refused_worker(tls_processes, *stranger.flags())
    assert "its certificate, checked against our CA file" in log, log
    assert "Traceback" not in log


def test_worker_with_expired_certificate_is_refused(
    ca: CertAuthority, tls_processes: LocalProcesses
) -> None:
    log = refused_worker(tls_processes, *ca.issue("expired", expired=True).flags())
    assert "expired" in log and "TLS handshake" in log, log
    assert "Traceback" not in log


def test_plaintext_worker_against_tls_port_is_refused(tls_processes: LocalProcesses) -> None:
    plain = tls_processes.address.replace("tls://", "tcp://")
    proc = tls_processes.start_worker("--death-timeout", DEATH_TIMEOUT, address=plain)
    assert proc.wait(timeout=60) != 0
    log = proc.log()
    assert "could not register" in log and "tls://" in log, log
    assert "Traceback" not in log


def test_tls_without_certificates_is_one_line(tls_processes: LocalProcesses) -> None:
    log = refused_worker(tls_processes)
    assert "tls:// needs a CA file and a certificate" in log, log
    assert "Traceback" not in log


def test_missing_certificate_file_is_one_line(ca: CertAuthority, tmp_path: Path) -> None:
    config = TLSConfig(ca_file=ca.ca_file, cert=str(tmp_path / "missing.crt"))
    with pytest.raises(TLSConfigError, match="cannot load the TLS certificate"):
        config.context(server=False)


def test_our_comm_round_trips_large_frames_over_tls(ca: CertAuthority) -> None:
    server_tls = TLSConfig(**_paths(ca.issue("server")))
    client_tls = TLSConfig(**_paths(ca.issue("client")))
    payload = bytes(range(256)) * (40 * 4096)  # 40 MiB

    async def main() -> None:
        async def echo(comm):
            while True:
                try:
                    await comm.write(await comm.read())
                except CommClosedError:
                    return

        listener = await listen("tls://127.0.0.1:0", echo, tls=server_tls)
        try:
            assert listener.address.startswith("tls://")
            comm = await connect(listener.address, timeout=10, tls=client_tls)
            assert comm.encrypted
            for message in ({"op": "ping"}, [payload, {"x": memoryview(payload)[7:]}]):
                await comm.write(message)
                echoed = await comm.read()
                if isinstance(message, dict):
                    assert echoed == message
                else:
                    assert bytes(echoed[0]) == payload
                    assert bytes(echoed[1]["x"]) == payload[7:]
            comm.abort()
        finally:
            await listener.stop()

    run_async(main(), timeout=60)


def test_plain_connect_refused_when_encryption_is_required(ca: CertAuthority) -> None:
    config = TLSConfig(**_paths(ca.issue("client")), require_encryption=True)

    async def main() -> None:
        with pytest.raises(ValueError, match="require-encryption"):
            await connect("tcp://127.0.0.1:9", timeout=1, tls=config)

    run_async(main(), timeout=30)


def _paths(files: CertFiles) -> dict[str, str]:
    return {"ca_file": files.ca_file, "cert": files.cert, "key": files.key}


def test_our_client_computes_over_tls(ca: CertAuthority, tls_processes: LocalProcesses) -> None:
    import clusterlaunch

    ours = tls_processes.start_worker(*ca.issue("worker").flags())
    with clusterlaunch.Client(
        tls_processes.address, security=security(ca.issue("client")), timeout=30
    ) as client:
        worker_address(client, ours)
        assert client.submit(operator.add, 20, 22).result(timeout=60) == 42
        data = client.submit(bytes, 1_000_000, pure=False)
        assert client.submit(len, data).result(timeout=60) == 1_000_000


def test_our_client_without_a_certificate_is_one_line(tls_processes: LocalProcesses) -> None:
    import clusterlaunch

    with pytest.raises(ValueError, match="tls:// needs a CA file") as info:
        clusterlaunch.Client(tls_processes.address, timeout=5)
    assert "\n" not in str(info.value)
