"""The load generator's minimal HTTP client, against a real aiohttp server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from aiohttp import web

from bench.http_client import HttpProtocolError, KeepAliveHttpClient
from services.gateway.service import serve_http
from services.gateway.settings import GatewaySettings
from tests.helpers import eventually


@dataclass
class EchoServer:
    port: int
    release: asyncio.Event  # /echo answers once this is set
    held: list[bytes] = field(default_factory=list)  # bodies of /echo requests that reached it


@pytest.fixture
async def server() -> AsyncIterator[EchoServer]:
    release = asyncio.Event()
    release.set()
    held: list[bytes] = []

    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        held.append(body)
        await release.wait()
        status = int(request.query.get("status", "200"))
        return web.Response(body=body * int(request.query.get("times", "1")), status=status)

    async def close_after(request: web.Request) -> web.Response:
        return web.Response(body=b"bye", headers={"Connection": "close"})

    async def chunked(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        await resp.write(b"part")
        await resp.write_eof()
        return resp

    async def hang_up(request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        request.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly a bit")
        request.transport.close()
        return web.Response()

    app = web.Application()
    app.router.add_post("/echo", echo)
    app.router.add_post("/close", close_after)
    app.router.add_post("/chunked", chunked)
    app.router.add_post("/hang-up", hang_up)
    # a short idle timeout: the server closes kept-alive connections that wait (as the gateway does)
    async with serve_http(app, GatewaySettings(idle_timeout_ms=300.0), port=0) as runner:
        yield EchoServer(runner.addresses[0][1], release, held)


async def test_answers_come_back_whole_over_one_kept_alive_connection(server: EchoServer) -> None:
    port = server.port
    async with KeepAliveHttpClient("127.0.0.1", port) as client:
        for i in range(3):
            body = f'{{"n": {i}}}'.encode()
            assert await client.send(client.request_bytes("/echo", body)) == (200, body)
        big = bytes(range(256)) * 4096  # 1 MiB back: many reads
        assert await client.send(client.request_bytes("/echo?times=1", big)) == (200, big)
        assert await client.send(client.request_bytes("/echo?status=422", b"no")) == (422, b"no")
        assert client.connections_opened == 1


async def test_requests_in_flight_together_use_one_connection_each(server: EchoServer) -> None:
    server.release.clear()
    async with KeepAliveHttpClient("127.0.0.1", server.port) as client:
        sends = [asyncio.create_task(client.send(client.request_bytes("/echo", b"%d" % i))) for i in range(4)]
        await eventually(lambda: len(server.held) == 4)  # all four are at the server, none answered
        server.release.set()
        assert [await t for t in sends] == [(200, b"%d" % i) for i in range(4)]
        assert client.connections_opened == 4
        await client.send(client.request_bytes("/echo", b"again"))
        assert client.connections_opened == 4  # reused from the idle pool


async def test_a_connection_the_server_closes_is_not_reused(server: EchoServer) -> None:
    port = server.port
    async with KeepAliveHttpClient("127.0.0.1", port) as client:
        assert await client.send(client.request_bytes("/close", b"")) == (200, b"bye")
        assert await client.send(client.request_bytes("/echo", b"x")) == (200, b"x")
        assert client.connections_opened == 2


async def test_answers_it_cannot_read_raise(server: EchoServer) -> None:
    port = server.port
    async with KeepAliveHttpClient("127.0.0.1", port) as client:
        with pytest.raises(HttpProtocolError, match="chunked"):
            await client.send(client.request_bytes("/chunked", b""))
        with pytest.raises(HttpProtocolError, match="closed before the response ended"):
            await client.send(client.request_bytes("/hang-up", b""))
        assert await client.send(client.request_bytes("/echo", b"still fine")) == (200, b"still fine")


async def test_a_kept_alive_connection_the_server_closed_is_not_reused(server: EchoServer) -> None:
    async with KeepAliveHttpClient("127.0.0.1", server.port) as client:
        request = client.request_bytes("/echo", b"one")
        assert await client.send(request) == (200, b"one")
        idle = client._idle[0]
        assert idle.transport is not None
        transport = idle.transport
        await eventually(transport.is_closing, timeout_s=5)  # the server's idle timeout passed
        assert await client.send(request) == (200, b"one")
        assert client.connections_opened == 2
