"""A stream cut by an upstream failure is visibly cut: the dialect's SSE error event, then
the connection closes without the terminating chunk, and the request counts as failed."""

from __future__ import annotations

import orjson
import pytest

from tests.conftest import Mock, StartProxy, kind_for, metric, raw_post


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages"])
async def test_a_mid_stream_failure_ends_without_the_last_chunk(
    mock: Mock, start_proxy: StartProxy, path: str
) -> None:
    proxy = await start_proxy(
        [{"name": "mock", "kind": kind_for(path), "base_url": mock.url_for(kind_for(path))}]
    )
    body = orjson.dumps(
        {"model": "mock-n10-r3", "stream": True, "messages": [{"role": "user", "content": "x"}]}
    )
    resp = await raw_post(proxy.url, path, body, proxy.auth())
    assert resp.status == 200  # the status line had gone out before the failure
    assert resp.headers["transfer-encoding"] == "chunked"
    assert not resp.complete, "a terminating 0-chunk made the cut stream look whole"
    last = resp.body.rstrip(b"\n").rsplit(b"\n\n", 1)[-1]
    if path == "/v1/messages":
        assert last.startswith(b"event: error\ndata: ")
        doc = orjson.loads(last.split(b"data: ", 1)[1])
        assert doc["type"] == "error" and doc["error"]["type"] == "api_error"
    else:
        doc = orjson.loads(last.removeprefix(b"data: "))
        assert doc["error"]["code"] == "upstream_stream_error"
    assert await metric(proxy, "zrproxy_requests_total", status_class="5xx") == 1
    assert await metric(proxy, "zrproxy_requests_total", status_class="2xx") == 0


async def test_a_whole_stream_still_ends_with_its_last_chunk(
    mock: Mock, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy([{"name": "mock", "kind": "openai", "base_url": mock.url}])
    body = orjson.dumps({"model": "mock-n3", "stream": True, "messages": []})
    resp = await raw_post(proxy.url, "/v1/chat/completions", body, proxy.auth())
    assert resp.complete
    assert resp.body.endswith(b"data: [DONE]\n\n")
    assert await metric(proxy, "zrproxy_requests_total", status_class="2xx") == 1
