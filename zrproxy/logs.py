"""How log lines look (`[server] log_format`: text or JSON lines) and which process speaks.

Owns the root logger's handler. Every line carries the pid and the worker number (0 for
the parent or a single process, 1..N for `--workers N`). Adds only fixed fields: never
request data, and never an exception's text or traceback (they can quote content), only
the exception's type.
"""

from __future__ import annotations

import json
import logging
import sys
import time

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [pid %(process)d worker %(worker)d]: %(message)s"
# The fields of every JSON line, in this order; "exception" is added when a record has one.
JSON_FIELDS = ("time", "level", "logger", "message", "pid", "worker")


class _Worker(logging.Filter):
    """Stamps each record with this process's worker number."""

    def __init__(self, worker: int) -> None:
        super().__init__()
        self.worker = worker

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self.worker
        return True


class _TextFormatter(logging.Formatter):
    def formatException(self, ei: object) -> str:
        return _exception_type(ei)

    def formatStack(self, stack_info: str) -> str:
        return ""


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
            "worker": getattr(record, "worker", 0),
        }
        if record.exc_info:
            line["exception"] = _exception_type(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def _exception_type(ei: object) -> str:
    kind = ei[0] if isinstance(ei, tuple) and ei else None
    return f"exception: {kind.__name__}" if isinstance(kind, type) else "exception"


_installed: list[logging.Handler] = []


def setup(log_format: str = "text", worker: int = 0) -> None:
    """Send INFO and above to stderr as "json" lines or "text", replacing our earlier setup.

    Like `logging.basicConfig`, leaves a root logger alone that someone else configured
    (pytest's capture, an embedding program).
    """
    root = logging.getLogger()
    if any(h not in _installed for h in root.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if log_format == "json" else _TextFormatter(TEXT_FORMAT))
    handler.addFilter(_Worker(worker))
    while _installed:
        root.removeHandler(_installed.pop())
    _installed.append(handler)
    root.addHandler(handler)
    root.setLevel(logging.INFO)
