"""``python -m clusterlaunch.worker SCHEDULER_ADDRESS [flags]``: one worker process.

Flags are named as ``dask worker`` names them. argparse rather than typer keeps the
worker's start-up lean.
"""

from __future__ import annotations

import argparse
from typing import NoReturn

from clusterlaunch.comm.addressing import parse_address
from clusterlaunch.worker.options import WorkerOptions, parse_memory_limit, parse_resources


class _OneLineErrors(argparse.ArgumentParser):
    """Usage errors as one line, not a usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineErrors(
        prog="python -m clusterlaunch.worker", description="Run one clusterlaunch worker."
    )
    parser.add_argument("scheduler", help="scheduler address, e.g. tcp://127.0.0.1:8786")
    parser.add_argument("--nthreads", type=int, default=1, help="threads running tasks")
    parser.add_argument("--resources", default="", help='abstract resources, e.g. "GPU=2,FOO=1"')
    parser.add_argument("--name", default=None, help="worker name (default: its address)")
    parser.add_argument("--host", default=None, help="interface to listen on")
    parser.add_argument("--port", type=int, default=0, help="port to listen on (0: any free)")
    parser.add_argument("--contact-address", default=None, help="address peers should use")
    parser.add_argument(
        "--death-timeout", type=float, default=None, help="seconds to wait for the scheduler"
    )
    parser.add_argument("--memory-limit", default="0", help="bytes, e.g. 4GiB, 0.5, auto; 0: none")
    parser.add_argument("--local-directory", default=None, help="directory for worker files")
    parser.add_argument("--lifetime", type=float, default=None, help="seconds before retiring")
    parser.add_argument("--tls-ca-file", default=None, help="CA certificate(s) file for TLS (PEM)")
    parser.add_argument("--tls-cert", default=None, help="certificate file for TLS (PEM)")
    parser.add_argument("--tls-key", default=None, help="private key file for TLS (PEM)")
    return parser


def options_from_args(argv: list[str] | None = None) -> WorkerOptions:
    """Parse ``argv``; bad input exits with a one-line message and status 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        parse_address(args.scheduler)
        return WorkerOptions(
            scheduler_address=args.scheduler,
            nthreads=args.nthreads,
            resources=parse_resources(args.resources),
            name=args.name,
            host=args.host,
            port=args.port,
            contact_address=args.contact_address,
            death_timeout=args.death_timeout,
            memory_limit=parse_memory_limit(args.memory_limit),
            local_directory=args.local_directory,
            lifetime=args.lifetime,
            tls_ca_file=args.tls_ca_file,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
        )
    except ValueError as e:
        parser.exit(2, f"error: {e}\n")


def main(argv: list[str] | None = None) -> NoReturn:
    """Run a worker process from ``argv``; never returns (see ``process.exit_now``)."""
    options = options_from_args(argv)
    from clusterlaunch.worker.process import run_worker_process

    run_worker_process(options)


if __name__ == "__main__":
    main()
