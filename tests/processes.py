"""The proxy and the mock as real subprocesses (test helper).

Configs are written as TOML files, the processes' ready lines are read from stderr,
and every process is stopped (SIGTERM, then SIGKILL) when the context exits.
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
from typing import IO, Any

_READY = re.compile(rb"zrproxy ready: api=(http://\S+) admin=(http://\S+)")
_MOCK = re.compile(rb"mock upstream listening on (http://\S+)")


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


@dataclass
class Proc:
    process: subprocess.Popen[bytes]
    url: str  # the API (or the mock's /v1 base URL)
    admin_url: str = ""

    @property
    def pid(self) -> int:
        return self.process.pid


def _wait_for(stream: IO[bytes], pattern: re.Pattern[bytes], timeout_s: float) -> re.Match[bytes]:
    deadline = time.monotonic() + timeout_s
    seen = b""
    while time.monotonic() < deadline:
        line = stream.readline()
        if not line:
            break
        seen += line
        match = pattern.search(line)
        if match:
            return match
    raise AssertionError(f"process did not get ready; it said:\n{seen.decode(errors='replace')}")


def stop(process: subprocess.Popen[bytes], timeout_s: float = 10) -> int:
    try:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                return process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
        return process.wait()
    finally:
        for pipe in (process.stdout, process.stderr):
            if pipe is not None:
                pipe.close()


@contextlib.contextmanager
def mock_process() -> Iterator[Proc]:
    process = subprocess.Popen(
        [sys.executable, "-m", "zrproxy.mock_upstream", "--listen", "127.0.0.1:0"],
        stderr=subprocess.PIPE,
    )
    try:
        assert process.stderr is not None
        url = _wait_for(process.stderr, _MOCK, 30).group(1).decode().rstrip("/")
        yield Proc(process, url if url.endswith("/v1") else url + "/v1")
    finally:
        stop(process)


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
    process = subprocess.Popen(
        [*(wrapper or []), sys.executable, "-m", "zrproxy", "serve", "--config", str(path), *args],
        stderr=subprocess.PIPE,
        env={**os.environ, **(env or {})},
        cwd=cwd,
        preexec_fn=preexec_fn,
    )
    try:
        assert process.stderr is not None
        match = _wait_for(process.stderr, _READY, 60)
        yield Proc(process, match.group(1).decode(), match.group(2).decode())
    finally:
        stop(process)


class LoggedProcess:
    """A child process whose output a thread collects, so its pipe never fills up."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

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
