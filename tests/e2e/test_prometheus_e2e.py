"""A real Prometheus scrapes a real zrproxy: metrics, alert rules and dashboard queries end to end.

Starts the bundled mock upstream and `python -m zrproxy serve` as subprocesses on
127.0.0.1 port 0, and the Debian `prometheus` binary with a 1 s scrape interval and
deploy/prometheus/alerts.yaml loaded, sends traffic with a project key, then asks
Prometheus's HTTP API what it saw. Prometheus's TSDB lives under /dev/shm when it can.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from hashlib import sha256
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.fakes import free_port
from tests.processes import LoggedProcess

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yaml"
DASHBOARD = ROOT / "deploy" / "grafana" / "zrproxy-dashboard.json"
POLL_LIMIT_S = 30.0
# Loopback only: never let an http_proxy in the environment see this traffic.
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
CHILD_ENV = {**os.environ, "no_proxy": "*", "NO_PROXY": "*"}


def http_get(url: str, timeout_s: float = 5) -> tuple[int, bytes]:
    try:
        with OPENER.open(url, timeout=timeout_s) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()


def eventually(check: Callable[[], str | None], what: str) -> None:
    """Poll `check` (None = satisfied, else what is still missing) for up to POLL_LIMIT_S."""
    deadline = time.monotonic() + POLL_LIMIT_S
    while (missing := check()) is not None:
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: still {missing} after {POLL_LIMIT_S:.0f} s")
        time.sleep(0.5)


class Prometheus:
    def __init__(self, base: str) -> None:
        self.base = base

    def api(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        status, body = http_get(f"{self.base}/api/v1/{path}?{query}")
        payload = json.loads(body)
        assert status == 200 and payload["status"] == "success", (path, params, payload)
        return payload["data"]

    def vector(self, promql: str) -> dict[tuple[tuple[str, str], ...], float]:
        data = self.api("query", query=promql)
        assert data["resultType"] == "vector", data
        return {
            tuple(sorted(item["metric"].items())): float(item["value"][1])
            for item in data["result"]
        }

    def scalar(self, promql: str) -> float | None:
        values = list(self.vector(promql).values())
        assert len(values) <= 1, values
        return values[0] if values else None


@pytest.fixture
def shm_dir() -> Iterator[Path]:
    """A scratch directory in RAM when /dev/shm is writable (TSDB files never touch disk)."""
    parent = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    path = Path(tempfile.mkdtemp(prefix="zrproxy-e2e-", dir=parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def start_prometheus(binary: str, workdir: Path, target: str) -> tuple[LoggedProcess, Prometheus]:
    shutil.copy(ALERTS, workdir / "alerts.yaml")
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": ["alerts.yaml"],
        "scrape_configs": [{"job_name": "zrproxy", "static_configs": [{"targets": [target]}]}],
    }
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    for _ in range(3):  # a free port can be taken between probe and bind: retry
        port = free_port()
        proc = LoggedProcess(
            [
                binary,
                f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            env=CHILD_ENV,
        )
        deadline = time.monotonic() + POLL_LIMIT_S
        while proc.proc.poll() is None and time.monotonic() < deadline:
            try:
                if http_get(f"http://127.0.0.1:{port}/-/ready", timeout_s=1)[0] == 200:
                    return proc, Prometheus(f"http://127.0.0.1:{port}")
            except OSError:
                pass
            time.sleep(0.2)
        proc.stop()
        if "address already in use" not in proc.output():
            raise AssertionError(f"prometheus did not become ready:\n{proc.output()}")
    raise AssertionError("prometheus found no free port in 3 tries")


def chat(api: str, key: str, model: str, content: str, stream: bool) -> tuple[int, bytes]:
    body = json.dumps(
        {"model": model, "stream": stream, "messages": [{"role": "user", "content": content}]}
    ).encode()
    request = urllib.request.Request(
        f"{api}/v1/chat/completions",
        data=body,
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    try:
        with OPENER.open(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()


def dashboard_queries() -> list[str]:
    """Every dashboard expr as Grafana sends it with the variables at "All"."""
    data = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return [
        target["expr"]
        .replace("$__rate_interval", "1m")
        .replace("$project", ".*")
        .replace("$route", ".*")
        for panel in data["panels"]
        if panel["type"] != "row"
        for target in panel["targets"]
    ]


def test_prometheus_scrapes_proxy_traffic(tmp_path: Path, shm_dir: Path) -> None:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus not installed (Debian package `prometheus`; `make system-deps`)")
    key = "zrp-" + secrets.token_urlsafe(32)
    # Content that must never reach a metric: a unique marker in the prompt and the model.
    marker = "zz" + secrets.token_hex(8)
    procs: list[LoggedProcess] = []
    try:
        mock = LoggedProcess(
            [sys.executable, "-m", "zrproxy", "mock-upstream", "--listen", "127.0.0.1:0"],
            env=CHILD_ENV,
        )
        procs.append(mock)
        upstream = mock.wait_for(r"mock upstream listening on (http://\S+)").group(1)
        config = tmp_path / "config.toml"
        config.write_text(
            "[server]\n"
            'listen = "127.0.0.1:0"\n'
            'admin_listen = "127.0.0.1:0"\n'
            "drain_timeout_s = 5\n\n"
            "[[upstreams]]\n"
            'name = "mock"\n'
            'kind = "openai"\n'
            f'base_url = "{upstream}/v1"\n'
            "zero_data_retention = true\n\n"
            "[[routes]]\n"
            'name = "all"\n'
            'model = "*"\n'
            'upstreams = ["mock"]\n\n'
            "[[projects]]\n"
            'name = "e2e"\n'
            f'key_sha256 = ["{sha256(key.encode()).hexdigest()}"]\n'
        )
        proxy = LoggedProcess(
            [sys.executable, "-m", "zrproxy", "serve", "--config", str(config)], env=CHILD_ENV
        )
        procs.append(proxy)
        ready = proxy.wait_for(r"zrproxy ready: api=(http://\S+) admin=http://(\S+)")
        api, admin = ready.group(1), ready.group(2)
        assert http_get(f"http://{admin}/readyz")[0] == 200

        prometheus_proc, prom = start_prometheus(binary, shm_dir, admin)
        procs.append(prometheus_proc)

        # Traffic: one bad key first, then streamed and plain completions.
        assert chat(api, "zrp-wrong-" + marker, "mock", marker, stream=False)[0] == 401
        plain, streamed = 3, 2
        for _ in range(plain):
            status, body = chat(api, key, f"mock-n4-{marker}", marker, stream=False)
            assert status == 200, body[:200]
        for _ in range(streamed):
            status, body = chat(api, key, f"mock-n4-{marker}", marker, stream=True)
            assert status == 200 and b"data: [DONE]" in body, body[:200]

        def traffic_seen() -> str | None:
            total = prom.scalar("sum(zrproxy_requests_total)")
            if total is None or total < plain + streamed:
                return f"sum(zrproxy_requests_total) = {total}"
            return None

        eventually(traffic_seen, "Prometheus never showed the proxy's traffic")

        def counts_exact() -> str | None:
            by_stream = prom.vector(
                "sum by (project, route, upstream, stream)"
                ' (zrproxy_requests_total{status_class="2xx"})'
            )
            want = {
                (("project", "e2e"), ("route", "all"), ("stream", stream), ("upstream", "mock")): n
                for stream, n in (("false", plain), ("true", streamed))
            }
            if by_stream != want:
                return f"2xx by stream = {by_stream}"
            auth = prom.scalar('sum(zrproxy_rejections_total{reason="auth"})')
            if auth != 1:
                return f"auth rejections = {auth}"
            ttfb = prom.scalar('sum(zrproxy_time_to_first_byte_seconds_count{route="all"})')
            if ttfb != plain + streamed:
                return f"ttfb observations = {ttfb}"
            up = prom.scalar('up{job="zrproxy"}')
            return None if up == 1 else f"up = {up}"

        eventually(counts_exact, "the scraped counters do not match the traffic sent")

        # Zero retention: nothing from the request (prompt, model, key) in any series.
        series = prom.api("series", **{"match[]": '{__name__=~"zrproxy_.+"}'})
        assert series, "no zrproxy series at all"
        dumped = json.dumps(series)
        assert marker not in dumped and key not in dumped
        for labels in series:
            assert labels.get("project", "e2e") in {"e2e", "none"}, labels
            assert labels.get("route", "all") in {"all", "none"}, labels
            assert labels.get("upstream", "mock") in {"mock", "none"}, labels

        # Every dashboard query runs against real data; the first panel (requests by status
        # class) shows the 2xx series once it has two samples for rate().
        queries = dashboard_queries()
        assert "by (status_class)" in queries[0]
        for promql in queries:
            prom.api("query", query=promql)

        def first_panel_has_2xx() -> str | None:
            by_class = prom.vector(queries[0])
            return None if (("status_class", "2xx"),) in by_class else f"{by_class}"

        eventually(first_panel_has_2xx, "the status-class panel shows no 2xx series")

        # Every alert rule evaluates cleanly against the real series.
        def rules_healthy() -> str | None:
            groups = prom.api("rules")["groups"]
            rules = [r for g in groups for r in g["rules"]]
            if not rules:
                return "no rules loaded"
            bad = [
                (r["name"], r["health"], r.get("lastError")) for r in rules if r["health"] != "ok"
            ]
            return f"unhealthy rules {bad}" if bad else None

        eventually(rules_healthy, "alert rules do not evaluate")

        # The proxy drains and exits 0 on SIGTERM, as Kubernetes and systemd expect.
        assert proxy.stop() == 0, proxy.output()
        assert marker not in proxy.output() and key not in proxy.output()
    finally:
        for proc in reversed(procs):
            proc.stop()
