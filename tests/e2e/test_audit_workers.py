"""The audit log with `serve --workers 2`: each worker its own writer and parts, the
parent's /metrics the sum (real processes)."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import orjson

from tests.audited import audited_config, chat, keypair, pyrage_decrypt
from tests.conftest import settled_metric
from tests.processes import mock_process, proxy_process
from tests.strace import children
from zrproxy import auditfiles
from zrproxy.auth import new_key


async def test_every_worker_writes_its_own_sealed_records(tmp_path: Path) -> None:
    keys, digests = {}, {}
    for name in ("zr", "beta", "meta"):
        keys[name], digests[name] = new_key()
    recipient, identity = keypair(tmp_path)
    audit_dir = tmp_path / "audit"
    count = 12
    with mock_process() as mock:
        config = audited_config(mock.url, recipient, audit_dir, digests)
        with proxy_process(config, tmp_path, "--workers", "2") as proxy:
            workers = set(children(proxy.pid))
            headers = {"Authorization": f"Bearer {keys['beta']}"}
            body = orjson.dumps(chat("mock-n4", "hello", True))
            url = proxy.url + "/v1/chat/completions"
            # Fresh connections each time, so SO_REUSEPORT spreads them over the workers.
            for i in range(count):
                async with (
                    aiohttp.ClientSession() as client,
                    client.post(url, data=body, headers={**headers, "X-Request-Id": f"w{i}"}) as r,
                ):
                    assert r.status == 200 and r.headers["ZR-Data-Retention"] == "audit-log"
                    await r.read()
            written = await settled_metric(
                proxy.admin_url, "zrproxy_audit_records_total", count, outcome="written"
            )
            assert written == count
    files = auditfiles.record_files(str(audit_dir), "beta")
    assert sorted(pyrage_decrypt(p, identity)["request_id"] for p in files) == sorted(
        f"w{i}" for i in range(count)
    )
    # Parts are named <time>-<pid>-<n>: written by the workers, not by the parent.
    writers = {int(p.parent.name.split("-")[1]) for p in files}
    assert writers and writers <= workers, (writers, workers)
