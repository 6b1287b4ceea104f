"""Tests for process hardening: each real call runs in its own child Python process.

Every claim has a control that shows the test could fail here: a crash without hardening
does leave a core file, mlockall does fail without CAP_IPC_LOCK, and the scan that finds
no freed copy in a scrubbed child does find the copy it still holds.
"""

from __future__ import annotations

import ast
import ctypes
import os
import resource
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.scrub_child import copies_left, variant_env
from zrproxy import hardening
from zrproxy.hardening import is_scrubbed, scrub_environment

REPO = Path(__file__).resolve().parents[2]
# What scrub_environment sets or drops: a control child starts with none of them.
SCRUB_KEYS = (
    "PYTHONMALLOC",
    "GLIBC_TUNABLES",
    "MALLOC_PERTURB_",
    "LD_BIND_NOW",
    "ZRPROXY_SCRUBBED",
)
OURS = "glibc.malloc.perturb=165:glibc.malloc.tcache_count=0"

_PR_CAPBSET_READ = 23
_PR_CAPBSET_DROP = 24
_CAP_IPC_LOCK = 14
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


def _base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SCRUB_KEYS}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def _run(
    code: str,
    *args: str,
    cwd: Path | None = None,
    preexec: Callable[[], None] | None = None,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=cwd,
        env=_base_env(),
        preexec_fn=preexec,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _raise_core_limit() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_CORE)
    resource.setrlimit(resource.RLIMIT_CORE, (hard, hard))


# --- core dumps -------------------------------------------------------------------------

FLAGS = """
import ctypes, resource
from zrproxy.hardening import disable_core_dumps
libc = ctypes.CDLL(None)
before = (libc.prctl(3, 0, 0, 0, 0), resource.getrlimit(resource.RLIMIT_CORE))
disable_core_dumps()
print((before, (libc.prctl(3, 0, 0, 0, 0), resource.getrlimit(resource.RLIMIT_CORE))))
"""


def test_disable_core_dumps_clears_dumpable_and_rlimit() -> None:
    result = _run(FLAGS, preexec=_raise_core_limit)
    assert result.returncode == 0, result.stderr
    before, after = ast.literal_eval(result.stdout)
    hard = resource.getrlimit(resource.RLIMIT_CORE)[1]
    assert before == (1, (hard, hard))
    assert after == (0, (0, 0))


CRASH = """
import os, signal, sys
if sys.argv[1] == "harden":
    from zrproxy.hardening import disable_core_dumps
    disable_core_dumps()
os.kill(os.getpid(), getattr(signal, sys.argv[2]))
"""


def _core_glob() -> str:
    pattern = Path("/proc/sys/kernel/core_pattern").read_text().strip()
    if pattern.startswith("|") or "/" in pattern:
        pytest.skip(f"core_pattern {pattern!r} does not write core files into the cwd")
    if resource.getrlimit(resource.RLIMIT_CORE)[1] == 0:
        # Children inherit the hard limit and raising it needs CAP_SYS_RESOURCE. The usual
        # cause is an earlier test running `main(["serve", ...])` in this very process.
        pytest.skip(
            "this pytest process already has a hard RLIMIT_CORE of 0 (something in it called "
            "disable_core_dumps), so no child can dump core and the control would prove nothing"
        )
    return pattern.partition("%")[0] + "*"


@pytest.mark.parametrize("sig", ["SIGSEGV", "SIGABRT"])
def test_crash_after_hardening_leaves_no_core_file(tmp_path: Path, sig: str) -> None:
    glob = _core_glob()
    signum = getattr(signal, sig)
    control = tmp_path / "control"
    control.mkdir()
    result = _run(CRASH, "plain", sig, cwd=control, preexec=_raise_core_limit)
    assert result.returncode == -signum, result.stderr
    cores = list(control.glob(glob))
    if not cores:
        pytest.skip(
            "control: an unhardened crash with RLIMIT_CORE at its hard limit wrote no core "
            "file here, so the absence of one after hardening would prove nothing"
        )
    for core in cores:
        core.unlink()  # several MB each

    hardened = tmp_path / "hardened"
    hardened.mkdir()
    result = _run(CRASH, "harden", sig, cwd=hardened, preexec=_raise_core_limit)
    assert result.returncode == -signum, result.stderr
    left = sorted(hardened.iterdir())
    for path in left:
        path.unlink()
    assert left == []


# --- mlock ------------------------------------------------------------------------------

LOCK = """
from zrproxy.hardening import HardeningError, lock_memory

def status(name):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(name + ":"):
                return line.split(":", 1)[1].strip()

before = int(status("VmLck").split()[0])
try:
    lock_memory()
    error = None
except HardeningError as exc:
    error = str(exc)
print((before, int(status("VmLck").split()[0]), int(status("CapEff"), 16), error))
"""


def _run_lock(preexec: Callable[[], None] | None = None) -> tuple[int, int, int, str | None]:
    result = _run(LOCK, preexec=preexec)
    assert result.returncode == 0, result.stderr
    before, after, cap_eff, error = ast.literal_eval(result.stdout)
    return before, after, cap_eff, error


def _own_effective_caps() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def test_lock_memory_locks_pages() -> None:
    can_lock = _own_effective_caps() & (1 << _CAP_IPC_LOCK)
    if not can_lock and resource.getrlimit(resource.RLIMIT_MEMLOCK)[0] != resource.RLIM_INFINITY:
        pytest.skip("no CAP_IPC_LOCK and a finite RLIMIT_MEMLOCK: mlockall would be refused")
    before, after, _, error = _run_lock()
    assert error is None
    assert before == 0
    assert after > 0


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


_MEMLOCK_LIMIT = 64 * 1024


def _drop_capability(cap: int) -> None:
    """In a forked child before exec: lose `cap` from the bounding and own sets."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "PR_CAPBSET_DROP")
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    if libc.capget(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capget")
    keep = ~(1 << cap) & 0xFFFFFFFF
    data[0].effective &= keep
    data[0].permitted &= keep
    data[0].inheritable &= keep
    if libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset")


def _refuse_mlock() -> None:
    """Runs in the forked child before exec: a small RLIMIT_MEMLOCK and no CAP_IPC_LOCK."""
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (_MEMLOCK_LIMIT, _MEMLOCK_LIMIT))
    if os.geteuid() != 0:
        return  # an ordinary user has no CAP_IPC_LOCK to drop
    # exec as root grants the whole bounding set again, so drop it there too.
    _drop_capability(_CAP_IPC_LOCK)


def test_lock_memory_refusal_names_the_knobs() -> None:
    before, after, cap_eff, error = _run_lock(preexec=_refuse_mlock)
    assert not cap_eff & (1 << _CAP_IPC_LOCK), "the child still has CAP_IPC_LOCK"
    assert error is not None, "mlockall succeeded without CAP_IPC_LOCK"
    assert after == before == 0
    assert "memory locking was refused" in error
    assert "(ENOMEM)" in error or "(EPERM)" in error
    assert f"RLIMIT_MEMLOCK is soft={_MEMLOCK_LIMIT} bytes hard={_MEMLOCK_LIMIT} bytes" in error
    assert "CAP_IPC_LOCK" in error
    assert "server.mlock" in error


# --- scrubbed environment ---------------------------------------------------------------


def test_scrub_environment_sets_allocator_and_keeps_the_rest() -> None:
    base = {"PATH": "/bin", "MALLOC_PERTURB_": "0"}
    env = scrub_environment(base)
    assert env == {
        "PATH": "/bin",
        "PYTHONMALLOC": "malloc",
        "GLIBC_TUNABLES": OURS,
        "LD_BIND_NOW": "1",
        "ZRPROXY_SCRUBBED": "1",
    }
    assert base == {"PATH": "/bin", "MALLOC_PERTURB_": "0"}  # a copy, not a mutation
    assert is_scrubbed(env)


def test_scrub_environment_merges_glibc_tunables_ours_last() -> None:
    env = scrub_environment(
        {"GLIBC_TUNABLES": "glibc.malloc.check=3:glibc.malloc.perturb=0::glibc.mem.tagging=1"}
    )
    assert env["GLIBC_TUNABLES"] == f"glibc.malloc.check=3:glibc.mem.tagging=1:{OURS}"
    assert scrub_environment(env) == env  # idempotent


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"ZRPROXY_SCRUBBED": "1"},  # the marker alone does not count
        {"ZRPROXY_SCRUBBED": "1", "PYTHONMALLOC": "malloc", "LD_BIND_NOW": "1"},
        {
            "ZRPROXY_SCRUBBED": "1",
            "PYTHONMALLOC": "pymalloc",
            "LD_BIND_NOW": "1",
            "GLIBC_TUNABLES": OURS,
        },
        {  # a later entry turns the tcache back on: glibc applies the last one
            "ZRPROXY_SCRUBBED": "1",
            "PYTHONMALLOC": "malloc",
            "LD_BIND_NOW": "1",
            "GLIBC_TUNABLES": OURS + ":glibc.malloc.tcache_count=7",
        },
    ],
)
def test_is_scrubbed_rejects_incomplete_settings(env: dict[str, str]) -> None:
    assert not is_scrubbed(env)


_tunable = st.tuples(
    st.sampled_from(["glibc.malloc.perturb", "glibc.malloc.tcache_count", "glibc.malloc.check"]),
    st.sampled_from(["0", "1", "7"]),
).map("=".join)


@given(st.lists(_tunable | st.just(""), max_size=6).map(":".join))
def test_scrubbed_is_always_recognised(existing: str) -> None:
    env = scrub_environment({"GLIBC_TUNABLES": existing})
    assert is_scrubbed(env)
    others = [t for t in existing.split(":") if t.startswith("glibc.malloc.check")]
    assert env["GLIBC_TUNABLES"] == ":".join([*others, OURS])


class _Exec(Exception):
    pass


def test_reexec_scrubbed_execs_the_interpreter_with_the_scrubbed_env(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[tuple[str, list[str], dict[str, str]]] = []

    def fake_execve(path: str, argv: list[str], env: dict[str, str]) -> None:
        calls.append((path, argv, env))
        raise _Exec

    monkeypatch.setattr(os, "execve", fake_execve)
    with pytest.raises(_Exec):
        hardening.reexec_scrubbed(["serve", "--scrub-memory"], {"PATH": "/bin"})
    [(path, argv, env)] = calls
    assert path == sys.executable
    assert argv == [sys.executable, "-m", "zrproxy", "serve", "--scrub-memory"]
    assert env["PATH"] == "/bin"
    assert is_scrubbed(env)


def test_hardening_never_reads_the_environment() -> None:
    tree = ast.parse(Path(hardening.__file__).read_text())
    names = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    assert not names & {"environ", "environb", "getenv", "getenvb"}


# --- the scrubbed environment does what it claims --------------------------------------


@pytest.mark.parametrize("mode", ["churn", "first-call"])
def test_scrubbed_child_keeps_no_freed_copy(mode: str) -> None:
    assert copies_left(variant_env("scrubbed", _base_env()), mode) == 0


def test_scrubbed_child_scan_finds_a_live_copy() -> None:
    # The control that holds on every machine: the same scan of the same scrubbed child
    # finds the marker while the child still holds it, so a 0 above is not a blind scan.
    # (Which settings are each needed depends on the CPU and glibc: that experiment is a
    # benchmark figure, `python -m bench.scrub_settings`.)
    assert copies_left(variant_env("scrubbed", _base_env()), "hold") >= 1


# --- the running proxy ------------------------------------------------------------------

_CAP_SYS_PTRACE = 19


def _without_ptrace() -> None:
    _drop_capability(_CAP_SYS_PTRACE)


def _peer_can_read_memory(pid: int) -> bool:
    """Whether a process of the same user and capabilities, minus CAP_SYS_PTRACE, may read
    `pid`'s memory (the kernel allows it exactly when `pid` is dumpable)."""
    result = subprocess.run(
        [sys.executable, "-c", f"open('/proc/{pid}/mem', 'rb').close()"],
        preexec_fn=lambda: _drop_capability(_CAP_SYS_PTRACE),
        capture_output=True,
        check=False,
    )
    return result.returncode == 0


async def test_running_proxy_is_non_dumpable_and_leaves_no_core(tmp_path: Path) -> None:
    from tests.processes import LoggedProcess, proxy_process
    from zrproxy.auth import new_key

    if os.geteuid() != 0:
        pytest.skip("needs root to drop CAP_SYS_PTRACE from a peer process")
    # Control: an ordinary process is readable by such a peer, so a refusal means something.
    sleeper = LoggedProcess(
        [sys.executable, "-c", "import sys; sys.stdin.read()"],
        preexec_fn=_without_ptrace,
        stdin=True,
    )
    try:
        assert _peer_can_read_memory(sleeper.pid)
    finally:
        sleeper.stop()
    _, digest = new_key()
    config = {
        "server": {"listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0"},
        "upstreams": [{"name": "u", "kind": "openai", "base_url": "http://127.0.0.1:9/v1"}],
        "routes": [{"model": "*", "upstreams": ["u"]}],
        "projects": [{"name": "p", "key_sha256": [digest]}],
    }
    crash_dir = tmp_path / "cwd"
    crash_dir.mkdir()

    def core_allowed_no_ptrace() -> None:
        _raise_core_limit()
        _without_ptrace()

    with proxy_process(config, tmp_path, preexec_fn=core_allowed_no_ptrace, cwd=crash_dir) as proxy:
        limits = Path(f"/proc/{proxy.pid}/limits").read_text()
        core_line = next(line for line in limits.splitlines() if "core file" in line)
        assert core_line.split()[4:6] == ["0", "0"], core_line
        assert not _peer_can_read_memory(proxy.pid)  # non-dumpable
        os.kill(proxy.pid, signal.SIGSEGV)
        assert proxy.process.wait(10) == -signal.SIGSEGV
    assert list(crash_dir.iterdir()) == []
