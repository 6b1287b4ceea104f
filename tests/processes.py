"""Child processes and their logs: the one way the suite starts a process it talks to.

`LoggedProcess` starts any child and collects its output; `proxy_process` and
`mock_process` start zrproxy and the bundled mock on it, with configs written as TOML
files, and yield once the ready line was logged. Every process is stopped (SIGTERM,
then SIGKILL) when its context exits.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_READY = r"zrproxy ready: api=(http://\S+) admin=(http://\S+)"
_MOCK = r"mock upstream listening on (https?://\S+)"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, datetime.date):
        return value.isoformat()  # a TOML local date
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(type(value))


def to_toml(data: dict[str, Any]) -> str:
    """Enough TOML for our config shape: tables, arrays of tables, inline tables."""
    lines: list[str] = []
    for key, value in data.items():
        if isinstance(value, dict):
            lines.append(f"[{key}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in value.items()]
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            for table in value:
                lines.append(f"[[{key}]]")
                lines += [f"{k} = {_toml_value(v)}" for k, v in table.items()]
        else:
            lines.insert(0, f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


class LoggedProcess:
    """A child process whose output (stdout and stderr, merged) a thread collects, so its
    pipe never fills up; `wait_for` reads it. With `stdin=True` the child gets a pipe it
    can block on until `stop` closes it (children that wait to be scanned)."""

    def __init__(
        self,
        argv: list[str],
        env: dict[str, str] | None = None,
        *,
        cwd: Path | None = None,
        preexec_fn: Callable[[], None] | None = None,
        stdin: bool = False,
    ) -> None:
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            cwd=cwd,
            preexec_fn=preexec_fn,
        )
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def output(self) -> str:
        with self._cond:
            return "".join(self.lines)

    def wait_for(self, pattern: str, timeout_s: float = 30) -> re.Match[str]:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                for line in self.lines:
                    if match := re.search(pattern, line):
                        return match
                left = deadline - time.monotonic()
                if self.proc.poll() is not None or left <= 0:
                    state = f"exited {self.proc.returncode}" if left > 0 else "timed out"
                    raise AssertionError(f"{pattern!r} not seen ({state}):\n{''.join(self.lines)}")
                self._cond.wait(min(left, 0.2))

    def stop(self, timeout_s: float = 20) -> int:
        """Close its stdin; SIGTERM unless it exited then; SIGKILL after `timeout_s`."""
        if self.proc.stdin is not None:
            self.proc.stdin.close()  # a child blocked reading it exits now
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout_s)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._thread.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.returncode


@dataclass
class Proc:
    log: LoggedProcess
    url: str  # the API (or the mock's /v1 base URL)
    admin_url: str = ""

    @property
    def process(self) -> subprocess.Popen[str]:
        return self.log.proc

    @property
    def pid(self) -> int:
        return self.log.pid


@contextlib.contextmanager
def mock_process(*args: str) -> Iterator[Proc]:
    """The bundled mock as a subprocess (`args` added to its command line, e.g. --kind or
    --tls-cert); yields once it logged its listening line."""
    log = LoggedProcess(
        [sys.executable, "-m", "zrproxy.mock_upstream", "--listen", "127.0.0.1:0", *args]
    )
    try:
        url = log.wait_for(_MOCK, 30).group(1).rstrip("/")
        yield Proc(log, url if url.endswith("/v1") else url + "/v1")
    finally:
        log.stop(10)


@contextlib.contextmanager
def proxy_process(
    config: dict[str, Any],
    tmp_path: Path,
    *args: str,
    wrapper: list[str] | None = None,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    preexec_fn: Callable[[], None] | None = None,
    config_dir: Path | None = None,
) -> Iterator[Proc]:
    """`zrproxy serve --config` as a subprocess; yields once it logged its ready line."""
    directory = config_dir or tmp_path
    path = directory / f"zrproxy-{len(list(directory.iterdir()))}.toml"
    path.write_text(to_toml(config))
    log = LoggedProcess(
        [*(wrapper or []), sys.executable, "-m", "zrproxy", "serve", "--config", str(path), *args],
        env={**os.environ, **(env or {})},
        cwd=cwd,
        preexec_fn=preexec_fn,
    )
    try:
        match = log.wait_for(_READY, 60)
        yield Proc(log, match.group(1), match.group(2))
    finally:
        log.stop(10)


def worker_pids(parent: int) -> set[int]:
    """Worker processes of `parent` (not multiprocessing's resource tracker)."""
    workers = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == parent and b"resource_tracker" not in cmdline:
            workers.add(int(entry))
    return workers


def metrics_dir_of(pid: int) -> Path:
    """Where a `--workers` parent keeps its multiprocess metrics files."""
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    value = next(v for v in environ if v.startswith(b"PROMETHEUS_MULTIPROC_DIR="))
    return Path(value.split(b"=", 1)[1].decode())
