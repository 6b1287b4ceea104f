"""Tests for the /proc memory scanner the zero-retention proofs rely on."""

from __future__ import annotations

import hashlib
import itertools
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from tests.memscan import (
    Region,
    count_in_chunks,
    count_occurrences,
    needle_forms,
    readable_regions,
    scan,
    scan_regions,
    wait_until_sleeping,
)
from tests.processes import LoggedProcess

# The child derives the marker from a seed, so the marker itself never crosses the process
# boundary (argv, pipes) and is not in any source text: every copy found is one the child
# made. It holds three distinct live bytes objects with the marker, two wide strs with it,
# or ("none") never computes it at all.
HOLDER = """
import hashlib, sys
seed, mode = sys.argv[1], sys.argv[2]
held = []
if mode != "none":
    marker = hashlib.sha256(seed.encode()).hexdigest()
if mode == "three":
    held = [b"a:" + marker.encode(), b"bb:" + marker.encode() + b"!", b"c" * 5000 + marker.encode()]
elif mode == "wide":
    held = ["w:\\u20ac" + marker, "w:\\U0001f600" + marker]
sys.stdout.write("ready\\n")
sys.stdout.flush()
sys.stdin.readline()
"""


def _marker(seed: str) -> bytes:
    return hashlib.sha256(seed.encode()).hexdigest().encode()


@contextmanager
def _holder(mode: str) -> Iterator[tuple[int, bytes]]:
    seed = os.urandom(16).hex()
    holder = LoggedProcess([sys.executable, "-c", HOLDER, seed, mode], stdin=True)
    try:
        holder.wait_for("^ready$")
        wait_until_sleeping(holder.pid)
        yield holder.pid, _marker(seed)
    finally:
        holder.stop(10)


@pytest.mark.parametrize("chunk_bytes", [1 << 20, 4093])
def test_counts_live_copies_in_child(chunk_bytes: int) -> None:
    with _holder("three") as (pid, marker):
        counts = count_occurrences(pid, [marker], chunk_bytes=chunk_bytes)
    assert counts[marker] >= 3


def test_absent_marker_counts_zero_after_reading_memory() -> None:
    with _holder("none") as (pid, marker):
        report = scan(pid, [marker])
        assert count_occurrences(pid, [marker]) == {marker: 0}
    assert report.counts == {marker: 0}
    assert report.bytes_scanned > 1 << 20
    assert report.regions_scanned > 0


def test_wide_forms_found_only_when_asked() -> None:
    with _holder("wide") as (pid, marker):
        narrow = scan(pid, [marker], wide=False)
        wide = scan(pid, [marker], wide=True)
    ucs2 = marker.decode().encode("utf-16-le")
    ucs4 = marker.decode().encode("utf-32-le")
    assert wide.form_counts[ucs2] >= 1
    assert wide.form_counts[ucs4] >= 1
    assert ucs2 not in narrow.form_counts
    assert wide.counts[marker] >= narrow.counts[marker] + 2


def test_regions_skip_kernel_pages() -> None:
    paths = {region.path for region in readable_regions(os.getpid())}
    assert "[heap]" in paths or "" in paths
    assert not paths & {"[vvar]", "[vvar_vclock]", "[vsyscall]"}


def test_dead_process_raises_instead_of_counting_zero() -> None:
    proc = LoggedProcess([sys.executable, "-c", "pass"])  # nobody reaps it until stop()
    try:
        # A zombie still has /proc/<pid>/mem but no memory behind it.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with open(f"/proc/{proc.pid}/stat", encoding="ascii") as f:
                if f.read().rpartition(")")[2].split()[0] == "Z":
                    break
            time.sleep(0.01)
        else:
            pytest.fail("child did not exit")
        # The kernel refuses the open (ESRCH) or the scan reads nothing: both must raise.
        with pytest.raises((OSError, RuntimeError)):
            count_occurrences(proc.pid, [b"anything"])
    finally:
        proc.stop()


def test_scan_joins_only_touching_regions_read_to_the_end() -> None:
    marker = b"0123456789abcdef"
    memory = bytearray(b"." * 400)
    memory[92:100] = marker[:8]  # the first half ends at 100
    for start in (100, 200, 300):
        memory[start : start + 8] = marker[8:]  # the second half at 100, 200 and 300
    unreadable = range(0)

    def read(address: int, size: int) -> bytes:
        if address in unreadable:
            raise OSError("unreadable")
        return bytes(memory[address : address + size])

    def count(*regions: tuple[int, int]) -> tuple[int, int]:
        spans = [Region(start, end, "r--p", "") for start, end in regions]
        report = scan_regions(spans, read, [marker], chunk_bytes=7)
        return report.counts[marker], report.regions_failed

    assert count((0, 100), (100, 120)) == (1, 0)  # touching mappings are one stream
    assert count((0, 100), (300, 320)) == (0, 0)  # no match across a gap
    unreadable = range(100, 200)
    assert count((0, 100), (100, 200), (200, 220)) == (0, 1)  # nor across a failed region


def test_needle_forms() -> None:
    assert needle_forms(b"ab", wide=False) == [b"ab"]
    assert needle_forms(b"ab", wide=True) == [b"ab", b"a\0b\0", b"a\0\0\0b\0\0\0"]
    # Non-ASCII: the UTF-8 input, then CPython's Latin-1, UCS-2 and UCS-4 storage.
    assert needle_forms("é".encode(), wide=True) == [b"\xc3\xa9", b"\xe9", b"\xe9\0", b"\xe9\0\0\0"]
    # Outside the BMP a str is always UCS-4: there is no UCS-2 form.
    assert needle_forms("😀".encode(), wide=True) == ["😀".encode(), b"\x00\xf6\x01\x00"]
    assert needle_forms(b"\xff", wide=True) == [b"\xff"]  # not UTF-8: searched as given
    with pytest.raises(ValueError):
        needle_forms(b"", wide=False)


def _naive_count(data: bytes, needle: bytes) -> int:
    return sum(data.startswith(needle, i) for i in range(len(data)))


def test_overlapping_occurrences_all_count() -> None:
    assert count_in_chunks([b"aaaa"], [b"aa", b"a"]) == {b"aa": 3, b"a": 4}
    assert count_in_chunks([b"aa", b"a", b"a"], [b"aa", b"a"]) == {b"aa": 3, b"a": 4}


def test_marker_across_every_chunk_boundary() -> None:
    needle = b"0123456789abcdef"
    data = b"x" * 7 + needle + b"y" * 5
    for cut in range(len(data) + 1):
        assert count_in_chunks([data[:cut], data[cut:]], [needle]) == {needle: 1}


# A two-letter alphabet makes overlapping and boundary-straddling matches common, and
# needles of different lengths catch a tail that double-counts the shorter ones.
def _ab(min_size: int, max_size: int) -> st.SearchStrategy[bytes]:
    return st.binary(min_size=min_size, max_size=max_size).map(
        lambda b: bytes(b"ab"[x & 1] for x in b)
    )


# Needles whose occurrences can overlap: "aaa" holds "aa" twice.
_SELF_OVERLAPPING = [b"a", b"aa", b"aba", b"abab", b"aaaa", b"babab", b"aabaa"]


@given(
    data=_ab(0, 300),
    needles=st.lists(st.sampled_from(_SELF_OVERLAPPING) | _ab(1, 9), min_size=1, max_size=4),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=12),
)
@example(data=b"abababa", needles=[b"aba", b"a", b"bab"], cuts=[2, 3, 5])
def test_chunked_count_equals_whole_count(
    data: bytes, needles: list[bytes], cuts: list[int]
) -> None:
    bounds = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    chunks = [data[a:b] for a, b in itertools.pairwise(bounds)]
    counts = count_in_chunks(chunks, needles)
    assert counts == {n: _naive_count(data, n) for n in needles}
