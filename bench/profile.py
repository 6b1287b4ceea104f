"""Where zrproxy's CPU goes (the opt-in scenario `profile`): py-spy samples the proxy
while wrk drives workloads (a) and (c), and the samples are summed by function and file.

Needs py-spy (`pip install py-spy`) and the right to ptrace the proxy (root, or
CAP_SYS_PTRACE: zrproxy makes itself non-dumpable). The collapsed stacks are kept in
results/raw-profile-*.txt for flame graphs (flamegraph.pl, speedscope).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench import client, procs, throughput, wrk
from bench.context import Context

_FRAME = re.compile(r"(?P<func>.*) \((?P<file>.*?)(?::\d+)?\)$")
_TOP = 15


def _py_spy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def _name(frame: str) -> tuple[str, str]:
    """(function, file) of a py-spy frame, the file shortened to package/module."""
    match = _FRAME.match(frame)
    if match is None:
        return frame, frame
    file = re.sub(r".*/(site-packages|python3\.\d+)/", "", match["file"])
    return f"{match['func']} ({file})", file


def summarize(collapsed: str) -> dict[str, Any]:
    """Self time by function and by file, and inclusive time of zrproxy's functions."""
    own, files, inclusive = Counter[str](), Counter[str](), Counter[str]()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [_name(f) for f in stack.split(";")]
        n = int(count)
        total += n
        own[frames[-1][0]] += n
        files[frames[-1][1]] += n
        for func in {func for func, file in frames if file.startswith("zrproxy/")}:
            inclusive[func] += n

    def top(counter: Counter[str]) -> list[tuple[str, float]]:
        return [(name, round(100 * n / max(total, 1), 1)) for name, n in counter.most_common(_TOP)]

    return {
        "samples": total,
        "self_by_function": top(own),
        "self_by_file": top(files),
        "zrproxy_inclusive": top(inclusive),
    }


def run(ctx: Context) -> dict[str, Any]:
    py_spy = _py_spy()
    targets = ctx.pick("zrproxy")
    if py_spy is None or not targets:
        print("  py-spy not installed (pip install py-spy) or no zrproxy target: skipped")
        return {"available": False}
    target = targets[0]
    assert target.proxy is not None
    seconds = ctx.budget(6, 2)
    results: dict[str, Any] = {"available": True, "seconds": seconds}
    for kind, workload in throughput.MAX.items():
        data = client.body(workload.model, workload.stream)
        load = wrk.Wrk(
            ctx.tmp, target.host, target.port, client.PATH, data, ctx.key, workload.connections,
            seconds=seconds + 3,
        )  # fmt: skip
        driver = subprocess.Popen(load.command(), stdout=subprocess.DEVNULL)
        time.sleep(1)  # past connection set-up
        raw = ctx.out / f"raw-profile-{kind}.txt"
        cmd = [py_spy, "record", "--pid", str(target.proxy.pid), "--duration", str(seconds)]
        cmd += ["--rate", "250", "--native", "--format", "raw", "-o", str(raw)]
        done = subprocess.run(
            procs.pinned(cmd, str(procs.LOAD_CPU)), capture_output=True, text=True, check=False
        )
        driver.wait()
        if done.returncode != 0 or not raw.exists():
            print(f"  py-spy failed: {done.stderr.strip()[-300:]}")
            return {"available": False}
        results[kind] = summary = summarize(raw.read_text())
        print(f"  profile   {kind:9} {summary['samples']} samples; top:")
        for name, percent in summary["self_by_function"][:8]:
            print(f"            {percent:5.1f}%  {name}")
    return results
