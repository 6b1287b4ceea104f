"""File descriptors: the soft limit raised to the hard one at start, a connection cap that
keeps the proxy (and its health endpoints) inside the limit, and refused accepts counted
and logged at a bounded rate."""

from __future__ import annotations

import asyncio
import asyncio.selector_events
import errno
import inspect
import logging
import os
import resource
import socket
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from tests.conftest import config_data
from tests.processes import mock_process, proxy_process
from zrproxy.auth import new_key
from zrproxy.listener import AcceptErrors


def _limit(soft: int, hard: int) -> Callable[[], None]:
    return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _open_files(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no Max open files line")


def _settled_fd_count(pid: int) -> int:
    """The process's descriptor count once it stayed the same for 5 looks 0.1 s apart."""
    seen: list[int] = []
    for _ in range(100):
        seen.append(len(os.listdir(f"/proc/{pid}/fd")))
        if len(seen) >= 5 and len(set(seen[-5:])) == 1:
            break
        time.sleep(0.1)
    return seen[-1]


def test_the_soft_limit_is_raised_to_the_hard_one(tmp_path: Path) -> None:
    _, digest = new_key()
    config = config_data(
        [{"name": "m", "kind": "openai", "base_url": "http://127.0.0.1:9/v1"}], digest
    )
    with proxy_process(config, tmp_path, preexec_fn=_limit(256, 4096)) as proxy:
        assert _open_files(proxy.process.pid) == (4096, 4096)


# The proxy's loop: uvloop by default, the standard loop in scrub mode. At the fd limit
# they differ (README, "Limits and failure behaviour"); the cap must hold on both.
LOOPS = {"uvloop": {}, "asyncio": {"scrub_memory": True}}


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_the_connection_cap_keeps_health_answering_at_the_fd_limit(
    tmp_path: Path, loop: str
) -> None:
    key, digest = new_key()
    with mock_process() as mock:
        config = config_data(
            [{"name": "m", "kind": "openai", "base_url": mock.url}],
            digest,
            header_timeout_s=60,
            **LOOPS[loop],
        )
        with proxy_process(config, tmp_path, preexec_fn=_limit(200, 200)) as proxy:
            host, port = proxy.url.removeprefix("http://").rsplit(":", 1)
            idle = []
            try:
                for _ in range(250):  # more than the proxy's 200 descriptors
                    idle.append(socket.create_connection((host, int(port)), timeout=5))
                _settled_fd_count(proxy.process.pid)  # it accepted all it is going to
                with urllib.request.urlopen(proxy.admin_url + "/healthz", timeout=10) as r:
                    assert r.status == 200
                # The cap held them off (in the backlog), rather than the loop shedding
                # them at the limit: uvloop would not say so, the standard loop would.
                with urllib.request.urlopen(proxy.admin_url + "/metrics", timeout=10) as r:
                    exposition = r.read().decode()
                assert "\nzrproxy_accept_pauses_total 1.0\n" in exposition
                assert "\nzrproxy_refused_accepts_total 0.0\n" in exposition
            finally:
                for sock in idle:
                    sock.close()
            body = orjson.dumps({"model": "mock", "messages": [{"role": "user", "content": "x"}]})
            request = urllib.request.Request(
                proxy.url + "/v1/chat/completions",
                data=body,
                headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
            )
            with urllib.request.urlopen(request, timeout=30) as r:
                assert r.status == 200


def test_refused_accepts_are_counted_and_logged_at_a_bounded_rate(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="zrproxy")
    refused: list[bool] = []
    passed_on: list[dict[str, object]] = []
    handler = AcceptErrors(refused.append, lambda _loop, context: passed_on.append(context))
    loop = asyncio.new_event_loop()
    try:
        emfile = OSError(errno.EMFILE, "Too many open files")
        # The standard loop's own wording for these (checked against its source below).
        for _ in range(3):
            handler(
                loop, {"message": "socket.accept() out of system resource", "exception": emfile}
            )
        handler(
            loop, {"message": "error status in uv_stream_t.listen callback", "exception": emfile}
        )
        handler(loop, {"message": "something else", "exception": ValueError()})
    finally:
        loop.close()
    assert refused == [False, False, False, True]
    assert len(passed_on) == 1
    lines = [r for r in caplog.records if "not accepted" in r.getMessage()]
    assert len(lines) == 1
    assert "EMFILE" in lines[0].getMessage()
    assert "socket.accept() out of system resource" in inspect.getsource(asyncio.selector_events)
