"""Workers never outlive their parent: SIGKILL the parent, and the workers go, the port is
free and the metrics directory on /dev/shm is removed."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

from tests.conftest import config_data
from tests.processes import metrics_dir_of, mock_process, proxy_process, worker_pids
from zrproxy.auth import new_key


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited; only its parent's wait is missing


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _wait_until(predicate, timeout_s: float) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


def test_workers_die_with_a_sigkilled_parent_and_free_the_port(tmp_path: Path) -> None:
    _, digest = new_key()
    with mock_process() as mock:
        config = config_data([{"name": "m", "kind": "openai", "base_url": mock.url}], digest)
        with proxy_process(config, tmp_path, "--workers", "2") as proxy:
            workers = worker_pids(proxy.process.pid)
            assert len(workers) == 2, workers
            port = int(proxy.url.rsplit(":", 1)[1])
            metrics = metrics_dir_of(next(iter(workers)))
            assert metrics.is_dir()
            assert not _port_free(port)
            os.kill(proxy.process.pid, signal.SIGKILL)
            proxy.process.wait(10)
            assert _wait_until(lambda: not any(_alive(pid) for pid in workers), 30), workers
            assert _wait_until(lambda: _port_free(port), 10)
            # The parent had no chance to remove its /dev/shm metrics directory: a worker did.
            assert _wait_until(lambda: not metrics.exists(), 10)
