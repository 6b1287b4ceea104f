"""The audit log under strace, on the real process.

With an audit project configured beside a zero-retention one, zero-retention traffic
(every path, under concurrency, failures and cancellations) opens nothing under the
audit dir and writes nothing anywhere. And the audit project's traffic writes only under
the audit dir, only ciphertext: every file it wrote is scanned for the marker, then
decrypted with the real `age` CLI to find it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from tests.audited import age_decrypt, keypair, needs_age
from tests.processes import Proc, mock_process, proxy_process
from tests.strace import STRACE, TRACED, WRITE, children, violations
from tests.traffic import drive_every_path, retention_config
from zrproxy import auditfiles
from zrproxy.auth import new_key

pytestmark = pytest.mark.skipif(
    STRACE is None, reason="strace not installed (Debian package 'strace'; make test installs it)"
)
_PATHS = re.compile(r'"(/[^"]*)"')


def _config(
    mock_url: str, zr_digest: str, beta_digest: str, recipient: str, audit_dir: Path
) -> Any:
    config = retention_config(mock_url, zr_digest)
    for upstream in config["upstreams"]:
        upstream["zero_data_retention"] = True  # so zero-retention routing may use them
    config["projects"].append(
        {
            "name": "beta",
            "key_sha256": [beta_digest],
            "zero_retention": False,
            "audit_log": {"recipient": recipient, "retention_days": 30},
        }
    )
    config["audit"] = {"dir": str(audit_dir), "queue_records": 64}
    return config


@contextlib.contextmanager
def _traced_proxy(config: Any, tmp_path: Path) -> Iterator[tuple[Proc, Path]]:
    assert STRACE is not None
    trace_file = tmp_path / "strace.out"
    wrapper = [STRACE, "-f", "-qq", "-y", "-s", "1024", "-e", f"trace={TRACED}"]
    wrapper += ["-o", str(trace_file)]
    with proxy_process(config, tmp_path, wrapper=wrapper, cwd=tmp_path) as proxy:
        try:
            yield proxy, trace_file
        finally:
            # strace detaches on SIGTERM and would leave the proxy running: stop the
            # proxy itself (it writes what is queued); strace exits with it.
            for child in children(proxy.pid):
                os.kill(child, signal.SIGTERM)
            assert proxy.process.wait(30) == 0


async def _stream(client: aiohttp.ClientSession, url: str, key: str, leave: bool) -> str | None:
    """One stream; `leave`: read its first line, then go away. Returns the header."""
    body = orjson.dumps(
        {"model": "mock-n30-d10", "stream": True, "messages": [{"role": "user", "content": "x"}]}
    )
    headers = {"Authorization": f"Bearer {key}"}
    async with client.post(url + "/v1/chat/completions", data=body, headers=headers) as resp:
        if leave:
            await resp.content.readline()
        else:
            await resp.read()
        return resp.headers.get("ZR-Data-Retention")


async def test_zero_retention_traffic_never_reaches_the_audit_log(tmp_path: Path) -> None:
    zr_key, zr_digest = new_key()
    _, beta_digest = new_key()
    recipient, _identity = keypair(tmp_path)
    audit_dir = tmp_path / "audit"
    marker = ("zrAUDITZR", secrets.token_hex(12))
    with mock_process() as mock:
        config = _config(mock.url, zr_digest, beta_digest, recipient, audit_dir)
        with _traced_proxy(config, tmp_path) as (proxy, trace_file):
            async with aiohttp.ClientSession() as client:
                # Every path twice at once, beside 20 streams of which half are abandoned.
                paths = [drive_every_path(proxy.url, zr_key, marker, client) for _ in range(2)]
                streams = [_stream(client, proxy.url, zr_key, i % 2 == 0) for i in range(20)]
                results = await asyncio.gather(*paths, *streams)
                await asyncio.sleep(0.3)
    statuses = results[0]
    # upstream_reset: cut after its in-band error event (no last chunk), so -1.
    assert statuses["stream"] == 200 and statuses["upstream_reset"] == -1, statuses
    assert set(results[2:]) == {"zero"}  # the header, on finished and abandoned streams
    trace = trace_file.read_text(errors="replace")
    after_ready = trace.split("zrproxy ready", 1)[1]
    assert after_ready.count("<socket:") > 50  # the trace saw the traffic
    assert violations(trace) == []
    assert str(audit_dir) not in after_ready  # not even opened for reading
    assert not audit_dir.exists()


@needs_age
async def test_audit_traffic_writes_only_ciphertext_under_the_audit_dir(tmp_path: Path) -> None:
    _, zr_digest = new_key()
    beta_key, beta_digest = new_key()
    recipient, identity = keypair(tmp_path)
    audit_dir = tmp_path / "audit"
    marker = ("zrAUDITSEAL", secrets.token_hex(12))
    with mock_process() as mock:
        config = _config(mock.url, zr_digest, beta_digest, recipient, audit_dir)
        with _traced_proxy(config, tmp_path) as (proxy, trace_file):
            async with aiohttp.ClientSession() as client:
                statuses = await drive_every_path(proxy.url, beta_key, marker, client)
    assert statuses["stream"] == 200 and statuses["messages_stream"] == 200, statuses
    trace = trace_file.read_text(errors="replace")
    after_ready = trace.split("zrproxy ready", 1)[1].split("\n", 1)[1]
    # Every path the proxy created, renamed or opened for writing is in the audit dir.
    written = set()
    for line in violations(trace):
        if match := WRITE.match(line):
            written.add(match.group(3))  # the file behind the fd, not the (sealed) data
        else:
            written.update(_PATHS.findall(line))
    assert written, "the trace saw no record being written"
    outside = {p for p in written if p != str(audit_dir) and not p.startswith(f"{audit_dir}/")}
    assert outside == set()
    assert "O_CREAT" in after_ready
    # No plaintext: neither in what the proxy wrote, nor anywhere else under tmp_path.
    needle = "".join(marker).encode()
    scanned = [p for p in tmp_path.rglob("*") if p.is_file() and p.name != "strace.out"]
    for path in scanned:
        assert needle not in path.read_bytes(), path
    # The customer's key and the standard CLI find the marker in the records.
    records = [
        orjson.loads(age_decrypt(p, identity))
        for p in auditfiles.record_files(str(audit_dir), "beta")
    ]
    assert len(records) >= 12
    by_status = {r["status"] for r in records}
    assert 200 in by_status and any(s >= 400 for s in by_status)
    with_marker = [r for r in records if r["request"] and needle.decode() in r["request"]["text"]]
    assert len(with_marker) >= 10
    streamed = [r for r in with_marker if r["stream"] and r["status"] == 200]
    assert any(needle.decode() in r["response"]["text"] for r in streamed)
