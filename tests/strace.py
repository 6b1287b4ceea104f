"""strace for the no-disk proofs (test helper): the syscalls to trace, a parser of
`strace -f -y` output that finds writes to disk after the ready line, and the children
of a traced process (strace detaches on SIGTERM, so tests signal the proxy itself)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

STRACE = shutil.which("strace")

TRACED = (
    "open,openat,openat2,creat,rename,renameat,renameat2,unlink,unlinkat,mkdir,mkdirat,"
    "link,linkat,symlink,symlinkat,truncate,ftruncate,memfd_create,"
    "write,writev,pwrite64,pwritev,pwritev2,sendfile,sendto,sendmsg"
)
WRITE = re.compile(r"^\d+\s+(write|writev|pwrite64|pwritev2?|sendfile)\((\d+)<([^>]*)>")
_OPEN = re.compile(r"^\d+\s+(open|openat|openat2)\(.*\"([^\"]*)\", ([A-Z_|]+)")
_FORBIDDEN = re.compile(
    r"^\d+\s+(creat|rename|renameat2?|unlink|unlinkat|mkdir|mkdirat|link|linkat|symlink"
    r"|symlinkat|truncate|ftruncate|memfd_create)\("
)
_WRITE_FLAGS = ("O_WRONLY", "O_RDWR", "O_CREAT", "O_TRUNC", "O_APPEND")


def children(pid: int) -> list[int]:
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
        elif (match := WRITE.match(line)) and not _allowed_write_target(
            int(match.group(2)), match.group(3)
        ):
            found.append(line)
    return found
