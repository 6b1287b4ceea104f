"""Transparency: `zrproxy policy`, the admin listener's /policy and a customer's
/v1/policy say what is kept and where traffic goes, read from the config and the code."""

from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import Counter
from prometheus_client.metrics import MetricWrapperBase
from pyrage import x25519

from tests.policy_fixtures import call, mocks, proxy
from tests.processes import LoggedProcess, proxy_process, to_toml
from zrproxy import policy
from zrproxy.cli import main
from zrproxy.config import parse_config
from zrproxy.metrics import Metrics

RECIPIENT = str(x25519.Identity.generate().to_public())
TODAY = datetime.date(2026, 6, 1)


def _data(mock_url: str, audit_dir: str) -> dict[str, Any]:
    return {
        "upstreams": [
            {
                "name": "eu-zdr",
                "kind": "openai",
                "base_url": mock_url,
                "region": "eu",
                "zero_data_retention": True,
                "request_overrides": {"store": False},
                "header_overrides": {"X-Title": "zrproxy"},
            },
            {
                "name": "us-keeps",
                "kind": "openai",
                "base_url": mock_url.replace("127.0.0.1", "localhost"),
                "region": "us",
                "request_overrides": {"provider": {"data_collection": "deny", "zdr": True}},
            },
        ],
        "routes": [{"name": "all", "model": "*", "upstreams": ["eu-zdr", "us-keeps"]}],
        "projects": [
            {"name": "alpha", "regions": ["eu"]},
            {
                "name": "beta",
                "zero_retention": False,
                "audit_log": {"recipient": RECIPIENT, "retention_days": 14},
            },
        ],
        "audit": {"dir": audit_dir},
        "subprocessors": [
            {
                "name": "Loopback GmbH",
                "purpose": "LLM inference",
                "location": "DE",
                "hosts": ["127.0.0.1"],
                "since": datetime.date(2020, 1, 1),
            },
            {
                "name": "Localhost Inc.",
                "purpose": "LLM inference",
                "location": "US",
                "hosts": ["localhost"],
                "since": datetime.date(2999, 1, 1),
            },
        ],
    }


def _keyed(data: dict[str, Any]) -> dict[str, Any]:
    for i, project in enumerate(data["projects"]):
        project["key_sha256"] = [str(i) * 64]
    return data


def _file(tmp_path: Path) -> Path:
    data = _keyed(_data("http://127.0.0.1:9/v1", str(tmp_path / "audit")))
    path = tmp_path / "zrproxy.toml"
    path.write_text(to_toml(data))
    return path


def test_policy_text_says_it_in_plain_words(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["policy", "--config", str(_file(tmp_path))]) == 0
    text = capsys.readouterr().out
    alpha, rest = text.split("Project beta")
    beta, register = rest.split("Subprocessor register")
    assert "Project alpha" in alpha
    assert "Zero retention: on." in alpha and "Zero retention: off." in beta
    assert "Content audit log: none." in alpha
    fingerprint = policy.recipient_fingerprint(RECIPIENT)
    assert "Content audit log: on." in beta and fingerprint in beta and "14 days" in beta
    assert RECIPIENT not in text
    assert "Regions: eu." in alpha and "Regions: any." in beta
    # alpha (eu, zero retention) reaches only eu-zdr; beta reaches both.
    assert "eu-zdr at 127.0.0.1, eu; provider contract: keeps nothing" in alpha
    assert "subprocessor Loopback GmbH (DE), in use since 2020-01-01" in alpha
    assert "store = false" in alpha and "headers set: X-Title" in alpha
    assert "us-keeps" not in alpha
    assert "us-keeps at localhost, us; provider contract: may retain data" in beta
    assert "announced: used from 2999-01-01" in beta
    assert 'provider = {"data_collection":"deny","zdr":true}' in beta
    assert "Current:\n    - Loopback GmbH: LLM inference; DE; hosts 127.0.0.1" in register
    assert "Announced:\n    - Localhost Inc.: LLM inference; US; hosts localhost" in register


def test_policy_lists_every_metric_the_proxy_keeps(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["policy", "--config", str(_file(tmp_path)), "--project", "alpha"]) == 0
    text = capsys.readouterr().out
    metrics = [m for m in vars(Metrics()).values() if isinstance(m, MetricWrapperBase)]
    assert len(metrics) > 5
    for metric in metrics:
        assert metric._name in text
        assert metric._documentation in text


def test_adding_a_metric_changes_what_the_policy_says(tmp_path: Path) -> None:
    config = parse_config(_keyed(_data("http://127.0.0.1:9/v1", str(tmp_path))), {})

    class MoreMetrics(Metrics):
        def __init__(self) -> None:
            super().__init__()
            self.client_ips = Counter(
                "zrproxy_client_ips", "Client addresses.", ["ip"], registry=self.registry
            )

    before = policy.to_text(policy.report(config, Metrics(), TODAY))
    after = policy.to_text(policy.report(config, MoreMetrics(), TODAY))
    assert "zrproxy_client_ips" not in before
    assert "zrproxy_client_ips_total (counter; by ip): Client addresses." in after


def test_policy_json_and_one_project(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = str(_file(tmp_path))
    assert main(["policy", "--config", path, "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [p["project"] for p in doc["projects"]] == ["alpha", "beta"]
    assert [(s["name"], s["status"]) for s in doc["subprocessors"]] == [
        ("Loopback GmbH", "current"),
        ("Localhost Inc.", "announced"),
    ]
    beta = doc["projects"][1]
    assert beta["audit_log"] == {
        "recipient_fingerprint": policy.recipient_fingerprint(RECIPIENT),
        "retention_days": 14,
    }
    ups = beta["routes"][0]["upstreams"]
    assert [(u["upstream"], u["zero_data_retention"]) for u in ups] == [
        ("eu-zdr", True),
        ("us-keeps", False),
    ]
    assert ups[0]["header_overrides"] == ["X-Title"]
    assert main(["policy", "--config", path, "--format", "json", "--project", "beta"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [p["project"] for p in doc["projects"]] == ["beta"]
    assert main(["policy", "--config", path, "--project", "nobody"]) == 2


def test_policy_without_a_config_describes_the_embedded_demo(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["policy"]) == 0
    text = capsys.readouterr().out
    assert "Project demo" in text and "zrproxy bundled mock upstream" in text


async def test_admin_policy_is_the_whole_report(tmp_path: Path) -> None:
    async with mocks("m") as m:
        async with proxy(_data(m.urls["m"], str(tmp_path))) as p:
            status, doc, _ = await call(p.admin_url + "/policy", None, {}, "GET")
            assert status == 200
            assert [x["project"] for x in doc["projects"]] == ["alpha", "beta"]
            assert len(doc["subprocessors"]) == 2


async def test_v1_policy_shows_a_customer_its_own_project_only(tmp_path: Path) -> None:
    async with mocks("m") as m:
        async with proxy(_data(m.urls["m"], str(tmp_path))) as p:
            status, doc, raw = await call(p.url + "/v1/policy", None, p.auth("alpha"), "GET")
            assert status == 200
            assert doc["project"] == "alpha"
            assert doc["zero_retention"] is True
            assert b"beta" not in raw
            assert b"us-keeps" not in raw  # an upstream only another project reaches
            status, doc, raw = await call(p.url + "/v1/policy", None, p.auth("beta"), "GET")
            assert status == 200
            assert doc["project"] == "beta"
            assert b"alpha" not in raw
            assert doc["audit_log"]["retention_days"] == 14
            status, _doc, _ = await call(p.url + "/v1/policy", None, {}, "GET")
            assert status == 401
            status, _doc, _ = await call(p.url + "/v1/policy", {}, p.auth("alpha"), "POST")
            assert status == 405
            assert m.started("m") == 0


async def test_admin_policy_with_worker_processes(tmp_path: Path) -> None:
    data = _keyed(_data("http://127.0.0.1:9/v1", str(tmp_path / "audit")))
    data["server"] = {"listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0"}
    with proxy_process(data, tmp_path, "--workers", "2") as proc:
        status, doc, _ = await call(proc.admin_url + "/policy", None, {}, "GET")
    assert status == 200
    assert [x["project"] for x in doc["projects"]] == ["alpha", "beta"]


async def test_the_demo_banner_shows_the_policy_with_the_register() -> None:
    proc = LoggedProcess(
        [
            sys.executable,
            "-m",
            "zrproxy",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ]
    )
    try:
        line = proc.wait_for(r"curl (http://\S+/v1/policy) -H 'Authorization: Bearer (zr-\S+)'")
        status, doc, _ = await call(line[1], None, {"Authorization": f"Bearer {line[2]}"}, "GET")
        assert status == 200
        (upstream,) = doc["routes"][0]["upstreams"]
        assert upstream["zero_data_retention"] is True
        assert upstream["subprocessor"]["name"] == "zrproxy bundled mock upstream"
        assert upstream["subprocessor"]["status"] == "current"
    finally:
        assert proc.stop() == 0
