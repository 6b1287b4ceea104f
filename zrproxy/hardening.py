"""Process hardening at start: no core dumps, locked memory, an allocator that wipes freed memory.

Owns the libc calls (prctl, mlockall) and the scrubbed environment for the re-exec.
Must never read ``os.environ`` (the caller passes the environment in) and never put
request content in a message. Linux only.

Goals:
- Nothing the process ever held (prompts, completions, keys) can reach a disk through a
  core dump or through swap.
- Memory the process has freed holds no leftover content for a later heap dump, ptrace
  reader or use-after-free to find.

Strategy:
- Core dumps: ``RLIMIT_CORE`` to (0, 0) *and* ``PR_SET_DUMPABLE`` 0. The rlimit alone is
  ignored when ``core_pattern`` pipes to a handler (systemd-coredump, apport); a
  non-dumpable process is never dumped, and it also keeps other processes of the same
  uid without CAP_SYS_PTRACE out of ``/proc/<pid>/mem`` and ptrace.
- Swap: ``mlockall(MCL_CURRENT | MCL_FUTURE)``; refusal is fatal and the message says
  which knob to turn.
- Freed memory: re-exec the interpreter with allocator and loader settings in its
  environment (see ``scrub_environment``); they only work if present before the
  interpreter starts. Not covered: bytes left in CPU registers, and the register save
  area the kernel puts on the stack when it delivers a signal.
"""

from __future__ import annotations

import ctypes
import errno
import os
import resource
import sys
from collections.abc import Mapping
from typing import NoReturn

__all__ = [
    "HardeningError",
    "die_with_parent",
    "disable_core_dumps",
    "is_scrubbed",
    "lock_memory",
    "raise_fd_limit",
    "reexec_scrubbed",
    "scrub_environment",
    "summary",
    "swap_enabled",
]

# <linux/prctl.h>, <sys/mman.h>
_PR_SET_PDEATHSIG = 1
_PR_GET_DUMPABLE = 3
_PR_SET_DUMPABLE = 4
_MCL_CURRENT = 1
_MCL_FUTURE = 2

SCRUBBED_MARKER = "ZRPROXY_SCRUBBED"
# Any non-zero byte works; 0 would switch perturbation off.
_PERTURB_BYTE = 0xA5
_OUR_TUNABLES = {
    "glibc.malloc.perturb": str(_PERTURB_BYTE),
    "glibc.malloc.tcache_count": "0",
}
# The legacy spelling of glibc.malloc.perturb. glibc lets GLIBC_TUNABLES win over it, but
# dropping it means nobody has to remember that precedence rule.
_LEGACY_PERTURB_ENV = "MALLOC_PERTURB_"

_libc = ctypes.CDLL(None, use_errno=True)
_libc.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
_libc.prctl.restype = ctypes.c_int
_libc.mlockall.argtypes = [ctypes.c_int]
_libc.mlockall.restype = ctypes.c_int


class HardeningError(Exception):
    """A hardening step failed; the process must not serve.

    Messages are built here from fixed text, errno names and resource limits only.
    """


def _errno_name(code: int) -> str:
    return errno.errorcode.get(code, f"errno {code}")


def _prctl(option: int, arg2: int = 0) -> int:
    rc: int = _libc.prctl(option, arg2, 0, 0, 0)
    if rc < 0:
        code = ctypes.get_errno()
        raise HardeningError(f"prctl({option}) failed ({_errno_name(code)})")
    return rc


def disable_core_dumps() -> None:
    """Make sure this process can never write a core dump, and verify it.

    Must run again after every ``execve``: the kernel resets the dumpable flag on exec.
    """
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    _prctl(_PR_SET_DUMPABLE, 0)
    if _prctl(_PR_GET_DUMPABLE) != 0:
        raise HardeningError("core dumps are still enabled after PR_SET_DUMPABLE 0")
    if resource.getrlimit(resource.RLIMIT_CORE) != (0, 0):
        raise HardeningError("RLIMIT_CORE is not 0 after setrlimit")


def _limit_text(value: int) -> str:
    return "unlimited" if value == resource.RLIM_INFINITY else f"{value} bytes"


def lock_memory() -> None:
    """Lock every current and future page of this process in RAM (no swap).

    MCL_FUTURE makes the kernel fault in and lock whole new mappings as they are made,
    thread stacks included, so resident memory grows to what is mapped. ``execve``
    removes the locks: call this after any re-exec.
    """
    if _libc.mlockall(_MCL_CURRENT | _MCL_FUTURE) == 0:
        return
    code = ctypes.get_errno()
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    raise HardeningError(
        f"memory locking was refused ({_errno_name(code)}): RLIMIT_MEMLOCK is "
        f"soft={_limit_text(soft)} hard={_limit_text(hard)}; grant the process "
        "CAP_IPC_LOCK or raise RLIMIT_MEMLOCK above its mapped size "
        "(e.g. LimitMEMLOCK=infinity), or set server.mlock = false"
    )


def _locked_kib() -> int:
    """VmLck of this process (kB of locked memory), 0 when unknown."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmLck:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def summary(scrubbed: bool, allocator: str) -> str:
    """One line saying which protections are in force, read back from the kernel, and
    the allocator the interpreter started with."""
    core = "off" if resource.getrlimit(resource.RLIMIT_CORE) == (0, 0) else "ON"
    dumpable = "off" if _prctl(_PR_GET_DUMPABLE) == 0 else "ON"
    mlock = "on" if _locked_kib() > 0 else "off"
    return (
        f"hardening: core dumps {core}, dumpable {dumpable}, mlock {mlock}, "
        f"scrub mode {'on' if scrubbed else 'off'}, allocator {allocator}"
    )


def started_allocator(env: Mapping[str, str]) -> str:
    """The allocator of this interpreter, from its start environment: "malloc" under
    PYTHONMALLOC=malloc, else "pymalloc" (or the PYTHONMALLOC value given)."""
    return env.get("PYTHONMALLOC") or "pymalloc"


def swap_enabled() -> bool:
    """Whether any swap area is active (a line in /proc/swaps below its header).

    A kernel built without swap support has no /proc/swaps and counts as no swap.
    """
    try:
        with open("/proc/swaps", encoding="ascii") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return False
    return any(line.strip() for line in lines[1:])


def _parse_tunables(value: str) -> list[tuple[str, str]]:
    pairs = []
    for item in value.split(":"):
        name, sep, val = item.partition("=")
        if name and sep:
            pairs.append((name, val))
    return pairs


def scrub_environment(base: Mapping[str, str]) -> dict[str, str]:
    """Return a copy of ``base`` that makes the next interpreter wipe memory it frees.

    - ``PYTHONMALLOC=malloc``: pymalloc keeps freed small objects (every str and bytes
      up to 512 bytes) in its arenas without wiping them, so routing them to malloc is
      what lets glibc wipe them. Python's own freelists hold only container headers,
      never str/bytes payloads.
    - ``glibc.malloc.perturb``: glibc fills each freed chunk with this byte.
    - ``glibc.malloc.tcache_count=0``: freeing into a tcache bin returns before the
      perturb fill, so with tcache on the last 7 freed chunks of each size up to 1032
      bytes (most request fragments) keep their content; ``MALLOC_PERTURB_`` alone
      misses them.
    - ``LD_BIND_NOW=1``: a lazily bound libc call goes through ``_dl_runtime_resolve``,
      which saves every vector register onto the stack; memcpy and memcmp leave recent
      string bytes in those registers, so each first call of a symbol would copy request
      content to the stack where no free() ever wipes it. Binding at load time avoids it.

    An existing ``GLIBC_TUNABLES`` keeps its other entries; ours go last, and glibc
    applies the last value for a name.
    """
    env = dict(base)
    kept = [
        f"{name}={val}"
        for name, val in _parse_tunables(env.get("GLIBC_TUNABLES", ""))
        if name not in _OUR_TUNABLES
    ]
    ours = [f"{name}={val}" for name, val in _OUR_TUNABLES.items()]
    env["GLIBC_TUNABLES"] = ":".join(kept + ours)
    env.pop(_LEGACY_PERTURB_ENV, None)
    env["LD_BIND_NOW"] = "1"
    env["PYTHONMALLOC"] = "malloc"
    env[SCRUBBED_MARKER] = "1"
    return env


def is_scrubbed(env: Mapping[str, str]) -> bool:
    """Whether ``env`` (this process's start environment) carries our allocator settings.

    Checks the settings themselves, not just the marker, so a hand-set marker cannot
    skip the re-exec. ``is_scrubbed(scrub_environment(e))`` holds for every ``e``.
    """
    if env.get(SCRUBBED_MARKER) != "1" or env.get("PYTHONMALLOC") != "malloc":
        return False
    if not env.get("LD_BIND_NOW"):  # ld.so takes any non-empty value
        return False
    effective = dict(_parse_tunables(env.get("GLIBC_TUNABLES", "")))  # last value wins
    return all(effective.get(name) == val for name, val in _OUR_TUNABLES.items())


def reexec_scrubbed(argv: list[str], env: Mapping[str, str]) -> NoReturn:
    """Replace this process with ``python -m zrproxy *argv`` under the scrubbed environment."""
    reexec(argv, scrub_environment(env))


def reexec_on_malloc(argv: list[str], env: Mapping[str, str]) -> NoReturn:
    """Replace this process with ``python -m zrproxy *argv`` on glibc's allocator."""
    reexec(argv, {**env, "PYTHONMALLOC": "malloc"})


def reexec(argv: list[str], env: Mapping[str, str]) -> NoReturn:
    """Replace this process with ``python -m zrproxy *argv`` under `env`.

    The allocator is chosen while the interpreter starts (PYTHONMALLOC) and glibc reads
    its tunables once, at load, so setting either from inside a running process has no
    effect: a fresh exec is the only way. The new process must call
    ``disable_core_dumps`` again (exec resets the dumpable flag) and check
    ``is_scrubbed`` so it does not exec a second time.
    """
    if not sys.executable:
        raise HardeningError("cannot re-exec: the interpreter path is unknown")
    # execve drops Python-level buffers; flush so start-up lines already written survive.
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()
    os.execve(sys.executable, [sys.executable, "-m", "zrproxy", *argv], dict(env))


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the soft limit in force.

    Every client connection and every upstream connection is a file descriptor, and
    the common default soft limit of 1,024 made the proxy go dark at about 500 streams.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            return soft
        soft = hard
    return soft


def die_with_parent(sig: int, parent_pid: int) -> None:
    """Have the kernel send `sig` to this process when its parent dies.

    If the parent is already gone (it died before this call), exit now: the signal
    would never come.
    """
    if _libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        code = ctypes.get_errno()
        raise HardeningError(f"prctl(PR_SET_PDEATHSIG) failed: {os.strerror(code)}")
    if os.getppid() != parent_pid:
        os._exit(0)
