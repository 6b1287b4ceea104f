"""Counters only, with label sets bounded by the config whatever clients send."""

from __future__ import annotations

import random
import secrets
from typing import get_args

import aiohttp
import orjson
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Mock, StartProxy, metric
from zrproxy import __version__
from zrproxy.errors import RejectReason
from zrproxy.metrics import STATUS_CLASSES, TokenType, UpstreamErrorKind
from zrproxy.retention_rules import REFUSAL_FIELDS

PATHS = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/v1/messages",
    "/v1/models",
]
CLIENT_ERROR_KINDS = {"slow_body", "body_timeout", "slow_read"}
FIXED_ENUMS = {
    "status_class": set(STATUS_CLASSES),
    "stream": {"true", "false"},
    "type": set(get_args(TokenType)),
    "kind": set(get_args(UpstreamErrorKind)),
    "reason": set(get_args(RejectReason)),
    "field": set(REFUSAL_FIELDS),
    "backend": {"local", "redis"},
    "le": None,  # histogram buckets: fixed by the code
    "outcome": {"written", "dropped_queue_full", "dropped_write_error"},
    "zero_retention": {"true", "false"},
    "audit_log": {"true", "false"},
    "version": {__version__},
}


async def test_series_stay_within_the_config_bound(mock: Mock, start_proxy: StartProxy) -> None:
    upstreams = [
        {"name": "mock-a", "kind": "openai", "base_url": mock.url},
        {"name": "mock-b", "kind": "anthropic", "base_url": mock.anthropic_url},
    ]
    routes = [
        {"model": "mock-n2*", "upstreams": ["mock-a"], "name": "short"},
        {"model": "mock*", "upstreams": ["mock-b", "mock-a"], "name": "rest"},
    ]
    proxy = await start_proxy(upstreams, routes=routes)
    config = proxy.service.config
    names = {
        "project": {p.name for p in config.projects} | {"none"},
        "route": {r.name for r in config.routes} | {"none"},
        "upstream": {u.name for u in config.upstreams} | {"none"},
    }
    rng = random.Random(1234)
    async with aiohttp.ClientSession() as client:
        for _ in range(150):
            key = proxy.key if rng.random() < 0.7 else secrets.token_urlsafe(16)
            model = rng.choice(["mock-n2", "mock-n3-e503", "mock", "gpt-" + secrets.token_hex(4)])
            path = rng.choice([*PATHS, "/v1/" + secrets.token_hex(3), "/" + secrets.token_hex(2)])
            stream = rng.random() < 0.5
            body = orjson.dumps(
                {"model": model, "stream": stream, "messages": [{"role": "user", "content": "x"}]}
            )
            method = "GET" if path == "/v1/models" and rng.random() < 0.8 else "POST"
            async with client.request(
                method,
                proxy.url + path + ("?q=" + secrets.token_hex(4) if rng.random() < 0.3 else ""),
                data=body,
                headers={"Authorization": f"Bearer {key}", "User-Agent": secrets.token_hex(5)},
            ) as resp:
                await resp.read()
        async with client.get(proxy.admin_url + "/metrics") as resp:
            text = await resp.text()

    series: dict[str, int] = {}
    for family in text_string_to_metric_families(text):
        if not family.name.startswith("zrproxy_"):
            continue
        for sample in family.samples:
            series[family.name] = series.get(family.name, 0) + 1
            for label, value in sample.labels.items():
                if label in names:
                    assert value in names[label], (family.name, label, value)
                else:
                    allowed = (
                        CLIENT_ERROR_KINDS
                        if family.name == "zrproxy_client_errors" and label == "kind"
                        else FIXED_ENUMS[label]
                    )
                    assert allowed is None or value in allowed, (family.name, label, value)
    assert series["zrproxy_requests"] > 3  # traffic of several kinds was counted

    # The bound computed from the config, per metric (series of all its samples).
    projects, routes_n, ups = (len(names[k]) for k in ("project", "route", "upstream"))
    buckets_ttfb, buckets_duration = 14, 15  # buckets + +Inf
    bound = {
        "zrproxy_requests": projects * routes_n * ups * len(STATUS_CLASSES) * 2,
        "zrproxy_request_duration_seconds": routes_n * (buckets_duration + 2),
        "zrproxy_time_to_first_byte_seconds": routes_n * (buckets_ttfb + 2),
        "zrproxy_request_bytes": projects * routes_n,
        "zrproxy_response_bytes": projects * routes_n,
        "zrproxy_stream_chunks": routes_n,
        "zrproxy_tokens": projects * routes_n * ups * len(FIXED_ENUMS["type"]),  # type: ignore[arg-type]
        "zrproxy_upstream_errors": ups * len(FIXED_ENUMS["kind"]),  # type: ignore[arg-type]
        "zrproxy_failovers": routes_n,
        "zrproxy_client_aborts": routes_n,
        "zrproxy_rejections": len(FIXED_ENUMS["reason"]) * projects * routes_n,  # type: ignore[arg-type]
        "zrproxy_zero_retention_refusals": len(REFUSAL_FIELDS),
        "zrproxy_in_flight_requests": 1,
        "zrproxy_open_streams": 1,
        "zrproxy_project_info": len(config.projects),
        "zrproxy_audit_records": len(config.projects) * 3,
        "zrproxy_build_info": 1,
        "zrproxy_client_errors": len(CLIENT_ERROR_KINDS),
        "zrproxy_limits_backend": len(FIXED_ENUMS["backend"]),  # type: ignore[arg-type]
        "zrproxy_refused_accepts": 1,
        "zrproxy_accept_pauses": 1,
    }
    assert set(series) <= set(bound), set(series) - set(bound)
    for name, count in series.items():
        assert count <= bound[name], (name, count, bound[name])


async def test_tokens_are_counted_for_streams_and_plain_responses(
    mock: Mock, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy([{"name": "mock", "kind": "openai", "base_url": mock.url}])
    async with aiohttp.ClientSession() as client:
        for stream in (True, False):
            body = orjson.dumps(
                {
                    "model": "mock-n5",
                    "stream": stream,
                    "messages": [{"role": "user", "content": "hello"}],
                }
            )
            async with client.post(
                proxy.url + "/v1/chat/completions", data=body, headers=proxy.auth()
            ) as resp:
                payload = await resp.read()
                assert resp.status == 200
            # The client did not ask for usage in the stream: it gets no usage chunk.
            if stream:
                assert b'"usage":{' not in payload
    tokens = {
        kind: await metric(proxy, "zrproxy_tokens_total", type=kind)
        for kind in ("prompt", "completion")
    }
    # mock-n5 completes with 5 content chunks per response: counted for both responses.
    assert tokens["completion"] == 2 * 5
    # The mock's prompt tokens: characters of the prompt's strings ("user", "hello") // 4 + 1.
    assert tokens["prompt"] == 2 * 3
