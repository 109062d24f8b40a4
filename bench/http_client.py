"""A minimal keep-alive HTTP/1.1 client for load generation: POST bytes, get (status, body) back.

Why not aiohttp's client: it spends ~0.1-0.2 ms of Python per request on this machine (request and
response objects, header multidicts, cookie jar, tracing hooks), and a load generator that measures a
gateway should add as little of its own as it can (the direct arm's NATS client adds ~50 us). This one
writes a pre-built request and parses only what it needs: the status line and Content-Length. It is a
measuring instrument, not a general client: no chunked responses, no redirects, no TLS.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import cast


class HttpProtocolError(Exception):
    """The server answered something this client does not parse (or closed the connection mid-answer)."""


class _Connection(asyncio.Protocol):
    """One keep-alive connection serving one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.reusable = True
        self.got_bytes = False  # anything read since the current exchange began
        self._buf = bytearray()
        self._waiter: asyncio.Future[tuple[int, bytes]] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.reusable = False
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(HttpProtocolError(f"connection closed before the response ended ({exc})"))

    def data_received(self, data: bytes) -> None:
        self._buf += data
        self.got_bytes = True
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        try:
            answer = self._parse()
        except HttpProtocolError as exc:
            self.reusable = False
            waiter.set_exception(exc)
            return
        if answer is not None:
            waiter.set_result(answer)

    def _parse(self) -> tuple[int, bytes] | None:
        buf = self._buf
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            return None
        lines = bytes(buf[:end]).split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise HttpProtocolError(f"bad status line {lines[0]!r}")
        length = None
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            key = name.strip().lower()
            if key == b"content-length":
                length = int(value.strip())
            elif key == b"connection" and value.strip().lower() == b"close":
                self.reusable = False
            elif key == b"transfer-encoding":
                raise HttpProtocolError("chunked responses are not supported")
        if length is None:
            raise HttpProtocolError("response without Content-Length")
        total = end + 4 + length
        if len(buf) < total:
            return None
        body = bytes(buf[end + 4 : total])
        del buf[:total]
        return int(parts[1]), body

    async def exchange(self, request: bytes) -> tuple[int, bytes]:
        assert self.transport is not None
        if self.transport.is_closing():
            raise HttpProtocolError("connection closed before the request was sent")
        self.got_bytes = bool(self._buf)
        self._waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        try:
            return await self._waiter
        finally:
            self._waiter = None

    def close(self) -> None:
        self.reusable = False
        if self.transport is not None:
            self.transport.close()


class KeepAliveHttpClient:
    """POSTs over a pool of keep-alive connections to one host: one connection per request in flight."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.connections_opened = 0
        self._idle: list[_Connection] = []
        self._all: set[_Connection] = set()

    async def _open(self) -> _Connection:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(_Connection, self.host, self.port)
        self.connections_opened += 1
        self._all.add(conn)
        return conn

    def request_bytes(self, path: str, body: bytes, content_type: str = "application/json") -> bytes:
        """The whole request, to build before the clock starts."""
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        return head.encode("ascii") + body

    def _reuse(self) -> _Connection | None:
        """An idle connection still open (the server closes idle ones after its keep-alive timeout)."""
        while self._idle:
            conn = self._idle.pop()
            if conn.reusable and conn.transport is not None and not conn.transport.is_closing():
                return conn
            self._all.discard(conn)
        return None

    async def send(self, request: bytes) -> tuple[int, bytes]:
        """Send a request built by `request_bytes`; (status, body) of its answer. A kept-alive connection
        that the server closed just as it was reused (no answer byte read) is retried once on a new one,
        as HTTP clients do."""
        conn = self._reuse()
        reused = conn is not None
        if conn is None:
            conn = await self._open()
        try:
            answer = await conn.exchange(request)
        except HttpProtocolError:
            conn.close()
            self._all.discard(conn)
            if not reused or conn.got_bytes:
                raise
            return await self.send(request)
        except BaseException:
            conn.close()  # its state is unknown (cancelled mid-answer, or broken): never reuse it
            self._all.discard(conn)
            raise
        if conn.reusable:
            self._idle.append(conn)
        else:
            conn.close()
            self._all.discard(conn)
        return answer

    async def close(self) -> None:
        for conn in self._all:
            conn.close()
        self._all.clear()
        self._idle.clear()
        await asyncio.sleep(0)  # let the transports run their close callbacks

    async def __aenter__(self) -> KeepAliveHttpClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        with contextlib.suppress(Exception):
            await self.close()
