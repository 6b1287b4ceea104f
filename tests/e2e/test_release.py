"""What a user installs and reads: version, help, licence, security policy, changelog,
the Makefile's two install levels, and no server banner on any response."""

from __future__ import annotations

import asyncio
import importlib.metadata
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import Mock, StartProxy
from zrproxy import __version__
from zrproxy.cli import main

ROOT = Path(__file__).resolve().parents[2]


def run_main(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit) as exited:
        main(list(argv))
    assert exited.value.code == 0
    return capsys.readouterr().out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    out = run_main(capsys, "--version")
    assert out == f"zrproxy {__version__}\n"
    assert re.fullmatch(r"\d+\.\d+\.\d+", __version__)
    # The installed package metadata takes its version from the same place.
    assert importlib.metadata.version("zrproxy") == __version__


def test_help_is_written_for_users(capsys: pytest.CaptureFixture[str]) -> None:
    out = run_main(capsys, "--help")
    for command in ("serve", "check-config", "keygen", "mock-upstream"):
        assert re.search(rf"^\s+{command}\b", out, re.MULTILINE), command
    assert "examples:" in out
    assert "zrproxy serve --config" in out
    # The module docstring is for developers; it must not be what users read.
    assert "main(argv)" not in out and "in-process" not in out


@pytest.mark.parametrize("command", ["serve", "check-config", "keygen", "mock-upstream"])
def test_every_command_has_a_description(capsys: pytest.CaptureFixture[str], command: str) -> None:
    out = run_main(capsys, command, "--help")
    usage, _, rest = out.partition("\n\n")
    assert usage.startswith(f"usage: zrproxy {command}")
    description = rest.split("\n\n")[0]
    assert len(description.split()) >= 8, out


def test_license_is_the_apache_2_0_text() -> None:
    text = (ROOT / "LICENSE").read_text()
    assert re.match(r"\s*Apache License\s+Version 2\.0, January 2004\s", text)
    sections = [
        "Definitions",
        "Grant of Copyright License",
        "Grant of Patent License",
        "Redistribution",
        "Submission of Contributions",
        "Trademarks",
        "Disclaimer of Warranty",
        "Limitation of Liability",
        "Accepting Warranty or Additional Liability",
    ]
    for number, title in enumerate(sections, 1):
        assert f"{number}. {title}." in text, title
    assert "END OF TERMS AND CONDITIONS" in text
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["license"] == "Apache-2.0"


def test_security_policy_says_how_to_report_and_what_is_in_scope() -> None:
    text = (ROOT / "SECURITY.md").read_text()
    headings = re.findall(r"^## (.+)$", text, re.MULTILINE)
    assert headings == ["Reporting a vulnerability", "In scope", "Out of scope"]
    assert "zrproxy --version" in text


def test_changelog_has_the_current_version() -> None:
    text = (ROOT / "CHANGELOG.md").read_text()
    versions = re.findall(r"^## (\S+)", text, re.MULTILINE)
    assert versions[0] == "Unreleased"
    assert __version__ in versions


def test_readme_has_no_internal_wording() -> None:
    text = (ROOT / "README.md").read_text().lower()
    for phrase in ("the issue", "issue left open", "the lead", "helper session", "todo"):
        assert phrase not in text, phrase


# --- the Makefile: make run installs the runtime package only -------------------------


def make_dry_run(directory: Path, target: str) -> list[str]:
    # As a user runs it: not as a sub-make of `make test` (which would add
    # "Entering directory" lines and pass its own flags down).
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    result = subprocess.run(
        ["make", "-n", target], cwd=directory, env=env, capture_output=True, text=True, check=True
    )
    return result.stdout.splitlines()


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(ROOT / name, tmp_path / name)
    return tmp_path


def test_make_run_on_a_fresh_machine_installs_only_the_runtime(checkout: Path) -> None:
    lines = make_dry_run(checkout, "run")
    assert any(re.search(r"python3? -m venv \.venv", line) for line in lines), lines
    installs = [line for line in lines if "pip install" in line and "--upgrade pip" not in line]
    assert installs == [".venv/bin/python -m pip install --quiet -e ."], lines
    assert lines[-1] == ".venv/bin/zrproxy serve"


def test_make_test_installs_the_extras(checkout: Path) -> None:
    lines = make_dry_run(checkout, "test")
    assert any("pip install --quiet -e '.[test,bench]'" in line for line in lines), lines


def test_make_run_after_make_test_installs_nothing(checkout: Path) -> None:
    venv = checkout / ".venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").touch()
    # What `make test` leaves behind, per its own recipe (dry-run shows the touch).
    lines = make_dry_run(checkout, ".venv/.installed-stamp")
    touched = next(line for line in lines if line.startswith("touch "))
    for name in touched.split()[1:]:
        (checkout / name).touch()
    assert make_dry_run(checkout, "run") == [".venv/bin/zrproxy serve"]


# --- no server banner -----------------------------------------------------------------


async def raw_request(url: str, data: bytes) -> bytes:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(65536), 10)
    finally:
        writer.close()


async def test_no_server_header_on_any_response(mock: Mock, start_proxy: StartProxy) -> None:
    proxy = await start_proxy([{"name": "mock", "kind": "openai", "base_url": mock.url}])
    body = {"model": "mock-n4", "messages": [{"role": "user", "content": "hi"}]}
    seen: list[int] = []
    async with aiohttp.ClientSession() as s:
        for stream in (False, True):
            async with s.post(
                proxy.url + "/v1/chat/completions",
                json={**body, "stream": stream},
                headers=proxy.auth(),
            ) as resp:
                await resp.read()
                assert "Server" not in resp.headers, resp.headers
                seen.append(resp.status)
        for method, url, headers in [
            ("POST", proxy.url + "/v1/chat/completions", {}),  # 401
            ("GET", proxy.url + "/nowhere", proxy.auth()),  # 404
            ("GET", proxy.url + "/v1/chat/completions", proxy.auth()),  # 405
            ("GET", proxy.url + "/v1/models", proxy.auth()),
            ("GET", proxy.admin_url + "/metrics", {}),
            ("GET", proxy.admin_url + "/healthz", {}),
            ("GET", proxy.admin_url + "/readyz", {}),
            ("GET", proxy.admin_url + "/nowhere", {}),  # the admin app's own 404
        ]:
            async with s.request(method, url, headers=headers) as resp:
                await resp.read()
                assert "Server" not in resp.headers, (url, resp.headers)
                seen.append(resp.status)
    assert seen == [200, 200, 401, 404, 405, 200, 200, 200, 200, 404]
    # aiohttp's own parser-error answer goes through our request class too.
    raw = await raw_request(proxy.url, b"GET /v1/models HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n")
    head = raw.split(b"\r\n\r\n", 1)[0].lower()
    assert re.match(rb"http/1\.[01] 400 ", head), head
    assert b"\r\nserver:" not in head and b"aiohttp" not in raw.lower()
