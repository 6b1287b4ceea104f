"""The admin listener answers while the API event loop is completely blocked: it has its
own thread and loop, so no API load can starve /healthz and /readyz."""

from __future__ import annotations

import asyncio
import threading
import urllib.error
import urllib.request

from tests.conftest import RunningProxy


def _probe(url: str, answered: threading.Event, statuses: list[int]) -> None:
    for path in ("/healthz", "/readyz", "/metrics"):
        with urllib.request.urlopen(url + path, timeout=20) as resp:
            statuses.append(resp.status)
    answered.set()


async def test_health_answers_while_the_api_loop_is_blocked(proxy: RunningProxy) -> None:
    answered = threading.Event()
    statuses: list[int] = []
    probe = threading.Thread(target=_probe, args=(proxy.admin_url, answered, statuses))
    probe.start()
    # Block the loop the API runs on until the probes are answered (at most 20 s): with
    # the admin app on this loop they could not be, and this would time out.
    got_answers = answered.wait(20)
    probe.join(20)
    assert got_answers
    assert statuses == [200, 200, 200]
    await asyncio.sleep(0)


async def test_readyz_follows_drain_across_threads(proxy: RunningProxy) -> None:
    statuses: list[int] = []
    await proxy.service.drain()

    def probe() -> None:
        try:
            urllib.request.urlopen(proxy.admin_url + "/readyz", timeout=20)
        except urllib.error.HTTPError as exc:
            statuses.append(exc.code)

    await asyncio.to_thread(probe)
    assert statuses == [503]
