"""The closed sets that name how a request ended and how an upstream attempt failed.

Names only: no content, no behaviour. Metric label values for failures come from here.
"""

from __future__ import annotations

import enum
from typing import Literal, get_args

# How one upstream attempt failed. "protocol": the upstream's bytes broke HTTP framing
# (or framing we refuse, such as a body delimited by closing the connection).
# "auth": it refused our provider key (401/403). "tls": its certificate or handshake.
# "not_found": its "unknown URL" 404, i.e. the endpoint's path is not on that server (a
# wrong base_url), told apart from its "no such model" 404 (which goes to the client).
FailureKind = Literal[
    "connect",
    "timeout",
    "status_429",
    "status_5xx",
    "reset",
    "protocol",
    "auth",
    "tls",
    "not_found",
]
FAILURE_KINDS: tuple[FailureKind, ...] = get_args(FailureKind)


class Outcome(enum.Enum):
    """How a proxied request ended; decided once, by the request's handler."""

    COMPLETED = "completed"
    CLIENT_GONE = "client_gone"  # the client closed its connection
    CLIENT_STALLED = "client_stalled"  # the client stopped reading for send_timeout_s
    UPSTREAM_FAILED_BEFORE_FIRST_BYTE = "upstream_failed_before_first_byte"
    UPSTREAM_FAILED_AFTER_FIRST_BYTE = "upstream_failed_after_first_byte"
    DEADLINE = "deadline"  # total_timeout_s
    DRAIN = "drain"  # the drain deadline ended it
    REJECTED = "rejected"  # answered with an error by the proxy itself
