"""TLS to upstreams: verification always on, a private CA (`ca_file`), a client
certificate (mTLS), a certificate failure counted as kind `tls` with its reason logged,
and the egress proxy (CONNECT). The upstream is the bundled mock behind a trustme
certificate on loopback; the egress proxy a small CONNECT proxy on loopback."""

from __future__ import annotations

import logging
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest
import trustme
from aiohttp import web

from tests.conftest import Mock, StartProxy, metric
from tests.egress import ConnectProxy
from zrproxy.mock_upstream import create_mock_app

BODY = {"model": "mock-n2", "messages": [{"role": "user", "content": "hi"}]}


@asynccontextmanager
async def tls_mock(ca: trustme.CA, require_client_cert: bool = False) -> AsyncIterator[str]:
    """The mock on https://localhost:PORT/v1 with a certificate `ca` issued."""
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost", "127.0.0.1").configure_cert(server)
    if require_client_cert:
        server.verify_mode = ssl.CERT_REQUIRED
        ca.configure_trust(server)
    runner = web.AppRunner(create_mock_app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"https://localhost:{port}/v1"
    finally:
        await runner.cleanup()


@pytest.fixture
def pem(tmp_path: Path) -> Callable[[trustme.Blob, str], str]:
    def write(blob: trustme.Blob, name: str) -> str:
        path = tmp_path / name
        blob.write_to_path(str(path))
        return str(path)

    return write


async def _chat(url: str, key: str) -> tuple[int, bytes]:
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            url + "/v1/chat/completions", json=BODY, headers={"Authorization": f"Bearer {key}"}
        ) as resp,
    ):
        return resp.status, await resp.read()


async def test_a_private_ca_verifies_the_upstream(
    start_proxy: StartProxy, pem: Callable[[trustme.Blob, str], str]
) -> None:
    ca = trustme.CA()
    async with tls_mock(ca) as url:
        proxy = await start_proxy(
            [
                {
                    "name": "private",
                    "kind": "openai",
                    "base_url": url,
                    "ca_file": pem(ca.cert_pem, "ca.pem"),
                }
            ]
        )
        status, body = await _chat(proxy.url, proxy.key)
    assert status == 200, body
    assert b"chat.completion" in body


async def test_an_unverified_certificate_is_kind_tls_with_its_reason_logged(
    start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    async with tls_mock(trustme.CA()) as url:  # a CA nobody told the proxy about
        proxy = await start_proxy([{"name": "private", "kind": "openai", "base_url": url}])
        status, _ = await _chat(proxy.url, proxy.key)
    assert status == 502  # never sent over a connection we could not verify
    kinds = await metric(proxy, "zrproxy_upstream_errors_total", upstream="private", kind="tls")
    assert kinds == 1
    lines = [r.getMessage() for r in caplog.records if "TLS failed" in r.getMessage()]
    assert lines == ["upstream private: TLS failed (unable to get local issuer certificate)"]


async def test_mtls_presents_the_client_certificate(
    start_proxy: StartProxy, pem: Callable[[trustme.Blob, str], str]
) -> None:
    ca = trustme.CA()
    client = ca.issue_cert("zrproxy.client")
    async with tls_mock(ca, require_client_cert=True) as url:
        base = {"kind": "openai", "base_url": url, "ca_file": pem(ca.cert_pem, "ca.pem")}
        with_cert = {
            **base,
            "name": "mtls",
            "client_cert_file": pem(client.cert_chain_pems[0], "client.pem"),
            "client_key_file": pem(client.private_key_pem, "client.key"),
        }
        proxy = await start_proxy([with_cert])
        status, body = await _chat(proxy.url, proxy.key)
        assert status == 200, body
        # The control: the same upstream refuses a proxy without the certificate.
        bare = await start_proxy([{**base, "name": "bare"}])
        status, _ = await _chat(bare.url, bare.key)
        assert status == 502


@pytest.mark.parametrize("scheme", ["https", "http"])
async def test_every_upstream_connection_goes_through_the_egress_proxy(
    start_proxy: StartProxy, pem: Callable[[trustme.Blob, str], str], mock: Mock, scheme: str
) -> None:
    egress = ConnectProxy()
    await egress.start()
    ca = trustme.CA()
    try:
        async with tls_mock(ca) as tls_url:
            if scheme == "https":
                upstream = {"base_url": tls_url, "ca_file": pem(ca.cert_pem, "ca.pem")}
                host_port = tls_url.removeprefix("https://").removesuffix("/v1")
            else:
                upstream = {"base_url": mock.url}
                host_port = mock.url.removeprefix("http://").removesuffix("/v1")
            proxy = await start_proxy(
                [{"name": "up", "kind": "openai", **upstream}], egress_proxy=egress.url
            )
            status, body = await _chat(proxy.url, proxy.key)
            assert status == 200, body
            # TLS runs end to end through the tunnel: the proxy saw host and port only.
            assert egress.targets == [f"CONNECT {host_port}"]
    finally:
        await egress.stop()


async def test_an_egress_proxy_refusing_the_tunnel_is_a_connect_failure(
    start_proxy: StartProxy, mock: Mock
) -> None:
    egress = ConnectProxy(refuse=True)
    await egress.start()
    try:
        proxy = await start_proxy(
            [{"name": "up", "kind": "openai", "base_url": mock.url, "egress_proxy": egress.url}]
        )
        status, _ = await _chat(proxy.url, proxy.key)
        assert status == 502
        assert len(egress.targets) == 1  # the upstream's own egress_proxy was used
        kinds = await metric(proxy, "zrproxy_upstream_errors_total", upstream="up", kind="connect")
        assert kinds == 1
        assert mock.stats.started == 0
    finally:
        await egress.stop()
