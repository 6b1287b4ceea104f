"""The config's shape: frozen slotted dataclasses, one per table, with every key's type
and default.

Holds values only: parsing and validation live in `zrproxy.config` (and the config_*
modules it is built from); nothing here reads a file or the environment.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from zrproxy.dialects import KIND_DIALECT, KIND_ENDPOINTS, Dialect, Kind

# Where an upstream's request_overrides go unless it names its own override_endpoints:
# the generation endpoints, which take fields such as `store` and `metadata`. Embeddings,
# moderations and completions reject `store`; Anthropic rejects unknown fields anywhere.
OVERRIDE_ENDPOINTS: Mapping[Kind, tuple[str, ...]] = {
    "openai": ("/v1/chat/completions", "/v1/responses"),
    "anthropic": ("/v1/messages",),
    "azure_openai": ("/v1/chat/completions",),
}


LogFormat = Literal["text", "json"]


LOG_FORMATS: tuple[LogFormat, ...] = ("text", "json")


Allocator = Literal["malloc", "pymalloc"]


ALLOCATORS: tuple[Allocator, ...] = ("malloc", "pymalloc")


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class ServerConfig:
    listen: Address = Address("127.0.0.1", 8080)
    admin_listen: Address = Address("127.0.0.1", 9090)
    max_body_bytes: int = 10 * 1024 * 1024
    connect_timeout_s: float = 5.0
    first_byte_timeout_s: float = 60.0
    idle_timeout_s: float = 60.0
    total_timeout_s: float = 600.0
    drain_timeout_s: float = 30.0
    keepalive_timeout_s: float = 75.0
    # A client that reads nothing for this long while we have bytes for it is closed.
    send_timeout_s: float = 30.0
    mlock: bool = False
    scrub_memory: bool = False
    # Small objects on glibc's malloc (PYTHONMALLOC=malloc, set by a re-exec at start):
    # pymalloc keeps a 1 MiB arena while any block in it lives, so after a burst of
    # streams a few survivors in C free lists held ~80 MiB; malloc gives it back.
    allocator: Allocator = "malloc"
    workers: int = 1
    log_format: LogFormat = "text"
    # An HTTP forward proxy every upstream connection goes through (CONNECT), as
    # "http://HOST:PORT"; an upstream's own egress_proxy wins. None: connect directly.
    egress_proxy: str | None = None
    # The environment variable holding "USER:PASSWORD" for egress_proxy (never the file),
    # and its value, resolved at load and never printed (repr=False).
    egress_proxy_auth_env: str | None = None
    egress_proxy_auth: str | None = field(default=None, repr=False)
    # Admission and memory. The defaults fit a 512 MiB pod (the shipped manifest):
    #   ~64 MiB the process itself
    # + max_in_flight 512 x 512 KiB (the per-stream relay bound, README) = 256 MiB
    # + max_buffered_body_bytes                                           =  96 MiB
    # + max_connections 4096 x 16 KiB (socket objects, parser, buffers)   =  64 MiB
    # = 480 MiB. With --workers N each process gets 1/N of each (limits.share).
    max_connections: int = 4096
    max_in_flight: int = 512
    max_streams: int = 512
    max_buffered_body_bytes: int = 96 * 1024 * 1024
    body_timeout_s: float = 60.0
    # HTTP input limits (431 / 414, connection closed).
    header_timeout_s: float = 10.0
    max_request_line_bytes: int = 8190
    max_header_field_bytes: int = 8190
    max_header_fields: int = 100
    max_header_bytes: int = 32 * 1024
    # One upstream SSE event (the bytes up to its blank line) larger than this breaks the
    # stream as the upstream's protocol error (zrproxy.sse). Nothing is buffered for it:
    # it bounds what a client's SDK must hold for one event, not our memory.
    max_event_bytes: int = 16 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    # Per-project counters shared by every worker and replica; None: per process. It may
    # carry a password, so it is never printed (repr=False).
    redis_url: str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    name: str
    kind: Kind
    base_url: str
    api_key_env: str | None = None
    # Resolved from the environment at load time; never printed (repr=False).
    api_key: str | None = field(default=None, repr=False)
    region: str | None = None
    request_overrides: Mapping[str, Any] = field(default_factory=dict)
    # Merged into every request sent here, winning over the client's headers.
    header_overrides: Mapping[str, str] = field(default_factory=dict)
    # The provider contract says it keeps nothing (an account agreement). Unknown means
    # it retains: only upstreams with this set may serve zero-retention projects.
    zero_data_retention: bool = False
    # The endpoints request_overrides go into (default: OVERRIDE_ENDPOINTS[kind]).
    override_endpoints: tuple[str, ...] = ()
    # Open connections to this upstream at most; a request waits for a free one at most
    # pool_timeout_s, then fails over like a refused connection.
    max_connections: int = 1024
    pool_timeout_s: float = 5.0
    # TLS to an https upstream: verification is always on; these add a private CA and a
    # client certificate (mTLS to private model servers). Paths, checked readable at load.
    ca_file: str | None = None
    client_cert_file: str | None = None
    client_key_file: str | None = None
    # This upstream's forward proxy ("http://HOST:PORT"), over [server] egress_proxy, and
    # the environment variable with its "USER:PASSWORD" (resolved, never printed).
    egress_proxy: str | None = None
    egress_proxy_auth_env: str | None = None
    egress_proxy_auth: str | None = field(default=None, repr=False)
    # Kind azure_openai only: the api-version query parameter every request carries (the
    # only query string sent upstream), and model id -> deployment name; a model not
    # listed goes to the deployment named like the model.
    api_version: str | None = None
    deployments: Mapping[str, str] = field(default_factory=dict)

    @property
    def dialect(self) -> Dialect:
        """The API style this upstream speaks."""
        return KIND_DIALECT[self.kind]

    @property
    def endpoints(self) -> frozenset[str]:
        """The client endpoints this upstream serves (its kind's)."""
        return KIND_ENDPOINTS[self.kind]

    def overrides_for(self, path: str) -> Mapping[str, Any]:
        """The request_overrides for a request to `path` (none where they don't apply)."""
        return self.request_overrides if path in self.override_endpoints else {}


@dataclass(frozen=True, slots=True)
class RouteConfig:
    name: str
    model: str
    upstreams: tuple[str, ...]
    upstream_model: str | None = None
    # Concrete model ids this route serves, for GET /v1/models (a glob lists nothing).
    models: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class AuditLogConfig:
    """A project's opt-in content audit log, sealed to the customer's age key."""

    recipient: str  # an age X25519 recipient, "age1..."; the proxy never holds the identity
    retention_days: int = 30


@dataclass(frozen=True, slots=True)
class ProjectConfig:
    name: str
    key_sha256: tuple[bytes, ...]
    zero_retention: bool = True
    models: tuple[str, ...] | None = None
    regions: tuple[str, ...] | None = None
    audit_log: AuditLogConfig | None = None
    # Admission limits for the whole service (None: unlimited); see zrproxy/limits.py.
    max_concurrent: int | None = None
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None


@dataclass(frozen=True, slots=True)
class AuditConfig:
    """Where and how sealed audit records are written (`[audit]`)."""

    dir: str
    max_file_bytes: int = 64 * 1024 * 1024
    max_record_bytes: int = 1024 * 1024
    queue_records: int = 1000


@dataclass(frozen=True, slots=True)
class SubprocessorConfig:
    """One entry of the published subprocessor register."""

    name: str
    purpose: str
    location: str
    hosts: tuple[str, ...]
    since: datetime.date  # announced before this day, used from it on


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig
    upstreams: tuple[UpstreamConfig, ...]
    routes: tuple[RouteConfig, ...]
    projects: tuple[ProjectConfig, ...]
    subprocessors: tuple[SubprocessorConfig, ...] = ()
    audit: AuditConfig | None = None
    limits: LimitsConfig = LimitsConfig()

    def upstream(self, name: str) -> UpstreamConfig:
        return next(u for u in self.upstreams if u.name == name)
