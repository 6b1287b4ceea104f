"""The audit log on disk: records sealed to a customer's age key, their files, rotation,
retention and deletion.

Never writes plaintext. A record is encrypted in memory (age, X25519, via pyrage) before
its file is created, so the disk only ever holds ciphertext; the proxy holds recipients,
never identities. File and directory names hold metadata only: the project, the UTC day,
the writer's part, a sequence number and the request id.

# Layout
    <dir>/<project>/<YYYY-MM-DD>/<part>/<seq>-<request id>.age
Each `.age` file is one complete age message (one record as a JSON line), so the plain
`age -d -i key.txt FILE` reads it, and one request's record can be found and deleted by
its name without a key. Age messages cannot be appended to one another (the CLI refuses
trailing data), hence one file per record. A writer starts a new part directory at each
UTC day and once its part holds `max_file_bytes` of sealed records; parts carry the
writer's pid, so several worker processes never share one.
"""

from __future__ import annotations

import datetime
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pyrage
from pyrage import x25519

_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")
SUFFIX = ".age"


class SealedFiles:
    """One writer's files for one project (used by one thread only)."""

    def __init__(self, root: str, project: str, recipient: str, max_file_bytes: int) -> None:
        self._project_dir = Path(root) / project
        self._recipients = [x25519.Recipient.from_str(recipient)]
        self._max_file_bytes = max_file_bytes
        self._day = ""
        self._part: Path | None = None
        self._part_bytes = 0
        self._parts = 0
        self._seq = 0

    def write(self, request_id: str, plaintext: bytes, now: datetime.datetime) -> int:
        """Seal `plaintext` and write it as its own file; returns the sealed size.
        Raises OSError when the disk fails (nothing is left behind then)."""
        sealed = pyrage.encrypt(plaintext, self._recipients)
        day = now.date().isoformat()
        if (
            self._part is None
            or day != self._day
            or (self._part_bytes and self._part_bytes + len(sealed) > self._max_file_bytes)
        ):
            self._new_part(day, now)
        try:
            self._write_in_part(request_id, sealed)
        except FileNotFoundError:
            # Our part was deleted under us (`zrproxy audit delete`): one more try.
            self._new_part(day, now)
            self._write_in_part(request_id, sealed)
        return len(sealed)

    def _write_in_part(self, request_id: str, sealed: bytes) -> None:
        assert self._part is not None
        self._seq += 1
        final = self._part / f"{self._seq:06d}-{request_id}{SUFFIX}"
        temporary = self._part / f".{self._seq:06d}.tmp"
        try:
            _write_new(temporary, sealed)
            os.rename(temporary, final)  # a reader never sees half a record
        except OSError:
            self._part = None  # the directory may be gone: start afresh next time
            try:
                temporary.unlink(missing_ok=True)
            except OSError:
                pass
            raise
        self._part_bytes += len(sealed)

    def _new_part(self, day: str, now: datetime.datetime) -> None:
        self._parts += 1
        name = f"{now:%H%M%S}-{os.getpid()}-{self._parts}"
        part = self._project_dir / day / name
        part.mkdir(mode=0o700, parents=True, exist_ok=False)
        self._day, self._part, self._part_bytes, self._seq = day, part, 0, 0


def _write_new(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


# --- retention and deletion (the proxy's sweeper and `zrproxy audit delete`) -----------


def _days(project_dir: Path) -> Iterator[tuple[datetime.date, Path]]:
    try:
        entries = sorted(project_dir.iterdir())
    except FileNotFoundError:
        return
    for entry in entries:
        if _DAY.fullmatch(entry.name) and entry.is_dir():
            try:
                yield datetime.date.fromisoformat(entry.name), entry
            except ValueError:
                continue


def record_files(root: str, project: str) -> list[Path]:
    """Every sealed record of a project, oldest first (by day, part and sequence)."""
    found: list[Path] = []
    for _day, day_dir in _days(Path(root) / project):
        found += sorted(day_dir.glob(f"*/*{SUFFIX}"))
    return found


def delete_before(root: str, project: str, before: datetime.date) -> int:
    """Remove every record written on a UTC day before `before`; returns how many."""
    removed = 0
    for day, day_dir in _days(Path(root) / project):
        if day < before:
            removed += sum(1 for _ in day_dir.glob(f"*/*{SUFFIX}"))
            shutil.rmtree(day_dir, ignore_errors=True)  # another worker may sweep too
    return removed


def delete_request(root: str, project: str, request_id: str) -> int:
    """Remove the records of one request id (a client may reuse one); returns how many."""
    removed = 0
    for path in record_files(root, project):
        if path.name.split("-", 1)[1] == request_id + SUFFIX:
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def sweep(root: str, retention_days: dict[str, int], today: datetime.date) -> int:
    """Delete the records older than each project's `retention_days`: a record written
    on day D goes once D is more than that many days before `today` (UTC)."""
    removed = 0
    for project, days in retention_days.items():
        removed += delete_before(root, project, today - datetime.timedelta(days=days))
    return removed


# --- reading (`zrproxy audit export`, with the customer's identity) --------------------


def read_identities(path: str) -> list[x25519.Identity]:
    """The X25519 identities in an age identity file (as `age-keygen` writes it)."""
    text = Path(path).read_text()
    return [
        x25519.Identity.from_str(line.strip())
        for line in text.splitlines()
        if line.strip().startswith("AGE-SECRET-KEY-1")
    ]


def open_record(path: Path, identities: list[x25519.Identity]) -> bytes:
    """The plaintext of one sealed record."""
    return pyrage.decrypt(path.read_bytes(), identities)
