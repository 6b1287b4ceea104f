"""The strongest proof: the running proxy's raw memory, read from another process.

The proxy runs as its own process (the production entry point), with the mock in
another. After marker-carrying traffic along every path, with the client's keep-alive
connections still open, this process reads the proxy's memory through /proc/<pid>/maps
and /proc/<pid>/mem and counts the marker in every form Python may store it.

- Scrub mode: 0 copies, anywhere.
- Default mode: freed memory is not wiped, so copies may remain in freed blocks (what
  scrub mode is for). How many depends on the machine: `python -m bench.scrub_settings`
  prints it; `test_retention.py` proves no live object holds any of them.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import aiohttp
import pytest

from tests.memscan import count_occurrences, wait_until_sleeping
from tests.processes import mock_process, proxy_process
from tests.traffic import drive_every_path, retention_config
from zrproxy.auth import new_key

pytestmark = pytest.mark.skipif(
    not os.path.exists("/proc/self/mem"), reason="needs Linux /proc/<pid>/mem"
)


async def _traffic_then_scan(tmp_path: Path, *args: str) -> tuple[int, dict[str, int]]:
    key, digest = new_key()
    marker = ("zrSCAN", secrets.token_hex(12))
    needle = "".join(marker).encode()
    with mock_process() as mock:
        config = retention_config(mock.url, digest)
        with proxy_process(config, tmp_path, *args) as proxy:
            async with aiohttp.ClientSession() as client:
                statuses = await drive_every_path(proxy.url, key, marker, client)
                # Keep-alive connections to the proxy are still open during the scan.
                wait_until_sleeping(proxy.pid)
                copies = count_occurrences(proxy.pid, [needle], wide=True)[needle]
    return copies, statuses


async def test_scrub_mode_leaves_zero_copies_in_process_memory(tmp_path: Path) -> None:
    copies, statuses = await _traffic_then_scan(tmp_path, "--scrub-memory")
    assert statuses["stream"] == statuses["failover"] == 200, statuses
    assert copies == 0
