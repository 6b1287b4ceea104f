"""The opt-in content audit log: a record per request of a project with `audit_log`,
built as the relay passes bytes, then sealed and written off the event loop.

# Goals
Only projects with an audit log pay anything. For every other project no record object
exists, nothing is queued, and the relay runs the plain usage tap (no per-chunk cost).
The log never delays or fails a response: a record that finds the queue full, or the
disk failing, is dropped and counted in `zrproxy_audit_records_total{project, outcome}`.

# Strategy
The proxy creates an `AuditRecord` once the project is known, gives it the request body,
and runs a `RecordingTap` (the usage tap plus one append per chunk, capped at
`max_record_bytes`) as the relay's tap. When the handler ends the record goes to a bounded
`queue.Queue` with `put_nowait`; one writer thread turns it into a JSON line, seals it to
the project's age recipient (pyrage releases the GIL while encrypting) and writes it
(`zrproxy.auditfiles`). The same thread deletes records past `retention_days` hourly;
the service also does so once before it reports ready.
"""

from __future__ import annotations

import base64
import datetime
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, Literal

import orjson

from zrproxy.auditfiles import SealedFiles, sweep
from zrproxy.config import AuditConfig, Config, ProjectConfig
from zrproxy.metrics import Metrics
from zrproxy.usage import UsageTap

log = logging.getLogger("zrproxy")

RETENTION_HEADER = "ZR-Data-Retention"
RetentionMode = Literal["zero", "audit-log", "metadata-only"]
AuditOutcome = Literal["written", "dropped_queue_full", "dropped_write_error"]
OUTCOMES: tuple[AuditOutcome, ...] = ("written", "dropped_queue_full", "dropped_write_error")
SWEEP_EVERY_S = 3600.0
Clock = Callable[[], datetime.datetime]


def utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def retention_mode(project: ProjectConfig) -> RetentionMode:
    """What the `ZR-Data-Retention` header says about a project's requests."""
    if project.zero_retention:
        return "zero"
    return "audit-log" if project.audit_log is not None else "metadata-only"


class AuditRecord:
    """One request's record: metadata, and both bodies cut at `cap` bytes."""

    __slots__ = (
        "cap",
        "meta",
        "project",
        "request_body",
        "request_bytes",
        "request_id",
        "response_bytes",
        "response_kept",
        "response_parts",
        "time",
    )

    def __init__(self, project: str, request_id: str, cap: int, time: datetime.datetime) -> None:
        self.project = project
        self.request_id = request_id
        self.cap = cap
        self.time = time
        self.request_body: bytes | None = None  # None: the body was never read
        self.request_bytes = 0
        self.response_parts: list[bytes] = []
        self.response_kept = 0
        self.response_bytes = 0
        self.meta: dict[str, Any] = {}

    def request(self, body: bytes) -> None:
        self.request_bytes = len(body)
        self.request_body = body if len(body) <= self.cap else body[: self.cap]

    def response(self, data: bytes) -> None:
        """Bytes about to be sent to the client, in order."""
        self.response_bytes += len(data)
        room = self.cap - self.response_kept
        if room > 0:
            part = data if len(data) <= room else data[:room]
            self.response_parts.append(part)
            self.response_kept += len(part)

    def sent(self, total: int) -> None:
        """Only `total` of the bytes given to `response` reached the client (the last
        write failed): forget the rest."""
        if total >= self.response_bytes:
            return
        self.response_bytes = total
        if self.response_kept > total:
            joined = b"".join(self.response_parts)[:total]
            self.response_parts = [joined]
            self.response_kept = len(joined)

    def to_json(self) -> bytes:
        request = None
        if self.request_body is not None:
            request = _body(self.request_body, self.request_bytes)
        response = _body(b"".join(self.response_parts), self.response_bytes)
        return orjson.dumps(
            {
                "request_id": self.request_id,
                "time": self.time.isoformat().replace("+00:00", "Z"),
                "project": self.project,
                **self.meta,
                "request": request,
                "response": response,
            },
            option=orjson.OPT_APPEND_NEWLINE,
        )

    def clear(self) -> None:
        self.request_body = None
        self.response_parts = []


def _body(kept: bytes, total: int) -> dict[str, Any]:
    truncated = total > len(kept)
    text = _utf8(kept, truncated)
    if text is None:
        return {"base64": base64.b64encode(kept).decode(), "bytes": total, "truncated": truncated}
    return {"text": text, "bytes": total, "truncated": truncated}


def _utf8(data: bytes, truncated: bool) -> str | None:
    # A cut may fall inside a character: drop its first bytes rather than go to base64.
    for cut in range(4 if truncated else 1):
        try:
            return (data[: len(data) - cut] if cut else data).decode()
        except UnicodeDecodeError:
            pass  # the error holds the bytes: it ends here
    return None


class RecordingTap(UsageTap):
    """The usage tap, also appending what it forwards to an audit record."""

    __slots__ = ("_audit",)

    def __init__(self, record: AuditRecord, strip_usage_event: bool = False) -> None:
        super().__init__(strip_usage_event)
        self._audit = record

    def feed(self, data: bytes) -> bytes:
        out = UsageTap.feed(self, data)
        if out:
            self._audit.response(out)
        return out

    def flush(self) -> bytes:
        out = UsageTap.flush(self)
        if out:
            self._audit.response(out)
        return out


_STOP = object()


class AuditLog:
    """The bounded queue and its writer thread, for the projects with an audit log."""

    def __init__(self, audit: AuditConfig, config: Config, metrics: Metrics, clock: Clock) -> None:
        self._config = audit
        self._clock = clock
        projects = [p for p in config.projects if p.audit_log is not None]
        self._retention = {p.name: p.audit_log.retention_days for p in projects if p.audit_log}
        self._files = {
            p.name: SealedFiles(audit.dir, p.name, p.audit_log.recipient, audit.max_file_bytes)
            for p in projects
            if p.audit_log
        }
        self._counters = {
            (name, outcome): metrics.child(metrics.audit_records, name, outcome)
            for name in self._files
            for outcome in OUTCOMES
        }
        self._queue: queue.Queue[AuditRecord | object] = queue.Queue(audit.queue_records)
        self._thread = threading.Thread(target=self._run, name="zrproxy-audit", daemon=True)

    @classmethod
    def from_config(
        cls, config: Config, metrics: Metrics, clock: Clock = utc_now
    ) -> AuditLog | None:
        """The audit log, or None when no project has one."""
        if config.audit is None or not any(p.audit_log for p in config.projects):
            return None
        return cls(config.audit, config, metrics, clock)

    def start(self) -> None:
        self._thread.start()

    def record(self, project: str, request_id: str) -> AuditRecord:
        return AuditRecord(project, request_id, self._config.max_record_bytes, self._clock())

    def submit(self, record: AuditRecord, **meta: Any) -> None:
        """Hand a finished record to the writer, or drop it if the queue is full."""
        record.meta = meta
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            record.clear()
            self._counters[record.project, "dropped_queue_full"].inc()

    def sweep(self) -> None:
        """Delete the records past their project's retention_days."""
        try:
            sweep(self._config.dir, self._retention, self._clock().date())
        except OSError as exc:
            log.warning("audit retention sweep failed (%s)", type(exc).__name__)

    def close(self, timeout_s: float = 10.0) -> None:
        """Write what is queued, then stop the writer (blocks: call it in a thread)."""
        if not self._thread.is_alive():
            return
        try:
            self._queue.put(_STOP, timeout=timeout_s)
        except queue.Full:
            return  # the writer is stuck; it is a daemon thread and dies with us
        self._thread.join(timeout_s)

    def _run(self) -> None:
        # The schedule runs on the monotonic clock; `self._clock` only says which day it is.
        next_sweep = time.monotonic() + SWEEP_EVERY_S
        while True:
            wait = max(0.0, next_sweep - time.monotonic())
            try:
                item = self._queue.get(timeout=wait)
            except queue.Empty:
                item = None
            if item is _STOP:
                return
            if isinstance(item, AuditRecord):
                self._write(item)
                item = None
            if time.monotonic() >= next_sweep:
                self.sweep()
                next_sweep = time.monotonic() + SWEEP_EVERY_S

    def _write(self, record: AuditRecord) -> None:
        plaintext = b""
        try:
            plaintext = record.to_json()
            record.clear()
            self._files[record.project].write(record.request_id, plaintext, record.time)
            outcome: AuditOutcome = "written"
        except OSError:
            outcome = "dropped_write_error"  # its text names a path, never content
        except Exception as exc:  # pyrage.EncryptError or worse: the writer must not die
            log.error("audit record not sealed (%s)", type(exc).__name__)
            outcome = "dropped_write_error"
        record.clear()
        del plaintext
        self._counters[record.project, outcome].inc()
