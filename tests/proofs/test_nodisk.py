"""No disk: after it is ready, the proxy opens no file for writing and writes only to
sockets, eventfds, pipes and its stdout/stderr. Checked with strace on the real process
during marker traffic along every path, in default and scrub mode."""

from __future__ import annotations

import os
import secrets
import signal
from pathlib import Path

import aiohttp
import pytest

from tests.processes import mock_process, proxy_process
from tests.strace import STRACE, TRACED, children, violations
from tests.traffic import drive_every_path, retention_config
from zrproxy.auth import new_key

pytestmark = pytest.mark.skipif(
    STRACE is None, reason="strace not installed (Debian package 'strace'; make test installs it)"
)


def test_the_checker_sees_a_write_to_a_file() -> None:
    trace = (
        '7 write(2<pipe:[1]>, "zrproxy ready: api=x", 20) = 20\n'
        '7 openat(AT_FDCWD</>, "/tmp/x", O_WRONLY|O_CREAT|O_CLOEXEC, 0666) = 9</tmp/x>\n'
        '7 write(9</tmp/x>, "content", 7) = 7\n'
        '7 write(5<socket:[99]>, "ok", 2) = 2\n'
        '7 unlink("/tmp/x") = 0\n'
    )
    assert len(violations(trace)) == 3


@pytest.mark.parametrize("mode", ["default", "scrub"])
async def test_no_disk_writes_after_ready(tmp_path: Path, mode: str) -> None:
    assert STRACE is not None
    key, digest = new_key()
    trace_file = tmp_path / "strace.out"
    wrapper = [
        STRACE,
        "-f",
        "-qq",
        "-y",
        "-s",
        "160",  # the ready line's text comes after the log prefix (time, level, pid, worker)
        "-e",
        f"trace={TRACED}",
        "-o",
        str(trace_file),
    ]
    args = ["--scrub-memory"] if mode == "scrub" else []
    marker = ("zrDISK", secrets.token_hex(12))
    with mock_process() as mock:
        config = retention_config(mock.url, digest)
        with proxy_process(config, tmp_path, *args, wrapper=wrapper, cwd=tmp_path) as proxy:
            try:
                async with aiohttp.ClientSession() as client:
                    statuses = await drive_every_path(proxy.url, key, marker, client)
            finally:
                # strace detaches on SIGTERM and would leave the proxy running: stop the
                # proxy itself; strace exits with it.
                for child in children(proxy.pid):
                    os.kill(child, signal.SIGTERM)
                assert proxy.process.wait(30) == 0
            assert statuses["stream"] == 200, statuses
    trace = trace_file.read_text(errors="replace")
    after_ready = trace.split("zrproxy ready", 1)[1]
    assert after_ready.count("<socket:") > 20  # the trace saw the traffic
    assert violations(trace) == []
    # Nothing new appeared in the proxy's working directory either.
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("zrproxy-")) == [
        "strace.out"
    ]
