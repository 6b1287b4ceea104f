"""No live copies: once a response has ended, no Python object holds any of its content.

The proxy runs in this process with the mock; the client's keep-alive connections stay
open during the scan (an idle connection must not pin its last request). Each path is
scanned twice: without a collection first (content must not wait for the garbage
collector: a cycle through a traceback would only show up here) and with one.
"""

from __future__ import annotations

import logging
import secrets

import aiohttp
import pytest

from tests.conftest import Mock
from tests.retention import live_holders
from tests.traffic import drive_every_path, retention_config
from zrproxy.app import Service
from zrproxy.auth import new_key
from zrproxy.config import parse_config

EXPECTED = {
    "stream": 200,
    "stream_usage": 200,
    "plain": 200,
    "query": 200,
    "messages_stream": 200,
    "responses": 200,
    "embeddings": 200,
    "failover": 200,
    "timeout": 504,
    "upstream_reset": -1,  # the error arrives in-band, then the stream is cut (no 0-chunk)
    "upstream_reset_plain": -1,  # a cut connection: no truncated body passes as whole
    "client_disconnect": 200,
    "no_route": 404,
    "bad_json": 400,
    "bad_key": 401,
    "too_large": 413,
    "malformed_http": 400,
    "zero_retention_conflict": 400,
    "zero_retention_unavailable": 403,
    "storing_endpoint": 404,
    "policy": 200,
}


@pytest.fixture
async def running(mock: Mock):
    key, digest = new_key()
    service = Service(
        parse_config(retention_config(mock.url, digest, anthropic_url=mock.anthropic_url), {})
    )
    await service.start()
    yield service, key
    await service.stop()


async def test_no_live_object_holds_content_after_any_path(
    running: tuple[Service, str], caplog: pytest.LogCaptureFixture
) -> None:
    service, key = running
    marker = ("zrMARK", secrets.token_hex(12))
    caplog.set_level(logging.DEBUG)
    async with aiohttp.ClientSession() as client:
        statuses = await drive_every_path(f"http://{service.api_address}", key, marker, client)
        for path, status in EXPECTED.items():
            assert statuses[path] == status, (path, statuses)
        # Keep-alive connections to the proxy are still open here.
        assert live_holders(marker, collect=False) == []
        assert live_holders(marker, collect=True) == []
    text = "".join(marker)
    for record in caplog.records:
        assert text not in record.getMessage()
        assert text not in str(record.exc_info)
    assert text not in caplog.text
