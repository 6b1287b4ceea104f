"""The processes under test: the mock upstream, zrproxy and nginx, each its own process.

Each is started in a temporary directory with its log there, pinned with taskset, and
stopped with SIGTERM (then SIGKILL) by its own pid.
"""

from __future__ import annotations

import re
import resource
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench import procs

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
_MOCK_READY = re.compile(r"mock upstream listening on http://(\S+):(\d+)")
_PROXY_READY = re.compile(r"zrproxy ready: api=http://(\S+):(\d+) admin=http://(\S+)")


@dataclass
class Server:
    """A running process under test, and where it listens."""

    name: str
    process: subprocess.Popen[bytes]
    host: str
    port: int
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def pids(self) -> list[int]:
        return procs.tree(self.pid)

    def cpu_seconds(self) -> float:
        return procs.cpu_seconds(self.pids())

    def user_seconds(self) -> float:
        return procs.user_seconds(self.pids())

    def rss_kib(self) -> int:
        return procs.rss_kib(self.pids())

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _spawn(cmd: list[str], log: Path, cpus: str | None) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            procs.pinned(cmd, cpus), stdin=subprocess.DEVNULL, stdout=out, stderr=out
        )


def _wait_ready(
    process: subprocess.Popen[bytes], log: Path, pattern: re.Pattern[str], timeout_s: float = 30
) -> re.Match[str]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        match = pattern.search(log.read_text(errors="replace"))
        if match:
            return match
        if process.poll() is not None:
            break
        time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"{log.name}: not ready; its log says:\n{log.read_text(errors='replace')}")


def start_mock(tmp: Path) -> Server:
    log = tmp / "mock.log"
    port = free_port()
    cmd = [sys.executable, "-m", "zrproxy.mock_upstream", "--listen", f"127.0.0.1:{port}"]
    process = _spawn(cmd, log, None)  # inherits our CPU (the load CPU)
    match = _wait_ready(process, log, _MOCK_READY)
    return Server("mock", process, match.group(1), int(match.group(2)), log)


# The benchmark holds up to 10,000 streams: above the default admission caps, which are
# sized for a 512 MiB pod.
BENCH_CAPS = {"max_connections": 20000, "max_in_flight": 20000, "max_streams": 20000}


def zrproxy_config(mock: Server, key_sha256: str, caps: dict[str, int] | None = None) -> str:
    settings = {**BENCH_CAPS, **(caps or {})}
    return (
        "[server]\n"
        f'listen = "127.0.0.1:{free_port()}"\n'
        f'admin_listen = "127.0.0.1:{free_port()}"\n'
        + "".join(f"{name} = {value}\n" for name, value in settings.items())
        + "[[upstreams]]\n"
        'name = "mock"\nkind = "openai"\n'
        f'base_url = "http://{mock.host}:{mock.port}/v1"\n'
        # The mock keeps nothing; without this a zero-retention project (the default)
        # has no upstream and every request is refused before reaching the mock.
        "zero_data_retention = true\n"
        # The memory scenario holds 10,000 streams open at once.
        "max_connections = 20000\n"
        "[[routes]]\n"
        'model = "*"\nupstreams = ["mock"]\n'
        "[[projects]]\n"
        f'name = "bench"\nkey_sha256 = ["{key_sha256}"]\n'
    )


def start_zrproxy(
    tmp: Path,
    name: str,
    mock: Server,
    key_sha256: str,
    *,
    flags: tuple[str, ...] = (),
    cpus: str | None = procs.PROXY_CPUS,
    config_text: str | None = None,
    caps: dict[str, int] | None = None,
) -> Server:
    config = tmp / f"{name}.toml"
    config.write_text(config_text or zrproxy_config(mock, key_sha256, caps))
    log = tmp / f"{name}.log"
    cmd = [sys.executable, "-m", "zrproxy", "serve", "--config", str(config), *flags]
    process = _spawn(cmd, log, cpus)
    match = _wait_ready(process, log, _PROXY_READY)
    return Server(name, process, match.group(1), int(match.group(2)), log)


def zrproxy_has_flag(flag: str) -> bool:
    help_text = subprocess.run(
        [sys.executable, "-m", "zrproxy", "serve", "--help"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    return flag in help_text


_NGINX_CONF = """\
daemon off;
worker_processes 1;
worker_rlimit_nofile {fds};
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 32768; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    keepalive_requests 1000000;
    upstream mock {{
        server {mock_host}:{mock_port};
        keepalive 256;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=1024;
        location / {{
            proxy_pass http://mock;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 120s;
        }}
    }}
}}
"""


def start_nginx(tmp: Path, mock: Server, cpus: str | None = procs.PROXY_CPUS) -> Server:
    """nginx as a plain streaming reverse proxy to the mock (Authorization passes through)."""
    prefix = tmp / "nginx"
    prefix.mkdir()
    prefix.chmod(0o755)  # the worker may run as an unprivileged user
    port = free_port()
    fds = resource.getrlimit(resource.RLIMIT_NOFILE)[1]  # what the worker may raise itself to
    conf = prefix / "nginx.conf"
    conf.write_text(
        _NGINX_CONF.format(
            prefix=prefix, mock_host=mock.host, mock_port=mock.port, port=port, fds=fds
        )
    )
    log = tmp / "nginx.log"
    cmd = [NGINX, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")]
    process = _spawn(cmd, log, cpus)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and process.poll() is None:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return Server("nginx", process, "127.0.0.1", port, log)
        except OSError:
            time.sleep(0.05)
    process.kill()
    errors = (prefix / "error.log").read_text(errors="replace") if prefix.exists() else ""
    raise RuntimeError(f"nginx did not start:\n{log.read_text(errors='replace')}\n{errors}")


def nginx_version() -> str:
    try:
        out = subprocess.run([NGINX, "-v"], capture_output=True, text=True, check=False)
    except OSError:
        return "not installed"
    return out.stderr.strip().removeprefix("nginx version: ")
