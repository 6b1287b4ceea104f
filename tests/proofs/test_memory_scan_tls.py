"""The raw memory scan of `test_memory_scan.py`, with the upstream behind TLS.

Over https the prompt and the completion pass through OpenSSL on their way to and from
the upstream: encrypted from a plaintext copy in its write buffer, decrypted in place in
its read buffer. This proof runs the same marker-carrying traffic along every path with
the mock served over TLS (a trustme certificate, the proxy trusting its CA through
`ca_file`), then reads the proxy's whole memory through /proc/<pid>/mem, OpenSSL's heap
included: in scrub mode no copy of the marker may be left anywhere.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import aiohttp
import pytest
import trustme

from tests.memscan import count_occurrences, wait_until_sleeping
from tests.processes import mock_process, proxy_process
from tests.traffic import drive_every_path, retention_config
from zrproxy.auth import new_key

pytestmark = pytest.mark.skipif(
    not os.path.exists("/proc/self/mem"), reason="needs Linux /proc/<pid>/mem"
)


async def _tls_traffic_then_scan(tmp_path: Path, *args: str) -> tuple[int, dict[str, int]]:
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    cert, key_file, ca_file = tmp_path / "mock.pem", tmp_path / "mock.key", tmp_path / "ca.pem"
    server.cert_chain_pems[0].write_to_path(str(cert))
    server.private_key_pem.write_to_path(str(key_file))
    ca.cert_pem.write_to_path(str(ca_file))
    key, digest = new_key()
    marker = ("zrTLS", secrets.token_hex(12))
    needle = "".join(marker).encode()
    with mock_process("--tls-cert", str(cert), "--tls-key", str(key_file)) as mock:
        assert mock.url.startswith("https://"), mock.url
        config = retention_config(mock.url, digest, ca_file=str(ca_file))
        with proxy_process(config, tmp_path, *args) as proxy:
            async with aiohttp.ClientSession() as client:
                statuses = await drive_every_path(proxy.url, key, marker, client)
                # Keep-alive connections to the proxy (and its TLS connections to the
                # upstream, pooled) are still open during the scan.
                wait_until_sleeping(proxy.pid)
                copies = count_occurrences(proxy.pid, [needle], wide=True)[needle]
    return copies, statuses


async def test_scrub_mode_leaves_zero_copies_after_traffic_to_a_tls_upstream(
    tmp_path: Path,
) -> None:
    copies, statuses = await _tls_traffic_then_scan(tmp_path, "--scrub-memory")
    # The traffic really crossed TLS: every path that needs the upstream was served.
    assert statuses["stream"] == statuses["failover"] == statuses["plain"] == 200, statuses
    assert statuses["messages_stream"] == statuses["embeddings"] == 200, statuses
    assert copies == 0
