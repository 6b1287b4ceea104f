"""The aiohttp behaviour zrproxy still relies on (the admin listener, zrproxy/app.py).

The API listener is our own server (zrproxy/server.py) and uses no aiohttp internals.
The admin app drops aiohttp's `Server` header in `on_response_prepare`: that only works
while aiohttp adds the header before the signal runs and writes it after.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from zrproxy.app import admin_app
from zrproxy.proxy import ServiceState


async def test_the_admin_app_sends_no_server_header() -> None:
    from prometheus_client import CollectorRegistry

    runner = web.AppRunner(admin_app(ServiceState(), CollectorRegistry()))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        head = data.partition(b"\r\n\r\n")[0].lower()
        assert head.startswith(b"http/1.1 200")
        assert b"\r\nserver:" not in head
    finally:
        await runner.cleanup()
