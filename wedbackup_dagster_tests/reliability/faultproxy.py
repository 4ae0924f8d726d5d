"""A fault-injecting proxy for the reliability tests: listens on 127.0.0.1 (an ephemeral port) in front of
one stand-in and, on a seeded random schedule, answers or breaks some of the traffic instead of passing it.

HTTP mode (moto S3, the GCS emulator, Azurite) parses just enough HTTP/1.1 to decide per request:
`http_500` / `http_503` answers, throttling (`slowdown`: S3's 503 SlowDown, `http_429`), `reset` (a TCP
RST instead of an answer), `stall` (no answer for longer than the client's timeout, then close) and
`truncate` (the real answer, cut off in the middle of its body). TCP mode (PostgreSQL) decides per
connection: `reset` or `stall` (traffic stops, then RST) after a random number of bytes. Every fault is
counted by kind when it strikes (a TCP fault whose connection ends before its byte budget is not one).
Threads only, every socket has a timeout, and `stop()` closes everything."""
from __future__ import annotations

import random
import select
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

HTTP_FAULTS = ("http_500", "http_503", "slowdown", "http_429", "reset", "stall", "truncate")
TCP_FAULTS = ("reset", "stall")
MAX_HEAD = 64 << 10
SOCKET_TIMEOUT = 30.0  # no proxy thread waits longer than this on a silent peer
_REASONS = {500: "Internal Server Error", 503: "Service Unavailable", 429: "Too Many Requests"}


@dataclass
class FaultSchedule:
    """Which faults, how often: `rate` is the chance that one request (HTTP) or connection (TCP) is hit;
    `weights` pick the kind; a stall lasts `stall_seconds` (set it past the client's timeout)."""

    seed: int
    rate: float
    weights: Mapping[str, float] = field(default_factory=dict)
    stall_seconds: float = 3.0
    limit: int | None = None  # at most this many faults, then everything passes
    tcp_after: tuple[int, int] = (0, 256 << 10)  # a TCP fault strikes after this many bytes (random in range)

    def __post_init__(self) -> None:
        if not 0 <= self.rate <= 1:
            raise ValueError(f"fault rate {self.rate} is not between 0 and 1")


class FaultProxy:
    """One listener on 127.0.0.1 forwarding to `upstream` (host, port), with faults per `schedule`."""

    def __init__(self, name: str, upstream: tuple[str, int], schedule: FaultSchedule, *, mode: str = "http"):
        if mode not in ("http", "tcp"):
            raise ValueError(f"mode {mode!r} is not 'http' or 'tcp'")
        kinds = HTTP_FAULTS if mode == "http" else TCP_FAULTS
        unknown = set(schedule.weights) - set(kinds)
        if unknown:
            raise ValueError(f"{name}: fault kinds {sorted(unknown)} are not {mode} faults {kinds}")
        self.name = name
        self.upstream = upstream
        self.schedule = schedule
        self.mode = mode
        self._kinds = [k for k in kinds if schedule.weights.get(k, 1.0 if not schedule.weights else 0) > 0]
        self._weights = [schedule.weights.get(k, 1.0) for k in self._kinds]
        self._rng = random.Random(schedule.seed)
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.requests = 0  # requests (HTTP) or connections (TCP) seen
        self._pending = 0  # TCP faults chosen that have not struck yet
        self.enabled = True
        self._stopping = threading.Event()
        self._open: set[socket.socket] = set()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._accept_loop, name=f"faultproxy-{name}", daemon=True)

    # ------------------------------------------------------------------------------ lifecycle

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=5)
        self._listener.close()
        with self._lock:
            doomed = list(self._open)
        for sock in doomed:
            _close(sock)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _decide(self, *, count: bool = True) -> str | None:
        """The fault for the next request or connection, or None to pass it through (seeded). Counted now,
        or (count=False, a TCP fault that strikes only after its bytes) by `_struck` when it strikes."""
        with self._lock:
            self.requests += 1
            hit = self._rng.random() < self.schedule.rate
            kind = self._rng.choices(self._kinds, self._weights)[0] if hit and self._kinds else None
            within_limit = (self.schedule.limit is None
                            or sum(self.counts.values()) + self._pending < self.schedule.limit)
            if kind and self.enabled and within_limit:
                if count:
                    self.counts[kind] += 1
                else:
                    self._pending += 1  # held against the limit until it strikes or its connection ends
                return kind
            return None

    def _settle(self, kind: str, *, struck: bool) -> None:
        """A pending TCP fault struck (counted) or its connection ended first (not a fault after all)."""
        with self._lock:
            self._pending -= 1
            if struck:
                self.counts[kind] += 1

    def _track(self, sock: socket.socket) -> socket.socket:
        sock.settimeout(SOCKET_TIMEOUT)
        with self._lock:
            self._open.add(sock)
        return sock

    def _untrack(self, *socks: socket.socket | None) -> None:
        for sock in socks:
            if sock is None:
                continue
            with self._lock:
                self._open.discard(sock)
            _close(sock)

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            handler = self._serve_http if self.mode == "http" else self._serve_tcp
            threading.Thread(target=self._guarded, args=(handler, self._track(client)), daemon=True).start()

    def _guarded(self, handler, client: socket.socket) -> None:  # noqa: ANN001
        upstream: list[socket.socket | None] = [None]
        try:
            handler(client, upstream)
        except (OSError, ValueError, EOFError):
            pass  # a peer went away or spoke garbage: the connection ends, as it would at a real provider
        finally:
            self._untrack(client, upstream[0])

    def _connect_upstream(self) -> socket.socket:
        return self._track(socket.create_connection(self.upstream, timeout=SOCKET_TIMEOUT))

    def _stall(self, *socks: socket.socket | None) -> None:
        """Say nothing for `stall_seconds` (or until stop), then cut the connection with a reset."""
        self._stopping.wait(self.schedule.stall_seconds)
        for sock in socks:
            if sock is not None:
                _reset(sock)

    # ---------------------------------------------------------------------------------- TCP

    def _serve_tcp(self, client: socket.socket, upstream_ref: list) -> None:
        kind = self._decide(count=False)  # counted when it strikes: a connection may end before its budget
        struck = False
        try:
            # The fault strikes after a random amount of traffic: during the handshake, a query or a COPY.
            budget = self._rng_int(*self.schedule.tcp_after) if kind else -1
            upstream = upstream_ref[0] = self._connect_upstream()
            relayed = 0
            peers = {client: upstream, upstream: client}
            while not self._stopping.is_set():
                readable, _, _ = select.select(list(peers), [], [], 0.5)
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        return
                    if kind and relayed + len(data) > budget:
                        struck = True
                        self._settle(kind, struck=True)
                        if kind == "stall":
                            self._stall(client, upstream)
                        else:
                            _reset(client)
                            _reset(upstream)
                        return
                    peers[sock].sendall(data)
                    relayed += len(data)
        finally:
            if kind and not struck:
                self._settle(kind, struck=False)

    def _rng_int(self, low: int, high: int) -> int:
        with self._lock:
            return self._rng.randint(low, high)

    # --------------------------------------------------------------------------------- HTTP

    def _serve_http(self, client: socket.socket, upstream_ref: list) -> None:
        reader = _Reader(client)
        up_reader: _Reader | None = None
        while not self._stopping.is_set():
            head = reader.read_head()
            if head is None:
                return
            request_line, headers = _parse_head(head)
            method = request_line.split(" ", 1)[0].upper()
            expects_continue = headers.get("expect", "").lower() == "100-continue"
            kind = self._decide()
            if kind in ("reset", "stall"):
                # Part of the request may still be in flight: the client sees the cut mid-send or mid-wait.
                if kind == "stall":
                    self._stall(client)
                else:
                    _reset(client)
                return
            if kind in ("http_500", "http_503", "slowdown", "http_429"):
                if not expects_continue:
                    reader.read_body(headers)  # drained, so the client is not cut off mid-send
                client.sendall(_error_answer(kind, method))
                return  # Connection: close
            if expects_continue:
                client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            body = reader.read_body(headers)
            forwarded = _strip_header(head, b"expect")
            if up_reader is None:
                upstream_ref[0] = self._connect_upstream()
                up_reader = _Reader(upstream_ref[0])
            up_reader.sock.sendall(forwarded + body)
            if not self._relay_response(up_reader, client, method, truncate=kind == "truncate"):
                return

    def _relay_response(self, up: _Reader, client: socket.socket, method: str, *, truncate: bool) -> bool:
        """One answer from upstream to the client (cut in half when `truncate`); False = connection over."""
        while True:
            head = up.read_head()
            if head is None:
                return False
            status_line, headers = _parse_head(head)
            status = int(status_line.split(" ")[1])
            if status >= 200:
                break  # a 1xx before the real answer is dropped: we removed the client's Expect
        head = self._rewrite_location(head)
        no_body = method == "HEAD" or status in (204, 304)
        body = b"" if no_body else up.read_body(headers, until_close=True)
        if truncate:
            if body:
                client.sendall(head + body[: len(body) // 2])
            else:
                client.sendall(head[: len(head) // 2])
            return False
        client.sendall(head + body)
        closing = headers.get("connection", "").lower() == "close" or (
            not no_body and "content-length" not in headers and "chunked" not in headers.get("transfer-encoding", ""))
        return not closing

    def _rewrite_location(self, head: bytes) -> bytes:
        # A resumable upload's session URL names the stand-in itself; the next requests must come back here.
        host, port = self.upstream
        for name in (host, "localhost", "127.0.0.1", "0.0.0.0"):
            head = head.replace(f"//{name}:{port}".encode(), f"//127.0.0.1:{self.port}".encode())
        return head


# ------------------------------------------------------------------------------------------ HTTP bits


class FailingAfter(FaultProxy):
    """A fault proxy that is deterministic instead of seeded (HTTP mode): the first `good` requests pass, every
    later one gets the fault `kind` (a provider that goes down part-way through a run); `good` may be raised
    again to let the provider recover."""

    def __init__(self, name: str, upstream: tuple[str, int], *, good: int, kind: str):
        if kind not in HTTP_FAULTS:
            raise ValueError(f"{name}: fault kind {kind!r} is not an HTTP fault {HTTP_FAULTS}")
        super().__init__(name, upstream, FaultSchedule(seed=0, rate=0.0), mode="http")
        self.good, self.kind = good, kind

    def _decide(self, *, count: bool = True) -> str | None:
        with self._lock:
            self.requests += 1
            if self.requests <= self.good:
                return None
            self.counts[self.kind] += 1
            return self.kind


class _Reader:
    """Buffered reads from a socket: a message head, then its body by Content-Length or chunks."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = b""

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        if not data:
            return False
        self.buf += data
        return True

    def read_head(self) -> bytes | None:
        while b"\r\n\r\n" not in self.buf:
            if len(self.buf) > MAX_HEAD:
                raise ValueError("message head too large")
            if not self._fill():
                return None
        end = self.buf.index(b"\r\n\r\n") + 4
        head, self.buf = self.buf[:end], self.buf[end:]
        return head

    def read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self._fill():
                raise EOFError(f"peer closed with {n - len(self.buf)} bytes to go")
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def read_line(self) -> bytes:
        while b"\r\n" not in self.buf:
            if not self._fill():
                raise EOFError("peer closed mid-line")
        end = self.buf.index(b"\r\n") + 2
        out, self.buf = self.buf[:end], self.buf[end:]
        return out

    def read_body(self, headers: Mapping[str, str], *, until_close: bool = False) -> bytes:
        """The raw body bytes (chunk framing kept, so they can be passed on as they came)."""
        if "chunked" in headers.get("transfer-encoding", "").lower():
            parts = []
            while True:
                line = self.read_line()
                parts.append(line)
                size = int(line.split(b";")[0].strip(), 16)
                if size == 0:
                    while True:  # trailers, up to the empty line
                        trailer = self.read_line()
                        parts.append(trailer)
                        if trailer == b"\r\n":
                            return b"".join(parts)
                parts.append(self.read_exact(size + 2))
        if "content-length" in headers:
            return self.read_exact(int(headers["content-length"]))
        if not until_close:
            return b""
        while self._fill():
            pass
        out, self.buf = self.buf, b""
        return out


def _parse_head(head: bytes) -> tuple[str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    return lines[0], headers


def _strip_header(head: bytes, name: bytes) -> bytes:
    lines = head.split(b"\r\n")
    return b"\r\n".join(line for line in lines if not line.lower().startswith(name + b":"))


def _error_answer(kind: str, method: str) -> bytes:
    status = {"http_500": 500, "http_503": 503, "slowdown": 503, "http_429": 429}[kind]
    if kind == "slowdown":
        body = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
                b"<Message>Please reduce your request rate.</Message></Error>")
        content_type = b"application/xml"
    else:
        body = f"injected fault: {status} {_REASONS[status]}\n".encode()
        content_type = b"text/plain"
    head = (f"HTTP/1.1 {status} {_REASONS[status]}\r\n".encode() + b"Content-Type: " + content_type + b"\r\n"
            + f"Content-Length: {len(body)}\r\n".encode() + b"Retry-After: 0\r\nConnection: close\r\n\r\n")
    return head if method == "HEAD" else head + body


def _reset(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: the peer gets a TCP RST, 'connection reset by peer'."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    _close(sock)


def _close(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass


def wait_until(predicate, timeout: float, interval: float = 0.05) -> bool:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())
