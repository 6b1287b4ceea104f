"""Test helper: count byte strings in another live process's memory, read via /proc.

Owns reading ``/proc/<pid>/maps`` and ``/proc/<pid>/mem``. It must never report "0 copies"
for memory it could not read: if nothing at all was readable it raises instead.

Strategy: stream each readable mapping through ``pread`` in fixed-size chunks, carrying the
last ``len(longest needle) - 1`` bytes into the next chunk so a match split across chunks,
or across two mappings that touch, is still seen, and counted once.

Reading another process's memory needs ptrace access to it: same uid and dumpable, or
CAP_SYS_PTRACE (root). A process that made itself non-dumpable (``hardening``) can only be
scanned by root.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "Region",
    "ScanReport",
    "StreamCounter",
    "count_in_chunks",
    "count_occurrences",
    "needle_forms",
    "readable_regions",
    "scan",
    "scan_regions",
    "wait_until_sleeping",
]

DEFAULT_CHUNK_BYTES = 1 << 20
# Kernel pages with no real memory behind them; reading them fails or is meaningless.
_SKIP_PATHS = frozenset({"[vvar]", "[vvar_vclock]", "[vsyscall]"})
# pread takes a signed offset; only the vsyscall page lives up there on x86-64.
_MAX_OFFSET = 1 << 63


@dataclass(frozen=True, slots=True)
class Region:
    """One line of /proc/<pid>/maps."""

    start: int
    end: int
    perms: str
    path: str


@dataclass(frozen=True, slots=True)
class ScanReport:
    """What a scan saw: counts per needle (all its forms summed) and per form searched."""

    counts: dict[bytes, int]
    form_counts: dict[bytes, int]
    bytes_scanned: int
    regions_scanned: int
    regions_failed: int


def readable_regions(pid: int) -> list[Region]:
    """The readable mappings of ``pid``, minus kernel-only pages, in address order."""
    regions = []
    with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            if len(fields) < 5:
                continue
            start_s, _, end_s = fields[0].partition("-")
            perms = fields[1]
            path = fields[5].strip() if len(fields) == 6 else ""
            start, end = int(start_s, 16), int(end_s, 16)
            if perms[0] != "r" or path in _SKIP_PATHS or end > _MAX_OFFSET:
                continue
            regions.append(Region(start, end, perms, path))
    return regions


def wait_until_sleeping(pid: int, timeout_s: float = 10.0) -> None:
    """Wait until the main thread of ``pid`` is blocked (state S), e.g. in the read that
    follows its "ready" line, so a scan sees its settled heap and not a moving one."""
    deadline = time.monotonic() + timeout_s
    while True:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            state = f.read().rpartition(")")[2].split()[0]
        if state == "S":
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"pid {pid} stayed in state {state}")
        time.sleep(0.001)


def needle_forms(needle: bytes, *, wide: bool) -> list[bytes]:
    """The byte patterns under which ``needle`` can sit in a CPython process.

    Without ``wide`` that is the needle itself. With it, ``needle`` is read as UTF-8 text
    and the forms CPython's ``str`` storage uses (PEP 393) are added: Latin-1 (1 byte per
    char), UCS-2 and UCS-4 in native byte order. An ASCII marker inside a prompt that also
    holds a non-Latin-1 character (an emoji, a CJK char) is stored only in a wide form.
    """
    if not needle:
        raise ValueError("empty needle")
    forms = [needle]
    if wide:
        try:
            text = needle.decode("utf-8")
        except UnicodeDecodeError:
            return forms
        order = "le" if sys.byteorder == "little" else "be"
        if max(map(ord, text)) < 0x100:
            forms.append(text.encode("latin-1"))
        if max(map(ord, text)) < 0x10000:
            forms.append(text.encode(f"utf-16-{order}"))
        forms.append(text.encode(f"utf-32-{order}"))
    return list(dict.fromkeys(forms))


class StreamCounter:
    """Counts every (possibly overlapping) occurrence of each needle in a chunked stream."""

    def __init__(self, needles: Sequence[bytes]) -> None:
        if not needles or not all(needles):
            raise ValueError("needles must be non-empty byte strings")
        self.counts: dict[bytes, int] = dict.fromkeys(needles, 0)
        self._keep = max(map(len, needles)) - 1
        self._tail = b""

    def feed(self, chunk: bytes) -> None:
        """Count the occurrences that end inside ``chunk``."""
        buf = self._tail + chunk if self._tail else chunk
        tail_len = len(self._tail)
        for needle in self.counts:
            # An occurrence starting here or later ends inside `chunk`; one starting
            # earlier lies wholly inside the tail and was counted with the last chunk.
            pos = buf.find(needle, max(0, tail_len - len(needle) + 1))
            found = 0
            while pos != -1:
                found += 1
                pos = buf.find(needle, pos + 1)
            self.counts[needle] += found
        self._tail = buf[max(0, len(buf) - self._keep) :]

    def break_stream(self) -> None:
        """The next chunk is not contiguous with the last: nothing spans the gap."""
        self._tail = b""


def count_in_chunks(chunks: Iterable[bytes], needles: Sequence[bytes]) -> dict[bytes, int]:
    """Count occurrences of each needle in the concatenation of ``chunks``."""
    counter = StreamCounter(needles)
    for chunk in chunks:
        counter.feed(chunk)
    return counter.counts


def scan_regions(
    regions: Iterable[Region],
    read: Callable[[int, int], bytes],
    needles: Sequence[bytes],
    *,
    wide: bool = False,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> ScanReport:
    """Scan ``regions`` through ``read(address, size)``; regions that touch form one stream.

    A region whose read raises ``OSError`` (raced unmap, I/O mapping, file shrunk under a
    mapping) is counted in ``regions_failed`` and breaks the stream.
    """
    if chunk_bytes <= 0:
        raise ValueError("chunk_bytes must be positive")
    forms_of = {needle: needle_forms(needle, wide=wide) for needle in needles}
    counter = StreamCounter([form for forms in forms_of.values() for form in forms])
    scanned = failed = regions_read = 0
    last_end = -1
    for region in regions:
        if region.start != last_end:
            counter.break_stream()
        offset = region.start
        try:
            while offset < region.end:
                data = read(offset, min(chunk_bytes, region.end - offset))
                if not data:
                    break
                counter.feed(data)
                offset += len(data)
                scanned += len(data)
        except OSError:
            failed += 1
        else:
            regions_read += 1
        # Only a region read to its end continues into the next one.
        last_end = region.end if offset == region.end else -1
    counts = {
        needle: sum(counter.counts[form] for form in forms) for needle, forms in forms_of.items()
    }
    return ScanReport(counts, dict(counter.counts), scanned, regions_read, failed)


def scan(
    pid: int,
    needles: Sequence[bytes],
    *,
    wide: bool = False,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> ScanReport:
    """Scan every readable mapping of ``pid`` once for all forms of all needles.

    Failing to open the process (gone, no ptrace access) propagates.
    """
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    try:
        return scan_regions(
            readable_regions(pid),
            lambda address, size: os.pread(fd, size, address),
            needles,
            wide=wide,
            chunk_bytes=chunk_bytes,
        )
    finally:
        os.close(fd)


def count_occurrences(
    pid: int,
    needles: list[bytes],
    *,
    wide: bool = False,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> dict[bytes, int]:
    """How many times each needle (and, with ``wide``, its str forms) occurs in ``pid``.

    Raises ``RuntimeError`` if no byte could be read, so "0" always means "looked, absent".
    """
    report = scan(pid, needles, wide=wide, chunk_bytes=chunk_bytes)
    if report.bytes_scanned == 0:
        raise RuntimeError(f"no readable memory in pid {pid}; cannot count")
    return report.counts
