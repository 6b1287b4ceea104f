"""`zrproxy audit delete|export` on records the real proxy wrote (main() in-process)."""

from __future__ import annotations

import datetime
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest

from tests.audited import (
    CHAT,
    Audited,
    Start,
    audit_count,
    audited_services,
    chat,
    keypair,
    wait_for,
)
from tests.conftest import Mock
from tests.processes import to_toml
from zrproxy import auditfiles
from zrproxy.cli import main

DAY1 = datetime.datetime(2026, 5, 10, 12, 0, tzinfo=datetime.UTC)


class _Clock:
    def __init__(self, now: datetime.datetime) -> None:
        self.now = now

    def __call__(self) -> datetime.datetime:
        return self.now


@pytest.fixture
async def start_audited(mock: Mock, tmp_path: Path) -> AsyncIterator[Start]:
    async with audited_services(mock, tmp_path) as start:
        yield start


async def _records(a: Audited, rids: list[str], clock: _Clock | None = None) -> Path:
    """Send one request per id (a day apart when a clock is given); the config's path."""
    for rid in rids:
        status, _, _ = await a.post(CHAT, chat("mock-n3", "secret " + rid, True), rid=rid)
        assert status == 200
        if clock is not None:
            clock.now += datetime.timedelta(days=1)

    async def written() -> bool:
        return await audit_count(a.proxy, "written") == len(rids)

    await wait_for(written)
    path = a.audit_dir.parent / "zrproxy.toml"
    path.write_text(to_toml(a.config))
    return path


def _export(config: Path, identity: Path, capsysbinary: pytest.CaptureFixture[bytes]) -> list[str]:
    args = ["audit", "export", "--config", str(config), "--project", "beta"]
    assert main([*args, "--identity", str(identity)]) == 0
    lines = capsysbinary.readouterr().out.splitlines()
    return [orjson.loads(line)["request_id"] for line in lines]


async def test_export_decrypts_every_record_to_json_lines(
    start_audited: Start, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    a = await start_audited()
    config = await _records(a, ["one", "two", "three"])
    capsysbinary.readouterr()
    args = ["audit", "export", "--config", str(config), "--project", "beta"]
    assert main([*args, "--identity", str(a.identity)]) == 0
    lines = capsysbinary.readouterr().out.splitlines()
    records = [orjson.loads(line) for line in lines]
    assert [r["request_id"] for r in records] == ["one", "two", "three"]
    assert "secret two" in records[1]["request"]["text"]


async def test_export_with_the_wrong_key_prints_nothing(
    start_audited: Start, tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    a = await start_audited()
    config = await _records(a, ["one"])
    _, other = keypair(tmp_path, "other.txt")
    capsysbinary.readouterr()
    args = ["audit", "export", "--config", str(config), "--project", "beta", "--identity"]
    assert main([*args, str(other)]) == 1
    out = capsysbinary.readouterr()
    assert out.out == b"" and b"1 records could not be decrypted" in out.err
    garbage = tmp_path / "garbage.txt"
    garbage.write_text("not a key\n")
    assert main([*args, str(garbage)]) == 2


async def test_delete_one_request_by_id_without_the_key(
    start_audited: Start, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    a = await start_audited()
    config = await _records(a, ["keep-1", "drop-me", "keep-2"])
    args = ["audit", "delete", "--config", str(config), "--project", "beta"]
    assert main([*args, "--request-id", "drop-me"]) == 0
    assert b"deleted 1 audit records" in capsysbinary.readouterr().out
    assert _export(config, a.identity, capsysbinary) == ["keep-1", "keep-2"]
    assert main([*args, "--request-id", "drop-me"]) == 0
    assert b"deleted 0 audit records" in capsysbinary.readouterr().out


async def test_delete_before_a_date_and_all(
    start_audited: Start, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    clock = _Clock(DAY1)
    a = await start_audited(clock=clock)
    config = await _records(a, ["d10", "d11", "d12"], clock)
    args = ["audit", "delete", "--config", str(config), "--project", "beta"]
    assert main([*args, "--before", "2026-05-12"]) == 0
    assert b"deleted 2 audit records" in capsysbinary.readouterr().out
    assert _export(config, a.identity, capsysbinary) == ["d12"]
    assert main([*args, "--all"]) == 0
    assert auditfiles.record_files(str(a.audit_dir), "beta") == []
    capsysbinary.readouterr()
    assert main([*args, "--before", "yesterday"]) == 2
    assert b"--before" in capsysbinary.readouterr().err


async def test_audit_commands_name_a_configured_project(
    start_audited: Start, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    a = await start_audited()
    config = await _records(a, ["one"])
    args = ["audit", "delete", "--config", str(config), "--project", "nobody", "--all"]
    assert main(args) == 2
    assert b"--project" in capsysbinary.readouterr().err
    assert len(auditfiles.record_files(str(a.audit_dir), "beta")) == 1
