"""SIGHUP reloads the config: validated first; a bad one keeps the running one and the log
names the key; a good one applies to new requests while in-flight streams finish on the
old one; with --workers, new workers replace the old behind the same port."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from tests.conftest import config_data
from tests.processes import Proc, mock_process, proxy_process, to_toml, worker_pids
from zrproxy.auth import new_key

CHAT = "/v1/chat/completions"


def _body(model: str, stream: bool) -> bytes:
    return orjson.dumps(
        {"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]}
    )


def _config(mock_url: str, digest: str, **server: Any) -> dict[str, Any]:
    return config_data([{"name": "m", "kind": "openai", "base_url": mock_url}], digest, **server)


def _config_path(proxy: Proc) -> Path:
    argv = Path(f"/proc/{proxy.process.pid}/cmdline").read_bytes().split(b"\0")
    return Path(argv[argv.index(b"--config") + 1].decode())


async def _status(client: aiohttp.ClientSession, url: str, key: str) -> int:
    async with client.post(
        url + CHAT, data=_body("mock", False), headers={"Authorization": f"Bearer {key}"}
    ) as resp:
        await resp.read()
        return resp.status


async def _until_status(url: str, key: str, status: int) -> bool:
    async with aiohttp.ClientSession() as client:
        for _ in range(200):
            if await _status(client, url, key) == status:
                return True
            await asyncio.sleep(0.05)
    return False


def _stderr_after_stop(proxy: Proc) -> str:
    """Everything the proxy logged, once it has stopped (LoggedProcess reads it as it goes)."""
    proxy.log.stop(30)
    return proxy.log.output()


async def _reload_keeps_streams_and_switches_keys(tmp_path: Path, *args: str) -> str:
    old_key, old_digest = new_key()
    new_key_, new_digest = new_key()
    with mock_process() as mock:
        with proxy_process(_config(mock.url, old_digest), tmp_path, *args) as proxy:
            before = worker_pids(proxy.process.pid)
            path = _config_path(proxy)
            async with aiohttp.ClientSession() as client:
                stream = await client.post(
                    proxy.url + CHAT,
                    data=_body("mock-n30-d100", True),
                    headers={"Authorization": f"Bearer {old_key}"},
                )
                assert stream.status == 200
                first = await stream.content.readany()
                assert first
                # The new config: the old key is gone, a new one is in.
                path.write_text(to_toml(_config(mock.url, new_digest)))
                proxy.process.send_signal(signal.SIGHUP)
                assert await _until_status(proxy.url, new_key_, 200)
                # The stream taken under the old config finishes whole.
                rest = first + await stream.content.read()
                assert rest.rstrip().endswith(b"data: [DONE]")
                assert rest.count(b'"content"') >= 30
                stream.release()
                if args:  # the old workers drain, then exit
                    for _ in range(300):
                        if not worker_pids(proxy.process.pid) & before:
                            break
                        await asyncio.sleep(0.1)
                assert await _status(client, proxy.url, old_key) == 401
                # A bad config: refused, the running one stays, the log names the key.
                bad = _config(mock.url, new_digest)
                bad["server"]["bogus_setting"] = 1
                path.write_text(to_toml(bad))
                proxy.process.send_signal(signal.SIGHUP)
                await asyncio.sleep(0.5)
                assert await _status(client, proxy.url, new_key_) == 200
                # A key fixed at start: refused the same way.
                moved = _config(mock.url, new_digest)
                moved["server"]["admin_listen"] = "127.0.0.1:1"
                path.write_text(to_toml(moved))
                proxy.process.send_signal(signal.SIGHUP)
                await asyncio.sleep(0.5)
                assert await _status(client, proxy.url, new_key_) == 200
            if args:
                after = worker_pids(proxy.process.pid)
                assert len(after) == len(before) and not after & before, (before, after)
            return _stderr_after_stop(proxy)


async def test_sighup_reloads_a_single_process(tmp_path: Path) -> None:
    log = await _reload_keeps_streams_and_switches_keys(tmp_path)
    assert "config reloaded" in log
    assert "server.bogus_setting: unknown key" in log
    assert "server.admin_listen: cannot change on reload" in log


async def test_sighup_replaces_workers_behind_the_same_port(tmp_path: Path) -> None:
    log = await _reload_keeps_streams_and_switches_keys(tmp_path, "--workers", "2")
    assert "config reloaded" in log
    assert "server.bogus_setting: unknown key" in log
    assert "server.admin_listen: cannot change on reload" in log


async def test_requests_keep_being_served_while_workers_are_replaced(tmp_path: Path) -> None:
    key, digest = new_key()
    with mock_process() as mock:
        config = _config(mock.url, digest)
        with proxy_process(config, tmp_path, "--workers", "2") as proxy:
            before = worker_pids(proxy.process.pid)
            statuses: list[int] = []
            # The parent and every worker get SIGHUP, as from `systemctl kill -s HUP`: the
            # workers ignore it, the parent replaces them.
            proxy.process.send_signal(signal.SIGHUP)
            for worker in before:
                os.kill(worker, signal.SIGHUP)
            for _ in range(400):  # bounded: until the old workers are gone
                async with aiohttp.ClientSession() as client:  # a new connection each time
                    statuses.append(await _status(client, proxy.url, key))
                if not worker_pids(proxy.process.pid) & before and len(statuses) > 20:
                    break
            assert not worker_pids(proxy.process.pid) & before
            assert set(statuses) == {200}
            assert proxy.process.poll() is None
            log = _stderr_after_stop(proxy)
            assert "exited with" not in log  # no worker died of the SIGHUP


def test_sighup_without_a_config_file_is_ignored() -> None:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "zrproxy",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        assert process.stderr is not None
        for line in process.stderr:
            if b"zrproxy ready" in line:
                break
        process.send_signal(signal.SIGHUP)
        for line in process.stderr:
            if b"no config file to reload" in line:
                break
        assert process.poll() is None
    finally:
        process.terminate()
        process.wait(30)
        if process.stderr is not None:
            process.stderr.close()
