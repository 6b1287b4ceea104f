"""Regions: failover never leaves a pinned project's regions, and check-config warns
about routes such a project can never use. Real proxy, bundled mocks, loopback."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.fakes import closed_port
from tests.policy_fixtures import call, chat, mocks, proxy
from tests.processes import to_toml
from zrproxy.cli import main


def _up(name: str, url: str, region: str, zdr: bool = True) -> dict[str, Any]:
    return {
        "name": name,
        "kind": "openai",
        "base_url": url,
        "region": region,
        "zero_data_retention": zdr,
    }


async def test_failover_stays_in_the_region() -> None:
    dead = f"http://127.0.0.1:{closed_port()}/v1"
    async with mocks("us", "eu") as m:
        data = {
            "upstreams": [
                _up("eu-dead", dead, "eu"),
                _up("us", m.urls["us"], "us"),
                _up("eu", m.urls["eu"], "eu"),
            ],
            "routes": [
                {"model": "both*", "upstreams": ["eu-dead", "us", "eu"]},
                {"model": "us-only*", "upstreams": ["eu-dead", "us"]},
            ],
            "projects": [{"name": "eu-pinned", "regions": ["eu"]}, {"name": "anywhere"}],
        }
        async with proxy(data) as p:
            status, _doc, _ = await call(
                p.url + "/v1/chat/completions", chat("both-1"), p.auth("eu-pinned")
            )
            assert status == 200
            assert (m.started("us"), m.started("eu")) == (0, 1)
            status, doc, _ = await call(
                p.url + "/v1/chat/completions", chat("us-only-1"), p.auth("eu-pinned")
            )
            assert status == 502
            assert doc["error"]["code"] == "upstream_unavailable"
            assert m.started("us") == 0
            # Control: an unpinned project fails over to the next upstream, wherever it is.
            status, _doc, _ = await call(
                p.url + "/v1/chat/completions", chat("both-1"), p.auth("anywhere")
            )
            assert status == 200
            assert m.started("us") == 1


async def test_failover_stays_in_region_and_zdr_together() -> None:
    dead = f"http://127.0.0.1:{closed_port()}/v1"
    async with mocks("eu-keeps", "us-zdr") as m:
        data = {
            "upstreams": [
                _up("eu-dead", dead, "eu"),
                _up("eu-keeps", m.urls["eu-keeps"], "eu", zdr=False),
                _up("us-zdr", m.urls["us-zdr"], "us"),
            ],
            "routes": [{"model": "*", "upstreams": ["eu-dead", "eu-keeps", "us-zdr"]}],
            "projects": [{"name": "eu-pinned", "regions": ["eu"]}],
        }
        async with proxy(data) as p:
            status, _doc, _ = await call(
                p.url + "/v1/chat/completions", chat(), p.auth("eu-pinned")
            )
            assert status == 502
            assert (m.started("eu-keeps"), m.started("us-zdr")) == (0, 0)


def _config(tmp_path: Path) -> Path:
    data = {
        "upstreams": [
            _up("eu", "https://eu.example/v1", "eu"),
            _up("us", "https://us.example/v1", "us"),
            _up("us-keeps", "https://us2.example/v1", "us", zdr=False),
        ],
        "routes": [
            {"name": "eu-route", "model": "e*", "upstreams": ["eu"]},
            {"name": "us-route", "model": "u*", "upstreams": ["us"]},
            {"name": "keeps-route", "model": "k*", "upstreams": ["us-keeps"]},
        ],
        "projects": [
            {"name": "pinned", "key_sha256": ["0" * 64], "regions": ["eu"]},
            {"name": "us-zr", "key_sha256": ["1" * 64], "regions": ["us"]},
            {"name": "open", "key_sha256": ["2" * 64], "zero_retention": False},
        ],
        "subprocessors": [
            {
                "name": "Example",
                "purpose": "LLM inference",
                "location": "EU, US",
                "hosts": ["eu.example", "us.example", "us2.example"],
                "since": datetime.date(2026, 1, 1),
            }
        ],
    }
    path = tmp_path / "zrproxy.toml"
    path.write_text(to_toml(data))
    return path


def test_check_config_warns_for_routes_a_project_can_never_use(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check-config", str(_config(tmp_path))]) == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if line.startswith("warning: ")]
    # pinned (eu): us-route and keeps-route are out of its regions.
    assert any(
        "project 'pinned'" in w and "route 'us-route'" in w and "projects[0].regions" in w
        for w in warnings
    )
    assert any("project 'pinned'" in w and "route 'keeps-route'" in w for w in warnings)
    # us-zr: in region, but keeps-route's only upstream retains: the ZDR key is named.
    assert any(
        "project 'us-zr'" in w
        and "route 'keeps-route'" in w
        and "upstreams[2].zero_data_retention" in w
        and "projects[1].zero_retention = false" in w
        for w in warnings
    )
    assert not any("'us-zr'" in w and "'us-route'" in w for w in warnings)
    assert not any("project 'open'" in w for w in warnings)
    assert len(warnings) == 4  # pinned: us-route, keeps-route; us-zr: eu-route, keeps-route
