"""`serve --workers N`: one port, summed metrics, restarted crashes, one SIGTERM drains all."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import aiohttp
import orjson

from tests.conftest import config_data, settled_metric
from tests.processes import metrics_dir_of, mock_process, proxy_process, worker_pids
from zrproxy.auth import new_key


async def _send(url: str, key: str, count: int) -> list[int]:
    statuses = []
    body = orjson.dumps({"model": "mock-n2", "messages": [{"role": "user", "content": "hi"}]})
    for _ in range(count):
        # A fresh connection each time, so the kernel spreads them over the workers.
        async with (
            aiohttp.ClientSession() as client,
            client.post(
                url + "/v1/chat/completions", data=body, headers={"Authorization": f"Bearer {key}"}
            ) as resp,
        ):
            await resp.read()
            statuses.append(resp.status)
    return statuses


def _wait_until(predicate, timeout_s: float) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


async def test_workers_share_a_port_sum_metrics_restart_and_drain(tmp_path: Path) -> None:
    key, digest = new_key()
    with mock_process() as mock:
        config = config_data(
            [{"name": "mock", "kind": "openai", "base_url": mock.url}], digest, drain_timeout_s=2
        )
        with proxy_process(config, tmp_path, "--workers", "2") as proxy:
            workers = worker_pids(proxy.pid)
            assert len(workers) == 2, workers
            metrics_dir = metrics_dir_of(next(iter(workers)))
            assert str(metrics_dir).startswith("/dev/shm/")

            assert await _send(proxy.url, key, 40) == [200] * 40
            assert await settled_metric(proxy.admin_url, "zrproxy_requests_total", 40) == 40
            # Both workers served traffic: each wrote its own counter file.
            writers = {p.name for p in metrics_dir.glob("counter_*.db")}
            assert {f"counter_{pid}.db" for pid in workers} <= writers

            # A crashed worker is replaced, and the service keeps answering.
            crashed = next(iter(workers))
            os.kill(crashed, signal.SIGKILL)
            assert _wait_until(lambda: len(worker_pids(proxy.pid) - {crashed}) == 2, 20)
            assert await _send(proxy.url, key, 10) == [200] * 10
            # Counters survive a crash.
            assert await settled_metric(proxy.admin_url, "zrproxy_requests_total", 50) == 50

            survivors = worker_pids(proxy.pid)
            proxy.process.send_signal(signal.SIGTERM)
            assert proxy.process.wait(30) == 0
            assert not metrics_dir.exists()
            assert all(not Path(f"/proc/{pid}").exists() or _is_zombie(pid) for pid in survivors)


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True
