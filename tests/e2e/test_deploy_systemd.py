"""deploy/systemd/zrproxy.service: its hardening settings, systemd-analyze verify and security
(skipped with the reason when unavailable), and MemoryDenyWriteExecute=yes proved on the
real proxy under the seccomp filter systemd installs for it."""

from __future__ import annotations

import json
import os
import platform
import re
import secrets
import subprocess
import sys
import urllib.request
from hashlib import sha256
from pathlib import Path

import pytest

from tests.deploy_support import (
    UNIT,
    require_tool,
)
from tests.processes import LoggedProcess
from zrproxy.config import ServerConfig


def unit_settings() -> list[tuple[str, str, str]]:
    """(section, key, value) for every assignment in the unit, duplicates kept."""
    out: list[tuple[str, str, str]] = []
    section = ""
    for raw in UNIT.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.append((section, key.strip(), value.strip()))
    return out


def test_unit_hardening_settings() -> None:
    settings = unit_settings()
    service = {key: value for section, key, value in settings if section == "Service"}
    expected = {
        "ExecStart": "/usr/local/bin/zrproxy serve --config /etc/zrproxy/config.toml",
        "LimitCORE": "0",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes",
        "AmbientCapabilities": "CAP_IPC_LOCK",
        "CapabilityBoundingSet": "CAP_IPC_LOCK",
        "LimitMEMLOCK": "infinity",
        "KillSignal": "SIGTERM",
        "Restart": "on-failure",
        "UMask": "0077",
        "DynamicUser": "yes",
    }
    assert {k: service.get(k) for k in expected} == expected
    assert set(service["RestrictAddressFamilies"].split()) == {"AF_INET", "AF_INET6", "AF_UNIX"}
    assert service["EnvironmentFile"].lstrip("-").startswith("/etc/zrproxy/")
    assert service["MemoryDenyWriteExecute"] in ("yes", "no"), "decide it explicitly"
    # PrivateUsers= would leave CAP_IPC_LOCK powerless in the host user namespace.
    assert "PrivateUsers" not in service
    assert float(service["TimeoutStopSec"]) > ServerConfig().drain_timeout_s


def stub_unit(tmp_path: Path, unit_text: str) -> Path:
    """`unit_text` with /usr/local/bin/zrproxy pointing at an executable stub in tmp_path.

    systemd-analyze verify fails a unit whose ExecStart binary does not exist, and this
    machine has no /usr/local/bin/zrproxy; everything else is verified as shipped.
    """
    stub = tmp_path / "zrproxy"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    assert unit_text.count("/usr/local/bin/zrproxy") >= 2
    path = tmp_path / "zrproxy.service"
    path.write_text(unit_text.replace("/usr/local/bin/zrproxy", str(stub)))
    return path


def systemd_verify(path: Path) -> subprocess.CompletedProcess[str]:
    analyze = require_tool("systemd-analyze", "systemd-analyze not installed")
    env = {**os.environ, "SYSTEMD_LOG_TARGET": "console", "SYSTEMD_LOG_COLOR": "0"}
    return subprocess.run(
        [analyze, "verify", "--man=no", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


@pytest.fixture
def verify_works(tmp_path: Path) -> None:
    """Skip unless systemd-analyze verify passes a trivial unit (it needs no running systemd)."""
    control = tmp_path / "control"
    control.mkdir()
    unit = "[Service]\nExecStartPre=/usr/local/bin/zrproxy x\nExecStart=/usr/local/bin/zrproxy\n"
    out = systemd_verify(stub_unit(control, unit))
    if out.returncode != 0 or out.stderr.strip():
        pytest.skip(f"systemd-analyze verify cannot run here: {out.stderr.strip()[:300]}")


@pytest.mark.usefixtures("verify_works")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    out = systemd_verify(stub_unit(tmp_path, UNIT.read_text(encoding="utf-8")))
    # verify exits 0 on unknown keys ("ignoring"), so any message at all is a failure.
    assert (out.returncode, out.stdout + out.stderr) == (0, "")


@pytest.mark.usefixtures("verify_works")
def test_systemd_analyze_verify_as_shipped() -> None:
    out = systemd_verify(UNIT)
    if Path("/usr/local/bin/zrproxy").exists():
        assert (out.returncode, out.stderr) == (0, "")
        return
    # Without the binary installed the only complaint may be that it is missing.
    complaints = [line for line in out.stderr.splitlines() if line.strip()]
    assert complaints, "verify should notice that /usr/local/bin/zrproxy is missing"
    for line in complaints:
        assert "/usr/local/bin/zrproxy is not executable" in line, line


@pytest.mark.usefixtures("verify_works")
def test_systemd_analyze_verify_can_fail(tmp_path: Path) -> None:
    text = UNIT.read_text(encoding="utf-8").replace("ProtectHome=yes", "ProtectHomes=yes")
    out = systemd_verify(stub_unit(tmp_path, text))
    assert "Unknown key 'ProtectHomes'" in out.stderr, out.stderr


def test_systemd_security_exposure(tmp_path: Path) -> None:
    analyze = require_tool("systemd-analyze", "systemd-analyze not installed")
    path = stub_unit(tmp_path, UNIT.read_text(encoding="utf-8"))
    out = subprocess.run(
        [analyze, "security", "--offline=true", "--threshold=20", "--no-pager", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if "offline" in out.stderr and "unrecognized" in out.stderr:
        pytest.skip("this systemd-analyze has no `security --offline` (systemd < 250)")
    overall = re.search(r"Overall exposure level for \S+: ([\d.]+)", out.stdout)
    assert overall is not None, out.stdout + out.stderr
    assert float(overall.group(1)) <= 2.0, out.stdout
    assert out.returncode == 0


# --- MemoryDenyWriteExecute=yes, proved on the real process ---------------------------

# The seccomp rule systemd installs for MemoryDenyWriteExecute=yes on x86-64 (systemd
# 252's seccomp_memory_deny_write_execute): EPERM for mmap with PROT_WRITE|PROT_EXEC,
# mprotect/pkey_mprotect adding PROT_EXEC, and shmat with SHM_EXEC. The wrapper installs
# it, proves it bites with a W+X mapping, then execs the command (filters survive exec).
MDWE_WRAPPER = r"""
import ctypes, mmap, os, struct, sys
LD, JEQ, AND, RET = 0x20, 0x15, 0x54, 0x06
ALLOW, DENY = 0x7FFF0000, 0x00050000 | 1
AUDIT_ARCH_X86_64, ARG2 = 0xC000003E, 16 + 2 * 8
RULES = [(9, 6), (10, 4), (329, 4), (30, 0o100000)]  # mmap, mprotect, pkey_mprotect, shmat
prog = [(LD, 0, 0, 4), (JEQ, 0, 6 * len(RULES), AUDIT_ARCH_X86_64)]
for nr, mask in RULES:
    prog += [(LD, 0, 0, 0), (JEQ, 0, 4, nr), (LD, 0, 0, ARG2), (AND, 0, 0, mask),
             (JEQ, 0, 1, mask), (RET, 0, 0, DENY)]
prog.append((RET, 0, 0, ALLOW))
raw = b"".join(struct.pack("=HBBI", *ins) for ins in prog)
buf = ctypes.create_string_buffer(raw, len(raw))
class Fprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
fprog = Fprog(len(prog), ctypes.addressof(buf))
libc = ctypes.CDLL(None, use_errno=True)
libc.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
    sys.exit("no_new_privs failed")
if libc.prctl(22, 2, ctypes.addressof(fprog), 0, 0) != 0:  # PR_SET_SECCOMP, FILTER
    sys.exit("seccomp failed: errno %d" % ctypes.get_errno())
mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE).close()
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
except PermissionError:
    print("mdwe: W+X mapping refused", file=sys.stderr, flush=True)
else:
    sys.exit("mdwe: W+X mapping was allowed")
if len(sys.argv) > 1:
    os.execv(sys.argv[1], sys.argv[1:])
"""

needs_x86_64 = pytest.mark.skipif(
    sys.platform != "linux" or platform.machine() != "x86_64",
    reason="the MemoryDenyWriteExecute filter here is written for Linux x86-64",
)


@needs_x86_64
def test_mdwe_filter_refuses_write_execute_memory() -> None:
    out = subprocess.run(
        [sys.executable, "-c", MDWE_WRAPPER], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    assert "W+X mapping refused" in out.stderr


@needs_x86_64
@pytest.mark.slow
@pytest.mark.timeout(90)
@pytest.mark.parametrize("flags", [[], ["--scrub-memory"]], ids=["default", "scrub-memory"])
def test_proxy_serves_under_memory_deny_write_execute(tmp_path: Path, flags: list[str]) -> None:
    env = {**os.environ, "no_proxy": "*", "NO_PROXY": "*"}
    key = "zrp-" + secrets.token_urlsafe(24)
    mock = LoggedProcess(
        [sys.executable, "-m", "zrproxy", "mock-upstream", "--listen", "127.0.0.1:0"]
    )
    proxy: LoggedProcess | None = None
    try:
        base = mock.wait_for(r"mock upstream listening on (http://\S+)").group(1)
        config = tmp_path / "config.toml"
        config.write_text(
            "[server]\n"
            'listen = "127.0.0.1:0"\nadmin_listen = "127.0.0.1:0"\ndrain_timeout_s = 5\n'
            f'[[upstreams]]\nname = "mock"\nkind = "openai"\nbase_url = "{base}/v1"\n'
            "zero_data_retention = true\n"
            '[[routes]]\nmodel = "*"\nupstreams = ["mock"]\n'
            f'[[projects]]\nname = "mdwe"\nkey_sha256 = ["{sha256(key.encode()).hexdigest()}"]\n'
        )
        argv = [sys.executable, "-m", "zrproxy", "serve", "--config", str(config), *flags]
        proxy = LoggedProcess([sys.executable, "-c", MDWE_WRAPPER, *argv], env=env)
        proxy.wait_for("W\\+X mapping refused")
        api = proxy.wait_for(r"zrproxy ready: api=(http://\S+) admin=(http://\S+)").group(1)
        body = json.dumps(
            {
                "model": "mock-n8",
                "stream": True,
                "messages": [{"role": "user", "content": "hello"}],
            }
        ).encode()
        request = urllib.request.Request(
            f"{api}/v1/chat/completions",
            data=body,
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        )
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(request, timeout=30) as response:
            assert response.status == 200
            streamed = response.read()
        assert b"data: [DONE]" in streamed
        assert proxy.stop() == 0, proxy.output()
    finally:
        if proxy is not None:
            proxy.stop()
        mock.stop()
