"""`check-config` as an adopter meets it: every error at once, "did you mean", warnings
for legal but likely wrong settings, `--no-env`, pasted keys refused unprinted; and
`keygen --hash`."""

from __future__ import annotations

import datetime
import hashlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.processes import LoggedProcess, to_toml
from zrproxy.checks import config_warnings
from zrproxy.cli import main
from zrproxy.config import parse_config
from zrproxy.errors import ConfigError, ConfigErrors

ENV = "ZRPROXY_TEST_CHECK_KEY"
PASTED = "sk-proj-Q2hlY2tDb25maWdQYXN0ZWRLZXkxMjM0NTY3ODkw"
H1, H2 = "ab" * 32, "cd" * 32


def clean() -> dict[str, object]:
    """A config that passes without a single warning (the control for every case)."""
    return {
        "server": {"listen": "127.0.0.1:8080", "admin_listen": "127.0.0.1:9090"},
        "upstreams": [
            {
                "name": "openai",
                "kind": "openai",
                "base_url": "https://api.openai.com/v1",
                "api_key_env": ENV,
                "region": "us",
                "zero_data_retention": True,
            },
            {
                "name": "anthropic",
                "kind": "anthropic",
                "base_url": "https://api.anthropic.com/v1",
                "api_key_env": ENV,
                "region": "eu",
                "zero_data_retention": True,
            },
        ],
        "routes": [
            {"model": "gpt-4o*", "upstreams": ["openai"]},
            {"model": "claude-*", "upstreams": ["anthropic"]},
        ],
        "projects": [
            {"name": "acme", "key_sha256": [H1], "models": ["gpt-4o-mini", "claude-*"]},
            {"name": "beta", "key_sha256": [H2], "regions": ["eu", "us"]},
        ],
        "subprocessors": [
            {
                "name": "OpenAI",
                "purpose": "LLM inference",
                "location": "US",
                "hosts": ["api.openai.com"],
                "since": datetime.date(2026, 1, 15),
            },
            {
                "name": "Anthropic",
                "purpose": "LLM inference",
                "location": "US",
                "hosts": ["api.anthropic.com"],
                "since": datetime.date(2026, 1, 15),
            },
        ],
    }


@pytest.fixture(autouse=True)
def environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, "sk-test-upstream-key")
    monkeypatch.delenv("ZRPROXY_TEST_CHECK_UNSET", raising=False)


def check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], data: dict[str, object], *flags: str
) -> tuple[int, str, str]:
    path = tmp_path / "config.toml"
    path.write_text(to_toml(data))
    code = main(["check-config", *flags, str(path)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_the_control_config_has_no_warnings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = check(tmp_path, capsys, clean())
    assert (code, err) == (0, "")
    assert out.startswith("config ok: ")


# --- every error at once ---------------------------------------------------------------


def test_every_error_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = clean()
    data["server"] = {"listen": "127.0.0.1", "idle_timout_s": 5, "workers": 0}
    data["upstreams"][0]["region"] = 7  # type: ignore[index]
    data["upstreams"][1]["kind"] = "claude"  # type: ignore[index]
    data["routes"][1]["upstreams"] = ["anthropic", "gone"]  # type: ignore[index]
    data["projects"][1]["key_sha256"] = ["not-hex"]  # type: ignore[index]
    data["projects"][0]["zero_retention"] = "yes"  # type: ignore[index]
    data["subprocesors"] = [{"name": "x"}]
    code, out, err = check(tmp_path, capsys, data)
    assert code == 2 and out == ""
    lines = err.splitlines()
    assert all(line.startswith("config error: ") for line in lines), lines
    paths = [line.removeprefix("config error: ").split(": ", 1)[0] for line in lines]
    assert paths == [
        "server.listen",
        "server.workers",
        "server.idle_timout_s",
        "upstreams[0].region",
        "upstreams[1].kind",
        "routes[1].upstreams[1]",
        "projects[0].zero_retention",
        "projects[1].key_sha256[0]",
        "subprocesors",
    ]


def test_a_route_naming_a_broken_upstream_is_not_an_extra_error() -> None:
    data = clean()
    data["upstreams"][1]["kind"] = "claude"  # type: ignore[index]
    with pytest.raises(ConfigError) as info:
        parse_config(data, {ENV: "k"})
    assert not isinstance(info.value, ConfigErrors)
    assert info.value.key_path == "upstreams[1].kind"


def test_config_errors_carry_each_error() -> None:
    data = clean()
    data["server"] = {"workers": -1, "mlock": "no"}
    with pytest.raises(ConfigErrors) as info:
        parse_config(data, {ENV: "k"})
    assert [e.key_path for e in info.value.errors] == ["server.mlock", "server.workers"]
    assert info.value.key_path == "server.mlock"  # still a ConfigError: the first one
    assert str(info.value).splitlines() == [str(e) for e in info.value.errors]


@pytest.mark.parametrize(
    ("table", "wrong", "right"),
    [
        ("server", "idle_timout_s", "idle_timeout_s"),
        ("server", "admin-listen", "admin_listen"),
        ("upstreams", "base_uri", "base_url"),
        ("upstreams", "api_key_var", "api_key_env"),
        ("projects", "key_sha", "key_sha256"),
        ("routes", "upstream", "upstreams"),
    ],
)
def test_misspelled_keys_get_did_you_mean(table: str, wrong: str, right: str) -> None:
    data = clean()
    target = data[table] if table == "server" else data[table][0]  # type: ignore[index]
    target[wrong] = target.pop(right, 1)  # type: ignore[union-attr]
    if table == "routes":
        target[right] = ["openai"]  # type: ignore[index]
        target[wrong] = "x"  # type: ignore[index]
    with pytest.raises(ConfigError) as info:
        parse_config(data, {ENV: "k"})
    errors = getattr(info.value, "errors", (info.value,))
    hints = [e.problem for e in errors if e.key_path.endswith("." + wrong)]
    if hints:  # an optional key: its leftover misspelling is reported
        assert hints == [f"unknown key (did you mean '{right}'?)"], errors
    else:  # a required key: its absence is, naming the misspelling
        problems = [e.problem for e in errors if e.key_path.endswith("." + right)]
        assert problems == [f"is required (is '{wrong}' a misspelling of it?)"], errors


def test_an_unlike_key_gets_no_suggestion() -> None:
    data = clean()
    data["server"]["colour"] = "blue"  # type: ignore[index]
    with pytest.raises(ConfigError) as info:
        parse_config(data, {ENV: "k"})
    assert info.value.problem == "unknown key"


# --- api_key_env and --no-env ---------------------------------------------------------


def test_a_pasted_key_is_refused_without_being_printed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = clean()
    data["upstreams"][0]["api_key_env"] = PASTED  # type: ignore[index]
    for flags in ((), ("--no-env",)):
        code, out, err = check(tmp_path, capsys, data, *flags)
        assert code == 2
        assert err.startswith("config error: upstreams[0].api_key_env: must be the NAME of ")
        assert PASTED not in out + err
        assert PASTED[:12] not in out + err


def test_a_pasted_key_is_not_printed_by_serve(tmp_path: Path) -> None:
    data = clean()
    data["upstreams"][0]["api_key_env"] = PASTED  # type: ignore[index]
    path = tmp_path / "config.toml"
    path.write_text(to_toml(data))
    result = subprocess.run(
        [sys.executable, "-m", "zrproxy", "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "upstreams[0].api_key_env" in result.stderr
    assert PASTED not in result.stdout + result.stderr


@pytest.mark.parametrize("name", ["openai_key", "1KEY", "MY-KEY", "KEY NAME", "sk-abc", ""])
def test_api_key_env_must_look_like_a_variable_name(name: str) -> None:
    data = clean()
    data["upstreams"][0]["api_key_env"] = name  # type: ignore[index]
    with pytest.raises(ConfigError) as info:
        parse_config(data, {name: "k", ENV: "k"})
    assert info.value.key_path == "upstreams[0].api_key_env"
    assert name not in info.value.problem or not name


def test_no_env_validates_without_the_secrets(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = clean()
    data["upstreams"][1]["api_key_env"] = "ZRPROXY_TEST_CHECK_UNSET"  # type: ignore[index]
    code, _, err = check(tmp_path, capsys, data)
    assert code == 2 and "upstreams[1].api_key_env" in err
    code, out, err = check(tmp_path, capsys, data, "--no-env")
    assert (code, err) == (0, "")
    assert "config ok" in out
    # Everything else is still checked.
    data["server"] = {"workers": 0}
    code, _, err = check(tmp_path, capsys, data, "--no-env")
    assert code == 2 and "server.workers" in err


# --- warnings -------------------------------------------------------------------------


def edit_base_url(url: str) -> dict[str, object]:
    data = clean()
    data["upstreams"][0]["base_url"] = url  # type: ignore[index]
    # The register must cover the new host, or the config is refused (not warned about).
    data["subprocessors"][0]["hosts"] = [urlsplit(url).hostname]  # type: ignore[index]
    return data


def edit(path: tuple[object, ...], value: object) -> dict[str, object]:
    data = clean()
    target: object = data
    for step in path[:-1]:
        target = target[step]  # type: ignore[index]
    if value is None:
        del target[path[-1]]  # type: ignore[attr-defined]
    else:
        target[path[-1]] = value  # type: ignore[index]
    return data


def with_route(route: dict[str, object], at: int | None = None) -> dict[str, object]:
    data = clean()
    routes = data["routes"]
    assert isinstance(routes, list)
    routes.insert(len(routes) if at is None else at, route)
    return data


def pinned(data: dict[str, object], project: str, regions: list[str]) -> dict[str, object]:
    for entry in data["projects"]:  # type: ignore[attr-defined]
        if entry["name"] == project:
            entry["regions"] = regions
    return data


def outside_regions() -> dict[str, object]:
    data = edit(("projects", 0, "models"), ["gpt-4o-mini"])
    data["projects"][1]["regions"] = ["us"]  # type: ignore[index]
    return data


WARNINGS = [
    (
        "route shadowed",
        with_route({"model": "gpt-4o-mini*", "upstreams": ["openai"]}),
        "routes[2].model",
    ),
    (
        "catch-all early",
        with_route({"model": "*", "upstreams": ["openai"]}, at=1),
        "routes[2].model",
    ),
    (
        "route no project may use",
        pinned(with_route({"model": "o1*", "upstreams": ["openai"]}), "beta", ["eu"]),
        "routes[2]",
    ),
    ("route outside every project's regions", outside_regions(), "routes[1]"),
    (
        "allowlist glob no route serves",
        edit(("projects", 0, "models"), ["gpt-4o*", "o3"]),
        "projects[0].models[1]",
    ),
    ("base_url without /v1", edit_base_url("https://api.openai.com"), "upstreams[0].base_url"),
    (
        "base_url with an endpoint",
        edit_base_url("https://api.openai.com/v1/chat/completions"),
        "upstreams[0].base_url",
    ),
    (
        "base_url with /messages",
        edit_base_url("https://gw.example/v1/messages"),
        "upstreams[0].base_url",
    ),
    ("idle > total", edit(("server", "idle_timeout_s"), 900), "server.idle_timeout_s"),
    ("too many workers", edit(("server", "workers"), 65), "server.workers"),
    (
        "plain http to a remote host",
        edit_base_url("http://10.0.0.5:8000/v1"),
        "upstreams[0].base_url",
    ),
    (
        "overrides on an Anthropic upstream",
        edit(("upstreams", 1, "request_overrides"), {"metadata": {"user_id": "x"}}),
        "upstreams[1].request_overrides",
    ),
    ("provider host without key", edit(("upstreams", 1, "api_key_env"), None), "upstreams[1]"),
    ("provider subdomain without key", edit(("upstreams", 0, "api_key_env"), None), "upstreams[0]"),
]


@pytest.mark.parametrize(("what", "data", "key_path"), WARNINGS, ids=[w[0] for w in WARNINGS])
def test_warning(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    what: str,
    data: dict[str, object],
    key_path: str,
) -> None:
    code, out, err = check(tmp_path, capsys, data)
    assert code == 0 and "config ok" in out
    # Projects a route can never serve are policy warnings, tested in test_regions.py.
    lines = [line for line in err.splitlines() if not line.startswith("warning: project '")]
    assert [line.split(": ", 2)[1] for line in lines] == [key_path], err
    assert lines[0].startswith("warning: ")


def test_base_urls_that_are_fine(tmp_path: Path) -> None:
    for url in (
        "https://eu.api.openai.com/v1",
        "https://10.0.0.5:8000/openai/v1",
        "https://x/v1beta/",
    ):
        config = parse_config(edit_base_url(url), {ENV: "k"})
        assert not [w for w in config_warnings(config, 2) if "base_url" in w.key_path], url


def test_worker_warning_follows_the_cpu_count() -> None:
    config = parse_config(edit(("server", "workers"), 9), {ENV: "k"})
    assert [w.key_path for w in config_warnings(config, 2)] == ["server.workers"]
    assert config_warnings(config, 4) == []


# --- keygen --hash --------------------------------------------------------------------


def test_keygen_hash_prints_the_digest_of_a_key_on_stdin(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert main(["keygen", "--project", "p"]) == 0
    printed = capsys.readouterr().out
    key = re.search(r"API key .*: (\S+)\n", printed).group(1)  # type: ignore[union-attr]
    digest = re.search(r'key_sha256 = \["([0-9a-f]{64})"\]', printed).group(1)  # type: ignore[union-attr]
    monkeypatch.setattr(sys, "stdin", io.StringIO(key + "\n"))
    assert main(["keygen", "--hash"]) == 0
    captured = capsys.readouterr()
    assert captured.out == f'key_sha256 = ["{digest}"]\n'
    assert key not in captured.out + captured.err


def test_keygen_hash_as_a_process() -> None:
    key = "zr-existing-key-from-another-system"
    result = subprocess.run(
        [sys.executable, "-m", "zrproxy", "keygen", "--hash"],
        input=key,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0
    assert result.stdout == f'key_sha256 = ["{hashlib.sha256(key.encode()).hexdigest()}"]\n'
    assert key not in result.stderr


def test_keygen_hash_without_a_key(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n"))
    assert main(["keygen", "--hash"]) == 2
    assert capsys.readouterr().out == ""


def test_serve_logs_the_warnings_at_start(tmp_path: Path) -> None:
    data = edit(("server", "idle_timeout_s"), 900)
    data["server"] = {**data["server"], "listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0"}  # type: ignore[dict-item]
    path = tmp_path / "config.toml"
    path.write_text(to_toml(data))
    proc = LoggedProcess(
        [sys.executable, "-m", "zrproxy", "serve", "--config", str(path)],
        env={**os.environ, ENV: "sk-test-upstream-key"},
    )
    try:
        line = proc.wait_for(r"WARNING zrproxy .*: config: (\S+): ", 60)
        assert line.group(1) == "server.idle_timeout_s"
        proc.wait_for("zrproxy ready", 60)
    finally:
        assert proc.stop() == 0
