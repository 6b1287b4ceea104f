"""The admin listener on its own thread and event loop, so load on the API can't starve it.

# Goals
/healthz and /readyz answer within milliseconds while thousands of streams keep the API
loop busy (Kubernetes restarts a pod whose probe times out: a busy pod must not look
dead).

# Strategy
A daemon thread runs its own event loop with the admin aiohttp app. The handlers only
read state that is safe across threads: the service's ready/draining flags (plain bool
reads) and prometheus-client's registry (its values are lock-protected). The API loop's
busiest moments still share the interpreter lock with this thread, which gets it back
at every switch interval (5 ms by default).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading

from aiohttp import web

from zrproxy.config import Address
from zrproxy.errors import StartupError


class AdminListener:
    """`await start()` binds and serves `app` on its own thread; `await stop()` ends it."""

    def __init__(self, app: web.Application, listen: Address, key: str) -> None:
        self._app = app
        self._listen = listen
        self._key = key
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._stopping: asyncio.Event | None = None
        self.address: Address | None = None

    async def start(self) -> None:
        bound: concurrent.futures.Future[Address] = concurrent.futures.Future()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._run, args=(bound,), name="zrproxy-admin", daemon=True
        )
        self._thread.start()
        self.address = await asyncio.wrap_future(bound)

    def _run(self, bound: concurrent.futures.Future[Address]) -> None:
        loop = self._loop
        assert loop is not None
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._main(bound))
        except BaseException as exc:  # reported through the future, never lost
            if not bound.done():
                bound.set_exception(exc)
        finally:
            loop.close()

    async def _main(self, bound: concurrent.futures.Future[Address]) -> None:
        # Created on this thread's loop before anyone can ask it to stop.
        self._stopping = asyncio.Event()
        self._runner = web.AppRunner(self._app, access_log=None, handle_signals=False)
        await self._runner.setup()
        try:
            site = web.TCPSite(self._runner, self._listen.host, self._listen.port)
            try:
                await site.start()
            except OSError as exc:
                raise StartupError(f"{self._key}: cannot listen ({exc.strerror})") from None
            host, port = self._runner.addresses[0][:2]
            bound.set_result(Address(host, port))
            await self._stopping.wait()
        finally:
            await self._runner.cleanup()

    async def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            return
        stopping = self._stopping
        if stopping is None:
            return
        loop.call_soon_threadsafe(stopping.set)
        await asyncio.to_thread(thread.join, 10)
