"""Log lines of a real `zrproxy serve`: text or JSON lines, each naming the process that
speaks (pid, worker number), and the start-up line that says which hardening is on."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from pathlib import Path

import pytest

from tests.processes import LoggedProcess, to_toml
from zrproxy.logs import JSON_FIELDS, setup

TEXT_LINE = re.compile(
    r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (?P<level>DEBUG|INFO|WARNING|ERROR|CRITICAL) "
    r"(?P<logger>\S+) \[pid (?P<pid>\d+) worker (?P<worker>\d+)\]: (?P<message>.*)"
)
HARDENING = "hardening: core dumps off, dumpable off, mlock off, scrub mode {}, allocator malloc"


def write_config(tmp_path: Path, **server: object) -> Path:
    path = tmp_path / "zrproxy.toml"
    path.write_text(
        to_toml(
            {
                "server": {"listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0", **server},
                # Never contacted: these tests send no requests.
                "upstreams": [{"name": "u", "kind": "openai", "base_url": "http://127.0.0.1:9/v1"}],
                "routes": [{"model": "*", "upstreams": ["u"]}],
                "projects": [{"name": "acme", "key_sha256": ["ab" * 32]}],
            }
        )
    )
    return path


def serve_and_stop(config: Path, *args: str) -> tuple[int, list[str]]:
    """Start `zrproxy serve`, wait until ready, SIGTERM it; its pid and its log lines."""
    proc = LoggedProcess([sys.executable, "-m", "zrproxy", "serve", "--config", str(config), *args])
    try:
        proc.wait_for("zrproxy ready", 90)
    finally:
        assert proc.stop() == 0, proc.output()
    lines = proc.output().splitlines()
    assert any("stopped" in line for line in lines), lines
    return proc.proc.pid, lines


def parse_json(lines: list[str]) -> list[dict[str, object]]:
    records = []
    for line in lines:
        record = json.loads(line)  # every line is one JSON object
        assert isinstance(record, dict)
        assert tuple(record) == JSON_FIELDS, record
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", str(record["time"]))
        records.append(record)
    return records


def test_text_lines_name_the_process(tmp_path: Path) -> None:
    pid, lines = serve_and_stop(write_config(tmp_path))
    parsed = [TEXT_LINE.fullmatch(line) for line in lines]
    assert all(parsed), lines
    assert {(int(m["pid"]), int(m["worker"])) for m in parsed if m} == {(pid, 0)}
    messages = [m["message"] for m in parsed if m]
    assert HARDENING.format("off") in messages
    assert any(m.startswith("zrproxy ready: api=http://127.0.0.1:") for m in messages)


def test_json_lines_have_fixed_fields(tmp_path: Path) -> None:
    pid, lines = serve_and_stop(write_config(tmp_path, log_format="json"))
    records = parse_json(lines)
    assert {(r["pid"], r["worker"]) for r in records} == {(pid, 0)}
    assert {r["level"] for r in records} <= {"INFO", "WARNING"}
    assert {r["logger"] for r in records} == {"zrproxy"}
    messages = [str(r["message"]) for r in records]
    assert HARDENING.format("off") in messages
    assert any(m.startswith("zrproxy ready: api=") for m in messages)


@pytest.mark.slow
def test_each_worker_says_who_it_is(tmp_path: Path) -> None:
    pid, lines = serve_and_stop(write_config(tmp_path, log_format="json", workers=2))
    records = parse_json(lines)
    speakers = {(r["pid"], r["worker"]) for r in records}
    workers = {w: p for p, w in speakers if w != 0}
    assert set(workers) == {1, 2}, speakers
    assert pid not in workers.values() and len(set(workers.values())) == 2
    # The parent and each worker report their own hardening, each under its own name.
    hardened = {(r["pid"], r["worker"]) for r in records if r["message"] == HARDENING.format("off")}
    assert hardened == {(pid, 0), *((p, w) for w, p in workers.items())}


def test_scrub_mode_is_reported(tmp_path: Path) -> None:
    _, lines = serve_and_stop(write_config(tmp_path), "--scrub-memory")
    messages = [m["message"] for line in lines if (m := TEXT_LINE.fullmatch(line))]
    assert HARDENING.format("on") in messages, lines
    assert HARDENING.format("off") not in messages


def test_exceptions_are_logged_by_type_only(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved = root.handlers[:]
    for handler in saved:
        root.removeHandler(handler)
    try:
        for log_format in ("text", "json"):
            setup(log_format, worker=3)
            try:
                raise ValueError("secret-content-7c1f")
            except ValueError:
                logging.getLogger("zrproxy.test").exception("it failed")
            err = capsys.readouterr().err
            assert "it failed" in err and "ValueError" in err
            assert "secret-content-7c1f" not in err and "Traceback" not in err
            assert ("worker 3]" in err) if log_format == "text" else ('"worker": 3' in err)
    finally:
        setup("text")  # our handler out again, then the saved ones back
        for handler in root.handlers[:]:
            root.removeHandler(handler)
        for handler in saved:
            root.addHandler(handler)


def test_mlock_is_reported_when_memory_is_locked(tmp_path: Path) -> None:
    proc = LoggedProcess(
        [
            sys.executable,
            "-m",
            "zrproxy",
            "serve",
            "--config",
            str(write_config(tmp_path, mlock=True)),
        ]
    )
    try:
        try:
            proc.wait_for("zrproxy ready", 90)
        except AssertionError:
            if "memory locking was refused" in proc.output():
                pytest.skip("this process may not lock its memory (RLIMIT_MEMLOCK, CAP_IPC_LOCK)")
            raise
    finally:
        proc.stop()
    assert (
        "hardening: core dumps off, dumpable off, mlock on, scrub mode off, allocator malloc"
        in proc.output()
    )


@pytest.mark.parametrize("allocator", ["malloc", "pymalloc"])
def test_the_allocator_is_the_configured_one(tmp_path: Path, allocator: str) -> None:
    # malloc (the default) re-executes the process under PYTHONMALLOC=malloc, the only
    # way to choose the allocator; pymalloc leaves the interpreter as it started.
    config = write_config(tmp_path, allocator=allocator)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONMALLOC"}
    proc = LoggedProcess(
        [sys.executable, "-m", "zrproxy", "serve", "--config", str(config)], env=env
    )
    try:
        proc.wait_for("zrproxy ready", 90)
        with open(f"/proc/{proc.proc.pid}/environ", "rb") as f:
            environ = f.read().split(b"\0")
    finally:
        assert proc.stop() == 0, proc.output()
    assert (b"PYTHONMALLOC=malloc" in environ) == (allocator == "malloc")
    line = (
        f"hardening: core dumps off, dumpable off, mlock off, scrub mode off, allocator {allocator}"
    )
    assert line in proc.output()
