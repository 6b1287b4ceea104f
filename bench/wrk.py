"""The closed-loop load generator: wrk with a Lua script for the POST body and headers.

wrk is bounded by its duration (-d); its own CPU time comes from wait4()'s rusage.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from bench import procs

WRK = shutil.which("wrk")
_LUA = """\
wrk.method = "POST"
wrk.path = "{path}"
wrk.body = [[{body}]]
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer {key}"
"""


@dataclass(frozen=True, slots=True)
class WrkRun:
    requests: int
    seconds: float  # wall time of the wrk process
    errors: int  # socket errors plus non-2xx responses
    cpu_s: float  # wrk's own user + system CPU


@dataclass(frozen=True, slots=True)
class Wrk:
    """One thread on the load CPU, `connections` keep-alive connections, `seconds` long."""

    tmp: Path
    host: str
    port: int
    path: str
    body: bytes
    key: str
    connections: int
    seconds: int
    delay_ms: int | None = None  # each connection's pause between requests (pacing)

    def command(self) -> list[str]:
        assert WRK is not None
        script = self.tmp / "wrk.lua"
        lua = _LUA.format(path=self.path, body=self.body.decode(), key=self.key)
        if self.delay_ms:
            lua += f"function delay() return {self.delay_ms} end\n"
        script.write_text(lua)
        cmd = [WRK, "-t1", f"-c{self.connections}", f"-d{self.seconds}s", "--timeout", "10s"]
        cmd += ["-s", str(script), f"http://{self.host}:{self.port}"]
        return procs.pinned(cmd, str(procs.LOAD_CPU))

    def run(self) -> WrkRun:
        out_path = self.tmp / "wrk.out"
        started = time.perf_counter()
        with out_path.open("wb") as out:
            process = subprocess.Popen(self.command(), stdout=out)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - started
        text = out_path.read_text()
        if process.returncode != 0:
            raise RuntimeError(f"wrk failed ({process.returncode}):\n{text}")
        done = re.search(r"(\d+) requests in", text)
        errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", text))
        non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
        errors += int(non_2xx.group(1)) if non_2xx else 0
        requests = int(done.group(1)) if done else 0
        return WrkRun(requests, wall, errors, usage.ru_utime + usage.ru_stime)


def version() -> str:
    if WRK is None:
        return "not installed"
    out = subprocess.run([WRK, "--version"], capture_output=True, text=True, check=False)
    return (out.stdout + out.stderr).split("Copyright")[0].strip()
