"""The `zrproxy` command: `main(argv)` in-process, and `python -m zrproxy` as a real process."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import orjson
import pytest

from tests.processes import LoggedProcess
from zrproxy.cli import main

SECRET = "sk-CLI-TEST-SECRET-0123456789"
ENV_VAR = "ZRPROXY_TEST_CLI_UPSTREAM_KEY"
H1 = "ab" * 32
H2 = "cd" * 32

VALID = f"""
[server]
listen = "127.0.0.1:8080"
admin_listen = "127.0.0.1:9090"

[[upstreams]]
name = "openai-main"
kind = "openai"
base_url = "https://api.openai.com/v1"
api_key_env = "{ENV_VAR}"
zero_data_retention = true

[[upstreams]]
name = "anthropic-main"
kind = "anthropic"
base_url = "https://api.anthropic.com/v1"
api_key_env = "{ENV_VAR}"
zero_data_retention = true

[[routes]]
name = "gpt"
model = "gpt-*"
upstreams = ["openai-main"]

[[routes]]
model = "claude-*"
upstreams = ["anthropic-main"]

[[projects]]
name = "acme"
key_sha256 = ["{H1}"]

[[projects]]
name = "beta"
key_sha256 = ["{H2}"]

[[subprocessors]]
name = "OpenAI, L.L.C."
purpose = "LLM inference"
location = "US"
hosts = ["api.openai.com"]
since = 2026-01-15

[[subprocessors]]
name = "Anthropic, PBC"
purpose = "LLM inference"
location = "US"
hosts = ["api.anthropic.com"]
since = 2026-01-15
"""

# (what goes wrong, the edit to VALID, the key path the error must name)
MISTAKES = [
    ("unknown key", ("[server]\n", "[server]\nlisten_port = 80\n"), "server.listen_port"),
    (
        "unknown upstream key",
        ('kind = "anthropic"\n', 'kind = "anthropic"\ntimeout = 3\n'),
        "upstreams[1].timeout",
    ),
    ("wrong type", ('admin_listen = "127.0.0.1:9090"', "workers = true"), "server.workers"),
    (
        "wrong type (float for bytes)",
        ('admin_listen = "127.0.0.1:9090"', "max_body_bytes = 1.5"),
        "server.max_body_bytes",
    ),
    (
        "undefined upstream",
        ('upstreams = ["anthropic-main"]', 'upstreams = ["anthropic-main", "gone"]'),
        "routes[1].upstreams[1]",
    ),
    ("duplicate names", ('name = "beta"', 'name = "acme"'), "projects[1].name"),
    (
        "duplicate key hash",
        (f'key_sha256 = ["{H2}"]', f'key_sha256 = ["{H1}"]'),
        "projects[1].key_sha256[0]",
    ),
    (
        "missing env var",
        (f'api_key_env = "{ENV_VAR}"', 'api_key_env = "ZRPROXY_TEST_CLI_UNSET"'),
        "upstreams[0].api_key_env",
    ),
    ("bad listen address", ('"127.0.0.1:8080"', '"127.0.0.1"'), "server.listen"),
    ("bad listen port", ('"127.0.0.1:8080"', '"127.0.0.1:70000"'), "server.listen"),
    ("bad kind", ('kind = "anthropic"', 'kind = "claude"'), "upstreams[1].kind"),
]


@pytest.fixture(autouse=True)
def environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, SECRET)
    monkeypatch.delenv("ZRPROXY_TEST_CLI_UNSET", raising=False)


def write(tmp_path: Path, text: str, name: str = "zrproxy.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def mistaken(tmp_path: Path, edit: tuple[str, str]) -> Path:
    old, new = edit
    assert old in VALID
    return write(tmp_path, VALID.replace(old, new, 1))


# --- keygen ---------------------------------------------------------------------------


def keygen(capsys: pytest.CaptureFixture[str], project: str) -> tuple[str, str, str]:
    assert main(["keygen", "--project", project]) == 0
    out = capsys.readouterr().out
    key = re.search(r"API key .*: (\S+)\n", out)
    digest = re.search(r'^key_sha256 = \["([0-9a-f]{64})"\]$', out, re.MULTILINE)
    assert key and digest, out
    return key.group(1), digest.group(1), out


def test_keygen_prints_a_key_and_its_digest(capsys: pytest.CaptureFixture[str]) -> None:
    key, digest, out = keygen(capsys, "x")
    assert hashlib.sha256(key.encode()).hexdigest() == digest
    assert 'name = "x"' in out
    assert len(key) == len("zr-") + 43  # 32 random bytes, URL-safe base64


def test_keygen_gives_a_new_key_every_time(capsys: pytest.CaptureFixture[str]) -> None:
    first = keygen(capsys, "x")
    second = keygen(capsys, "x")
    assert first[0] != second[0]
    assert first[1] != second[1]


# --- check-config ---------------------------------------------------------------------


def test_check_config_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, VALID)
    assert main(["check-config", str(path)]) == 0
    captured = capsys.readouterr()
    assert "config ok" in captured.out
    for name in ("openai-main", "anthropic-main", "gpt", "claude-*", "acme", "beta"):
        assert name in captured.out
    assert "127.0.0.1:8080" in captured.out
    assert SECRET not in captured.out + captured.err
    assert captured.err == ""


@pytest.mark.parametrize(("what", "edit", "key_path"), MISTAKES, ids=[m[0] for m in MISTAKES])
def test_check_config_mistake(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    what: str,
    edit: tuple[str, str],
    key_path: str,
) -> None:
    path = mistaken(tmp_path, edit)
    assert main(["check-config", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert re.fullmatch(rf"config error: {re.escape(key_path)}: [^\n]+\n", captured.err), (
        captured.err
    )
    assert SECRET not in captured.err


def test_check_config_invalid_toml_hides_the_text(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, VALID + f"\nleaked = {SECRET}\n")
    assert main(["check-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"config error: {path}: not valid TOML (at line ")
    assert SECRET not in err and "leaked" not in err


def test_check_config_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", str(tmp_path / "nope.toml")]) == 2
    assert capsys.readouterr().err.startswith("config error: ")


def test_serve_with_a_bad_config_exits_without_starting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    path = mistaken(tmp_path, MISTAKES[0][1])
    assert main(["serve", "--config", str(path), "--listen", "127.0.0.1:0"]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("config error: server.listen_port: ")
    assert "ready" not in captured.err + caplog.text


def test_serve_with_a_bad_listen_override(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, VALID)
    assert main(["serve", "--config", str(path), "--listen", "127.0.0.1:99999"]) == 2
    assert capsys.readouterr().err.startswith("config error: --listen: ")


# --- real processes -------------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "zrproxy", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_check_config_as_a_process(tmp_path: Path) -> None:
    good = run_cli("check-config", str(write(tmp_path, VALID)))
    assert good.returncode == 0, good.stderr
    assert "config ok" in good.stdout
    bad = run_cli("check-config", str(mistaken(tmp_path, MISTAKES[4][1])))
    assert bad.returncode == 2
    assert "config error: routes[1].upstreams[1]: " in bad.stderr
    usage = run_cli("check-config")
    assert usage.returncode == 2  # argparse: missing FILE


@contextlib.contextmanager
def zrproxy_process(*args: str) -> Iterator[LoggedProcess]:
    proc = LoggedProcess(
        [sys.executable, "-m", "zrproxy", *args], env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    try:
        yield proc
    finally:
        proc.stop()


async def test_serve_embedded_default_streams_and_stops_on_sigterm() -> None:
    prompt = "zr-cli-test-prompt-that-must-not-be-logged"
    args = ("serve", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0")
    with zrproxy_process(*args) as proc:
        ready = proc.wait_for(
            r"zrproxy ready: api=(http://127\.0\.0\.1:(\d+)) admin=(http://127\.0\.0\.1:(\d+))", 30
        )
        api, admin = ready.group(1), ready.group(3)
        assert int(ready.group(2)) != 0 and int(ready.group(4)) != 0
        key = proc.wait_for(r"key.*: (zr-\S+)", 10)[1]
        curl = proc.wait_for(r"curl .*", 10)
        assert f"{api}/v1/chat/completions" in curl[0]
        assert f"Bearer {key}" in curl[0]

        body = {
            "model": "mock-n4",
            "stream": True,
            "messages": [{"role": "user", "content": prompt}],
        }
        events: list[bytes] = []
        async with aiohttp.ClientSession() as session:
            async with session.post(
                f"{api}/v1/chat/completions",
                data=orjson.dumps(body),
                headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
            ) as response:
                assert response.status == 200
                assert response.headers["Content-Type"].startswith("text/event-stream")
                async for line in response.content:
                    if line.strip():
                        events.append(line.strip())
            async with session.post(
                f"{api}/v1/chat/completions",
                data=orjson.dumps(body),
                headers={"Authorization": "Bearer zr-not-the-demo-key"},
            ) as response:
                assert response.status == 401
            async with session.get(f"{admin}/healthz") as response:
                assert response.status == 200

        assert events[-1] == b"data: [DONE]"
        assert all(e.startswith(b"data: ") for e in events)
        chunks = [orjson.loads(e[6:]) for e in events[:-1]]
        assert len(chunks) == 1 + 4 + 1  # the role chunk, mock-n4's 4, the finish chunk
        assert all(c["object"] == "chat.completion.chunk" for c in chunks)
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
        assert text

        proc.proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.proc.wait, 30) == 0
        proc.stop()  # the reader has seen everything the process wrote
        logs = proc.output()
        assert prompt not in logs
        assert "zr-not-the-demo-key" not in logs
