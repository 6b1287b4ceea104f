"""The report: a Markdown summary (printed and written), the raw JSON, and a PNG chart.

Compares zrproxy with the targets and says whether each was met; never fails a run.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from bench import servers, throughput, wrk

COLUMNS = ("direct", "nginx", "zrproxy", "zrproxy-scrub", "zrproxy-pymalloc")


def machine() -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    models = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
    git = ["git", "-C", str(Path(__file__).parent), "rev-parse", "--short", "HEAD"]
    commit = subprocess.run(git, capture_output=True, text=True, check=False).stdout.strip()
    return {
        "nproc": os.cpu_count(),
        "cpu": models[0] if models else platform.processor(),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "nginx": servers.nginx_version(),
        "wrk": wrk.version(),
        "aiohttp": metadata.version("aiohttp"),
        "uvloop": metadata.version("uvloop"),
        "zrproxy_commit": commit or "unknown",
        "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3],
    }


def _get(node: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, list):
        return " / ".join(_fmt(v, 0) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k}: {v}" for k, v in value.items())
    return f"{value:,}" if isinstance(value, int) else str(value)


# --- the summary table -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Figure:
    """One summary row: `path` into the results, "*" standing for the target's name."""

    label: str
    path: tuple[str, ...]
    digits: int = 1
    target: str = ""
    ratio: float | None = None  # zrproxy / nginx must be at most this
    at_most: float | None = None
    at_least: float | None = None
    over_nginx: float | None = None  # zrproxy must be at most nginx's figure plus this
    overhead: bool = False  # show via-proxy minus direct (latency)

    def cell(self, results: dict[str, Any], name: str) -> Any:
        value = _get(results, *(name if p == "*" else p for p in self.path))
        if not self.overhead or name == "direct" or value is None:
            return value
        direct = _get(results, *("direct" if p == "*" else p for p in self.path))
        return value - direct if direct is not None else None

    def verdict(self, cells: dict[str, Any]) -> tuple[str, str]:
        ours, theirs = cells.get("zrproxy"), cells.get("nginx")
        if ours is None or not self.target:
            return "", ""
        if self.ratio is not None:
            if not theirs:
                return "", ""
            shown, met = f"{ours / theirs:.1f}x nginx", ours / theirs <= self.ratio
        elif self.over_nginx is not None:
            if theirs is None:
                return "", ""
            shown = f"nginx {ours - theirs:+.{self.digits}f}"
            met = ours <= theirs + self.over_nginx
        elif self.at_most is not None:
            shown, met = _fmt(ours, self.digits), ours <= self.at_most
        else:
            shown, met = _fmt(ours, self.digits), ours >= (self.at_least or 0)
            shown = "" if isinstance(ours, bool) else shown
        return shown, "yes" if met else "**no**"


_LAT = ("latency", "stream", "*")
_LAT_NS = ("latency", "nonstream", "*")
SUMMARY = (
    Figure("(a) CPU us/request, stream of 64 chunks [3]", ("cpu", "stream", "*",
           "cpu_us_per_request"), 0, "<= 2.5x nginx", ratio=2.5),
    Figure("(a) CPU us/request, stream, saturated (closed loop)", ("throughput", "stream",
           "*", "cpu_us_per_request"), 0, "<= 2.5x nginx", ratio=2.5),
    Figure("(b) CPU us/chunk, 200 streams, 10 ms apart", ("streams", "*", "cpu_us_per_chunk"),
           2, "<= 1.5x nginx", ratio=1.5),
    Figure("(c) CPU us/request, non-stream [3]", ("cpu", "nonstream", "*",
           "cpu_us_per_request"), 0, "<= 2.5x nginx", ratio=2.5),
    Figure("(c) CPU us/request, non-stream, saturated (closed loop)", ("throughput",
           "nonstream", "*", "cpu_us_per_request"), 0, "<= 2.5x nginx", ratio=2.5),
    Figure("(a) requests/s, proxy on one core", ("throughput", "stream", "*", "rps"), 0),
    Figure("(c) requests/s, proxy on one core", ("throughput", "nonstream", "*", "rps"), 0),
    Figure("TTFB p50, stream (ms) [1]", (*_LAT, "ttfb_ms", "p50"), 3, "<= nginx + 0.1 ms",
           over_nginx=0.1, overhead=True),
    Figure("TTFB p99, stream (ms) [1]", (*_LAT, "ttfb_ms", "p99"), 3, "<= 1 ms",
           at_most=1.0, overhead=True),
    Figure("last byte p50, stream (ms) [1]", (*_LAT, "ttlb_ms", "p50"), 3, overhead=True),
    Figure("last byte p99, stream (ms) [1]", (*_LAT, "ttlb_ms", "p99"), 3, overhead=True),
    Figure("TTFB p50, non-stream (ms) [1]", (*_LAT_NS, "ttfb_ms", "p50"), 3,
           "<= nginx + 0.1 ms", over_nginx=0.1, overhead=True),
    Figure("TTFB p99, non-stream (ms) [1]", (*_LAT_NS, "ttfb_ms", "p99"), 3, "<= 1 ms",
           at_most=1.0, overhead=True),
    Figure("pacing: max deviation from 100 ms (ms)", ("pacing", "*", "max_deviation_ms"), 1,
           "< 5 ms", at_most=5.0),
    Figure("KiB per open stream, 500 open", ("memory", "*", "500", "kib_per_stream"), 1,
           "<= 20 KiB", at_most=20),
    Figure("KiB per open stream, 5k open", ("memory", "*", "5k", "kib_per_stream"), 1,
           "<= 20 KiB", at_most=20),
    Figure("KiB per open stream, 10k open [2]", ("memory", "*", "10k", "kib_per_stream"), 1,
           "<= 20 KiB", at_most=20),
    Figure("all streams held open at once [2]", ("memory", "*", "10k", "all_opened"), 0,
           "all", at_least=1),
    Figure("RSS after close minus before, 5k (KiB)", ("memory", "*", "5k",
           "after_minus_before_kib"), 0, "within 8 MiB", at_most=8192),
    Figure("RSS after close minus before, 10k (KiB)", ("memory", "*", "10k",
           "after_minus_before_kib"), 0, "within 8 MiB", at_most=8192),
    Figure("abort: upstream closed within 1 s (%)", ("abort", "*", "percent_within_1s"), 0,
           "100 %", at_least=100),
)  # fmt: skip


def summary(results: dict[str, Any]) -> str:
    lines = [
        "| figure | " + " | ".join(COLUMNS) + " | zrproxy vs target | target | met |",
        "|" + "---|" * (len(COLUMNS) + 4),
    ]
    for figure in SUMMARY:
        cells = {name: figure.cell(results, name) for name in COLUMNS}
        if all(v is None for v in cells.values()):
            continue
        values = " | ".join(_fmt(cells[name], figure.digits) for name in COLUMNS)
        shown, met = figure.verdict(cells)
        lines.append(f"| {figure.label} | {values} | {shown} | {figure.target} | {met} |")
    lines.append(
        "\n[1] direct: the time itself; proxies: via the proxy minus direct (the overhead)."
        f"\n[2] {_get(results, 'memory', 'zrproxy', '10k', 'streams') or 10_000:,} streams were"
        f" asked for (a proxy needs two fds per stream; RLIMIT_NOFILE {results['fd_limit']:,})."
        "\n[3] at the same offered rate for every target: "
        f"(a) {throughput.CPU['stream'].rate:,}/s, (c) {throughput.CPU['nonstream'].rate:,}/s."
    )
    return "\n".join(lines)


# --- detail tables ---------------------------------------------------------------------------

_LOAD = (
    ("req/s", "rps"),
    ("errors", "errors"),
    ("proxy CPU", "proxy_util"),
    ("mock CPU", "mock_util"),
    ("wrk CPU", "wrk_util"),
    ("others' CPU", "background_util"),
    ("bottleneck", "bottleneck"),
)
# (title, path to {row name: fields} or {group: {row name: fields}}, columns)
DETAILS: tuple[tuple[str, tuple[str, ...], tuple[tuple[str, str], ...]], ...] = (
    ("CPU per request at a fixed rate (wrk: 1 thread, 32 connections; CPU in cores)", ("cpu",),
     (*_LOAD, ("CPU us/req", "cpu_us_per_request"), ("of it user", "user_us_per_request"),
      ("mock us/req", "mock_cpu_us_per_request"), ("us/req, each run", "runs"))),
    ("Throughput, closed loop (wrk: 1 thread, 32 connections; CPU in cores)", ("throughput",),
     (*_LOAD, ("CPU us/req", "cpu_us_per_request"), ("of it user", "user_us_per_request"),
      ("mock us/req", "mock_cpu_us_per_request"), ("req/s, each run", "runs"))),
    ("200 concurrent streams, 64 chunks 10 ms apart", ("streams",),
     (("chunks", "chunks"), *_LOAD, ("CPU us/chunk", "cpu_us_per_chunk"),
      ("us/req, each run", "runs"))),
    ("`serve --workers 2` on both CPUs (shared with wrk and the mock), 64 connections",
     ("workers",), (*_LOAD, ("CPU us/req", "cpu_us_per_request"))),
    ("Audit log (beta) vs zero retention (zr), one zrproxy process: paced mock-n64 streams",
     ("audit", "cpu"), (*_LOAD, ("CPU us/chunk", "cpu_us_per_chunk"),
                        ("us/chunk, each run", "runs"))),
    ("Audit log (beta) vs zero retention (zr): TTFB in ms, sequential, keys alternating",
     ("audit", "ttfb"), (("n", "n"), ("p50", "p50"), ("p90", "p90"), ("p99", "p99"),
                         ("mean", "mean"))),
    ("Latency at low load (ms; sequential requests, round-robin over targets)", ("latency",),
     (("n", "n"), ("errors", "errors"), ("TTFB p50", "ttfb_ms.p50"), ("p90", "ttfb_ms.p90"),
      ("p99", "ttfb_ms.p99"), ("last byte p50", "ttlb_ms.p50"), ("p90", "ttlb_ms.p90"),
      ("p99", "ttlb_ms.p99"))),
    ("Pacing (mock-n20-d100: content events should be 100 ms apart)", ("pacing",),
     (("streams", "streams"), ("gaps", "gaps"), ("mean gap ms", "mean_gap_ms"),
      ("mean deviation ms", "mean_deviation_ms"), ("max deviation ms", "max_deviation_ms"))),
    ("Memory per open stream (mock-n600-d1000; RSS of the whole process tree)", ("memory",),
     (("streams", "streams"), ("opened", "opened"), ("open s", "open_seconds"),
      ("RSS before KiB", "rss_before_kib"),
      ("RSS open KiB", "rss_open_kib"), ("RSS after KiB", "rss_after_kib"),
      ("KiB/stream", "kib_per_stream"))),
    ("Abort propagation (clients close after the first body bytes)", ("abort",),
     (("aborted", "aborted"), ("closed <= 1 s", "closed_within_1s"),
      ("lag median ms", "lag_ms_median"), ("lag max ms", "lag_ms_max"), ("upstream end", "ends"))),
)  # fmt: skip


def _rows(node: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Flatten {name: fields} or {group: {name: fields}} into (row label, fields)."""
    rows: list[tuple[str, dict[str, Any]]] = []
    for name, value in node.items():
        if not isinstance(value, dict):
            continue
        if all(isinstance(v, dict) for v in value.values()):  # a group, not a row
            rows += [(f"{name} {sub}", fields) for sub, fields in _rows(value)]
        else:
            rows.append((name, value))
    return rows


def details(results: dict[str, Any]) -> str:
    parts = []
    for title, path, columns in DETAILS:
        node = _get(results, *path)
        if not isinstance(node, dict):
            continue
        if node.get("available") is False:
            parts.append(f"### {title}\n\nnot available")
            continue
        lines = [
            "| | " + " | ".join(h for h, _ in columns) + " |",
            "|" + "---|" * (1 + len(columns)),
        ]
        for label, fields in _rows(node):
            cells = [_fmt(_get(fields, *key.split("."))) for _, key in columns]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        parts.append(f"### {title}\n\n" + "\n".join(lines))
    profile = results.get("profile")
    if isinstance(profile, dict) and profile.get("available"):
        for kind in ("stream", "nonstream"):
            rows = profile[kind]["self_by_function"][:12]
            lines = ["| self % | function (file) |", "|---|---|"]
            lines += [f"| {percent} | `{name}` |" for name, percent in rows]
            parts.append(f"### Profile of zrproxy, {kind} ({profile[kind]['samples']} samples)\n\n"
                         + "\n".join(lines))  # fmt: skip
    return "\n\n".join(parts)


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    busy = ", ".join(f"{k} {v}" for k, v in results.get("background_cpu", {}).items())
    return (
        f"{'Quick smoke run' if results['quick'] else 'Full run'} in {results['elapsed_s']} s "
        f"on {m['nproc']} x {m['cpu']}, Linux {m['kernel']}, Python {m['python']}, "
        f"nginx {m['nginx']}, {m['wrk']}, aiohttp {m['aiohttp']}, uvloop {m['uvloop']}, "
        f"zrproxy at {m['zrproxy_commit']}; load average at start "
        f"{' '.join(m['loadavg_at_start'])}."
        f"\nCPUs used by other processes on the machine during each scenario: {busy or '-'}.\n\n"
        f"{summary(results)}\n\n{details(results)}\n"
    )


# --- the chart -------------------------------------------------------------------------------


def chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    ax = axes[0][0]
    for i, figure in enumerate(f for f in SUMMARY if f.ratio is not None):
        nginx = figure.cell(results, "nginx")
        for j, name in enumerate(("zrproxy", "zrproxy-scrub")):
            ours = figure.cell(results, name)
            if nginx and ours:
                label = name if i == 0 else None
                ax.bar(i + (j - 0.5) * 0.38, ours / nginx, 0.36, color=f"C{j}", label=label)
        label = "target" if i == 0 else None
        ax.hlines(figure.ratio, i - 0.45, i + 0.45, colors="k", linestyles="dashed", label=label)
    ax.axhline(1, color="grey", linewidth=0.8)
    ax.set_xticks(range(3), ["(a) CPU/request\nstream", "(b) CPU/chunk\n200 streams",
                             "(c) CPU/request\nnon-stream"])  # fmt: skip
    ax.set_ylabel("times nginx (lower is better)")
    ax.set_title("CPU cost relative to nginx")
    ax.legend()
    panels = (
        (axes[0][1], "stream", "ttfb_samples_ms", "Time to first body byte, stream"),
        (axes[1][0], "stream", "ttlb_samples_ms", "Time to last byte, stream of 64 chunks"),
        (axes[1][1], "nonstream", "ttlb_samples_ms", "Time to last byte, non-stream"),
    )
    for ax, kind, key, title in panels:
        for name, figures in (_get(results, "latency", kind) or {}).items():
            samples = sorted(figures[key])
            ax.plot(samples, [(k + 1) / len(samples) for k in range(len(samples))], label=name)
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(FixedLocator([0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100]))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("ms (log scale)")
        ax.set_ylabel("fraction of requests")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle("zrproxy benchmark, " + ("quick run" if results["quick"] else "full run"))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write(results: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(results)
    print("\n" + text)
    (out / "latest.md").write_text(text)
    (out / "latest.json").write_text(json.dumps(results, indent=1) + "\n")
    try:
        chart(results, out / "latest.png")
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): no chart")
        return
    print(f"wrote {out}/latest.md, latest.json and latest.png")
