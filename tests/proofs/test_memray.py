"""memray proofs (run in make test's second pass, with --memray).

- limit_leaks: over 200+ streamed requests, each carrying a 256 KiB prompt, no single
  allocation site keeps as much as half a prompt once the test ends. A proxy that kept
  any request's body (or completion) would leak at least one whole body at one site.
- limit_memory: four concurrent 8 MiB streams peak at buffer sizes, not response sizes.
"""

from __future__ import annotations

import asyncio

import aiohttp
import orjson
import pytest

from tests.conftest import Mock, RunningProxy

CHAT = "/v1/chat/completions"
PROMPT_BYTES = 256 * 1024


async def _stream(client: aiohttp.ClientSession, proxy: RunningProxy, body: bytes) -> int:
    received = 0
    async with client.post(proxy.url + CHAT, data=body, headers=proxy.auth()) as resp:
        assert resp.status == 200
        async for chunk in resp.content.iter_any():
            received += len(chunk)
    return received


def _body(model: str, prompt_bytes: int) -> bytes:
    prompt = "x" * prompt_bytes
    return orjson.dumps(
        {"model": model, "stream": True, "messages": [{"role": "user", "content": prompt}]}
    )


@pytest.fixture
async def warm_proxy(mock: Mock, proxy: RunningProxy) -> RunningProxy:
    # Caches that fill once (metric children, pooled upstream connections) fill here,
    # outside the measured test body.
    async with aiohttp.ClientSession() as client:
        for _ in range(5):
            await _stream(client, proxy, _body("mock-n8", PROMPT_BYTES))
    return proxy


@pytest.mark.memray
@pytest.mark.limit_leaks("128 KB")
async def test_no_request_leaves_its_body_behind(warm_proxy: RunningProxy) -> None:
    async with aiohttp.ClientSession() as client:
        for _ in range(200):
            assert await _stream(client, warm_proxy, _body("mock-n8", PROMPT_BYTES)) > 0
    await asyncio.sleep(0.1)


@pytest.mark.memray
@pytest.mark.limit_memory("24 MB")
async def test_streams_peak_at_buffer_sizes_not_response_sizes(
    warm_proxy: RunningProxy,
) -> None:
    body = _body("mock-n512-s16384", 1024)  # each response is about 8 MiB
    async with aiohttp.ClientSession() as client:
        sizes = await asyncio.gather(*(_stream(client, warm_proxy, body) for _ in range(4)))
    assert all(size > 8_000_000 for size in sizes)
