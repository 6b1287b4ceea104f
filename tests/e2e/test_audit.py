"""The content audit log through the real proxy: what a record holds, sealing (decrypted
by the real `age` CLI), no plaintext on disk, the ZR-Data-Retention header, the gauge,
and overload (queue full, disk failing) never touching the response."""

from __future__ import annotations

import asyncio
import datetime
import gc
import secrets
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from tests.audited import (
    CHAT,
    MESSAGES,
    Start,
    age_decrypt,
    anthropic,
    audit_count,
    audited_services,
    chat,
    files_under,
    needs_age,
    wait_for,
)
from tests.conftest import Mock, RunningProxy, metric, raw_post
from zrproxy import audit as audit_module
from zrproxy import auditfiles
from zrproxy.audit import AuditRecord


@pytest.fixture
async def start_audited(mock: Mock, tmp_path: Path) -> AsyncIterator[Start]:
    async with audited_services(mock, tmp_path) as start:
        yield start


@needs_age
async def test_records_hold_both_bodies_and_only_ciphertext_reaches_the_disk(
    start_audited: Start, tmp_path: Path
) -> None:
    a = await start_audited()
    marker = "zrAUDIT" + secrets.token_hex(8)
    sent = [
        ("rid-openai-stream", CHAT, chat("mock-n6", marker, True), "default", True),
        ("rid-openai-plain", CHAT, chat("mock-n6", marker, False), "default", False),
        ("rid-claude-stream", MESSAGES, anthropic("claude-mock-n6", marker, True), "claude", True),
        ("rid-claude-plain", MESSAGES, anthropic("claude-mock-n3", marker, False), "claude", False),
    ]
    received = {}
    for rid, path, body, _route, _stream in sent:
        status, got, headers = await a.post(path, body, rid=rid)
        assert status == 200, got
        assert headers["ZR-Data-Retention"] == "audit-log"
        received[rid] = got
    await wait_for(lambda: _count_is(a.proxy, "written", 4))

    # Every file anywhere under the test's directory (the audit dir included) is
    # scanned: the marker, which every request and response holds, is in none of them.
    scanned = files_under(tmp_path)
    assert len([p for p in scanned if p.suffix == ".age"]) == 4
    for path in scanned:
        assert marker.encode() not in path.read_bytes(), path
    # The customer's key and the standard CLI open each record.
    records = {}
    for path in auditfiles.record_files(str(a.audit_dir), "beta"):
        assert path.stat().st_mode & 0o077 == 0
        plaintext = age_decrypt(path, a.identity)
        assert plaintext.endswith(b"\n") and plaintext.count(b"\n") == 1  # one JSON line
        record = orjson.loads(plaintext)
        records[record["request_id"]] = record
        assert path.name.endswith(f"-{record['request_id']}.age")
    assert set(records) == set(received)
    for rid, _path, body, route, stream in sent:
        record = records[rid]
        assert record["project"] == "beta"
        assert record["route"] == route
        assert record["upstream"] == ("claude" if route == "claude" else "mock")
        assert record["status"] == 200 and record["stream"] is stream
        # The loop clock may not advance within one request: a duration, not a speed.
        assert isinstance(record["duration_s"], float) and record["duration_s"] >= 0
        assert datetime.datetime.fromisoformat(record["time"]).tzinfo is not None
        assert orjson.loads(record["request"]["text"]) == body
        assert record["request"]["truncated"] is False
        # The response body exactly as the client got it (for streams, the SSE bytes).
        assert record["response"]["text"].encode() == received[rid]
        assert record["response"]["bytes"] == len(received[rid])
        assert record["response"]["truncated"] is False
        assert marker in record["response"]["text"]  # the mock echoes the prompt


async def _count_is(proxy: RunningProxy, outcome: str, expected: float) -> bool:
    return await audit_count(proxy, outcome) == expected


async def test_bodies_are_cut_at_max_record_bytes(start_audited: Start) -> None:
    a = await start_audited({"max_record_bytes": 100})
    long_text = "é" * 400  # two bytes each: a cut can fall inside a character
    status, got, _ = await a.post(CHAT, chat("mock-n20", long_text, True))
    assert status == 200 and len(got) > 100
    await wait_for(lambda: _count_is(a.proxy, "written", 1))
    (path,) = auditfiles.record_files(str(a.audit_dir), "beta")
    record = auditfiles.open_record(path, auditfiles.read_identities(str(a.identity)))
    parsed = orjson.loads(record)
    request, response = parsed["request"], parsed["response"]
    assert request["truncated"] is True and response["truncated"] is True
    assert 97 <= len(request["text"].encode()) <= 100
    assert request["bytes"] == len(orjson.dumps(chat("mock-n20", long_text, True)))
    assert len(response["text"].encode()) == 100 and response["bytes"] == len(got)
    assert got.startswith(response["text"].encode())


async def test_errors_are_recorded_with_their_error_body(start_audited: Start) -> None:
    a = await start_audited()
    status, got, headers = await a.post(CHAT, {"model": "mock-e503", "messages": []})
    assert status == 503 or status == 502, got
    assert headers["ZR-Data-Retention"] == "audit-log"
    await wait_for(lambda: _count_is(a.proxy, "written", 1))
    (path,) = auditfiles.record_files(str(a.audit_dir), "beta")
    record = orjson.loads(auditfiles.open_record(path, auditfiles.read_identities(str(a.identity))))
    assert record["status"] == status
    assert record["response"]["text"].encode() == got


async def test_the_header_says_how_each_project_is_handled(start_audited: Start) -> None:
    a = await start_audited()
    for project, expected in (("zr", "zero"), ("beta", "audit-log"), ("meta", "metadata-only")):
        for body in (chat("mock-n3", "hi", True), chat("mock-n3", "hi", False)):
            status, _, headers = await a.post(CHAT, body, project)
            assert status == 200 and headers["ZR-Data-Retention"] == expected
        status, _, headers = await a.post(MESSAGES, anthropic("claude-mock", "hi", True), project)
        assert status == 200 and headers["ZR-Data-Retention"] == expected
        # Errors too: a refused request, an upstream failure, a malformed body.
        for body in (chat("mock-e500", "x", False), {"model": 5}):
            status, _, headers = await a.post(CHAT, body, project)
            assert status >= 400 and headers["ZR-Data-Retention"] == expected
        async with (
            aiohttp.ClientSession() as s,
            s.get(
                a.proxy.url + "/v1/models", headers={"Authorization": f"Bearer {a.keys[project]}"}
            ) as resp,
        ):
            assert resp.status == 200 and resp.headers["ZR-Data-Retention"] == expected
    # Before a project is known there is nothing to say: no header at all.
    async with aiohttp.ClientSession() as s:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            async with s.post(a.proxy.url + CHAT, data=b"{}", headers=headers) as resp:
                assert resp.status == 401 and "ZR-Data-Retention" not in resp.headers
        # An unknown /v1/ path asks for the key first, then says 404 with the header.
        async with s.post(a.proxy.url + "/v1/nothing-here", data=b"{}") as resp:
            assert resp.status == 401 and "ZR-Data-Retention" not in resp.headers
        async with s.post(a.proxy.url + "/nothing-here", data=b"{}") as resp:
            assert resp.status == 404 and "ZR-Data-Retention" not in resp.headers
        headers = {"Authorization": f"Bearer {a.keys['beta']}"}
        async with s.post(a.proxy.url + "/v1/nothing-here", data=b"{}", headers=headers) as resp:
            assert resp.status == 404 and resp.headers["ZR-Data-Retention"] == "audit-log"


async def test_project_info_gauge(start_audited: Start) -> None:
    a = await start_audited()
    for project, zero, logged in (
        ("zr", "true", "false"),
        ("beta", "false", "true"),
        ("meta", "false", "false"),
    ):
        labels = {"project": project, "zero_retention": zero, "audit_log": logged}
        assert await metric(a.proxy, "zrproxy_project_info", **labels) == 1
    assert await metric(a.proxy, "zrproxy_project_info") == 3


async def test_zero_retention_and_metadata_projects_get_no_record(start_audited: Start) -> None:
    a = await start_audited()
    for project in ("zr", "meta"):
        status, _, _ = await a.post(CHAT, chat("mock-n3", "hi", True), project)
        assert status == 200
    assert await audit_count(a.proxy) == 0
    assert not a.audit_dir.exists()  # not even created
    # Mid-stream, only the audit project's request has a record object.
    for project, expected in (("zr", 0), ("beta", 1)):
        async with aiohttp.ClientSession() as s:
            body = orjson.dumps(chat("mock-n40-d50", "hi", True))
            headers = {"Authorization": f"Bearer {a.keys[project]}"}
            async with s.post(a.proxy.url + CHAT, data=body, headers=headers) as resp:
                await resp.content.readline()
                live = [o for o in gc.get_objects() if isinstance(o, AuditRecord)]
                assert len(live) == expected, project
                del live


class _BlockedSeal:
    """pyrage.encrypt, held until the test lets it go (a stuck disk, seen from the queue)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()
        self._encrypt = auditfiles.pyrage.encrypt

    def __call__(self, plaintext: bytes, recipients: Any) -> bytes:
        self.entered.set()
        self.release.wait(30)
        return self._encrypt(plaintext, recipients)


async def test_a_full_queue_drops_records_never_responses(
    start_audited: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocked = _BlockedSeal()
    monkeypatch.setattr(auditfiles.pyrage, "encrypt", blocked)
    a = await start_audited({"queue_records": 1})
    try:
        status, expected, _ = await a.post(CHAT, chat("mock-n8", "same", True), rid="r0")
        assert status == 200
        assert await asyncio.to_thread(blocked.entered.wait, 10)  # the writer is stuck
        for i in range(1, 5):
            status, got, _ = await a.post(CHAT, chat("mock-n8", "same", True), rid=f"r{i}")
            assert status == 200 and got.endswith(b"data: [DONE]\n\n")  # the whole response
            assert got.count(b"data:") == expected.count(b"data:")
        # One record sits in the queue; the other three found it full.
        assert await audit_count(a.proxy, "dropped_queue_full") == 3
    finally:
        blocked.release.set()
    await wait_for(lambda: _count_is(a.proxy, "written", 2))
    assert await audit_count(a.proxy) == 5


async def test_a_failing_disk_drops_records_never_responses(start_audited: Start) -> None:
    a = await start_audited()
    a.audit_dir.write_bytes(b"")  # a file where the directory should be: every mkdir fails
    for _ in range(3):
        status, got, _ = await a.post(CHAT, chat("mock-n8", "hi", True))
        assert status == 200 and got.endswith(b"data: [DONE]\n\n")
    await wait_for(lambda: _count_is(a.proxy, "dropped_write_error", 3))
    assert await audit_count(a.proxy, "written") == 0
    # Once the disk is back, so is the log.
    a.audit_dir.unlink()
    status, _, _ = await a.post(CHAT, chat("mock-n8", "hi", True))
    assert status == 200
    await wait_for(lambda: _count_is(a.proxy, "written", 1))


async def test_files_rotate_by_size(start_audited: Start) -> None:
    a = await start_audited({"max_file_bytes": 1})  # every record starts a new part
    for _ in range(3):
        assert (await a.post(CHAT, chat("mock-n3", "hi", False)))[0] == 200
    await wait_for(lambda: _count_is(a.proxy, "written", 3))
    parts = {p.parent for p in auditfiles.record_files(str(a.audit_dir), "beta")}
    assert len(parts) == 3


async def test_files_share_a_part_below_max_file_bytes(start_audited: Start) -> None:
    a = await start_audited()
    for _ in range(3):
        assert (await a.post(CHAT, chat("mock-n3", "hi", False)))[0] == 200
    await wait_for(lambda: _count_is(a.proxy, "written", 3))
    parts = {p.parent for p in auditfiles.record_files(str(a.audit_dir), "beta")}
    assert len(parts) == 1


class _Clock:
    def __init__(self, now: datetime.datetime) -> None:
        self.now = now

    def __call__(self) -> datetime.datetime:
        return self.now


DAY1 = datetime.datetime(2026, 3, 1, 23, 59, tzinfo=datetime.UTC)


async def test_files_rotate_by_day(start_audited: Start) -> None:
    clock = _Clock(DAY1)
    a = await start_audited(clock=clock)
    assert (await a.post(CHAT, chat("mock-n3", "hi", False)))[0] == 200
    clock.now = DAY1 + datetime.timedelta(minutes=2)
    assert (await a.post(CHAT, chat("mock-n3", "hi", False)))[0] == 200
    await wait_for(lambda: _count_is(a.proxy, "written", 2))
    days = sorted(p.name for p in (a.audit_dir / "beta").iterdir())
    assert days == ["2026-03-01", "2026-03-02"]


async def test_retention_deletes_old_records_at_start(start_audited: Start) -> None:
    clock = _Clock(DAY1)
    a = await start_audited(clock=clock, retention_days=7)
    assert (await a.post(CHAT, chat("mock-n3", "hi", False)))[0] == 200
    await wait_for(lambda: _count_is(a.proxy, "written", 1))
    # Seven full days later the record is still kept; on the day after, it is gone.
    await start_audited(clock=_Clock(DAY1 + datetime.timedelta(days=7)), retention_days=7)
    assert len(auditfiles.record_files(str(a.audit_dir), "beta")) == 1
    await start_audited(clock=_Clock(DAY1 + datetime.timedelta(days=8)), retention_days=7)
    assert auditfiles.record_files(str(a.audit_dir), "beta") == []


async def test_retention_deletes_old_records_while_running(
    start_audited: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(audit_module, "SWEEP_EVERY_S", 0.05)
    clock = _Clock(DAY1)
    a = await start_audited(clock=clock, retention_days=2)
    assert (await a.post(CHAT, chat("mock-n3", "hi", False)))[0] == 200
    await wait_for(lambda: _count_is(a.proxy, "written", 1))
    clock.now = DAY1 + datetime.timedelta(days=3)

    async def gone() -> bool:
        return auditfiles.record_files(str(a.audit_dir), "beta") == []

    await wait_for(gone)


async def test_records_still_queued_are_written_at_shutdown(
    start_audited: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocked = _BlockedSeal()
    monkeypatch.setattr(auditfiles.pyrage, "encrypt", blocked)
    a = await start_audited({"queue_records": 10})
    for _ in range(4):
        assert (await a.post(CHAT, chat("mock-n3", "hi", False)))[0] == 200
    assert await asyncio.to_thread(blocked.entered.wait, 10)
    assert auditfiles.record_files(str(a.audit_dir), "beta") == []
    blocked.release.set()
    await a.proxy.service.stop()  # the fixture's second stop() finds nothing left to do
    assert len(auditfiles.record_files(str(a.audit_dir), "beta")) == 4


async def test_a_part_deleted_under_the_writer_costs_no_record(start_audited: Start) -> None:
    a = await start_audited()
    assert (await a.post(CHAT, chat("mock-n3", "hi", False)))[0] == 200
    await wait_for(lambda: _count_is(a.proxy, "written", 1))
    assert auditfiles.delete_before(str(a.audit_dir), "beta", datetime.date.max) == 1
    assert (await a.post(CHAT, chat("mock-n3", "hi", False)))[0] == 200
    await wait_for(lambda: _count_is(a.proxy, "written", 2))
    assert len(auditfiles.record_files(str(a.audit_dir), "beta")) == 1


async def test_a_stream_cut_upstream_is_recorded_with_its_error_event(start_audited: Start) -> None:
    a = await start_audited()
    # On a raw socket: the proxy cuts the stream after the error event (no last chunk), and
    # aiohttp's client drops bytes that arrive with a cut.
    auth = {"Authorization": f"Bearer {a.keys['beta']}"}
    resp = await raw_post(a.proxy.url, CHAT, orjson.dumps(chat("mock-n10-r3", "hi", True)), auth)
    status, got = resp.status, resp.body
    assert status == 200 and not resp.complete
    assert b'"error"' in got  # the in-band SSE error event
    await wait_for(lambda: _count_is(a.proxy, "written", 1))
    (path,) = auditfiles.record_files(str(a.audit_dir), "beta")
    record = orjson.loads(auditfiles.open_record(path, auditfiles.read_identities(str(a.identity))))
    assert record["response"]["text"].encode() == got


def test_a_record_keeps_only_what_reached_the_client() -> None:
    record = AuditRecord("p", "rid", 5, datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC))
    for chunk in (b"abc", b"def", b"ghi"):
        record.response(chunk)
    record.sent(4)  # the write of "def" failed after one byte, say
    parsed = orjson.loads(record.to_json())
    assert parsed["response"] == {"text": "abcd", "bytes": 4, "truncated": False}
    record.sent(2)
    assert orjson.loads(record.to_json())["response"]["text"] == "ab"


def test_bodies_that_are_not_utf8_are_kept_as_base64() -> None:
    record = AuditRecord("p", "rid", 100, datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC))
    record.request(b"\xff\xfe\x00binary")
    record.response(b"plain")
    parsed = orjson.loads(record.to_json())
    assert parsed["request"] == {"base64": "//4AYmluYXJ5", "bytes": 9, "truncated": False}
    assert parsed["response"]["text"] == "plain"
    assert parsed["time"] == "2026-01-01T00:00:00Z"
