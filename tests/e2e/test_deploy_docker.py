"""deploy/Dockerfile and its dockerignore, read offline: the image's shape, the build context
the allowlist sends, a wheel built from that context, and the HEALTHCHECK run against a
local server (tests/e2e/test_deploy_image.py runs the install steps themselves)."""

from __future__ import annotations

import http.server
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.deploy_support import (
    DEPLOY,
    ROOT,
    dockerfile_cmd,
    dockerfile_instructions,
    final_stage,
    only,
    zrproxy_container,
)


def test_dockerfile_image_shape() -> None:
    instructions = dockerfile_instructions()
    args = dict(a.split("=", 1) for ins, a in instructions if ins == "ARG" and "=" in a)
    assert args["PYTHON_IMAGE"].startswith("python:3.11-slim")
    final = final_stage()
    assert final[0] == ("FROM", "${PYTHON_IMAGE}")
    env = " ".join(a for ins, a in final if ins == "ENV")
    assert "PYTHONDONTWRITEBYTECODE=1" in env
    users = [a for ins, a in final if ins == "USER"]
    assert users == ["10001:10001"], "a numeric non-root USER lets kubelet check runAsNonRoot"
    assert (
        int(users[0].split(":")[0])
        == zrproxy_container(only("Deployment"))["securityContext"]["runAsUser"]
    )
    assert [a for ins, a in final if ins == "EXPOSE"] == ["8080 9090"]
    assert dockerfile_cmd() == ["zrproxy", "serve", "--config", "/etc/zrproxy/config.toml"]
    for ins, a in instructions:
        if ins == "RUN" and "pip install" in a:
            assert "--no-cache-dir" in a


def test_dockerignore_sends_only_what_the_build_needs() -> None:
    lines = [
        line.strip()
        for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "allowlist: ignore everything, then re-include"
    included = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    with (ROOT / "pyproject.toml").open("rb") as f:
        project = tomllib.load(f)["project"]
    assert {"pyproject.toml", "zrproxy", project["readme"]} <= included


def test_docker_context_builds_a_wheel_with_the_cmd(tmp_path: Path) -> None:
    # What the image's `pip install .` sees: the files the allowlist re-includes.
    if importlib.util.find_spec("hatchling") is None:
        pytest.skip("hatchling not installed here: cannot build offline")
    context = tmp_path / "context"
    context.mkdir()
    for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines():
        if line.startswith("!") and (ROOT / line[1:]).exists():
            source = ROOT / line[1:].rstrip("/")
            if source.is_dir():
                ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
                shutil.copytree(source, context / source.name, ignore=ignore)
            else:
                shutil.copy(source, context)
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "-q", "--no-cache-dir"]
    offline = ["--no-deps", "--no-build-isolation", "--no-index"]
    dist = tmp_path / "dist"
    out = subprocess.run(
        [*pip_wheel, *offline, "-w", str(dist), str(context)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    (wheel,) = dist.glob("zrproxy-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        scripts = archive.read(entry_points).decode()
    assert "zrproxy/cli.py" in names
    assert re.search(r"^zrproxy = zrproxy\.cli:run$", scripts, re.MULTILINE), scripts
    assert dockerfile_cmd()[0] == "zrproxy"


class _StatusHandler(http.server.BaseHTTPRequestHandler):
    status = 200
    paths: list[str] = []  # noqa: RUF012 - shared with the test on purpose

    def do_GET(self) -> None:
        type(self).paths.append(self.path)
        self.send_response(type(self).status)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def status_server() -> Iterator[tuple[int, type[_StatusHandler]]]:
    handler = type("Handler", (_StatusHandler,), {"status": 200, "paths": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_dockerfile_healthcheck_runs(status_server: tuple[int, type[_StatusHandler]]) -> None:
    port, handler = status_server
    checks = [a for ins, a in final_stage() if ins == "HEALTHCHECK"]
    assert len(checks) == 1
    exec_form = checks[0].split(" CMD ", 1)[1]
    command = json.loads(exec_form)
    assert command[:2] == ["python", "-c"], "slim has no curl; the check must use python"
    code = command[2]
    assert "http://127.0.0.1:9090/healthz" in code
    local = code.replace("127.0.0.1:9090", f"127.0.0.1:{port}")

    def run() -> int:
        env = {**os.environ, "no_proxy": "*", "NO_PROXY": "*"}
        return subprocess.run(
            [sys.executable, "-c", local], capture_output=True, timeout=30, env=env, check=False
        ).returncode

    assert run() == 0
    assert handler.paths == ["/healthz"]
    handler.status = 503
    assert run() == 1
    handler.status = 200
    local = code.replace("127.0.0.1:9090", "127.0.0.1:1")  # nothing listens there
    assert run() == 1
