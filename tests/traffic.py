"""Traffic that carries a marker along every path through the proxy (test helper).

Used by the retention proofs: the live-object scan (proxy in this process) and the raw
memory scan (proxy in a subprocess). The marker is passed in parts and only ever joined
inside request bodies, so after the traffic nothing on the test's side holds it.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import aiohttp
import orjson

from tests.fakes import closed_port


def retention_config(
    mock_url: str,
    key_sha256: str,
    ca_file: str | None = None,
    anthropic_url: str | None = None,
) -> dict[str, Any]:
    """Routes that reach every path: failover through a dead upstream, timeouts, 404s.
    With `ca_file`, the mock is an https:// one whose certificate that CA issued;
    `anthropic_url`, the Anthropic-kind mock where it is another one."""
    dead_port = closed_port()
    config = {
        "server": {
            "listen": "127.0.0.1:0",
            "admin_listen": "127.0.0.1:0",
            "max_body_bytes": 65536,
            "first_byte_timeout_s": 1,
        },
        "upstreams": [
            {
                "name": "dead",
                "kind": "openai",
                "base_url": f"http://127.0.0.1:{dead_port}/v1",
                "zero_data_retention": True,
            },
            {"name": "mock", "kind": "openai", "base_url": mock_url, "zero_data_retention": True},
            {
                "name": "mock-anthropic",
                "kind": "anthropic",
                "base_url": anthropic_url or mock_url,
                "zero_data_retention": True,
            },
            # The same mock declared as retaining: zero-retention requests never reach it.
            {"name": "keeps", "kind": "openai", "base_url": mock_url},
        ],
        "routes": [
            {"model": "retain-*", "upstreams": ["keeps"]},
            {"model": "failover-*", "upstreams": ["dead", "mock"]},
            {"model": "mock*", "upstreams": ["mock", "mock-anthropic"]},
        ],
        "projects": [{"name": "acme", "key_sha256": [key_sha256]}],
    }
    if ca_file is not None:
        for upstream in config["upstreams"]:
            if upstream["base_url"] == mock_url:
                upstream["ca_file"] = ca_file
    return config


def _chat(model: str, marker: tuple[str, ...], **extra: Any) -> bytes:
    content = "".join(marker) + " tell me more"
    return orjson.dumps(
        {"model": model, "messages": [{"role": "user", "content": content}], **extra}
    )


async def _post(
    client: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str]
) -> int:
    """POST and read the whole response; -1 if the connection failed.

    The test's own client must not keep content alive either, or the scan would find
    it: an exception's traceback holds this frame, so its locals are cleared on exit.
    """
    request = client.post(url, data=body, headers=headers)
    del body
    chunk = b""
    try:
        async with request as resp:
            async for chunk in resp.content.iter_any():  # noqa: B007
                pass
            return resp.status
    except aiohttp.ClientError:
        return -1
    finally:
        chunk = b""  # noqa: F841


async def drive_every_path(
    base_url: str, key: str, marker: tuple[str, ...], client: aiohttp.ClientSession
) -> dict[str, int]:
    """Send marker-carrying requests along every path; returns each path's status.

    `client` is left open by the caller so its keep-alive connections stay open too.
    """
    auth = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    chat = base_url + "/v1/chat/completions"
    statuses: dict[str, int] = {}
    statuses["stream"] = await _post(client, chat, _chat("mock-n6", marker, stream=True), auth)
    statuses["stream_usage"] = await _post(
        client,
        chat,
        _chat("mock-n6", marker, stream=True, stream_options={"include_usage": True}),
        auth,
    )
    statuses["plain"] = await _post(client, chat, _chat("mock-n6", marker), auth)
    # Query strings are content too: they must not stay in any URL cache.
    statuses["query"] = await _post(
        client, chat + "?q=" + "".join(marker), _chat("mock-n2", marker), auth
    )
    statuses["messages_stream"] = await _post(
        client,
        base_url + "/v1/messages",
        _chat("mock-n6", marker, stream=True, max_tokens=64),
        {**auth, "anthropic-version": "2023-06-01"},
    )
    statuses["responses"] = await _post(
        client,
        base_url + "/v1/responses",
        orjson.dumps({"model": "mock-n4", "input": "".join(marker), "stream": True}),
        auth,
    )
    statuses["embeddings"] = await _post(
        client,
        base_url + "/v1/embeddings",
        orjson.dumps({"model": "mock", "input": "".join(marker)}),
        auth,
    )
    statuses["failover"] = await _post(
        client, chat, _chat("failover-mock-n4", marker, stream=True), auth
    )
    statuses["upstream_reset"] = await _post(
        client, chat, _chat("mock-n10-r3", marker, stream=True), auth
    )
    statuses["upstream_reset_plain"] = await _post(client, chat, _chat("mock-n10-r3", marker), auth)
    statuses["timeout"] = await _post(client, chat, _chat("mock-hang", marker), auth)
    # The client leaves mid-stream.
    resp = await client.post(chat, data=_chat("mock-n200-d20", marker, stream=True), headers=auth)
    await resp.content.readline()
    statuses["client_disconnect"] = resp.status
    resp.close()
    del resp
    # Rejections whose request carries the marker.
    statuses["no_route"] = await _post(
        client, chat, _chat("nomatch-" + "".join(marker), marker), auth
    )
    statuses["bad_json"] = await _post(
        client, chat, b'{"model": "mock", "messages": [' + "".join(marker).encode(), auth
    )
    statuses["bad_key"] = await _post(
        client,
        chat,
        _chat("mock", marker),
        {"Authorization": "Bearer " + "".join(marker), "Content-Type": "application/json"},
    )
    statuses["too_large"] = await _post(client, chat, _chat("mock", marker) + b" " * 70000, auth)
    # Zero-retention refusals: a field asking for provider state, no ZDR upstream, a
    # storing endpoint (the marker in its path), and the customer's policy view.
    statuses["zero_retention_conflict"] = await _post(
        client, chat, _chat("mock-n2", marker, store=True), auth
    )
    statuses["zero_retention_unavailable"] = await _post(
        client, chat, _chat("retain-mock-n2", marker), auth
    )
    statuses["storing_endpoint"] = await _post(
        client, base_url + "/v1/files/" + "".join(marker), _chat("mock", marker), auth
    )
    async with client.get(base_url + "/v1/policy", headers=auth) as resp:
        await resp.read()
        statuses["policy"] = resp.status
    statuses["malformed_http"] = await _raw_malformed(base_url, marker)
    await asyncio.sleep(0.3)  # let the proxy notice closed connections and finish handlers
    return statuses


async def _raw_malformed(base_url: str, marker: tuple[str, ...]) -> int:
    host, port = base_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nBad Header "
        + "".join(marker).encode()
        + b"\r\nContent-Length: 2\r\n\r\n{}"
    )
    await writer.drain()
    response = await reader.read()
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()
    return int(response.split(b" ", 2)[1]) if response else 0
