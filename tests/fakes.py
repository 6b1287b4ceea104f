"""The one fake upstream, for what the bundled mock cannot express (test helper).

The bundled mock (`zrproxy.mock_upstream`, the `mock` fixture) speaks the real wire
formats and does what a model string asks for. A `FakeUpstream` covers the rest: it
records the exact request each upstream got (method, raw path, headers, body bytes as
they arrived) and the order the upstreams of a test were called in, and it answers the
same way whatever the model: a canned response, a fixed failure (`hang`, `reset`, `429`,
`5xx`, a chunked body cut mid-way), or a handler of the test's own. Port 0 on loopback.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# Behaviours: "ok" (the canned response), "hang" (never answers), "reset" (a TCP RST
# before any response byte), "429", "500"/"502"/"503", "chunked-reset" (half a chunked
# JSON body, then a reset).
RETRY_BODY = b'{"error":{"message":"slow down","type":"requests","param":null,"code":"rate"}}'


@dataclass
class Seen:
    method: str
    raw_path: str
    headers: CIMultiDict[str]
    body: bytes

    @property
    def path(self) -> str:
        """The path as the application sees it: decoded, without the query."""
        return URL(self.raw_path).path


@dataclass
class FakeUpstream:
    """One fake upstream; its canned response can be changed between requests."""

    name: str
    behaviour: str = "ok"
    url: str = ""  # base URL ending in /v1
    seen: list[Seen] = field(default_factory=list)
    status: int = 200
    body: bytes = b'{"id":"rec","choices":[]}'
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    chunks: tuple[bytes, ...] = ()  # if set: streamed (chunked) instead of `body`

    @property
    def hits(self) -> int:
        return len(self.seen)

    @property
    def last(self) -> Seen:
        assert self.seen, "the upstream got no request"
        return self.seen[-1]

    def json(self, i: int = -1) -> Any:
        """The body of request `i` (the last by default), parsed."""
        return orjson.loads(self.seen[i].body)

    async def answer(self, request: web.Request) -> web.StreamResponse:
        behaviour, name = self.behaviour, self.name
        if behaviour == "hang":
            await asyncio.get_running_loop().create_future()
        if behaviour == "reset":
            reset(request)
            return web.Response()
        if behaviour == "429":
            headers = {"Retry-After": "7", "x-request-id": name}
            return web.Response(
                status=429, body=RETRY_BODY, content_type="application/json", headers=headers
            )
        if behaviour in ("500", "502", "503"):
            body = json.dumps({"error": {"message": f"{name} is down", "type": "server_error"}})
            return web.Response(
                status=int(behaviour),
                text=body,
                content_type="application/json",
                headers={"x-request-id": name},
            )
        if behaviour == "chunked-reset":
            response = web.StreamResponse(headers={"Content-Type": "application/json"})
            await response.prepare(request)
            await response.write(b'{"id": "x", "choices": [')
            await asyncio.sleep(0.05)
            assert request.transport is not None
            request.transport.abort()
            return response
        assert behaviour == "ok", behaviour
        headers = {"Content-Type": self.content_type, **self.headers}
        if not self.chunks:
            return web.Response(status=self.status, body=self.body, headers=headers)
        response = web.StreamResponse(status=self.status, headers=headers)
        await response.prepare(request)
        for chunk in self.chunks:
            await response.write(chunk)
        await response.write_eof()
        return response


def reset(request: web.Request) -> None:
    """A real TCP RST: SO_LINGER (on, 0 s), then abort."""
    assert request.transport is not None
    sock = request.transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    request.transport.abort()


@dataclass
class FakeUpstreams:
    """The fake upstreams of one test (the `fakes` fixture), and the order they were
    called in; all of them stop when the test ends."""

    order: list[str] = field(default_factory=list)
    runners: list[web.AppRunner] = field(default_factory=list)

    async def start(
        self, name: str = "fake", behaviour: str = "ok", handler: Handler | None = None
    ) -> FakeUpstream:
        """A fake that records each request, then answers as `behaviour` says, or with
        `handler(request)` (the body has been read by then)."""
        fake = FakeUpstream(name, behaviour)

        async def handle(request: web.Request) -> web.StreamResponse:
            body = await request.read()
            fake.seen.append(
                Seen(request.method, request.raw_path, CIMultiDict(request.headers), body)
            )
            self.order.append(name)
            return await (handler or fake.answer)(request)

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        # auto_decompress=False: record the body bytes exactly as they arrived. A short
        # shutdown_timeout: a fake mid-`hang` must not hold the test's cleanup.
        runner = web.AppRunner(
            app,
            access_log=None,
            handler_cancellation=True,
            shutdown_timeout=0.5,
            auto_decompress=False,
        )
        await runner.setup()
        self.runners.append(runner)
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        fake.url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
        return fake

    async def close(self) -> None:
        for runner in self.runners:
            await runner.cleanup()
        self.runners.clear()


# Bound, never listening, held until the process exits: the kernel refuses connections
# to such a port, and no other process (the machine may run other suites) can take it.
_HELD: list[socket.socket] = []


@atexit.register
def _release() -> None:
    for s in _HELD:
        s.close()


def closed_port() -> int:
    """A loopback port that refuses connections for the rest of the test session."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    _HELD.append(s)
    return int(s.getsockname()[1])


def free_port() -> int:
    """A loopback port free just now (bound, then closed), for a child to listen on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# What the real providers answer, for fakes that must sound like them (bodies as sent).
# A 404 for a path the API does not have: OpenAI quotes the request line back (older
# deployments: code null; newer: code "unknown_url"), Anthropic and Azure say "not found".
OPENAI_UNKNOWN_URL_404 = (
    b'{"error":{"message":"Invalid URL (POST /v1/chat/completionsx)",'
    b'"type":"invalid_request_error","param":null,"code":null}}'
)
OPENAI_UNKNOWN_URL_CODE_404 = (
    b'{"error":{"type":"invalid_request_error","code":"unknown_url","message":"Unknown '
    b"request URL: POST /v2/chat/completions. Please check the URL for typos, or see the "
    b'docs at https://platform.openai.com/docs/api-reference/.","param":null}}'
)
ANTHROPIC_UNKNOWN_URL_404 = (
    b'{"type":"error","error":{"type":"not_found_error","message":"Not Found"}}'
)
AZURE_UNKNOWN_URL_404 = b'{"error":{"code":"404","message":"Resource not found"}}'
# A 404 for a model (or Azure deployment) the account lacks: the client's to fix.
OPENAI_MODEL_404 = (
    b'{"error":{"message":"The model `gpt-9` does not exist or you do not have access to '
    b'it.","type":"invalid_request_error","param":null,"code":"model_not_found"}}'
)
ANTHROPIC_MODEL_404 = (
    b'{"type":"error","error":{"type":"not_found_error","message":"model: claude-9"},'
    b'"request_id":"req_011CAnthropic404"}'
)
AZURE_DEPLOYMENT_404 = (
    b'{"error":{"code":"DeploymentNotFound","message":"The API deployment for this resource '
    b"does not exist. If you created the deployment within the last 5 minutes, please wait "
    b'a moment and try again."}}'
)
# What an Azure OpenAI resource answers with (names as sent; values made up).
AZURE_HEADERS = {
    "apim-request-id": "0b5e6f3c-azure-apim",
    "x-request-id": "req_azure_abc123",
    "x-ms-region": "Sweden Central",
    "x-ms-deployment-name": "operator-gpt4o-deploy",
    "x-ms-rai-invoked": "true",
    "azureml-model-session": "d123-20260101000000",
    "x-ratelimit-remaining-requests": "99",
    "x-ratelimit-remaining-tokens": "99000",
    "x-content-type-options": "nosniff",
    "strict-transport-security": "max-age=31536000; includeSubDomains; preload",
}
