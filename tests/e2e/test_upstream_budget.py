"""The upstream connections of all pools together stay within one budget (the file
descriptors the API listener's fd-fitted cap leaves them): at the limit, a new
connection first closes the longest-idle one of any pool."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from tests.conftest import config_data
from zrproxy.auth import new_key
from zrproxy.config import parse_config
from zrproxy.pool import Budget, Pool
from zrproxy.upstream import Upstreams


@contextmanager
def _listeners(count: int) -> Iterator[list[int]]:
    """Listening loopback ports; the kernel completes connections into their backlog."""
    socks = []
    for _ in range(count):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        socks.append(s)
    try:
        yield [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _pool(port: int, budget: Budget) -> Pool:
    return Pool(
        "127.0.0.1",
        port,
        None,
        max_connections=8,
        pool_timeout_s=1,
        connect_timeout_s=1,
        keepalive_s=30,
        budget=budget,
    )


async def _settle(budget: Budget, expected: int) -> None:
    for _ in range(100):  # a closed connection reports itself on a later loop turn
        if budget.open == expected:
            return
        await asyncio.sleep(0.01)


@pytest.mark.parametrize(("limit", "closed"), [(2, [True, False]), (3, [False, False])])
async def test_at_the_budget_a_new_connection_closes_the_longest_idle_one(
    limit: int, closed: list[bool]
) -> None:
    budget = Budget(limit)
    with _listeners(2) as (port_a, port_b):
        a, b = _pool(port_a, budget), _pool(port_b, budget)
        try:
            first, second = await a.acquire(), await a.acquire()
            a.release(first)
            await asyncio.sleep(0.01)
            a.release(second)
            other = await b.acquire()  # pool b needs one: at the limit, a's longest-idle goes
            assert [first.closed, second.closed] == closed
            assert not other.closed
            await _settle(budget, 2 if closed[0] else 3)
            assert budget.open == (2 if closed[0] else 3)
            assert a.size == (1 if closed[0] else 2) and b.size == 1
        finally:
            a.close()
            b.close()


async def test_the_pools_of_one_config_share_one_budget() -> None:
    _, digest = new_key()
    with _listeners(2) as (port_a, port_b):
        config = parse_config(
            config_data(
                [
                    {"name": "a", "kind": "openai", "base_url": f"http://127.0.0.1:{port_a}/v1"},
                    {"name": "b", "kind": "openai", "base_url": f"http://127.0.0.1:{port_b}/v1"},
                ],
                digest,
            ),
            {},
        )
        upstreams = Upstreams(config, connection_budget=1)
        try:
            conn = await upstreams.pool("a").acquire()
            upstreams.pool("a").release(conn)
            await upstreams.pool("b").acquire()
            assert conn.closed  # pool a's idle connection made room for pool b's
        finally:
            await upstreams.close()
