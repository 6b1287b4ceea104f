"""Process accounting from /proc: process trees, CPU seconds, RSS, CPU pinning, fd limits.

Linux only. Reads /proc, never writes to another process except its rlimits.
"""

from __future__ import annotations

import os
import resource
import shutil
import time
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# The proxy under test gets CPU 0; the benchmark, its load generators and the mock CPU 1.
PROXY_CPUS = "0"
LOAD_CPU = 1


def _stat_fields(pid: int) -> list[str]:
    # The command name (field 2) may contain spaces and parentheses: split after the last ")".
    text = Path(f"/proc/{pid}/stat").read_text()
    return text.rsplit(")", 1)[1].split()  # [0] is field 3 (state)


def children(pid: int) -> list[int]:
    """Direct children of `pid`, by scanning /proc (works without CONFIG_PROC_CHILDREN)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if int(_stat_fields(int(entry))[1]) == pid:
                    found.append(int(entry))
            except (OSError, IndexError):
                continue
    return found


def tree(pid: int) -> list[int]:
    """`pid` and all its live descendants."""
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        todo.extend(children(current))
    return out


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of each live process, plus cutime + cstime of its reaped children."""
    ticks = 0
    for pid in pids:
        try:
            fields = _stat_fields(pid)
        except OSError:
            continue  # exited since the tree was read
        ticks += sum(int(f) for f in fields[11:15])  # fields 14-17 of proc(5)
    return ticks / CLOCK_TICKS


def user_seconds(pids: list[int]) -> float:
    """utime of each live process, plus cutime of its reaped children: the part of
    `cpu_seconds` spent outside the kernel."""
    ticks = 0
    for pid in pids:
        try:
            fields = _stat_fields(pid)
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[13])  # utime, cutime
    return ticks / CLOCK_TICKS


def rss_kib(pids: list[int]) -> int:
    """Sum of VmRSS over `pids` in KiB."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total


def can_pin() -> bool:
    return (os.cpu_count() or 1) >= 2 and shutil.which("taskset") is not None


def pinned(cmd: list[str], cpus: str | None) -> list[str]:
    """`cmd` run under `taskset -c cpus` (taskset execs it: same pid, inherited by threads
    and children), or unchanged when pinning is not possible."""
    return ["taskset", "-c", cpus, *cmd] if cpus is not None and can_pin() else cmd


def pin_self_to_load_cpu() -> None:
    if can_pin():
        os.sched_setaffinity(0, {LOAD_CPU})


def raise_fd_limit(want: int = 65536) -> int:
    """Raise this process's RLIMIT_NOFILE (children inherit it); returns the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(want, soft), max(want, hard)))
    except (ValueError, OSError):  # not root: the hard limit is as far as we may go
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def machine_busy_seconds() -> float:
    """CPU seconds all CPUs of the machine spent running processes (user, nice, system)
    since boot. Interrupt time is left out: loopback traffic, ours too, is mostly softirq."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    return (int(fields[1]) + int(fields[2]) + int(fields[3])) / CLOCK_TICKS


class Background:
    """How much CPU processes outside our own tree used while a scenario ran."""

    def __init__(self) -> None:
        self._machine = machine_busy_seconds()
        self._ours = cpu_seconds(tree(os.getpid()))
        self._wall = time.monotonic()

    def share(self) -> float:
        """Their CPU seconds per second of wall time (2.0 = two cores' worth)."""
        machine = machine_busy_seconds() - self._machine
        ours = cpu_seconds(tree(os.getpid())) - self._ours
        return max(0.0, machine - ours) / max(time.monotonic() - self._wall, 1e-9)


def raise_priority(niceness: int = -10) -> int:
    """Run ourselves (and so every process we start) ahead of other work on the machine,
    when allowed; returns the niceness in effect."""
    try:
        os.setpriority(os.PRIO_PROCESS, 0, niceness)
    except OSError:
        pass
    return os.getpriority(os.PRIO_PROCESS, 0)
