"""The subprocessor register: coverage of every upstream host, announced entries not
used before their day, and redirects never followed. Real proxy on loopback."""

from __future__ import annotations

import datetime
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.policy_fixtures import call, chat, mocks, proxy, recorder
from tests.processes import LoggedProcess, to_toml
from zrproxy.cli import main
from zrproxy.config import covering_subprocessor, embedded_default, parse_config
from zrproxy.errors import ConfigError
from zrproxy.routing import DayClock, Router

TODAY = datetime.date(2026, 6, 1)


def _sub(name: str, hosts: list[str], since: datetime.date) -> dict[str, Any]:
    return {
        "name": name,
        "purpose": "LLM inference",
        "location": "EU",
        "hosts": hosts,
        "since": since,
    }


def _data(upstreams: list[dict[str, Any]], subs: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "upstreams": [{"kind": "openai", "zero_data_retention": True, **u} for u in upstreams],
        "routes": [{"model": "*", "upstreams": [u["name"] for u in upstreams]}],
        "projects": [{"name": "zr", "key_sha256": ["0" * 64]}],
        "subprocessors": subs,
    }


# --- the register covers every upstream ---------------------------------------------------


def test_an_upstream_outside_the_register_is_refused_by_name() -> None:
    data = _data(
        [
            {"name": "known", "base_url": "https://api.openai.com/v1"},
            {"name": "unknown", "base_url": "https://eu.api.openai.com/v1"},
        ],
        [_sub("OpenAI", ["api.openai.com"], TODAY)],
    )
    with pytest.raises(ConfigError) as caught:
        parse_config(data, {})
    assert caught.value.key_path == "upstreams[1].base_url"
    assert "'unknown'" in caught.value.problem
    data["subprocessors"][0]["hosts"].append("EU.api.openai.com")  # host names: any case
    parse_config(data, {})


def test_ipv6_hosts_are_matched_in_brackets() -> None:
    data = _data(
        [{"name": "v6", "base_url": "http://[::1]:8000/v1"}], [_sub("L", ["[::1]"], TODAY)]
    )
    parse_config(data, {})
    data["subprocessors"][0]["hosts"] = ["[::2]"]
    with pytest.raises(ConfigError):
        parse_config(data, {})


def test_without_a_register_anything_goes() -> None:
    parse_config(_data([{"name": "a", "base_url": "https://a.example/v1"}], []), {})


# --- warnings and announcements -----------------------------------------------------------


def _write(tmp_path: Path, data: dict[str, Any]) -> Path:
    path = tmp_path / "zrproxy.toml"
    path.write_text(to_toml(data))
    return path


def test_check_config_warns_when_no_register_is_kept(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(tmp_path, _data([{"name": "a", "base_url": "https://a.example/v1"}], []))
    assert main(["check-config", str(path)]) == 0
    err = capsys.readouterr().err
    assert "warning: no subprocessor register is kept" in err


def test_check_config_prints_when_each_subprocessor_becomes_active(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _data(
        [
            {"name": "a", "base_url": "https://a.example/v1"},
            {"name": "b", "base_url": "https://b.example/v1"},
        ],
        [
            _sub("Alpha", ["a.example"], datetime.date(2020, 1, 15)),
            _sub("Beta", ["b.example"], datetime.date(2999, 3, 1)),
        ],
    )
    assert main(["check-config", str(_write(tmp_path, data))]) == 0
    captured = capsys.readouterr()
    assert "subprocessor 'Alpha': active since 2020-01-15" in captured.out
    assert "subprocessor 'Beta': announced, becomes active on 2999-03-01" in captured.out
    assert "register" not in captured.err
    # Route "*" has a current upstream first: only a route with nothing current is warned.
    assert "cannot be served" not in captured.err
    data["routes"] = [{"name": "beta-only", "model": "*", "upstreams": ["b"]}]
    assert main(["check-config", str(_write(tmp_path, data))]) == 0
    err = capsys.readouterr().err
    assert "project 'zr' cannot be served by route 'beta-only' before 2999-03-01" in err


def test_serve_warns_at_start_up_when_no_register_is_kept(tmp_path: Path) -> None:
    data = _data([{"name": "a", "base_url": "http://127.0.0.1:9/v1"}], [])
    data["server"] = {"listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0"}
    path = _write(tmp_path, data)
    proc = LoggedProcess([sys.executable, "-m", "zrproxy", "serve", "--config", str(path)])
    try:
        proc.wait_for(r"zrproxy ready")
        assert "config: no subprocessor register is kept" in proc.output()
    finally:
        assert proc.stop() == 0


# --- announced subprocessors are not used before their day -------------------------------


def _announced(urls: dict[str, str], since: datetime.date) -> dict[str, Any]:
    data = _data(
        [{"name": "new", "base_url": urls["new"]}, {"name": "old", "base_url": urls["old"]}],
        [_sub("Old", ["127.0.0.1"], datetime.date(2020, 1, 1))],
    )
    # Both mocks listen on 127.0.0.1: tell them apart by host name.
    data["upstreams"][0]["base_url"] = urls["new"].replace("127.0.0.1", "localhost")
    data["subprocessors"].append(_sub("New", ["localhost"], since))
    data["projects"] = [{"name": "zr"}]
    return data


async def test_an_announced_subprocessor_is_skipped_until_its_day() -> None:
    day = [TODAY]
    async with mocks("new", "old") as m:
        data = _announced(m.urls, TODAY + datetime.timedelta(days=1))
        async with proxy(data, today=lambda: day[0]) as p:
            status, _doc, _ = await call(p.url + "/v1/chat/completions", chat(), p.auth("zr"))
            assert status == 200
            assert (m.started("new"), m.started("old")) == (0, 1)
            day[0] = TODAY + datetime.timedelta(days=1)
            status, _doc, _ = await call(p.url + "/v1/chat/completions", chat(), p.auth("zr"))
            assert status == 200
            assert (m.started("new"), m.started("old")) == (1, 1)


async def test_only_announced_upstreams_is_403_and_nothing_is_sent() -> None:
    day = [TODAY]
    async with mocks("new", "old") as m:
        data = _announced(m.urls, TODAY + datetime.timedelta(days=30))
        data["routes"] = [{"model": "*", "upstreams": ["new"]}]
        async with proxy(data, today=lambda: day[0]) as p:
            status, doc, _ = await call(p.url + "/v1/chat/completions", chat(), p.auth("zr"))
            assert status == 403  # a policy refusal: SDKs would retry a 503 at once
            assert doc["error"]["code"] == "upstream_not_yet_active"
            assert m.started("new") == 0
            day[0] = TODAY + datetime.timedelta(days=30)
            status, _doc, _ = await call(p.url + "/v1/chat/completions", chat(), p.auth("zr"))
            assert status == 200
            assert m.started("new") == 1


async def test_the_day_is_read_at_most_once_a_minute() -> None:
    day, now = [TODAY], [1000.0]
    async with mocks("new", "old") as m:
        data = _announced(m.urls, TODAY + datetime.timedelta(days=1))
        async with proxy(data, today=lambda: day[0], monotonic=lambda: now[0]) as p:
            day[0] = TODAY + datetime.timedelta(days=1)
            await call(p.url + "/v1/chat/completions", chat(), p.auth("zr"))
            assert m.started("new") == 0  # the cached day is still the old one
            now[0] += 60
            await call(p.url + "/v1/chat/completions", chat(), p.auth("zr"))
            assert m.started("new") == 1


def test_day_clock_asks_the_calendar_only_after_recheck() -> None:
    asked: list[int] = []
    now = [0.0]

    def today() -> datetime.date:
        asked.append(1)
        return TODAY

    clock = DayClock(today, recheck_s=60, monotonic=lambda: now[0])
    for _ in range(100):
        assert clock.day() == TODAY
    assert len(asked) == 1
    now[0] = 60
    clock.day()
    assert len(asked) == 2


# --- redirects are never followed ------------------------------------------------------------


@pytest.mark.parametrize("status", [301, 302, 307, 308])
async def test_an_upstream_redirect_is_refused_and_not_followed(status: int) -> None:
    async with recorder() as elsewhere:
        async with recorder(status, {"Location": elsewhere.url + "/chat/completions"}) as up:
            data = {
                "upstreams": [
                    {
                        "name": "up",
                        "kind": "openai",
                        "base_url": up.url,
                        "zero_data_retention": True,
                    }
                ],
                "routes": [{"model": "*", "upstreams": ["up"]}],
                "projects": [{"name": "zr"}, {"name": "open", "zero_retention": False}],
            }
            async with proxy(data) as p:
                for project in ("zr", "open"):
                    code, doc, _ = await call(
                        p.url + "/v1/chat/completions", chat(), p.auth(project)
                    )
                    assert code == 502
                    assert doc["error"]["code"] == "upstream_redirect"
            assert len(up.seen) == 2
            assert elsewhere.seen == []


def test_the_embedded_demo_registers_the_bundled_mock() -> None:
    config = embedded_default("http://127.0.0.1:4321/v1", bytes(32))
    (mock,) = config.upstreams
    assert mock.zero_data_retention
    sub = covering_subprocessor(config.subprocessors, mock)
    assert sub is not None and sub.since <= datetime.date.today()
    demo = config.projects[0]
    assert demo.zero_retention
    assert Router(config).plan(demo, "mock-n1").upstreams == (mock,)
