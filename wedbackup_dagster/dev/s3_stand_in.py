"""The local stack's S3 stand-in: moto's own WSGI application, the one `moto_server` serves, in one process
(moto keeps its buckets in memory) under cheroot, a threaded HTTP/1.1 server that keeps connections open.

`moto_server` runs that application on Werkzeug's development server, which answers `Connection: close` to
every request and then drains the socket: each GET or PUT costs a new TCP connection, a new thread and a full
request cycle, a few ms of the stand-in's CPU per request on this machine (the floor under `restore --all`,
README "Benchmarks"). Under cheroot the clients' pooled connections are reused; the application, and so
every S3 answer, is moto's own, unchanged.

Two things Werkzeug's request handler gives moto are kept here. `RAW_URI`, the request target as sent: moto
reads object keys from it (without it, it unquotes PATH_INFO a second time, so a key holding `%2E` changed).
And, as `moto_server`'s own handler (`MotoRequestHandler.make_environ`) does: WSGI folds `-` and `_` in header
names alike, so a header with an underscore could stand in for the dashed one (`x_amz_content_sha256` for
`x-amz-content-sha256`). Such headers are dropped, except object metadata (`x-amz-meta-key_id`), which keeps
its spelling for moto to report (`header_environ`, unit-tested).

Run as `python -m wedbackup_dagster.dev.s3_stand_in --host H --port P` (`wedbackup stack up` does). Without
cheroot it runs `moto_server` itself (same arguments), as the stack did before.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable
from typing import Any

# Requests served at once (one thread each); idle keep-alive connections cheroot keeps open (its default, 10,
# is below what a few boto3 clients pool: each keeps up to 10).
THREADS = 16
KEEP_ALIVE_CONNECTIONS = 256


def header_environ(env: dict[str, Any], headers: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """`env` with its request headers set from `headers` (name, value) as moto_server's handler sets them:
    every header without an underscore; one with an underscore only when it is object metadata and no dashed
    header has its WSGI name, with its spelling recorded under moto's PRESERVED_HEADER_NAMES_ENVIRON_KEY."""
    from moto.core.request import (
        PRESERVED_HEADER_NAMES_ENVIRON_KEY,
        environ_key_for_header,
        should_preserve_original_header_name,
    )

    headers = list(headers)
    out = {k: v for k, v in env.items()
           if not k.startswith("HTTP_") and k not in ("CONTENT_TYPE", "CONTENT_LENGTH")}
    dashed = {environ_key_for_header(name) for name, _ in headers if "_" not in name}
    names: dict[str, str] = {}
    values: dict[str, list[str]] = {}
    for name, value in headers:
        key = environ_key_for_header(name)
        if "_" in name and (not should_preserve_original_header_name(name) or key in dashed):
            continue
        if "_" in name:
            names.setdefault(key, name)
        values.setdefault(key, []).append(value)
    for key, key_values in values.items():
        out[key] = ",".join(key_values)
    out[PRESERVED_HEADER_NAMES_ENVIRON_KEY] = names
    return out


def moto_application() -> Any:
    """What `moto_server` serves (moto/server.py: main), with the backend found for each host name remembered:
    moto looks it up on every request by listing its own package directory (a `stat` per service, ~180)
    and then trying each service's URL patterns in turn (S3 is the 141st), about half of its CPU per GET."""
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app

    class RememberingDispatcher(DomainDispatcherApplication):
        def __init__(self, create_app: Any) -> None:
            super().__init__(create_app)
            self.backend_by_host: dict[str | None, Any] = {}

        def get_backend_for_host(self, host: str | None) -> Any:
            # Called under the dispatcher's lock; the answer depends on the host name alone.
            if host not in self.backend_by_host:
                self.backend_by_host[host] = super().get_backend_for_host(host)
            return self.backend_by_host[host]

    app = RememberingDispatcher(create_backend_app)
    app.debug = True  # type: ignore[attr-defined]
    return app


def make_server(host: str, port: int) -> Any:
    """A cheroot server of moto's application on (host, port), not started."""
    from cheroot import wsgi
    from cheroot._compat import bton

    class MotoGateway(wsgi.Gateway_10):
        def get_environ(self) -> dict[str, Any]:
            env = header_environ(super().get_environ(),
                                 ((bton(k), bton(v)) for k, v in self.req.inheaders.items()))
            # moto reads an object's key from RAW_URI, the request target as sent (Werkzeug sets it), and
            # otherwise unquotes the already unquoted PATH_INFO again: `a%2E%2E` would become `a..`.
            env["RAW_URI"] = env["REQUEST_URI"]
            return env

    server = wsgi.Server((host, port), moto_application(), numthreads=THREADS, request_queue_size=128,
                         server_name="wedbackup-s3-stand-in", timeout=300)
    server.gateway = MotoGateway
    server.keep_alive_conn_limit = KEEP_ALIVE_CONNECTIONS
    return server


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="moto's S3 under cheroot (keep-alive)")
    parser.add_argument("-H", "--host", default="127.0.0.1")
    parser.add_argument("-p", "--port", type=int, required=True)
    args = parser.parse_args(argv)
    os.environ.setdefault("MOTO_PORT", str(args.port))  # as moto_server sets it (moto's calls to itself)
    try:
        server = make_server(args.host, args.port)
    except ImportError as exc:  # cheroot missing, or moto's layout changed: moto_server as before
        print(f"s3 stand-in: {exc}; falling back to moto_server", file=sys.stderr, flush=True)
        from moto.server import main as moto_server

        moto_server(["-H", args.host, "-p", str(args.port)])
        return
    print(f"s3 stand-in: moto under cheroot on {args.host}:{args.port}", file=sys.stderr, flush=True)
    server.safe_start()


if __name__ == "__main__":
    main()
