"""Credentials for the egress proxy: `egress_proxy_auth_env` names the environment variable
holding USER:PASSWORD (never the config file), sent as `Proxy-Authorization: Basic` on
CONNECT. A 407 is a `connect` failure with one clear log line and no credentials in it;
a URL with credentials in it is a config error that does not print them. The egress
proxy is a CONNECT proxy on loopback that requires the credentials."""

from __future__ import annotations

import base64
import io
import logging
from collections.abc import AsyncIterator
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import Mock, StartProxy, metric
from tests.egress import ConnectProxy
from tests.processes import to_toml
from zrproxy.cli import main
from zrproxy.config import PLACEHOLDER_ENV, parse_config
from zrproxy.errors import ConfigError, ConfigErrors

PASSWORD = "s3cret-egress-Pa55"
CREDENTIALS = f"svc-zrproxy:{PASSWORD}"
ENV = {"EGRESS_PROXY_AUTH": CREDENTIALS}
BODY = {"model": "mock-n2", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
async def egress() -> AsyncIterator[ConnectProxy]:
    proxy = ConnectProxy(credentials=CREDENTIALS)
    await proxy.start()
    yield proxy
    await proxy.stop()


async def _chat(url: str, key: str) -> int:
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            url + "/v1/chat/completions", json=BODY, headers={"Authorization": f"Bearer {key}"}
        ) as resp,
    ):
        await resp.read()
        return resp.status


async def test_server_egress_credentials_are_sent_on_connect(
    egress: ConnectProxy, mock: Mock, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(
        [{"name": "up", "kind": "openai", "base_url": mock.url}],
        environ=ENV,
        egress_proxy=egress.url,
        egress_proxy_auth_env="EGRESS_PROXY_AUTH",
    )
    assert await _chat(proxy.url, proxy.key) == 200
    expected = "Basic " + base64.b64encode(CREDENTIALS.encode()).decode()
    assert egress.authorizations == [expected]
    assert mock.stats.started == 1


async def test_an_upstreams_own_egress_credentials(
    egress: ConnectProxy, mock: Mock, start_proxy: StartProxy
) -> None:
    upstream = {
        "name": "up",
        "kind": "openai",
        "base_url": mock.url,
        "egress_proxy": egress.url,
        "egress_proxy_auth_env": "EGRESS_PROXY_AUTH",
    }
    proxy = await start_proxy([upstream], environ=ENV)
    assert await _chat(proxy.url, proxy.key) == 200
    assert len(egress.authorizations) == 1 and egress.authorizations[0] is not None


@pytest.mark.parametrize("sent", [None, "svc-zrproxy:wrong-password"])
async def test_a_407_is_a_connect_failure_logged_once_without_credentials(
    egress: ConnectProxy,
    mock: Mock,
    start_proxy: StartProxy,
    caplog: pytest.LogCaptureFixture,
    sent: str | None,
) -> None:
    caplog.set_level(logging.DEBUG)
    auth = {} if sent is None else {"egress_proxy_auth_env": "EGRESS_PROXY_AUTH"}
    proxy = await start_proxy(
        [{"name": "up", "kind": "openai", "base_url": mock.url}],
        environ={} if sent is None else {"EGRESS_PROXY_AUTH": sent},
        egress_proxy=egress.url,
        **auth,
    )
    assert await _chat(proxy.url, proxy.key) == 502
    assert await _chat(proxy.url, proxy.key) == 502
    kinds = await metric(proxy, "zrproxy_upstream_errors_total", upstream="up", kind="connect")
    assert kinds == 2
    assert mock.stats.started == 0
    messages = [r.getMessage() for r in caplog.records]
    # ("(407 ", not "407": a port number in the ready line may hold those digits.)
    assert [m for m in messages if "(407 " in m] == [
        "upstream up: the egress proxy refused its credentials (407 Proxy Authentication"
        " Required): check egress_proxy_auth_env"
    ]
    assert not [m for m in messages if "wrong-password" in m or "svc-zrproxy" in m]


def _config(**server: object) -> dict[str, object]:
    return {
        "server": server,
        "upstreams": [{"name": "up", "kind": "openai", "base_url": "https://api.openai.com/v1"}],
        "routes": [{"model": "*", "upstreams": ["up"]}],
        "projects": [{"name": "acme", "key_sha256": ["ab" * 32]}],
    }


def test_credentials_in_the_proxy_url_are_refused_unprinted(tmp_path: Path) -> None:
    data = _config(egress_proxy=f"http://svc-zrproxy:{PASSWORD}@proxy.corp:3128")
    with pytest.raises(ConfigError) as info:
        parse_config(data, {})
    assert info.value.key_path == "server.egress_proxy"
    assert "egress_proxy_auth_env" in info.value.problem
    assert PASSWORD not in str(info.value)
    path = tmp_path / "config.toml"
    path.write_text(to_toml(data))
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(["check-config", "--no-env", str(path)])
    assert code != 0
    assert "server.egress_proxy" in err.getvalue() + out.getvalue()
    assert PASSWORD not in err.getvalue() + out.getvalue()


WITH_AUTH = {"egress_proxy": "http://proxy.corp:3128", "egress_proxy_auth_env": "EGRESS_PROXY_AUTH"}


@pytest.mark.parametrize(
    ("server", "environ", "problem"),
    [
        ({"egress_proxy_auth_env": "EGRESS_PROXY_AUTH"}, ENV, "needs egress_proxy"),
        (
            {
                "egress_proxy": "http://proxy.corp:3128",
                "egress_proxy_auth_env": "EGRESS_PROXY_AUTH",
            },
            {},
            "not set",
        ),
        (
            {
                "egress_proxy": "http://proxy.corp:3128",
                "egress_proxy_auth_env": "EGRESS_PROXY_AUTH",
            },
            {"EGRESS_PROXY_AUTH": PASSWORD},  # no USER: part
            "USER:PASSWORD",
        ),
    ],
)
def test_egress_proxy_auth_env_mistakes_name_the_key(
    server: dict[str, object], environ: dict[str, str], problem: str
) -> None:
    with pytest.raises((ConfigError, ConfigErrors)) as info:
        parse_config(_config(**server), environ)
    error = info.value
    assert isinstance(error, ConfigError)
    assert error.key_path == "server.egress_proxy_auth_env"
    assert problem in error.problem
    assert PASSWORD not in str(error)


def test_no_env_validates_without_the_credentials_and_repr_hides_them() -> None:
    server = {"egress_proxy": "http://proxy.corp:3128", "egress_proxy_auth_env": "EGRESS_AUTH"}
    assert parse_config(_config(**server), PLACEHOLDER_ENV).server.egress_proxy_auth_env
    config = parse_config(_config(**server), {"EGRESS_AUTH": CREDENTIALS})
    assert config.server.egress_proxy_auth == CREDENTIALS
    assert PASSWORD not in repr(config)
