"""No disk: after it is ready, the proxy opens no file for writing and writes only to
sockets, eventfds, pipes and its stdout/stderr. Checked with strace on the real process
during marker traffic along every path, in default and scrub mode."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
from pathlib import Path

import aiohttp
import pytest

from tests.processes import mock_process, proxy_process
from tests.traffic import drive_every_path, retention_config
from zrproxy.auth import new_key

STRACE = shutil.which("strace")
pytestmark = pytest.mark.skipif(
    STRACE is None, reason="strace not installed (Debian package 'strace'; make test installs it)"
)

TRACED = (
    "open,openat,openat2,creat,rename,renameat,renameat2,unlink,unlinkat,mkdir,mkdirat,"
    "link,linkat,symlink,symlinkat,truncate,ftruncate,memfd_create,"
    "write,writev,pwrite64,pwritev,pwritev2,sendfile,sendto,sendmsg"
)
_WRITE = re.compile(r"^\d+\s+(write|writev|pwrite64|pwritev2?|sendfile)\((\d+)<([^>]*)>")
_OPEN = re.compile(r"^\d+\s+(open|openat|openat2)\(.*\"([^\"]*)\", ([A-Z_|]+)")
_FORBIDDEN = re.compile(
    r"^\d+\s+(creat|rename|renameat2?|unlink|unlinkat|mkdir|mkdirat|link|linkat|symlink"
    r"|symlinkat|truncate|ftruncate|memfd_create)\("
)
_WRITE_FLAGS = ("O_WRONLY", "O_RDWR", "O_CREAT", "O_TRUNC", "O_APPEND")


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(child) for child in path.read_text().split()]


def _allowed_write_target(fd: int, target: str) -> bool:
    if fd in (1, 2):
        return True  # stdout and stderr, wherever the operator sends them
    return target.startswith(("socket:", "pipe:", "anon_inode:[eventfd]", "TCP", "UNIX"))


def violations(trace: str) -> list[str]:
    """Syscalls after the ready line that write to disk (strace -f -y output)."""
    lines = trace.splitlines()
    ready = next((i for i, line in enumerate(lines) if "zrproxy ready" in line), None)
    assert ready is not None, "the ready line is not in the trace"
    found = []
    for line in lines[ready + 1 :]:
        if " resumed>" in line and "(" not in line.split(" resumed>")[0]:
            continue
        if _FORBIDDEN.match(line):
            found.append(line)
        elif match := _OPEN.match(line):
            if any(flag in match.group(3) for flag in _WRITE_FLAGS):
                found.append(line)
        elif (match := _WRITE.match(line)) and not _allowed_write_target(
            int(match.group(2)), match.group(3)
        ):
            found.append(line)
    return found


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
                for child in _children(proxy.pid):
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
